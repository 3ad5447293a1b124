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
/// which the test types command lines, with XDG folders under `home`. The keys, screen and
/// waiting are [`tmux::Tmux`]'s.
pub struct Shell {
    tmux: tmux::Tmux,
    pub home: PathBuf,
}

/// What the test shell prints as its prompt.
pub const PROMPT: &str = "ivl-sh$ ";

impl std::ops::Deref for Shell {
    type Target = tmux::Tmux;
    fn deref(&self) -> &tmux::Tmux {
        &self.tmux
    }
}

impl Shell {
    pub fn start(name: &str, home: &Path) -> Self {
        let shell = format!(
            "env -i PATH=/usr/bin:/bin TERM=xterm-256color HOME={h} XDG_DATA_HOME={h}/data \
             XDG_CONFIG_HOME={h}/config XDG_STATE_HOME={h}/state PS1='{PROMPT}' \
             bash --norc --noprofile -i",
            h = home.display()
        );
        let s = Self {
            tmux: tmux::Tmux::start_cmd(name, &shell),
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

    /// The pid of the program running in the shell (the shell's child), once there is one.
    pub fn program_pid(&self) -> u32 {
        let shell = self.pane_pid();
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

/// Resident memory of this process, in bytes.
pub fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
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
