//! The real binary in tmux against tiny-qwen2: attach an image, ask, see tokens stream, cancel,
//! ask again, quit, relaunch and load the session.
mod common;

use common::tmux::{chat_command, streamed, Tmux};
use internvl_chat::testutil::fixture;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn attach_ask_stream_cancel_ask_quit_and_reload() {
    let home: PathBuf = std::env::temp_dir().join(format!("ivl-tui-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let model = fixture("models/tiny-qwen2").display().to_string();
    let image = fixture("media/images/image1.jpg").display().to_string();
    let args = vec![
        "--model".to_string(),
        model.clone(),
        "--device".into(),
        "cpu".into(),
        "--dtype".into(),
        "f32".into(),
        "--max-new-tokens".into(),
        "30000".into(),
        "--min-new-tokens".into(),
        "30000".into(),
    ];
    let t = Tmux::start("ivl-e2e", &home, &args);
    t.wait("the model to load", 60, |s| s.contains("ready"));
    t.text(&format!("/image {image} 2"));
    t.keys(&["Enter"]);
    t.wait("the staged image", 30, |s| {
        s.contains("image1.jpg") && s.contains("256 tokens")
    });
    t.text("Describe the image.");
    t.keys(&["Enter"]);
    // tokens stream: the answer grows between two looks
    let first = t.wait("tokens", 60, |s| streamed(s) > 5);
    t.wait("more tokens", 60, |s| streamed(s) > streamed(&first) + 5);
    t.keys(&["Escape"]);
    let stopped = t.wait("the cancel", 30, |s| {
        s.contains("stopped") && s.contains("ready")
    });
    assert_eq!(streamed(&stopped), 0, "no longer answering");
    // ask again (short answers now)
    t.text("/set min_new_tokens 0");
    t.keys(&["Enter"]);
    t.text("/set max_new_tokens 8");
    t.keys(&["Enter"]);
    t.text("And the colours?");
    t.keys(&["Enter"]);
    let s = t.wait("the second answer", 60, |s| {
        s.contains("And the colours?")
            && s.matches("first token after").count() >= 2
            && s.contains("ready")
    });
    assert!(
        s.contains("stopped"),
        "first answer still marked stopped:\n{s}"
    );
    t.text("/save e2e");
    t.keys(&["Enter"]);
    t.wait("the save", 10, |s| s.contains("e2e"));
    quit(&t);
    drop(t);
    let saved = home.join("data/internvl-chat/sessions/e2e.json");
    let text =
        std::fs::read_to_string(&saved).unwrap_or_else(|e| panic!("{}: {e}", saved.display()));
    assert!(text.contains("And the colours?") && text.contains("image1.jpg"));

    // relaunch and load the session: the transcript comes back and the model sees it
    let t = Tmux::start("ivl-e2e2", &home, &args[..8]);
    t.wait("the model to load", 60, |s| s.contains("ready"));
    t.text("/load e2e");
    t.keys(&["Enter"]);
    let s = t.wait("the loaded transcript", 20, |s| {
        s.contains("And the colours?") && s.contains("Describe the image.")
    });
    assert!(s.contains("image1.jpg"));
    t.text("/set max_new_tokens 4");
    t.keys(&["Enter"]);
    let answered = |s: &str| s.matches("first token after").count();
    let before = answered(&t.screen());
    t.text("One more?");
    t.keys(&["Enter"]);
    t.wait("an answer after loading", 60, |s| {
        s.contains("One more?") && answered(s) > before && s.contains("ready")
    });
    // closing the terminal (SIGHUP) ends the program, answer or not
    t.keys(&["Enter"]);
    let pid = t.pane_pid();
    drop(t);
    let gone = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            gone.elapsed() < Duration::from_secs(10),
            "process {pid} outlived its terminal"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&home);
}

/// Every byte the program writes, recorded by tmux (`pipe-pane`) from before its first byte:
/// the command waits for a line on its input, sent once the pipe is open.
struct Recorded {
    tmux: Tmux,
    file: PathBuf,
}

impl Recorded {
    fn start(name: &str, home: &Path, env: &str, args: &[String]) -> Self {
        let file = home.join(format!("{name}.out"));
        let _ = std::fs::remove_file(&file);
        let cmd = format!("sh -c 'read go; exec {}'", chat_command(home, env, args));
        let tmux = Tmux::start_cmd(name, &cmd);
        assert!(Command::new("tmux")
            .args([
                "pipe-pane",
                "-o",
                "-t",
                name,
                &format!("cat >> {}", file.display()),
            ])
            .status()
            .unwrap()
            .success());
        // pipe-pane starts its command in the background: wait until the file exists
        let t = Instant::now();
        while !file.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "pipe-pane did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        tmux.keys(&["Enter"]);
        Self { tmux, file }
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.file).unwrap_or_default()
    }

    /// Waits until the output holds `n` occurrences of `what`; panics after `secs`.
    fn wait_for(&self, what: &str, n: usize, secs: u64) -> String {
        let t = Instant::now();
        loop {
            let out = String::from_utf8_lossy(&self.bytes()).into_owned();
            if out.matches(what).count() >= n {
                return out;
            }
            if t.elapsed() > Duration::from_secs(secs) {
                panic!(
                    "timed out waiting for {n} x {what:?} in the output; screen:\n{}",
                    self.tmux.screen()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// kitty's graphics commands inside tmux's passthrough: `ESC P tmux; ESC ESC _G`.
const TMUX_KITTY: &str = "\x1bPtmux;\x1b\x1b_G";
/// The end of one: the command's ST with its escape doubled, then the passthrough's ST.
const TMUX_KITTY_END: &str = "\x1b\x1b\\\x1b\\";

/// The keys and the base64 payload of kitty image `id`'s transmission, chunks joined.
fn kitty_transmission(out: &str, id: &str) -> (String, String) {
    let first = format!("{TMUX_KITTY}q=2,i={id},a=T,");
    let start = out.find(&first).expect("the image is transmitted");
    let mut keys = String::new();
    let mut payload = String::new();
    for cmd in out[start..].split(TMUX_KITTY).skip(1) {
        let body = cmd.split(TMUX_KITTY_END).next().unwrap();
        let (k, data) = body.split_once(';').unwrap_or((body, ""));
        if keys.is_empty() {
            keys = k.to_string();
        } else if !k.starts_with("q=2,m=") {
            break;
        }
        payload.push_str(data);
        if k.ends_with("m=0") {
            break;
        }
    }
    (keys, payload)
}

#[test]
fn forced_kitty_graphics_are_written_and_tmux_alone_gets_half_blocks() {
    use base64::Engine;
    let home: PathBuf = std::env::temp_dir().join(format!("ivl-gfx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let model = fixture("models/tiny-qwen2").display().to_string();
    let image = fixture("media/images/image1.jpg").display().to_string();
    let args = |graphics: &str| {
        vec![
            "--model".to_string(),
            model.clone(),
            "--device".into(),
            "cpu".into(),
            "--image".into(),
            image.clone(),
            "--graphics".into(),
            graphics.into(),
        ]
    };

    // kitty forced under a fake kitty TERM inside tmux: written through tmux's passthrough
    // (which this tmux does not pass on), every byte recorded
    let r = Recorded::start("ivl-gfx-kitty", &home, "TERM=xterm-kitty", &args("kitty"));
    let out = r.wait_for(&format!("{TMUX_KITTY}q=2,i="), 1, 60);
    let id = out
        .split(&format!("{TMUX_KITTY}q=2,i="))
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("an image id")
        .to_string();
    // the frame that transmits it also places it: unicode placeholders in its cells, the first
    // of each row followed by diacritics (row, column, id)
    let out = r.wait_for("\u{10EEEE}", 1, 30);
    let frame_end = out[out.find(TMUX_KITTY).unwrap()..]
        .find("\x1b[?2026l")
        .expect("the frame ends");
    let frame = &out[..out.find(TMUX_KITTY).unwrap() + frame_end];
    let cells = frame.matches('\u{10EEEE}').count();
    // a row's first cell: the placeholder, the row's diacritic, column 0's (U+0305), the id's
    let chars: Vec<char> = frame.chars().collect();
    let rows = chars
        .windows(3)
        .filter(|w| w[0] == '\u{10EEEE}' && w[2] == '\u{305}')
        .count();
    assert!(
        rows >= 5 && cells.is_multiple_of(rows),
        "{cells} cells in {rows} rows"
    );
    let cols = (cells / rows) as u32;
    assert!(cols >= 20, "{cols} columns");
    // the payload: RGBA covering exactly those cells (at the cell size tmux reports)
    let (keys, payload) = kitty_transmission(&out, &id);
    let num = |k: &str| -> u32 {
        keys.split(',')
            .find_map(|kv| kv.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {keys}"))
    };
    assert!(keys.contains(",U=1,f=32,t=d,"), "{keys}");
    let (w, h) = (num("s="), num("v="));
    let rgba = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .expect("base64");
    assert_eq!(rgba.len() as u32, w * h * 4, "{keys}");
    assert!(
        w % cols == 0 && h % rows as u32 == 0 && w / cols >= 2,
        "{w}x{h} in {cols}x{rows} cells"
    );
    let opaque = rgba.chunks(4).filter(|p| p[3] == 255).count();
    assert!(opaque > (w * h / 2) as usize, "{opaque} of {w}x{h}");
    // the picture's cells are no half blocks on screen
    let screen = r
        .tmux
        .wait("the staged image", 30, |s| s.contains("image1.jpg"));
    assert!(!screen.contains('▀'), "{screen}");
    // the help overlay covers it; Esc brings it back, placed without a new copy
    let before = r.wait_for("\u{10EEEE}", 1, 5).matches('\u{10EEEE}').count();
    r.tmux.keys(&["F1"]);
    r.tmux.wait("the help", 30, |s| s.contains("Keys"));
    r.tmux.keys(&["Escape"]);
    let out = r.wait_for("\u{10EEEE}", before + cells, 30);
    assert_eq!(out.matches(",a=T,").count(), 1, "transmitted once");
    // leaving frees it
    r.tmux.text("/quit");
    r.tmux.keys(&["Enter"]);
    r.wait_for(
        &format!("{TMUX_KITTY}a=d,d=I,i={id},q=2{TMUX_KITTY_END}"),
        1,
        30,
    );
    drop(r);

    // auto inside tmux, even with kitty's variables leaking in: half blocks, no query
    let r = Recorded::start(
        "ivl-gfx-auto",
        &home,
        "TERM=xterm-kitty KITTY_WINDOW_ID=1",
        &args("auto"),
    );
    r.tmux.wait("half blocks", 60, |s| {
        s.contains("image1.jpg") && s.contains('▀')
    });
    r.tmux.text("/quit");
    r.tmux.keys(&["Enter"]);
    let t = Instant::now();
    while r.tmux.alive() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = r.bytes();
    assert!(out.len() > 1000, "the output was recorded");
    assert!(
        !String::from_utf8_lossy(&out).contains("\x1b_G"),
        "no kitty command or query in tmux"
    );
    drop(r);
    let _ = std::fs::remove_dir_all(&home);
}

/// The chat on a transformers-native (-hf) checkpoint: a picture staged and a question answered
/// through the checkpoint's own template and processor, then /quit.
#[test]
fn the_chat_answers_on_an_hf_checkpoint() {
    let home: PathBuf = std::env::temp_dir().join(format!("ivl-tui-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let model = fixture("models/tiny-qwen2-hf").display().to_string();
    let image = fixture("media/images/image1.jpg").display().to_string();
    let args: Vec<String> = [
        "--model",
        &model,
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t = Tmux::start("ivl-hfchat", &home, &args);
    t.wait("the model to load", 60, |s| s.contains("ready"));
    t.text(&format!("/image {image} 2"));
    t.keys(&["Enter"]);
    t.wait("the staged image", 30, |s| {
        s.contains("image1.jpg") && s.contains("tokens")
    });
    t.text("Describe the image.");
    t.keys(&["Enter"]);
    t.wait("the answer", 60, |s| {
        s.contains("Describe the image.") && s.contains("first token after") && s.contains("ready")
    });
    quit(&t);
}

/// `/quit`, and the program exits within 20 s.
fn quit(t: &Tmux) {
    t.text("/quit");
    t.keys(&["Enter"]);
    let start = Instant::now();
    while t.alive() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!t.alive(), "/quit exits");
}
