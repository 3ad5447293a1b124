//! Issue #7, faults and the terminal: the real binary in tmux, started from an interactive shell
//! as a user starts it. SIGKILL mid-answer loses no finished turn; SIGINT and SIGTERM save and
//! give the terminal back to the shell; Ctrl+Z and `fg` suspend and resume; a 10x3 window, a
//! non-UTF-8 paste and a 20000-character line are survived; bad input is a message in the chat
//! and the chat goes on.
mod common;
use common::*;
use internvl_chat::app::session;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn chat_args(extra: &[&str]) -> Vec<String> {
    let m = model("tiny-qwen2");
    greedy(&m, "6", extra)
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The chat's status line says it is idle with the model loaded.
fn ready(s: &str) -> bool {
    s.lines().last().is_some_and(|l| l.contains("│ ready"))
}

/// Answers finished on screen (each has a stats line).
fn answered(s: &str) -> usize {
    s.matches("first token after").count()
}

fn streamed(s: &str) -> usize {
    s.split("answering, ")
        .nth(1)
        .and_then(|s| s.split(" token").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn sessions_dir(home: &Path) -> PathBuf {
    home.join("data/internvl-chat/sessions")
}

/// Every file in the sessions folder (the chat saves under a generated name).
fn session_files(home: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(sessions_dir(home))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Launches the chat in `sh` and waits for the model.
fn launch(sh: &Shell, extra: &[&str]) -> u32 {
    sh.launch(&chat_args(extra));
    sh.wait("the model to load", 90, ready);
    sh.program_pid()
}

fn ask(sh: &Shell, question: &str, answers_before: usize) -> String {
    sh.line(question);
    sh.wait(&format!("the answer to {question:?}"), 120, |s| {
        s.contains(question) && answered(s) > answers_before && ready(s)
    })
}

/// Back at the shell: the main screen, with raw mode off so typed text echoes and runs.
fn assert_shell_is_back(sh: &Shell, tag: &str) {
    let s = sh.wait("the shell prompt", 20, |s| {
        !s.trim_end().is_empty() && s.trim_end().ends_with(PROMPT.trim_end())
    });
    assert!(!sh.alternate_screen(), "the alternate screen is left:\n{s}");
    sh.line(&format!("echo back-$((40+2))-{tag}; echo \"rc=$?\""));
    sh.wait("the echo", 10, |s| s.contains(&format!("back-42-{tag}")));
}

#[test]
fn sigkill_mid_answer_keeps_every_finished_turn() {
    let home = tempdir("kill");
    let sh = Shell::start("ivl-kill", home.path());
    let pid = launch(&sh, &[]);
    ask(&sh, "First question?", 0);
    ask(&sh, "Second question?", 1);
    sh.line("/set max_new_tokens 30000");
    sh.line("/set min_new_tokens 30000");
    sh.line("Third question, answered at length?");
    sh.wait("tokens streaming", 60, |s| streamed(s) > 5);
    sh.signal(pid, "KILL");
    sh.wait_exit(pid, 10);
    let files = session_files(home.path());
    assert_eq!(
        files.len(),
        1,
        "one session file, no temporary left: {files:?}"
    );
    let saved = session::load(&files[0]).unwrap();
    let questions: Vec<&str> = saved.exchanges.iter().map(|x| x.typed.as_str()).collect();
    assert_eq!(questions, ["First question?", "Second question?"]);
    assert!(saved.exchanges.iter().all(|x| !x.turn.answer.is_empty()));
}

#[test]
fn sigint_and_sigterm_save_and_give_the_terminal_back() {
    for sig in ["INT", "TERM"] {
        let home = tempdir("sig");
        let sh = Shell::start(&format!("ivl-sig{sig}"), home.path());
        let pid = launch(&sh, &[]);
        ask(&sh, "Before the signal?", 0);
        // mid-answer: the partial answer is not a finished turn
        sh.line("/set max_new_tokens 30000");
        sh.line("/set min_new_tokens 30000");
        sh.line("Cut short?");
        sh.wait("tokens streaming", 60, |s| streamed(s) > 5);
        sh.signal(pid, sig);
        sh.wait_exit(pid, 30);
        assert_shell_is_back(&sh, sig);
        sh.wait("exit code 0", 10, |s| s.contains("rc=0"));
        let files = session_files(home.path());
        assert_eq!(files.len(), 1, "{sig}: {files:?}");
        let saved = session::load(&files[0]).unwrap();
        assert_eq!(saved.exchanges.len(), 1, "{sig}");
        assert_eq!(saved.exchanges[0].typed, "Before the signal?");
    }
}

#[test]
fn ctrl_z_then_fg_comes_back_and_still_works() {
    let home = tempdir("tstp");
    let sh = Shell::start("ivl-tstp", home.path());
    let pid = launch(&sh, &[]);
    sh.text("typed before the break");
    sh.wait("the typed text", 10, |s| {
        s.contains("typed before the break")
    });
    sh.keys(&["C-z"]);
    sh.wait("the job to stop", 20, |s| s.contains("Stopped"));
    assert_shell_is_back(&sh, "tstp");
    sh.line("fg");
    let s = sh.wait("the chat to come back", 20, |s| {
        s.contains("typed before the break") && ready(s)
    });
    assert!(sh.alternate_screen(), "{s}");
    sh.keys(&["Enter"]);
    sh.wait("an answer after fg", 120, |s| answered(s) == 1 && ready(s));
    // SIGTSTP from outside does the same
    sh.signal(pid, "TSTP");
    sh.wait("the job to stop again", 20, |s| {
        s.matches("Stopped").count() >= 2 && !sh.alternate_screen()
    });
    sh.line("fg");
    sh.wait("the chat to come back again", 20, |s| {
        s.contains("typed before the break") && ready(s)
    });
    ask(&sh, "Still there?", 1);
    sh.line("/quit");
    sh.wait_exit(pid, 30);
    assert_shell_is_back(&sh, "quit");
}

#[test]
fn tiny_window_non_utf8_paste_and_a_long_line_are_survived() {
    let home = tempdir("term");
    let sh = Shell::start("ivl-term", home.path());
    let pid = launch(&sh, &[]);
    sh.text("kept across resizes");
    sh.resize(10, 3);
    std::thread::sleep(Duration::from_millis(500));
    sh.wait("a 10x3 frame", 20, |s| !s.trim().is_empty());
    sh.resize(110, 32);
    sh.wait("the full frame again", 20, |s| {
        s.contains("kept across resizes") && ready(s)
    });
    sh.keys(&["C-u"]);
    // bracketed paste of bytes that are not UTF-8, then stray bytes typed raw
    let mut paste = b"\x1b[200~".to_vec();
    paste.extend_from_slice(b"abc\xff\xfe def \xc3(\x80 ghi");
    paste.extend_from_slice(b"\x1b[201~");
    sh.bytes(&paste);
    sh.bytes(b"\xff\xc0 jkl");
    sh.wait("the pasted text", 20, |s| {
        s.contains("abc") && s.contains("jkl")
    });
    sh.keys(&["Enter"]);
    sh.wait("an answer to the pasted text", 120, |s| {
        answered(s) == 1 && ready(s)
    });
    // a 20000-character line, pasted as a terminal pastes it
    let words: String = (0..3000).map(|i| format!("w{i:05} ")).collect();
    let long = &words[..20_000];
    let last_word = long.split_whitespace().rev().nth(1).unwrap();
    sh.paste(long);
    sh.wait("the long line", 30, |s| s.contains(last_word));
    sh.keys(&["Enter"]);
    sh.wait("an answer to the long line", 240, |s| {
        let asked = s.rfind(last_word);
        let answer = s.rfind("first token after");
        asked.is_some() && answer > asked && ready(s)
    });
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    sh.line("/quit");
    sh.wait_exit(pid, 30);
    assert_shell_is_back(&sh, "term");
}

#[test]
fn bad_input_in_the_chat_is_a_message_and_the_chat_goes_on() {
    let home = tempdir("chatbad");
    let notes = home.path().join("notes.jpg");
    std::fs::write(&notes, "meeting notes, not a photo\n").unwrap();
    let sh = Shell::start("ivl-chatbad", home.path());
    let pid = launch(&sh, &[]);
    // an attachment that is not a picture: refused when staged, with the reason
    sh.line(&format!("/image {}", notes.display()));
    sh.wait("the refusal", 30, |s| {
        s.contains("notes.jpg") && s.contains("not an image")
    });
    // a request the engine refuses: the numbers, and the chat goes on
    sh.line("/set max_new_tokens 32768");
    sh.line("Too long?");
    sh.wait("the context error", 60, |s| {
        s.contains("exceeds the context") && ready(s)
    });
    sh.line("/set max_new_tokens 4");
    ask(&sh, "And now?", 0);
    // a missing video: named
    sh.line("/video /no/such/clip.mp4");
    sh.wait("the missing video", 20, |s| {
        s.contains("/no/such/clip.mp4") && s.contains("no such file")
    });
    ask(&sh, "Still fine?", 1);
    sh.line("/quit");
    sh.wait_exit(pid, 30);
}

/// Closes the tmux session (the terminal hangs up on the shell and on the chat) and asserts the
/// chat process `pid` is gone within a second.
fn hang_up_and_wait_for_exit(sh: &Shell, pid: u32) {
    let start = std::time::Instant::now();
    assert!(std::process::Command::new("tmux")
        .args(["kill-session", "-t", &sh.name])
        .status()
        .unwrap()
        .success());
    let gone = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
    };
    while !gone(pid) {
        // a bound far above the second it takes, against a chat that never notices
        assert!(start.elapsed() < Duration::from_secs(10), "still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed();
    eprintln!("the chat ended {took:?} after the hangup");
    assert!(
        took < Duration::from_secs(1),
        "ended {took:?} after the hangup"
    );
}

#[test]
fn a_closed_terminal_ends_the_chat_within_a_second_after_saving() {
    let home = tempdir("hup");
    let sh = Shell::start("ivl-hup", home.path());
    let pid = launch(&sh, &[]);
    ask(&sh, "Before the hangup?", 0);
    sh.line("/set max_new_tokens 30000");
    sh.line("/set min_new_tokens 30000");
    sh.line("Answered when the window closes?");
    sh.wait("tokens streaming", 60, |s| streamed(s) > 5);
    hang_up_and_wait_for_exit(&sh, pid);
    let files = session_files(home.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let saved = session::load(&files[0]).unwrap();
    let questions: Vec<&str> = saved.exchanges.iter().map(|x| x.typed.as_str()).collect();
    assert_eq!(questions, ["Before the hangup?"]);
}

#[test]
fn a_fifo_or_a_device_in_the_chat_is_refused_at_once_and_the_next_message_answered() {
    let home = tempdir("chatfifo");
    let fifo = home.path().join("pipe.jpg");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let sh = Shell::start("ivl-chatfifo", home.path());
    let pid = launch(&sh, &[]);
    sh.line(&format!("/image {}", fifo.display()));
    sh.wait("the FIFO refused", 10, |s| {
        s.contains("it is a FIFO (named")
    });
    sh.line("/video /dev/zero");
    sh.wait("the device refused", 10, |s| {
        s.contains("/dev/zero") && s.contains("character device")
    });
    // nothing is left reading: the next message goes out at once
    ask(&sh, "Still answered?", 0);
    sh.line("/quit");
    sh.wait_exit(pid, 30);
}

/// The resident memory of process `pid`, in bytes.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// A 10 MB paste: the chat takes it, sending it is refused before it is tokenized, with the
/// numbers, and the chat goes on; its memory stays bounded.
#[test]
fn a_ten_megabyte_paste_is_refused_with_the_numbers_and_the_chat_goes_on() {
    let home = tempdir("bigpaste");
    let sh = Shell::start("ivl-bigpaste", home.path());
    let pid = launch(&sh, &[]);
    let text = "lorem ipsum ".repeat((10 << 20) / 12);
    let t0 = std::time::Instant::now();
    sh.paste(&text);
    sh.wait("the pasted text", 120, |s| s.contains("lorem ipsum"));
    sh.keys(&["Enter"]);
    sh.wait("the refusal", 120, |s| {
        s.contains("exceeds the context window") && ready(s)
    });
    let took = t0.elapsed();
    let rss = rss_of(pid);
    eprintln!(
        "10 MB paste: refused {took:?} after pasting began, RSS {} MiB",
        rss >> 20
    );
    assert!(took < Duration::from_secs(120), "{took:?}");
    assert!(rss < 1 << 30, "RSS {} MiB", rss >> 20);
    ask(&sh, "Still here?", 0);
    sh.line("/quit");
    sh.wait_exit(pid, 30);
}

/// The terminal goes away while the model is inside one long step it cannot leave (reading 120
/// video frames and prefilling some 30000 tokens, tens of seconds here): the chat still ends
/// within a second, its finished turn saved.
#[test]
fn a_closed_terminal_ends_the_chat_within_a_second_even_mid_prefill() {
    let home = tempdir("hupprefill");
    let config = home.path().join("config/internvl-chat");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("config.toml"), "video_segments = 120\n").unwrap();
    let sh = Shell::start("ivl-slowstep", home.path());
    let pid = launch(&sh, &[]);
    ask(&sh, "Before the video?", 0);
    sh.line(&format!(
        "/video {}",
        media("videos/flipping_a_pancake.mkv")
    ));
    sh.wait("the staged video", 60, |s| s.contains("flipping_a_pancake"));
    sh.line("What happens in it?");
    sh.wait("the model busy with the prompt", 30, |s| {
        s.contains("reading the prompt") && answered(s) == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = sh.screen();
    assert!(!ready(&s) && answered(&s) == 1, "the model is busy:\n{s}");
    hang_up_and_wait_for_exit(&sh, pid);
    let files = session_files(home.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let saved = session::load(&files[0]).unwrap();
    assert_eq!(saved.exchanges[0].typed, "Before the video?");
}
