//! Entry point: parse flags, run, and turn errors into one line and an exit code.
use clap::Parser;
use internvl_chat::cli::Cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match internvl_chat::cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // one line: the context chain joined, libtorch backtraces cut
            eprintln!(
                "internvl-chat: error: {}",
                internvl_chat::cmd::error_line(&e)
            );
            ExitCode::from(1)
        }
    }
}
