//! Logs go to a file under the state directory (the TUI owns the terminal): `-v` for debug,
//! `-vv` for trace; `RUST_LOG` overrides.
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
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("internvl_chat={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
}
