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

/// The base64 payload of kitty image `id`'s transmission, chunks joined.
fn kitty_payload(out: &str, id: &str) -> String {
    let first = format!("\x1b_Ga=t,t=d,f=100,i={id},q=2,m=");
    let start = out.find(&first).expect("the image is transmitted");
    let mut payload = String::new();
    for cmd in out[start..].split("\x1b_G").skip(1) {
        let body = cmd.split("\x1b\\").next().unwrap();
        let (keys, data) = body.split_once(';').unwrap_or((body, ""));
        if !(keys.starts_with("a=t,") || keys.starts_with("m=")) {
            break;
        }
        payload.push_str(data);
        if keys.contains("m=0") {
            break;
        }
    }
    payload
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

    // kitty forced under a fake kitty TERM inside tmux: tmux drops the images, but the bytes
    // the program writes are all recorded
    let r = Recorded::start("ivl-gfx-kitty", &home, "TERM=xterm-kitty", &args("kitty"));
    let out = r.wait_for("\x1b_Ga=p,", 1, 60);
    let id = out
        .split("\x1b_Ga=t,t=d,f=100,i=")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("an image id")
        .to_string();
    let placed = format!("\x1b_Ga=p,i={id},p=1,");
    assert!(out.contains(&placed), "placed by id");
    // placed in a box of cells, the payload a PNG covering exactly those cells (at the cell
    // size tmux reports)
    let keys = out[out.find(&placed).unwrap() + placed.len()..]
        .split("\x1b\\")
        .next()
        .unwrap()
        .to_string();
    let num = |k: &str| -> u32 {
        keys.split(',')
            .find_map(|kv| kv.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {keys}"))
    };
    let (cols, rows) = (num("c="), num("r="));
    assert!(cols >= 20 && rows >= 5, "{keys}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(kitty_payload(&out, &id))
        .expect("base64");
    let img = image::load_from_memory(&png).expect("a PNG").to_rgba8();
    let (w, h) = img.dimensions();
    assert!(
        w % cols == 0 && h % rows == 0 && w / cols >= 2,
        "{w}x{h} in {keys}"
    );
    assert!(img.pixels().filter(|p| p.0[3] == 255).count() > (w * h / 2) as usize);
    // the picture's cells are left blank: no half blocks on screen
    let screen = r
        .tmux
        .wait("the staged image", 30, |s| s.contains("image1.jpg"));
    assert!(!screen.contains('▀'), "{screen}");
    // the help overlay takes the image away (by id), Esc brings it back without a new copy
    r.tmux.keys(&["F1"]);
    r.wait_for(&format!("\x1b_Ga=d,d=i,i={id},"), 1, 30);
    r.tmux.keys(&["Escape"]);
    let out = r.wait_for(&placed, 2, 30);
    assert_eq!(out.matches("\x1b_Ga=t,").count(), 1, "transmitted once");
    // leaving frees it
    r.tmux.text("/quit");
    r.tmux.keys(&["Enter"]);
    r.wait_for(&format!("\x1b_Ga=d,d=I,i={id},"), 1, 30);
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
