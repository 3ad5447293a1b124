//! The JSONL request parser of `internvl-chat batch`: any line gives a request or an error
//! that names what is wrong, never a panic.
#![no_main]
use internvl_chat::batch::parse_line;
use internvl_chat::sampling::SamplingParams;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match parse_line(line) {
        Ok(req) => {
            // everything the batch runner derives from a request before the engine sees it
            let _ = req.params(&SamplingParams::default());
            let _ = req.attachments();
            let _ = req.history();
        }
        Err((_id, msg)) => assert!(!msg.is_empty()),
    }
});
