//! Entry point: parse flags, run, and turn errors into one line and an exit code.
use clap::Parser;
use internvl_chat::cli::Cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match internvl_chat::run::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // one line: the context chain joined (causes already quoted by their parent left
            // out), libtorch backtraces cut
            let mut msg = String::new();
            for c in e.chain() {
                let s = c.to_string();
                let s = s.lines().next().unwrap_or("");
                if msg.contains(s) {
                    continue;
                }
                if !msg.is_empty() {
                    msg.push_str(": ");
                }
                msg.push_str(s);
            }
            eprintln!("internvl-chat: error: {msg}");
            ExitCode::from(1)
        }
    }
}
