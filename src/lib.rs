//! internvl-chat: InternVL 2.5 vision-language models in the terminal.
pub mod engine;
pub mod model;
pub mod sampling;
pub mod testutil;
