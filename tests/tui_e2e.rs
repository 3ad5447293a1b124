//! The real binary in tmux against tiny-qwen2: attach an image, ask, see tokens stream, cancel,
//! ask again, quit, relaunch and load the session.
mod common;

use common::tmux::{streamed, Tmux};
use internvl_chat::testutil::fixture;
use std::path::{Path, PathBuf};
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
    t.text("/quit");
    t.keys(&["Enter"]);
    let start = Instant::now();
    while t.alive() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!t.alive(), "/quit exits");
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
