//! internvl-chat: InternVL 2.5, 3 and 3.5 vision-language models in the terminal.
pub mod app;
pub mod batch;
pub mod bench;
pub mod cli;
pub mod device_map;
pub mod engine;
pub mod hub;
pub mod logging;
pub mod model;
pub mod plan;
pub mod preprocess;
pub mod prompt;
pub mod remote;
pub mod run;
pub mod sampling;
pub mod serve;
pub mod testutil;
