//! Key bindings: the actions a key can trigger, key names as written in `config.toml`
//! (`"ctrl+j"`, `"alt+enter"`, `"f1"`), and the map from keys to actions.
//! Editing keys (arrows, Home/End, Backspace, Ctrl+A/E/K/U/W) are fixed.
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use serde::Deserialize;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Send,
    Newline,
    /// Stop the generation, close an overlay, or leave editing.
    Cancel,
    /// Ctrl+C: stop the generation; when idle, twice quits.
    Interrupt,
    Help,
    Complete,
    ScrollUp,
    ScrollDown,
    PageUp,
    PageDown,
    Top,
    Bottom,
    TogglePreview,
    Sessions,
    /// Show finished thinking blocks whole, or as one line.
    ToggleThinking,
}

impl Action {
    pub const ALL: [Action; 15] = [
        Action::Send,
        Action::Newline,
        Action::Cancel,
        Action::Interrupt,
        Action::Help,
        Action::Complete,
        Action::ScrollUp,
        Action::ScrollDown,
        Action::PageUp,
        Action::PageDown,
        Action::Top,
        Action::Bottom,
        Action::TogglePreview,
        Action::Sessions,
        Action::ToggleThinking,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Action::Send => "send the message",
            Action::Newline => "new line in the message",
            Action::Cancel => "stop generating / close / leave editing",
            Action::Interrupt => "stop generating; twice when idle quits",
            Action::Help => "this help",
            Action::Complete => "complete a path or command",
            Action::ScrollUp => "scroll the conversation up a line",
            Action::ScrollDown => "scroll the conversation down a line",
            Action::PageUp => "scroll up a page",
            Action::PageDown => "scroll down a page",
            Action::Top => "go to the start of the conversation",
            Action::Bottom => "go to the end (follow new text)",
            Action::TogglePreview => "show or hide the picture preview",
            Action::Sessions => "saved sessions",
            Action::ToggleThinking => "expand or collapse the model's thinking",
        }
    }

    fn defaults(self) -> &'static [&'static str] {
        match self {
            Action::Send => &["enter"],
            Action::Newline => &["alt+enter", "shift+enter", "ctrl+j"],
            Action::Cancel => &["esc"],
            Action::Interrupt => &["ctrl+c"],
            Action::Help => &["f1"],
            Action::Complete => &["tab"],
            Action::ScrollUp => &["shift+up", "alt+up"],
            Action::ScrollDown => &["shift+down", "alt+down"],
            Action::PageUp => &["pageup"],
            Action::PageDown => &["pagedown"],
            Action::Top => &["ctrl+home"],
            Action::Bottom => &["ctrl+end"],
            Action::TogglePreview => &["f2"],
            Action::Sessions => &["f3"],
            Action::ToggleThinking => &["f4"],
        }
    }
}

/// A key with its modifiers, normalised so that a typed `A` is `shift+a` and Shift is ignored
/// on other characters (terminals disagree on reporting it for `?` and the like).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub code: KeyCode,
    pub mods: KeyModifiers,
}

impl Key {
    pub fn new(code: KeyCode, mods: KeyModifiers) -> Self {
        let mut mods = mods & (KeyModifiers::CONTROL | KeyModifiers::ALT | KeyModifiers::SHIFT);
        let code = match code {
            KeyCode::Char(c) => {
                mods.remove(KeyModifiers::SHIFT);
                if c.is_uppercase() {
                    mods.insert(KeyModifiers::SHIFT);
                }
                KeyCode::Char(c.to_lowercase().next().unwrap_or(c))
            }
            KeyCode::BackTab => {
                mods.insert(KeyModifiers::SHIFT);
                KeyCode::Tab
            }
            code => code,
        };
        Self { code, mods }
    }

    pub fn from_event(ev: &KeyEvent) -> Self {
        Self::new(ev.code, ev.modifiers)
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_lowercase();
        let mut parts: Vec<&str> = lower.split('+').collect();
        // "ctrl++" names the plus key
        if lower.ends_with("++") {
            parts.truncate(parts.len() - 2);
            parts.push("+");
        }
        let name = parts
            .pop()
            .filter(|n| !n.is_empty())
            .ok_or("empty key name")?;
        let mut mods = KeyModifiers::NONE;
        for m in parts {
            mods |= match m {
                "ctrl" | "control" => KeyModifiers::CONTROL,
                "alt" | "meta" | "option" => KeyModifiers::ALT,
                "shift" => KeyModifiers::SHIFT,
                other => return Err(format!("unknown modifier \"{other}\"")),
            };
        }
        let code = match name {
            "enter" | "return" => KeyCode::Enter,
            "esc" | "escape" => KeyCode::Esc,
            "tab" => KeyCode::Tab,
            "backspace" => KeyCode::Backspace,
            "delete" | "del" => KeyCode::Delete,
            "insert" => KeyCode::Insert,
            "up" => KeyCode::Up,
            "down" => KeyCode::Down,
            "left" => KeyCode::Left,
            "right" => KeyCode::Right,
            "home" => KeyCode::Home,
            "end" => KeyCode::End,
            "pageup" => KeyCode::PageUp,
            "pagedown" => KeyCode::PageDown,
            "space" => KeyCode::Char(' '),
            f if f.starts_with('f') && f.len() > 1 => match f[1..].parse::<u8>() {
                Ok(n @ 1..=24) => KeyCode::F(n),
                _ => return Err(format!("unknown key \"{name}\"")),
            },
            c if c.chars().count() == 1 => KeyCode::Char(c.chars().next().unwrap_or(' ')),
            _ => return Err(format!("unknown key \"{name}\"")),
        };
        Ok(Self::new(code, mods))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (m, name) in [
            (KeyModifiers::CONTROL, "Ctrl+"),
            (KeyModifiers::ALT, "Alt+"),
            (KeyModifiers::SHIFT, "Shift+"),
        ] {
            if self.mods.contains(m) {
                f.write_str(name)?;
            }
        }
        match self.code {
            KeyCode::Char(' ') => f.write_str("Space"),
            KeyCode::Char(c) => write!(f, "{}", c.to_uppercase()),
            KeyCode::F(n) => write!(f, "F{n}"),
            KeyCode::PageUp => f.write_str("PgUp"),
            KeyCode::PageDown => f.write_str("PgDn"),
            code => write!(f, "{code:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyMap {
    bindings: Vec<(Key, Action)>,
}

impl Default for KeyMap {
    fn default() -> Self {
        let bindings = Action::ALL
            .iter()
            .flat_map(|&a| {
                a.defaults()
                    .iter()
                    .map(move |k| (Key::parse(k).expect("default key names parse"), a))
            })
            .collect();
        Self { bindings }
    }
}

impl KeyMap {
    pub fn action(&self, ev: &KeyEvent) -> Option<Action> {
        let key = Key::from_event(ev);
        self.bindings
            .iter()
            .find(|(k, _)| *k == key)
            .map(|&(_, a)| a)
    }

    pub fn keys(&self, action: Action) -> Vec<Key> {
        self.bindings
            .iter()
            .filter(|(_, a)| *a == action)
            .map(|&(k, _)| k)
            .collect()
    }

    /// Gives `action` exactly `keys`; a key taken from another action's defaults moves here.
    /// Binding one key to two actions given explicitly is the caller's error to report.
    pub fn bind(&mut self, action: Action, keys: &[Key]) {
        self.bindings
            .retain(|(k, a)| *a != action && !keys.contains(k));
        self.bindings.extend(keys.iter().map(|&k| (k, action)));
    }

    /// The first key of `action`, for hints ("F1 help").
    pub fn hint(&self, action: Action) -> String {
        self.keys(action)
            .first()
            .map_or_else(|| "(unbound)".into(), Key::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(code: KeyCode, mods: KeyModifiers) -> KeyEvent {
        KeyEvent::new(code, mods)
    }

    #[test]
    fn parses_names_and_modifiers() {
        assert_eq!(
            Key::parse("Ctrl+Shift+X").unwrap(),
            Key::new(
                KeyCode::Char('x'),
                KeyModifiers::CONTROL | KeyModifiers::SHIFT
            )
        );
        assert_eq!(Key::parse("f12").unwrap().code, KeyCode::F(12));
        assert_eq!(Key::parse("ctrl++").unwrap().code, KeyCode::Char('+'));
        assert_eq!(
            Key::parse("ctrl+shft+x").unwrap_err(),
            "unknown modifier \"shft\""
        );
        assert_eq!(Key::parse("f99").unwrap_err(), "unknown key \"f99\"");
        assert_eq!(Key::parse("alt+enter").unwrap().to_string(), "Alt+Enter");
    }

    #[test]
    fn default_map_and_normalisation() {
        let map = KeyMap::default();
        assert_eq!(
            map.action(&ev(KeyCode::Enter, KeyModifiers::NONE)),
            Some(Action::Send)
        );
        assert_eq!(
            map.action(&ev(KeyCode::Enter, KeyModifiers::SHIFT)),
            Some(Action::Newline)
        );
        // Ctrl+J arrives as a control character in raw mode
        assert_eq!(
            map.action(&ev(KeyCode::Char('j'), KeyModifiers::CONTROL)),
            Some(Action::Newline)
        );
        // a typed capital letter is not Ctrl+C, nor anything else
        assert_eq!(
            map.action(&ev(KeyCode::Char('C'), KeyModifiers::SHIFT)),
            None
        );
        assert_eq!(
            map.action(&ev(KeyCode::BackTab, KeyModifiers::SHIFT)),
            None,
            "shift+tab is unbound by default"
        );
    }

    #[test]
    fn rebinding_moves_a_key_between_actions() {
        let mut map = KeyMap::default();
        let enter = Key::parse("enter").unwrap();
        let ctrl_s = Key::parse("ctrl+s").unwrap();
        map.bind(Action::Newline, &[enter]);
        map.bind(Action::Send, &[ctrl_s]);
        assert_eq!(
            map.action(&ev(KeyCode::Enter, KeyModifiers::NONE)),
            Some(Action::Newline)
        );
        assert_eq!(map.keys(Action::Send), vec![ctrl_s]);
        assert_eq!(map.keys(Action::Newline), vec![enter]);
        assert_eq!(map.hint(Action::Send), "Ctrl+S");
    }
}
