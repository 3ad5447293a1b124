//! Logs go to a file under the state directory (the TUI owns the terminal), or to stderr for
//! the server: `-v` for debug, `-vv` for trace; `RUST_LOG` overrides.
use std::path::PathBuf;

/// `$XDG_STATE_HOME/internvl-chat/internvl-chat.log` (or the data directory where there is no
/// state directory).
pub fn log_path() -> Option<PathBuf> {
    let d = directories::ProjectDirs::from("", "", "internvl-chat")?;
    let dir = d.state_dir().unwrap_or(d.data_local_dir()).to_path_buf();
    Some(dir.join("internvl-chat.log"))
}

/// Starts file logging; silently does nothing when the file cannot be opened.
pub fn init(verbose: u8) {
    let Some(path) = log_path() else { return };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(verbose))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}

/// Logging to stderr, for the server (no terminal UI owns it).
pub fn init_stderr(verbose: u8) {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(verbose))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

fn filter(verbose: u8) -> tracing_subscriber::EnvFilter {
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("internvl_chat={level}")))
}
