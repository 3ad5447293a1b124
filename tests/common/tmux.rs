//! The real binary in a tmux session: keys in, screen text out.
//! (Each test binary uses part of these helpers.)
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Tmux {
    pub name: String,
}

impl Tmux {
    pub fn start(name: &str, home: &Path, args: &[String]) -> Self {
        Self::start_cmd(name, &chat_command(home, "", args))
    }

    /// Runs `cmd` (a shell command line) in a new detached 110x32 session.
    pub fn start_cmd(name: &str, cmd: &str) -> Self {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", name])
            .output();
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "110",
                "-y",
                "32",
                cmd,
            ])
            .status()
            .expect("tmux is installed by scripts/setup.sh");
        assert!(ok.success());
        Self { name: name.into() }
    }

    pub fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", &self.name];
        a.extend(keys);
        assert!(Command::new("tmux").args(&a).status().unwrap().success());
    }

    /// Literal text (no key names).
    pub fn text(&self, text: &str) {
        assert!(Command::new("tmux")
            .args(["send-keys", "-t", &self.name, "-l", text])
            .status()
            .unwrap()
            .success());
    }

    /// Raw bytes as the terminal would deliver them.
    pub fn bytes(&self, bytes: &[u8]) {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut a = vec!["send-keys", "-t", &self.name, "-H"];
        a.extend(hex.iter().map(String::as_str));
        assert!(Command::new("tmux").args(&a).status().unwrap().success());
    }

    /// Pastes `text` through a tmux buffer, bracketed as a terminal pastes.
    pub fn paste(&self, text: &str) {
        let buf = format!("{}-buf", self.name);
        // through a file: tmux refuses long command lines
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        assert!(Command::new("tmux")
            .args(["load-buffer", "-b", &buf, file.path().to_str().unwrap()])
            .status()
            .unwrap()
            .success());
        assert!(Command::new("tmux")
            .args(["paste-buffer", "-p", "-d", "-b", &buf, "-t", &self.name])
            .status()
            .unwrap()
            .success());
    }

    pub fn resize(&self, cols: u16, rows: u16) {
        assert!(Command::new("tmux")
            .args([
                "resize-window",
                "-t",
                &self.name,
                "-x",
                &cols.to_string(),
                "-y",
                &rows.to_string(),
            ])
            .status()
            .unwrap()
            .success());
    }

    /// Whether the pane shows the alternate screen (the chat owns the terminal).
    pub fn alternate_screen(&self) -> bool {
        let o = Command::new("tmux")
            .args(["display-message", "-p", "-t", &self.name, "#{alternate_on}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim() == "1"
    }

    pub fn screen(&self) -> String {
        let o = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Waits until `pred` holds for the screen; panics with the screen after `secs`.
    pub fn wait(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            if t.elapsed() > Duration::from_secs(secs) {
                panic!("timed out waiting for {what}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pane_pid(&self) -> u32 {
        let o = Command::new("tmux")
            .args(["display-message", "-p", "-t", &self.name, "#{pane_pid}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    }

    pub fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .output();
    }
}

/// The status line's "answering, N tokens" while tokens stream.
pub fn streamed(screen: &str) -> usize {
    screen
        .split("answering, ")
        .nth(1)
        .and_then(|s| s.split(" tokens").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The chat with its folders under `home` and `env` (`VAR=value ...`) in its environment.
pub fn chat_command(home: &Path, env: &str, args: &[String]) -> String {
    let bin = env!("CARGO_BIN_EXE_internvl-chat");
    format!(
        "env XDG_DATA_HOME={h}/data XDG_CONFIG_HOME={h}/config XDG_STATE_HOME={h}/state {env} \
         {bin} {}",
        args.join(" "),
        h = home.display()
    )
}
