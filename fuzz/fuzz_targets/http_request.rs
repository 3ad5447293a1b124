//! The HTTP request head parser of `internvl-chat serve`: any bytes give a request or an error
//! that says what is wrong, never a panic; a body length is never over the limit it was given.
#![no_main]
use internvl_chat::serve::http::parse_head;
use libfuzzer_sys::fuzz_target;

const MAX_BODY: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    match parse_head(data) {
        Ok(req) => {
            // what the server asks of a head before it reads a body or routes the request
            let _ = req.keep_alive();
            let _ = req.header("authorization");
            assert!(!req.path.contains(['?', '#']), "{:?}", req.path);
            match req.body_length(MAX_BODY) {
                Ok(n) => assert!(n <= MAX_BODY),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
