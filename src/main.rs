//! Entry point: parse flags, run, and turn errors into one line and an exit code.
use clap::Parser;
use internvl_chat::cli::Cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match internvl_chat::run::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // one line: the context chain joined, libtorch backtraces cut
            let msg = e
                .chain()
                .map(|c| c.to_string().lines().next().unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("internvl-chat: error: {msg}");
            ExitCode::from(1)
        }
    }
}
