//! Which graphics protocol the terminal speaks, decided once at start-up, before the input
//! thread reads the terminal (so nothing races for the answers):
//! 1. `--graphics` / `graphics =` forcing a protocol or half blocks wins;
//! 2. inside tmux or screen: half blocks (they pass graphics on only with passthrough turned on,
//!    which cannot be asked); a forced protocol inside tmux goes through its passthrough;
//! 3. the environment: kitty (`KITTY_WINDOW_ID`, `TERM=xterm-kitty`), Ghostty (kitty's
//!    protocol), iTerm2 / WezTerm / mintty (`TERM_PROGRAM`, `LC_TERMINAL`: iTerm2's inline
//!    images), foot and mlterm (sixel); `TERM=linux` or `dumb`: half blocks;
//! 4. otherwise a query: kitty's graphics query (an answer `OK` means kitty's protocol), then
//!    DA1 (`ESC [ c`; a `4` among the attributes means sixel). Every terminal answers DA1, and
//!    answers in order, so its reply ends the wait; one that answers nothing costs the
//!    timeout ([`TIMEOUT`]) once, and gets half blocks.
//!
//! The cell size in pixels comes from the window size (TIOCGWINSZ) or, when that has no
//! pixels, from `ESC [ 16 t` in the same query; else [`CellSize::DEFAULT`].
use super::{CellSize, Graphics, GraphicsMode, Protocol};
use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use std::time::Duration;

/// The longest the start-up query waits for answers.
pub const TIMEOUT: Duration = Duration::from_millis(150);

/// kitty's graphics query: a 1x1 RGB image that is checked, never stored (`a=q`).
pub const KITTY_QUERY: &[u8] = b"\x1b_Gi=31,s=1,v=1,a=q,t=d,f=24;AAAA\x1b\\";
/// XTWINOPS: the cell size in pixels, answered `ESC [ 6 ; height ; width t`.
pub const CELL_QUERY: &[u8] = b"\x1b[16t";
/// Primary device attributes, answered `ESC [ ? 62 ; 4 ; ... c`.
pub const DA1: &[u8] = b"\x1b[c";

/// The environment variables that tell terminals apart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Env {
    pub term: String,
    pub term_program: String,
    pub lc_terminal: String,
    pub kitty_window: bool,
    pub wezterm: bool,
    pub multiplexer: bool,
    /// Inside tmux (whose passthrough can carry images).
    pub tmux: bool,
}

impl Env {
    pub fn from_os() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |k: &str| var(k).is_some_and(|v| !v.is_empty());
        Self {
            term: var("TERM").unwrap_or_default(),
            term_program: var("TERM_PROGRAM").unwrap_or_default(),
            lc_terminal: var("LC_TERMINAL").unwrap_or_default(),
            kitty_window: set("KITTY_WINDOW_ID"),
            wezterm: set("WEZTERM_EXECUTABLE"),
            multiplexer: set("TMUX") || set("STY"),
            tmux: set("TMUX"),
        }
    }
}

/// What the environment alone says.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Protocol(Protocol, &'static str),
    HalfBlocks(&'static str),
    /// Ask the terminal.
    Unknown,
}

pub fn from_env(env: &Env) -> Verdict {
    let term = env.term.as_str();
    let program = env.term_program.as_str();
    if env.multiplexer || term.starts_with("tmux") || term.starts_with("screen") {
        return Verdict::HalfBlocks("tmux/screen do not pass graphics through");
    }
    if term == "linux" || term == "dumb" || term.is_empty() {
        return Verdict::HalfBlocks("TERM has no graphics");
    }
    if env.kitty_window || term == "xterm-kitty" {
        return Verdict::Protocol(Protocol::Kitty, "kitty");
    }
    if program.eq_ignore_ascii_case("ghostty") || term == "xterm-ghostty" {
        return Verdict::Protocol(Protocol::Kitty, "Ghostty");
    }
    if program == "iTerm.app" || env.lc_terminal == "iTerm2" {
        return Verdict::Protocol(Protocol::Iterm2, "iTerm2");
    }
    // WezTerm's kitty support is partial; its iTerm2 images are complete
    if program == "WezTerm" || env.wezterm {
        return Verdict::Protocol(Protocol::Iterm2, "WezTerm");
    }
    if program == "mintty" {
        return Verdict::Protocol(Protocol::Iterm2, "mintty");
    }
    if term.starts_with("foot") || term.starts_with("mlterm") {
        return Verdict::Protocol(Protocol::Sixel, "foot/mlterm");
    }
    Verdict::Unknown
}

/// What the terminal answered to a query.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Replies {
    /// kitty's graphics query answered `OK`.
    pub kitty: bool,
    /// DA1 lists attribute 4.
    pub sixel: bool,
    pub cell: Option<CellSize>,
    /// The DA1 reply came: nothing else will.
    pub complete: bool,
}

/// Finds the answers in `bytes` (which may hold other input and half sequences).
pub fn parse_replies(bytes: &[u8]) -> Replies {
    let mut r = Replies::default();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != 0x1b {
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'_') => {
                // APC: ESC _ G keys ; message ESC \
                let body = &bytes[i + 2..];
                let Some(end) = find(body, b"\x1b\\") else {
                    break;
                };
                let body = &body[..end];
                if let Some(rest) = body.strip_prefix(b"G") {
                    if let Some(semi) = rest.iter().position(|&b| b == b';') {
                        let keys = &rest[..semi];
                        let msg = &rest[semi + 1..];
                        if keys.split(|&b| b == b',').any(|k| k == b"i=31") && msg == b"OK" {
                            r.kitty = true;
                        }
                    }
                }
                i += 2 + end + 2;
            }
            Some(b'[') => {
                // CSI: parameters, then a final byte in 0x40..=0x7e
                let body = &bytes[i + 2..];
                let Some(fin) = body.iter().position(|b| (0x40..=0x7e).contains(b)) else {
                    break;
                };
                let params = &body[..fin];
                match body[fin] {
                    b'c' if params.first() == Some(&b'?') => {
                        r.complete = true;
                        r.sixel |= params[1..].split(|&b| b == b';').any(|p| p == b"4");
                    }
                    b't' => {
                        let nums: Vec<u32> = params
                            .split(|&b| b == b';')
                            .map(|p| {
                                std::str::from_utf8(p)
                                    .ok()
                                    .and_then(|s| s.parse().ok())
                                    .unwrap_or(0)
                            })
                            .collect();
                        if let [6, h, w] = nums[..] {
                            r.cell = CellSize::new(w, h).or(r.cell);
                        }
                    }
                    _ => {}
                }
                i += 2 + fin + 1;
            }
            _ => i += 1,
        }
    }
    r
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The outcome of detection.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    /// `None`: half blocks.
    pub graphics: Option<Graphics>,
    /// Why, for the log.
    pub reason: String,
    /// A query went out and its end never came: late answers may still arrive as input
    /// (see [`LateReplyFilter`]).
    pub late_replies: bool,
    /// Something was written to the terminal (the screen should be cleared).
    pub queried: bool,
}

/// Decides from the mode, the environment, the window's cell size (TIOCGWINSZ) and, when
/// needed, `query` (writes its argument to the terminal, returns what came back in time, or
/// `None` when there is no terminal to ask).
pub fn decide(
    mode: GraphicsMode,
    env: &Env,
    window_cell: Option<CellSize>,
    mut query: impl FnMut(&[u8]) -> Option<Vec<u8>>,
) -> Detected {
    let mut d = Detected {
        graphics: None,
        reason: String::new(),
        late_replies: false,
        queried: false,
    };
    let (protocol, why) = match (mode, mode.forced()) {
        (GraphicsMode::Halfblocks, _) => {
            d.reason = "half blocks, as configured".into();
            return d;
        }
        (_, Some(p)) => (Some(p), "as configured".to_string()),
        (_, None) => match from_env(env) {
            Verdict::HalfBlocks(why) => {
                d.reason = format!("half blocks: {why}");
                return d;
            }
            Verdict::Protocol(p, who) => (Some(p), format!("{who} (environment)")),
            Verdict::Unknown => (None, String::new()),
        },
    };
    let mut request = Vec::new();
    if protocol.is_none() {
        request.extend_from_slice(KITTY_QUERY);
    }
    if window_cell.is_none() {
        request.extend_from_slice(CELL_QUERY);
    }
    let replies = if request.is_empty() {
        Replies::default()
    } else {
        request.extend_from_slice(DA1);
        match query(&request) {
            Some(bytes) => {
                d.queried = true;
                let r = parse_replies(&bytes);
                d.late_replies = !r.complete && protocol.is_none();
                r
            }
            None => Replies::default(),
        }
    };
    let (protocol, why) = match protocol {
        Some(p) => (p, why),
        None if replies.kitty => (
            Protocol::Kitty,
            "the terminal answered kitty's query".into(),
        ),
        None if replies.sixel => (Protocol::Sixel, "DA1 lists sixel".into()),
        None => {
            d.reason = if replies.complete {
                "half blocks: the terminal has no kitty graphics or sixel".into()
            } else {
                "half blocks: the terminal did not answer".into()
            };
            return d;
        }
    };
    let cell = window_cell.or(replies.cell);
    d.reason = format!(
        "{}: {why}; cell {}",
        protocol.name(),
        match cell {
            Some(c) => format!("{}x{} px", c.w, c.h),
            None => "size unknown, assuming 10x20 px".into(),
        }
    );
    d.graphics = Some(Graphics {
        protocol,
        cell: cell.unwrap_or(CellSize::DEFAULT),
        tmux: env.tmux,
    });
    d
}

/// The cell size from the window size in pixels, where the terminal reports it.
pub fn window_cell() -> Option<CellSize> {
    let w = crossterm::terminal::window_size().ok()?;
    CellSize::from_window(w.columns, w.rows, w.width, w.height)
}

/// Detection for this process's terminal.
pub fn detect(mode: GraphicsMode) -> Detected {
    decide(mode, &Env::from_os(), window_cell(), |q| query(q, TIMEOUT))
}

/// Writes `request` to stdout and reads the terminal's input until the DA1 reply or
/// `timeout`. Must run in raw mode, before anything else reads the terminal.
#[cfg(unix)]
pub fn query(request: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::Instant;
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDOUT_FILENO) } != 1 {
        return None;
    }
    // read where crossterm reads: stdin when it is the terminal, else /dev/tty
    let tty;
    // SAFETY: as above.
    let fd = if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
        libc::STDIN_FILENO
    } else {
        tty = std::fs::File::open("/dev/tty").ok()?;
        tty.as_raw_fd()
    };
    let mut out = std::io::stdout();
    out.write_all(request).ok()?;
    out.flush().ok()?;
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while !parse_replies(&got).complete && got.len() < 4096 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 || pfd.revents & libc::POLLIN == 0 {
            break;
        }
        let mut buf = [0u8; 512];
        // SAFETY: reads at most buf.len() bytes into buf.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r <= 0 {
            break;
        }
        got.extend_from_slice(&buf[..r as usize]);
    }
    Some(got)
}

#[cfg(not(unix))]
pub fn query(_request: &[u8], _timeout: Duration) -> Option<Vec<u8>> {
    None
}

/// Drops a kitty graphics reply that arrives after the start-up query gave up: crossterm
/// reads `ESC _ G ... ESC \` as Alt+_, G, the message's characters and Alt+\, which would
/// otherwise be typed into the prompt. Alt+_ has no binding, so losing one costs nothing.
#[derive(Debug, Default)]
pub struct LateReplyFilter {
    armed: bool,
    state: FilterState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum FilterState {
    #[default]
    Idle,
    /// Alt+_ seen.
    Intro,
    /// Inside the reply, after this many characters.
    Inside(u16),
}

/// A reply's message is short (`OK`, or an error code and a few words).
const MAX_REPLY_CHARS: u16 = 256;

impl LateReplyFilter {
    pub fn new(armed: bool) -> Self {
        Self {
            armed,
            state: FilterState::Idle,
        }
    }

    /// True when `ev` belongs to a late reply and must be dropped.
    pub fn swallow(&mut self, ev: &Event) -> bool {
        if !self.armed {
            return false;
        }
        let key = match ev {
            Event::Key(k) => Some(k),
            _ => None,
        };
        let alt_char = |k: &KeyEvent, c: char| {
            k.code == KeyCode::Char(c) && k.modifiers.contains(KeyModifiers::ALT)
        };
        let plain_char = |k: &KeyEvent| {
            matches!(k.code, KeyCode::Char(_))
                && !k
                    .modifiers
                    .intersects(KeyModifiers::ALT | KeyModifiers::CONTROL)
        };
        let (next, drop) = match (self.state, key) {
            (FilterState::Idle, Some(k)) if alt_char(k, '_') => (FilterState::Intro, true),
            (FilterState::Intro, Some(k)) if k.code == KeyCode::Char('G') => {
                (FilterState::Inside(0), true)
            }
            (FilterState::Inside(_), Some(k)) if alt_char(k, '\\') => (FilterState::Idle, true),
            (FilterState::Inside(n), Some(k)) if plain_char(k) && n < MAX_REPLY_CHARS => {
                (FilterState::Inside(n + 1), true)
            }
            _ => (FilterState::Idle, false),
        };
        self.state = next;
        drop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Env {
        Env::from_vars(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_environment_names_the_terminal() {
        let kitty = Verdict::Protocol(Protocol::Kitty, "kitty");
        assert_eq!(from_env(&env(&[("TERM", "xterm-kitty")])), kitty);
        assert_eq!(
            from_env(&env(&[
                ("TERM", "xterm-256color"),
                ("KITTY_WINDOW_ID", "3")
            ])),
            kitty
        );
        assert_eq!(
            from_env(&env(&[
                ("TERM", "xterm-ghostty"),
                ("TERM_PROGRAM", "ghostty")
            ])),
            Verdict::Protocol(Protocol::Kitty, "Ghostty")
        );
        assert_eq!(
            from_env(&env(&[
                ("TERM", "xterm-256color"),
                ("TERM_PROGRAM", "iTerm.app")
            ])),
            Verdict::Protocol(Protocol::Iterm2, "iTerm2")
        );
        assert_eq!(
            from_env(&env(&[
                ("TERM", "xterm-256color"),
                ("LC_TERMINAL", "iTerm2")
            ])),
            Verdict::Protocol(Protocol::Iterm2, "iTerm2")
        );
        assert_eq!(
            from_env(&env(&[
                ("TERM", "xterm-256color"),
                ("TERM_PROGRAM", "WezTerm")
            ])),
            Verdict::Protocol(Protocol::Iterm2, "WezTerm")
        );
        assert_eq!(
            from_env(&env(&[("TERM", "foot")])),
            Verdict::Protocol(Protocol::Sixel, "foot/mlterm")
        );
        assert_eq!(
            from_env(&env(&[("TERM", "xterm-256color")])),
            Verdict::Unknown
        );
        assert!(matches!(
            from_env(&env(&[("TERM", "linux")])),
            Verdict::HalfBlocks(_)
        ));
        assert!(matches!(from_env(&env(&[])), Verdict::HalfBlocks(_)));
    }

    #[test]
    fn tmux_wins_over_the_terminal_inside_it() {
        // kitty's variables leak into tmux; tmux does not pass the images on
        for vars in [
            &[("TERM", "tmux-256color"), ("KITTY_WINDOW_ID", "1")][..],
            &[
                ("TERM", "xterm-kitty"),
                ("TMUX", "/tmp/tmux-1000/default,1,0"),
            ],
            &[("TERM", "screen-256color")],
            &[("TERM", "xterm-kitty"), ("STY", "123.pts-0")],
        ] {
            assert!(
                matches!(from_env(&env(vars)), Verdict::HalfBlocks(_)),
                "{vars:?}"
            );
        }
    }

    #[test]
    fn replies_are_found_among_other_bytes() {
        let r = parse_replies(b"x\x1b_Gi=31;OK\x1b\\\x1b[6;18;9t\x1b[?62;4;22c");
        assert_eq!(
            r,
            Replies {
                kitty: true,
                sixel: true,
                cell: Some(CellSize { w: 9, h: 18 }),
                complete: true,
            }
        );
        // xterm without sixel: DA1 without 4 (42 is not 4)
        let r = parse_replies(b"\x1b[?63;1;2;42c");
        assert!(r.complete && !r.sixel && !r.kitty);
        // kitty's error answer means no support
        let r = parse_replies(b"\x1b_Gi=31;ENOTSUPPORTED:bad\x1b\\\x1b[?62c");
        assert!(!r.kitty && r.complete);
        // another image id's OK is not ours
        assert!(!parse_replies(b"\x1b_Gi=7;OK\x1b\\").kitty);
    }

    #[test]
    fn no_half_or_lying_replies_give_nothing_and_never_panic() {
        assert_eq!(parse_replies(b""), Replies::default());
        // cut short: no end of the APC, no DA1 final byte
        let r = parse_replies(b"\x1b_Gi=31;O");
        assert!(!r.kitty && !r.complete);
        assert!(!parse_replies(b"\x1b[?62;4").complete);
        // absurd cell sizes are ignored
        assert_eq!(parse_replies(b"\x1b[6;0;0t").cell, None);
        assert_eq!(parse_replies(b"\x1b[6;99999;99999t").cell, None);
        assert_eq!(parse_replies(b"\x1b[6;-3;x;t").cell, None);
        for junk in [
            &b"\x1b"[..],
            b"\x1b[",
            b"\x1b_",
            b"\x1b_G;\x1b\\",
            b"\x1b[?c",
            b"\xff\x1b[t",
        ] {
            parse_replies(junk);
        }
    }

    /// What a fake terminal was asked.
    type Asked = std::rc::Rc<std::cell::RefCell<Vec<Vec<u8>>>>;

    /// A query function that records what was asked and answers `reply`.
    fn asked(reply: Option<&'static [u8]>) -> (impl FnMut(&[u8]) -> Option<Vec<u8>>, Asked) {
        let log = Asked::default();
        let l = log.clone();
        (
            move |q: &[u8]| {
                l.borrow_mut().push(q.to_vec());
                reply.map(<[u8]>::to_vec)
            },
            log,
        )
    }

    const CELL: CellSize = CellSize { w: 8, h: 16 };

    #[test]
    fn an_unknown_terminal_is_asked_once() {
        let xterm = env(&[("TERM", "xterm-256color")]);
        // kitty answers: kitty, with the cell size from its answer
        let (q, log) = asked(Some(b"\x1b_Gi=31;OK\x1b\\\x1b[6;16;8t\x1b[?62;c"));
        let d = decide(GraphicsMode::Auto, &xterm, None, q);
        assert_eq!(
            d.graphics,
            Some(Graphics {
                protocol: Protocol::Kitty,
                cell: CELL,
                tmux: false,
            })
        );
        assert!(d.queried && !d.late_replies);
        assert_eq!(
            log.borrow().as_slice(),
            [[KITTY_QUERY, CELL_QUERY, DA1].concat()]
        );
        // a sixel terminal; the window knew the cell size, so it is not asked
        let (q, log) = asked(Some(b"\x1b[?64;4;22c"));
        let d = decide(GraphicsMode::Auto, &xterm, Some(CELL), q);
        assert_eq!(d.graphics.map(|g| g.protocol), Some(Protocol::Sixel));
        assert_eq!(log.borrow().as_slice(), [[KITTY_QUERY, DA1].concat()]);
        // answers without graphics
        let (q, _) = asked(Some(b"\x1b[?1;2c"));
        let d = decide(GraphicsMode::Auto, &xterm, None, q);
        assert_eq!(d.graphics, None);
        assert!(!d.late_replies);
    }

    #[test]
    fn silence_means_half_blocks_and_arms_the_late_reply_filter() {
        let xterm = env(&[("TERM", "xterm-256color")]);
        let (q, _) = asked(Some(b""));
        let d = decide(GraphicsMode::Auto, &xterm, None, q);
        assert_eq!(d.graphics, None);
        assert!(d.late_replies && d.queried);
        assert_eq!(d.reason, "half blocks: the terminal did not answer");
        // no terminal at all: nothing written
        let (q, _) = asked(None);
        let d = decide(GraphicsMode::Auto, &xterm, None, q);
        assert!(!d.queried && !d.late_replies && d.graphics.is_none());
    }

    #[test]
    fn forcing_skips_detection_but_still_learns_the_cell_size() {
        let tmux = env(&[("TERM", "tmux-256color"), ("TMUX", "x")]);
        let (q, log) = asked(None);
        let d = decide(GraphicsMode::Kitty, &tmux, Some(CELL), q);
        assert_eq!(
            d.graphics,
            Some(Graphics {
                protocol: Protocol::Kitty,
                cell: CELL,
                tmux: true,
            }),
            "forced inside tmux: through its passthrough"
        );
        assert!(log.borrow().is_empty(), "nothing to ask");
        let (q, log) = asked(Some(b"\x1b[?62c"));
        let d = decide(GraphicsMode::Sixel, &tmux, None, q);
        assert_eq!(
            d.graphics,
            Some(Graphics {
                protocol: Protocol::Sixel,
                cell: CellSize::DEFAULT,
                tmux: true,
            })
        );
        // screen has no passthrough ratatui-image speaks
        let screen = env(&[("TERM", "screen"), ("STY", "1.pts-0")]);
        let (q, _) = asked(None);
        let d = decide(GraphicsMode::Kitty, &screen, Some(CELL), q);
        assert_eq!(d.graphics.map(|g| g.tmux), Some(false));
        assert_eq!(log.borrow().as_slice(), [[CELL_QUERY, DA1].concat()]);
        assert!(!d.late_replies, "no kitty query went out");
        // environment says kitty: no query when the window has pixels
        let (q, log) = asked(None);
        let d = decide(
            GraphicsMode::Auto,
            &env(&[("TERM", "xterm-kitty")]),
            Some(CELL),
            q,
        );
        assert_eq!(d.graphics.map(|g| g.protocol), Some(Protocol::Kitty));
        assert!(log.borrow().is_empty());
        // halfblocks: never asks
        let (q, log) = asked(Some(b"\x1b_Gi=31;OK\x1b\\"));
        let d = decide(
            GraphicsMode::Halfblocks,
            &env(&[("TERM", "xterm-kitty")]),
            None,
            q,
        );
        assert_eq!(d.graphics, None);
        assert!(log.borrow().is_empty());
    }

    fn k(code: KeyCode, mods: KeyModifiers) -> Event {
        Event::Key(KeyEvent::new(code, mods))
    }

    /// What crossterm makes of `ESC _ G i=31;OK ESC \` (see parse.rs: ESC + byte is Alt+byte).
    fn late_reply() -> Vec<Event> {
        let mut evs = vec![
            k(KeyCode::Char('_'), KeyModifiers::ALT),
            k(KeyCode::Char('G'), KeyModifiers::SHIFT),
        ];
        for c in "i=31;OK".chars() {
            let mods = if c.is_uppercase() {
                KeyModifiers::SHIFT
            } else {
                KeyModifiers::NONE
            };
            evs.push(k(KeyCode::Char(c), mods));
        }
        evs.push(k(KeyCode::Char('\\'), KeyModifiers::ALT));
        evs
    }

    #[test]
    fn a_late_kitty_reply_is_dropped_and_typing_goes_on() {
        let mut f = LateReplyFilter::new(true);
        let mut evs = late_reply();
        evs.push(k(KeyCode::Char('h'), KeyModifiers::NONE));
        let kept: Vec<bool> = evs.iter().map(|e| !f.swallow(e)).collect();
        assert_eq!(kept.iter().filter(|&&k| k).count(), 1);
        assert!(kept[kept.len() - 1], "the key after the reply is kept");
        // Alt+_ followed by something else: that key is kept
        let mut f = LateReplyFilter::new(true);
        assert!(f.swallow(&k(KeyCode::Char('_'), KeyModifiers::ALT)));
        assert!(!f.swallow(&k(KeyCode::Char('x'), KeyModifiers::NONE)));
        // Enter inside a "reply" ends it and is kept
        let mut f = LateReplyFilter::new(true);
        f.swallow(&k(KeyCode::Char('_'), KeyModifiers::ALT));
        f.swallow(&k(KeyCode::Char('G'), KeyModifiers::SHIFT));
        assert!(!f.swallow(&k(KeyCode::Enter, KeyModifiers::NONE)));
        // not armed: everything passes
        let mut f = LateReplyFilter::new(false);
        assert!(late_reply().iter().all(|e| !f.swallow(e)));
    }
}
