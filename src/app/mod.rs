//! The full-screen chat. The model runs on a worker thread behind an [`EngineHandle`]; this
//! module never touches it directly. One loop merges keys, mouse, paste and resize events
//! (read on their own thread), engine events, attachment probes, signals and a tick into
//! [`Msg`]s; [`App::update`] turns each into state changes and [`Command`]s, which the loop
//! carries out; `impl Widget for &App` draws the result.
mod commands;
pub mod config;
mod editor;
pub mod graphics;
mod grounding;
mod highlight;
mod input;
mod keys;
mod markdown;
mod overlay;
mod preview;
pub mod session;
mod state;
pub mod terminal;
mod theme;
mod update;
mod view;
mod wrap;

#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod testkit;

pub use config::Overrides;
pub use state::App;
pub use update::{Command, Msg};

use crate::engine::protocol::{Attachment, Cancel, EngineCmd, EngineEvent};
use crate::engine::EngineHandle;
use anyhow::Context;
use crossbeam_channel::{select, Receiver, Sender};
use crossterm::event::{self, Event, KeyEventKind, MouseEventKind};
use input::{PathContext, SlashCommand};
use state::SessionRef;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the chat knows of an attachment before sending it, from [`AppOptions::probe`].
pub use crate::media::AttachmentInfo;

/// Reads an attachment (decodes it, works out its tiling): `Err` carries the reason it cannot
/// be used. Runs on its own thread.
pub type Probe = Arc<dyn Fn(&Attachment) -> Result<AttachmentInfo, String> + Send + Sync>;

pub struct AppOptions {
    pub probe: Probe,
    /// Command-line settings, over the config file's.
    pub overrides: Overrides,
    /// Staged when the chat opens (`--image`, `--video`).
    pub attachments: Vec<Attachment>,
    /// `None`: `config.toml` in the platform's config directory.
    pub config_path: Option<PathBuf>,
    /// `None`: `sessions` in the platform's data directory.
    pub sessions_dir: Option<PathBuf>,
    /// A saved session to open.
    pub resume: Option<String>,
}

impl AppOptions {
    pub fn new(probe: Probe) -> Self {
        Self {
            probe,
            overrides: Overrides::default(),
            attachments: Vec::new(),
            config_path: None,
            sessions_dir: None,
            resume: None,
        }
    }
}

const TICK: Duration = Duration::from_millis(100);

/// Runs the chat until the user quits or a signal comes; the terminal is restored on return.
pub fn run(handle: EngineHandle, opts: AppOptions) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let settings = settings(&opts, &mut problems);
    let sessions_dir = match opts
        .sessions_dir
        .clone()
        .map_or_else(session::default_dir, Ok)
    {
        Ok(dir) => dir,
        Err(e) => {
            let dir = std::env::temp_dir().join("internvl-chat-sessions");
            problems.push(format!("{e}; sessions go to {}", dir.display()));
            dir
        }
    };
    let paths = PathContext {
        cwd: std::env::current_dir().context("cannot read the current folder")?,
        home: directories::BaseDirs::new().map(|d| d.home_dir().to_path_buf()),
    };
    let unix = unix_now();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let session = SessionRef {
        name: session::name_for_time(unix),
        id: format!("{unix:x}{nanos:08x}-{:x}", std::process::id()),
    };
    let mouse = settings.mouse;
    let graphics_mode = settings.graphics;
    let mut app = App::new(settings, paths, sessions_dir, session);
    for p in problems {
        app.notice(p, true);
    }
    let mut startup = Vec::new();
    for a in opts.attachments {
        startup.extend(app.stage(a));
    }
    if let Some(name) = opts.resume {
        startup.extend(app.command(SlashCommand::Load(name)));
    }
    let mut tui = terminal::enter(mouse).context("cannot set up the terminal")?;
    // the one time the terminal is asked anything: before the input thread reads it
    let detected = graphics::detect(graphics_mode);
    tracing::info!("pictures: {}", detected.reason);
    if detected.queried {
        // a terminal that does not know a query may have printed it
        tui.terminal.clear().context("cannot clear the terminal")?;
    }
    app.graphics = detected.graphics;
    let mut images = detected.graphics.map(graphics::Images::new);
    let late = graphics::LateReplyFilter::new(detected.late_replies);
    let result = event_loop(
        &mut tui,
        &mut app,
        &handle,
        opts.probe,
        startup,
        &mut images,
        late,
    );
    if let Some(images) = images.as_mut() {
        let _ = images.clear(tui.terminal.backend_mut());
    }
    // a request still running was cancelled when the event loop ended
    let _ = handle.tx.send(EngineCmd::Shutdown);
    drop(tui);
    result
}

/// Config file, command line and `NO_COLOR`; problems become messages in the chat.
fn settings(opts: &AppOptions, problems: &mut Vec<String>) -> config::Settings {
    let path = opts
        .config_path
        .clone()
        .map_or_else(config::default_path, Ok);
    let mut settings = match path.and_then(|p| config::load(&p)) {
        Ok(s) => s,
        Err(e) => {
            problems.push(format!("{e}; using the defaults"));
            config::Settings::default()
        }
    };
    if let Err(e) = settings.apply(&opts.overrides) {
        problems.push(format!("command line: {e}"));
    }
    if std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
        settings.theme = theme::Theme::mono();
    }
    settings
}

fn event_loop(
    tui: &mut terminal::Tui,
    app: &mut App,
    handle: &EngineHandle,
    probe: Probe,
    startup: Vec<Command>,
    images: &mut Option<graphics::Images>,
    late: graphics::LateReplyFilter,
) -> anyhow::Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
    let stop = Arc::new(AtomicBool::new(false));
    let input = spawn_input(tx.clone(), stop.clone(), late)?;
    #[cfg(unix)]
    let signals = spawn_signals(tx.clone())?;
    let mut runner = Runner::new(handle, probe, tx)?;
    let mut queue = VecDeque::new();
    let mut quit = startup.into_iter().any(|c| runner.execute(c, &mut queue));
    let mut engine_rx: Receiver<_> = handle.rx.clone();
    let mut next_tick = Instant::now();
    let mut dirty = true;
    while !quit {
        if dirty {
            draw(&mut tui.terminal, app, images.as_mut()).context("cannot draw to the terminal")?;
            dirty = false;
        }
        if queue.is_empty() {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            let replies = runner.replies.clone();
            select! {
                recv(rx) -> m => queue.extend(m.ok()),
                recv(replies) -> ev => match ev {
                    Ok(ev) => queue.push_back(Msg::Engine(ev)),
                    // the request is over and its events all read
                    Err(_) => runner.replies = crossbeam_channel::never(),
                },
                recv(engine_rx) -> ev => match ev {
                    Ok(ev) => queue.push_back(Msg::Engine(ev)),
                    Err(_) => {
                        engine_rx = crossbeam_channel::never();
                        queue.push_back(Msg::EngineGone);
                    }
                },
                default(timeout) => {}
            }
        }
        // take everything already waiting, so fast tokens cost one frame, not one each
        queue.extend(rx.try_iter());
        queue.extend(engine_rx.try_iter().map(Msg::Engine));
        queue.extend(runner.replies.try_iter().map(Msg::Engine));
        let now = Instant::now();
        if now >= next_tick {
            queue.push_back(Msg::Tick {
                now,
                unix: unix_now(),
            });
            next_tick = now + TICK;
        }
        while let Some(msg) = queue.pop_front() {
            if let (Msg::Resize(..), Some(g)) = (&msg, app.graphics.as_mut()) {
                // the font may have changed with the window
                if let Some(cell) = graphics::detect::window_cell() {
                    g.cell = cell;
                }
                if let Some(images) = images.as_mut() {
                    images.set_graphics(*g);
                }
            }
            let tick = matches!(msg, Msg::Tick { .. });
            let moving = app.animating();
            for cmd in app.update(msg) {
                match cmd {
                    Command::Suspend => {
                        terminal::suspend(tui).context("cannot take the terminal back")?;
                        dirty = true;
                    }
                    Command::Resume => {
                        terminal::resume(tui).context("cannot take the terminal back")?;
                        dirty = true;
                    }
                    cmd => quit |= runner.execute(cmd, &mut queue),
                }
            }
            dirty |= !tick || moving || app.animating();
            if quit {
                break;
            }
        }
    }
    runner.cancel_current();
    stop.store(true, Ordering::SeqCst);
    // not joined: when the terminal is gone (SIGHUP, closed window) crossterm's read can block
    // or spin for ever; the thread ends with the process
    drop(input);
    #[cfg(unix)]
    signals.close();
    Ok(())
}

/// Draws a frame; with a graphics protocol, the pictures in it (the terminal shows the cells
/// and the images at once where it knows synchronized output).
fn draw<B>(
    terminal: &mut ratatui::Terminal<B>,
    app: &App,
    images: Option<&mut graphics::Images>,
) -> std::io::Result<()>
where
    B: ratatui::backend::Backend<Error = std::io::Error> + std::io::Write,
{
    let render = |f: &mut ratatui::Frame| {
        f.render_widget(app, f.area());
        if let Some(p) = app.cursor(f.area()) {
            f.set_cursor_position(p);
        }
    };
    let Some(images) = images else {
        terminal.draw(render)?;
        return Ok(());
    };
    crossterm::queue!(
        terminal.backend_mut(),
        crossterm::terminal::BeginSynchronizedUpdate
    )?;
    terminal.draw(|f| {
        render(f);
        let wanted = app.pictures(f.area());
        images.render(&wanted, f.buffer_mut());
    })?;
    let out = terminal.backend_mut();
    images.flush_evicted(out)?;
    crossterm::execute!(out, crossterm::terminal::EndSynchronizedUpdate)
}

/// Carries out commands; results come back as messages.
struct Runner<'h> {
    handle: &'h EngineHandle,
    probe: Probe,
    tx: Sender<Msg>,
    /// The events of the latest request (never, before the first and once it is over).
    replies: Receiver<EngineEvent>,
    /// The latest request's cancel switch.
    cancel: Option<Cancel>,
}

impl<'h> Runner<'h> {
    fn new(handle: &'h EngineHandle, probe: Probe, tx: Sender<Msg>) -> anyhow::Result<Self> {
        Ok(Self {
            handle,
            probe,
            tx,
            replies: crossbeam_channel::never(),
            cancel: None,
        })
    }

    /// Stops the latest request, if it still runs.
    fn cancel_current(&self) {
        if let Some(c) = &self.cancel {
            c.cancel();
        }
    }

    /// Reads `attachment` on a thread of its own, so that a read that hangs (a file on a hung
    /// network mount) holds up no other; the chat drops it at its deadline.
    fn start_probe(&self, id: u64, attachment: Attachment) -> std::io::Result<()> {
        let (probe, tx) = (self.probe.clone(), self.tx.clone());
        thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| probe(&attachment)))
                        .unwrap_or_else(|_| Err("reading it failed unexpectedly".into()));
                let _ = tx.send(Msg::Probed { id, result });
            })
            .map(drop)
    }

    /// Returns true to quit.
    fn execute(&mut self, cmd: Command, queue: &mut VecDeque<Msg>) -> bool {
        match cmd {
            Command::Generate(req) => match self.handle.submit(req) {
                Some(s) => {
                    self.replies = s.events;
                    self.cancel = Some(s.cancel);
                }
                None => queue.push_back(Msg::EngineGone),
            },
            Command::Reset => {
                let _ = self.handle.tx.send(EngineCmd::Reset);
            }
            Command::Cancel => self.cancel_current(),
            Command::Probe { id, attachment } => {
                if let Err(e) = self.start_probe(id, attachment) {
                    let result = Err(format!("cannot start a thread to read it: {e}"));
                    queue.push_back(Msg::Probed { id, result });
                }
            }
            Command::Save {
                name,
                path,
                mut session,
                force,
            } => {
                session.saved_at = unix_now();
                let result = session::save(&path, &session, force).map_err(|e| e.to_string());
                if let Err(e) = &result {
                    tracing::warn!("{e}");
                }
                queue.push_back(Msg::Saved { name, result });
            }
            Command::Load { name, path } => {
                let result = session::load(&path).map_err(|e| e.to_string());
                queue.push_back(Msg::Loaded { name, result });
            }
            Command::ListSessions(dir) => {
                queue.push_back(Msg::Sessions(
                    session::list(&dir).map_err(|e| e.to_string()),
                ));
            }
            // the run loop does these, as they need the terminal
            Command::Suspend | Command::Resume => {}
            Command::Quit => return true,
        }
        false
    }
}

/// Reads terminal events on their own thread (polling, so it stops when asked).
/// `late` drops answers to the start-up graphics query that come after it gave up.
fn spawn_input(
    tx: Sender<Msg>,
    stop: Arc<AtomicBool>,
    mut late: graphics::LateReplyFilter,
) -> anyhow::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("input".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let event = match event::poll(Duration::from_millis(50)) {
                    Ok(false) => continue,
                    Ok(true) => event::read(),
                    Err(e) => Err(e),
                };
                let msg = match event {
                    Ok(ev) if late.swallow(&ev) => None,
                    Ok(ev) => to_msg(ev),
                    Err(e) => {
                        // no more input: save and leave as on a signal
                        tracing::error!("cannot read the terminal: {e}");
                        let _ = tx.send(Msg::Signal);
                        break;
                    }
                };
                if msg.is_some_and(|m| tx.send(m).is_err()) {
                    break;
                }
            }
        })
        .context("cannot start the input thread")
}

fn to_msg(ev: Event) -> Option<Msg> {
    match ev {
        Event::Key(k) if k.kind != KeyEventKind::Release => Some(Msg::Key(k)),
        Event::Mouse(m)
            if matches!(
                m.kind,
                MouseEventKind::ScrollUp | MouseEventKind::ScrollDown
            ) =>
        {
            Some(Msg::Mouse(m))
        }
        Event::Paste(text) => Some(Msg::Paste(text)),
        Event::Resize(w, h) => Some(Msg::Resize(w, h)),
        _ => None,
    }
}

/// SIGTERM, SIGINT and SIGHUP become `Msg::Signal` (the chat saves, then the terminal is
/// restored on the way out); SIGTSTP stops the chat as Ctrl+Z does, and SIGCONT makes it take
/// the terminal back.
#[cfg(unix)]
fn spawn_signals(tx: Sender<Msg>) -> anyhow::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGCONT, SIGHUP, SIGINT, SIGTERM, SIGTSTP};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGTSTP, SIGCONT])
            .context("cannot listen for signals")?;
    let handle = signals.handle();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let msg = match signal {
                    SIGTSTP => Msg::Suspend,
                    SIGCONT => Msg::Continued,
                    _ => Msg::Signal,
                };
                if tx.send(msg).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(handle)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testkit::*;
    use crate::engine::protocol::{EngineEvent, Finish};
    use config::Settings;
    use std::fs;

    struct Rig {
        handle: EngineHandle,
        cmds: Receiver<EngineCmd>,
        msgs: Receiver<Msg>,
        tx: Sender<Msg>,
    }

    fn rig() -> Rig {
        let (cmd_tx, cmds) = crossbeam_channel::unbounded();
        let (_ev_tx, ev_rx) = crossbeam_channel::unbounded::<EngineEvent>();
        let (tx, msgs) = crossbeam_channel::unbounded();
        Rig {
            handle: EngineHandle {
                tx: cmd_tx,
                rx: ev_rx,
            },
            cmds,
            msgs,
            tx,
        }
    }

    fn fake_probe() -> Probe {
        Arc::new(|a: &Attachment| {
            let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
            match name.as_str() {
                "panic.png" => panic!("decoder bug"),
                "bad.png" => Err("not a PNG file".into()),
                _ => Ok(info(&name)),
            }
        })
    }

    fn app_with_sessions(dir: &std::path::Path, sessions: PathBuf) -> App {
        App::new(
            Settings::default(),
            PathContext {
                cwd: dir.to_path_buf(),
                home: None,
            },
            sessions,
            SessionRef {
                name: "chat-test".into(),
                id: "id-test".into(),
            },
        )
    }

    /// Runs `cmds` and feeds every resulting message back, as the loop does.
    fn drive(app: &mut App, runner: &mut Runner, cmds: Vec<Command>) {
        let mut queue = VecDeque::new();
        for c in cmds {
            assert!(!runner.execute(c, &mut queue));
        }
        while let Some(msg) = queue.pop_front() {
            for c in app.update(msg) {
                assert!(!runner.execute(c, &mut queue));
            }
        }
    }

    #[test]
    fn sessions_live_under_xdg_data_home_and_round_trip() {
        let data = tempfile::tempdir().unwrap();
        // the only test that reads the platform's directories
        std::env::set_var("XDG_DATA_HOME", data.path());
        let dir = session::default_dir().unwrap();
        assert_eq!(dir, data.path().join("internvl-chat/sessions"));
        let r = rig();
        let mut runner = Runner::new(&r.handle, fake_probe(), r.tx.clone()).unwrap();
        let mut app = app_with_sessions(data.path(), dir.clone());
        ready(&mut app);
        let cmds = submit(&mut app, "hello");
        drive(&mut app, &mut runner, cmds);
        assert!(matches!(r.cmds.try_recv(), Ok(EngineCmd::Generate { .. })));
        let id = app.gen.as_ref().unwrap().id;
        let cmds = answer(&mut app, id, &["Hi ", "there."], Finish::Stop);
        drive(&mut app, &mut runner, cmds);
        assert_eq!(app.flash.as_ref().unwrap().text, "saved chat-test");
        let file = dir.join("chat-test.json");
        let saved = session::load(&file).unwrap();
        assert_eq!(saved.exchanges[0].turn.answer, "Hi there.");
        assert!(saved.saved_at > 1_700_000_000, "stamped when written");
        // another chat opens it: transcript back, engine reset, history as before
        let mut other = app_with_sessions(data.path(), dir.clone());
        ready(&mut other);
        let cmds = submit(&mut other, "/load chat-test");
        drive(&mut other, &mut runner, cmds);
        assert!(matches!(r.cmds.try_recv(), Ok(EngineCmd::Reset)));
        assert_eq!(other.history(None), app.history(None));
        assert_eq!(other.session.id, "id-test");
        // and /sessions lists it
        let cmds = submit(&mut other, "/sessions");
        drive(&mut other, &mut runner, cmds);
        let state::Mode::Sessions { list, .. } = &other.mode else {
            panic!("the session list opens");
        };
        assert_eq!((list[0].name.as_str(), list[0].turns), ("chat-test", 1));
    }

    #[test]
    fn a_corrupt_session_gives_a_message_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = dir.path().join("sessions");
        fs::create_dir_all(&sessions).unwrap();
        let file = sessions.join("chat-test.json");
        fs::write(&file, "{ \"version\": 1, oops").unwrap();
        let r = rig();
        let mut runner = Runner::new(&r.handle, fake_probe(), r.tx.clone()).unwrap();
        let mut app = app_with_sessions(dir.path(), sessions);
        ready(&mut app);
        let cmds = submit(&mut app, "/load chat-test");
        drive(&mut app, &mut runner, cmds);
        let notice = |app: &App| match &app.entries.last().unwrap().kind {
            state::EntryKind::Notice { text, error } => (text.clone(), *error),
            other => panic!("a notice expected, got {other:?}"),
        };
        assert_eq!(
            notice(&app),
            (
                format!(
                    "Could not load \"chat-test\": session {} is corrupt (line 1, column 17: key must be a string); the file was left as it is",
                    file.display()
                ),
                true
            )
        );
        // the chat's own autosave goes to the same name: refused, with a message
        let cmds = submit(&mut app, "hi");
        drive(&mut app, &mut runner, cmds);
        let id = app.gen.as_ref().unwrap().id;
        let cmds = answer(&mut app, id, &["hello"], Finish::Stop);
        drive(&mut app, &mut runner, cmds);
        let (text, error) = notice(&app);
        assert!(error);
        assert!(
            text.starts_with(&format!(
                "The chat was not saved: not overwriting {}: it is not a readable session",
                file.display()
            )),
            "{text}"
        );
        assert_eq!(fs::read_to_string(&file).unwrap(), "{ \"version\": 1, oops");
        // /save! replaces it on purpose
        let cmds = submit(&mut app, "/save! chat-test");
        drive(&mut app, &mut runner, cmds);
        assert_eq!(session::load(&file).unwrap().id, "id-test");
    }

    /// Bytes written to a terminal, readable while the terminal holds the writer.
    #[derive(Clone, Default)]
    struct Tape(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

    impl std::io::Write for Tape {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Tape {
        /// What was written since the last call.
        fn take(&self) -> String {
            String::from_utf8_lossy(&std::mem::take(&mut *self.0.borrow_mut())).into_owned()
        }
    }

    #[test]
    fn kitty_pictures_follow_the_frames_and_overlays() {
        use ratatui::backend::CrosstermBackend;
        use ratatui::layout::Rect;
        use ratatui::{Terminal, TerminalOptions, Viewport};
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("harbour.jpg"), b"jpg").unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        let cmds = submit(&mut app, "/image harbour.jpg");
        app.update(Msg::Probed {
            id: probes(&cmds)[0],
            result: Ok(info("harbour.jpg")),
        });
        let g = graphics::Graphics {
            protocol: graphics::Protocol::Kitty,
            cell: graphics::CellSize { w: 10, h: 20 },
            tmux: false,
        };
        app.graphics = Some(g);
        let tape = Tape::default();
        let mut t = Terminal::with_options(
            CrosstermBackend::new(tape.clone()),
            TerminalOptions {
                viewport: Viewport::Fixed(Rect::new(0, 0, 90, 24)),
            },
        )
        .unwrap();
        let mut images = Some(graphics::Images::new(g));
        draw(&mut t, &app, images.as_mut()).unwrap();
        let first = tape.take();
        assert!(first.starts_with("\x1b[?2026h") && first.ends_with("\x1b[?2026l"));
        assert!(first.contains("harbour.jpg"), "the cells are drawn");
        assert!(!first.contains('▀'), "no half blocks under the image");
        let transmit = first.find("\x1b_Gq=2,i=").expect("transmitted");
        assert!(first[transmit..].contains(",a=T,U=1,f=32,"));
        let placeholders = first.matches('\u{10EEEE}').count();
        assert!(placeholders >= 30 * 5, "{placeholders} placeholder cells");
        // a frame with nothing new writes no graphics
        draw(&mut t, &app, images.as_mut()).unwrap();
        let again = tape.take();
        assert!(!again.contains("\x1b_G"), "transmitted once");
        assert!(
            again.matches('\u{10EEEE}').count() <= 1,
            "only the first cell, without it"
        );
        // the help overlay: text over the placeholders, the image kept in the terminal
        key(&mut app, crossterm::event::KeyCode::F(1));
        draw(&mut t, &app, images.as_mut()).unwrap();
        let help = tape.take();
        assert!(
            help.contains("Keys") && !help.contains("\x1b_G"),
            "{help:?}"
        );
        assert!(!help.contains('\u{10EEEE}'));
        // closed: placed again, not transmitted again
        key(&mut app, crossterm::event::KeyCode::Esc);
        draw(&mut t, &app, images.as_mut()).unwrap();
        let back = tape.take();
        assert!(back.contains('\u{10EEEE}') && !back.contains("\x1b_G"));
        // leaving frees the image
        images.as_mut().unwrap().clear(t.backend_mut()).unwrap();
        assert!(tape.take().contains("\x1b_Ga=d,d=I,"));
    }

    #[test]
    fn probes_run_on_their_own_thread_and_a_panic_is_an_error() {
        let r = rig();
        let mut runner = Runner::new(&r.handle, fake_probe(), r.tx.clone()).unwrap();
        let mut queue = VecDeque::new();
        for (id, name) in [(1, "ok.png"), (2, "panic.png"), (3, "bad.png")] {
            let attachment = Attachment::Image {
                path: name.into(),
                max_tiles: None,
            };
            runner.execute(Command::Probe { id, attachment }, &mut queue);
        }
        let mut results: Vec<(u64, Result<String, String>)> = (0..3)
            .map(
                |_| match r.msgs.recv_timeout(Duration::from_secs(10)).unwrap() {
                    Msg::Probed { id, result } => (id, result.map(|i| i.name)),
                    other => panic!("unexpected {other:?}"),
                },
            )
            .collect();
        results.sort_by_key(|r| r.0);
        assert_eq!(
            results,
            vec![
                (1, Ok("ok.png".into())),
                (2, Err("reading it failed unexpectedly".into())),
                (3, Err("not a PNG file".into())),
            ]
        );
        assert!(runner.execute(Command::Quit, &mut queue));
        // a cancel reaches the latest request's own switch
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_with_sessions(dir.path(), dir.path().join("sessions"));
        ready(&mut app);
        let req = request(&submit(&mut app, "hello")).clone();
        runner.execute(Command::Generate(req), &mut queue);
        let Ok(EngineCmd::Generate { cancel, .. }) = r.cmds.try_recv() else {
            panic!("the request was sent");
        };
        assert!(!cancel.is_cancelled());
        runner.execute(Command::Cancel, &mut queue);
        assert!(cancel.is_cancelled());
    }
}
