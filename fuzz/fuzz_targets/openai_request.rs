//! The OpenAI chat-completions parser of `internvl-chat serve`: any body gives a checked
//! request or a 4xx error with a message, never a panic.
#![no_main]
use internvl_chat::sampling::SamplingParams;
use internvl_chat::serve::openai::parse_chat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_chat(data, &SamplingParams::default()) {
        Ok(chat) => {
            // what the server derives from a request before the engine sees it
            let _ = chat.params.validate();
            let history = chat.history.iter().flat_map(|(u, _)| &u.images);
            for image in chat.question.images.iter().chain(history) {
                assert!(
                    !image.at.is_empty(),
                    "a picture says where it is in the request"
                );
            }
        }
        Err(e) => {
            assert!((400..500).contains(&e.status), "{} {}", e.status, e.message);
            assert!(!e.message.is_empty());
        }
    }
});
