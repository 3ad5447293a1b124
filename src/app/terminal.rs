//! Taking the terminal and giving it back: raw mode, alternate screen, bracketed paste, mouse
//! wheel, and, where the terminal supports it, unambiguous keys (so Shift+Enter is seen).
//! A panic on the UI thread restores the terminal before the message prints; a panic on another
//! thread while the chat is up goes to the log instead of over the screen. Ctrl+Z (or SIGTSTP)
//! gives the terminal back before the process stops, and it is taken again when continued.
use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture,
    KeyboardEnhancementFlags, PopKeyboardEnhancementFlags, PushKeyboardEnhancementFlags,
};
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use crossterm::{cursor, execute};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;
use std::io::{self, Stdout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::thread::{self, ThreadId};

static ACTIVE: AtomicBool = AtomicBool::new(false);
static MOUSE: AtomicBool = AtomicBool::new(false);
static KEYBOARD: AtomicBool = AtomicBool::new(false);
static UI_THREAD: Mutex<Option<ThreadId>> = Mutex::new(None);

/// The terminal while the chat owns it; dropping it gives the terminal back.
pub struct Tui {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
    mouse: bool,
}

impl Drop for Tui {
    fn drop(&mut self) {
        restore();
    }
}

/// Takes over the terminal (and installs the panic hook).
pub fn enter(mouse: bool) -> io::Result<Tui> {
    install_panic_hook();
    *UI_THREAD.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread::current().id());
    take(mouse)?;
    let setup = (|| {
        let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
        terminal.clear()?;
        Ok(terminal)
    })();
    match setup {
        Ok(terminal) => Ok(Tui { terminal, mouse }),
        Err(e) => {
            restore();
            Err(e)
        }
    }
}

/// Raw mode, the alternate screen, bracketed paste, the mouse wheel and unambiguous keys.
fn take(mouse: bool) -> io::Result<()> {
    enable_raw_mode()?;
    ACTIVE.store(true, Ordering::SeqCst);
    let mut out = io::stdout();
    let setup = (|| {
        execute!(out, EnterAlternateScreen, EnableBracketedPaste)?;
        if mouse {
            execute!(out, EnableMouseCapture)?;
            MOUSE.store(true, Ordering::SeqCst);
        }
        if crossterm::terminal::supports_keyboard_enhancement().unwrap_or(false) {
            execute!(
                out,
                PushKeyboardEnhancementFlags(KeyboardEnhancementFlags::DISAMBIGUATE_ESCAPE_CODES)
            )?;
            KEYBOARD.store(true, Ordering::SeqCst);
        }
        Ok(())
    })();
    if setup.is_err() {
        restore();
    }
    setup
}

/// Ctrl+Z: gives the terminal back to the shell and stops the process, as the terminal's own
/// suspend key would (raw mode turns that off); once continued (`fg`), takes it again.
pub fn suspend(tui: &mut Tui) -> io::Result<()> {
    restore();
    #[cfg(unix)]
    signal_hook::low_level::emulate_default_handler(signal_hook::consts::SIGTSTP)?;
    resume(tui)
}

/// Takes the terminal again after the process was stopped and continued: the shell had it
/// meanwhile and may have changed its modes. The next frame redraws everything.
pub fn resume(tui: &mut Tui) -> io::Result<()> {
    restore();
    take(tui.mouse)?;
    tui.terminal.clear()
}

/// Gives the terminal back; does nothing when it is not taken. Errors are ignored: this runs
/// on the way out, often while something else already failed.
pub fn restore() {
    if !ACTIVE.swap(false, Ordering::SeqCst) {
        return;
    }
    let mut out = io::stdout();
    if KEYBOARD.swap(false, Ordering::SeqCst) {
        let _ = execute!(out, PopKeyboardEnhancementFlags);
    }
    if MOUSE.swap(false, Ordering::SeqCst) {
        let _ = execute!(out, DisableMouseCapture);
    }
    let _ = execute!(
        out,
        DisableBracketedPaste,
        LeaveAlternateScreen,
        cursor::Show
    );
    let _ = disable_raw_mode();
}

/// Installs (once) the hook that restores the terminal before a panic message prints.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ui = *UI_THREAD.lock().unwrap_or_else(|e| e.into_inner());
            if ACTIVE.load(Ordering::SeqCst) && ui.is_some_and(|id| id != thread::current().id()) {
                // the worker catches its own panics; printing would scribble over the chat
                tracing::error!("panic on thread {:?}: {info}", thread::current().name());
                return;
            }
            restore();
            previous(info);
        }));
    });
}
