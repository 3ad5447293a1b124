//! Helpers shared by the integration tests that run the real binary: one-shot runs with their
//! output and exit code, and a tmux harness that drives the full-screen chat from a shell.
#![allow(dead_code)] // each test file uses its own part
pub mod tmux;
use internvl_chat::testutil::fixture;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_internvl-chat"))
}

pub fn model(name: &str) -> String {
    fixture(&format!("models/{name}")).display().to_string()
}

pub fn media(rel: &str) -> String {
    fixture(&format!("media/{rel}")).display().to_string()
}

/// Runs the binary with `args`, `stdin` piped in (or none).
pub fn run(args: &[&str], stdin: Option<&str>) -> Output {
    run_cmd(bin().args(args), stdin)
}

pub fn run_cmd(c: &mut Command, stdin: Option<&str>) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = c.spawn().unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// A failure: exit code 1 and exactly one line on stderr that says each of `what`.
pub fn assert_one_line_error(o: &Output, what: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("internvl-chat: error: "), "{err}");
    for w in what {
        assert!(err.contains(w), "{err:?} should mention {w:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// `--model M --device cpu --dtype f32 --greedy --max-new-tokens N` then `extra`.
pub fn greedy<'a>(m: &'a str, max_new: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--model",
        m,
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "--greedy",
        "--max-new-tokens",
        max_new,
    ];
    v.extend(extra);
    v
}

/// A tmux session running an interactive shell (job control, a prompt to come back to) in
/// which the test types command lines, with XDG folders under `home`.
pub struct Shell {
    pub name: String,
    pub home: PathBuf,
}

/// What the test shell prints as its prompt.
pub const PROMPT: &str = "ivl-sh$ ";

impl Shell {
    pub fn start(name: &str, home: &Path) -> Self {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", name])
            .output();
        let shell = format!(
            "env -i PATH=/usr/bin:/bin TERM=xterm-256color HOME={h} XDG_DATA_HOME={h}/data \
             XDG_CONFIG_HOME={h}/config XDG_STATE_HOME={h}/state PS1='{PROMPT}' \
             bash --norc --noprofile -i",
            h = home.display()
        );
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
                &shell,
            ])
            .status()
            .expect("tmux is installed by scripts/setup.sh");
        assert!(ok.success());
        let s = Self {
            name: name.into(),
            home: home.into(),
        };
        s.wait("the shell prompt", 20, |s| s.contains(PROMPT.trim_end()));
        s
    }

    /// Types `line` and Enter.
    pub fn line(&self, line: &str) {
        self.text(line);
        self.keys(&["Enter"]);
    }

    /// Starts the chat with `args` in the shell.
    pub fn launch(&self, args: &[String]) {
        let bin = env!("CARGO_BIN_EXE_internvl-chat");
        self.line(&format!("{bin} {}", args.join(" ")));
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
        let file = self.home.join(format!("{buf}.txt"));
        std::fs::write(&file, text).unwrap();
        assert!(Command::new("tmux")
            .args(["load-buffer", "-b", &buf, file.to_str().unwrap()])
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

    pub fn screen(&self) -> String {
        let o = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Whether the pane shows the alternate screen (the chat owns the terminal).
    pub fn alternate_screen(&self) -> bool {
        let o = Command::new("tmux")
            .args(["display-message", "-p", "-t", &self.name, "#{alternate_on}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim() == "1"
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

    /// The pid of the program running in the shell (the shell's child), once there is one.
    pub fn program_pid(&self) -> u32 {
        let o = Command::new("tmux")
            .args(["display-message", "-p", "-t", &self.name, "#{pane_pid}"])
            .output()
            .unwrap();
        let shell: u32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        let t = Instant::now();
        loop {
            let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
                .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                return pid.parse().unwrap();
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no program started in the shell"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, pid: u32, sig: &str) {
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for process `pid` to end.
    pub fn wait_exit(&self, pid: u32, secs: u64) {
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "process {pid} still runs; screen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .output();
    }
}

/// A fresh folder under the system temp dir, removed when dropped.
pub fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ivl-{tag}-"))
        .tempdir()
        .unwrap()
}

/// A copy of fixture model `name` (its files linked) whose config gives the LLM a context window
/// of `context` positions, so a long conversation takes few tokens.
pub fn model_with_context(name: &str, context: usize) -> tempfile::TempDir {
    let src = fixture(&format!("models/{name}"));
    let d = tempdir(&format!("ctx{context}"));
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let to = d.path().join(p.file_name().unwrap());
        if p.file_name().unwrap() == "config.json" {
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            cfg["llm_config"]["max_position_embeddings"] = context.into();
            std::fs::write(to, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        } else {
            std::os::unix::fs::symlink(&p, to).unwrap();
        }
    }
    d
}
