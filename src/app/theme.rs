//! Colours of the chat. `mono` uses only bold, dim, italic and reverse (for `NO_COLOR` and
//! terminals without colour); pictures keep their own colours in every theme.
use ratatui::style::{Color, Modifier, Style};

#[derive(Debug, Clone, PartialEq)]
pub struct Theme {
    pub name: &'static str,
    pub user: Style,
    pub assistant: Style,
    pub dim: Style,
    pub notice: Style,
    pub error: Style,
    pub accent: Style,
    pub border: Style,
    pub status: Style,
    pub selected: Style,
    pub heading: Style,
    pub code: Style,
    pub quote: Style,
    pub link: Style,
    pub keyword: Style,
    pub string: Style,
    pub comment: Style,
    pub number: Style,
}

pub const THEMES: [&str; 3] = ["dark", "light", "mono"];

impl Default for Theme {
    fn default() -> Self {
        Self::dark()
    }
}

impl Theme {
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "dark" => Some(Self::dark()),
            "light" => Some(Self::light()),
            "mono" => Some(Self::mono()),
            _ => None,
        }
    }

    pub fn dark() -> Self {
        let fg = |c| Style::new().fg(c);
        Self {
            name: "dark",
            user: fg(Color::LightCyan).add_modifier(Modifier::BOLD),
            assistant: fg(Color::LightGreen).add_modifier(Modifier::BOLD),
            dim: fg(Color::DarkGray),
            notice: fg(Color::Gray),
            error: fg(Color::LightRed),
            accent: fg(Color::Yellow),
            border: fg(Color::DarkGray),
            status: Style::new().bg(Color::Rgb(40, 40, 48)).fg(Color::Gray),
            selected: Style::new().bg(Color::Rgb(60, 60, 90)),
            heading: fg(Color::LightMagenta).add_modifier(Modifier::BOLD),
            code: fg(Color::Rgb(230, 200, 140)),
            quote: fg(Color::Gray).add_modifier(Modifier::ITALIC),
            link: fg(Color::LightBlue).add_modifier(Modifier::UNDERLINED),
            keyword: fg(Color::LightMagenta),
            string: fg(Color::LightGreen),
            comment: fg(Color::DarkGray).add_modifier(Modifier::ITALIC),
            number: fg(Color::LightYellow),
        }
    }

    pub fn light() -> Self {
        let fg = |c| Style::new().fg(c);
        Self {
            name: "light",
            user: fg(Color::Blue).add_modifier(Modifier::BOLD),
            assistant: fg(Color::Green).add_modifier(Modifier::BOLD),
            dim: fg(Color::Gray),
            notice: fg(Color::DarkGray),
            error: fg(Color::Red),
            accent: fg(Color::Rgb(160, 100, 0)),
            border: fg(Color::Gray),
            status: Style::new().bg(Color::Rgb(220, 220, 228)).fg(Color::Black),
            selected: Style::new().bg(Color::Rgb(200, 210, 240)),
            heading: fg(Color::Magenta).add_modifier(Modifier::BOLD),
            code: fg(Color::Rgb(150, 80, 0)),
            quote: fg(Color::DarkGray).add_modifier(Modifier::ITALIC),
            link: fg(Color::Blue).add_modifier(Modifier::UNDERLINED),
            keyword: fg(Color::Magenta),
            string: fg(Color::Green),
            comment: fg(Color::Gray).add_modifier(Modifier::ITALIC),
            number: fg(Color::Rgb(160, 100, 0)),
        }
    }

    pub fn mono() -> Self {
        let m = |m| Style::new().add_modifier(m);
        let plain = Style::new();
        Self {
            name: "mono",
            user: m(Modifier::BOLD),
            assistant: m(Modifier::BOLD),
            dim: m(Modifier::DIM),
            notice: plain,
            error: m(Modifier::BOLD),
            accent: m(Modifier::BOLD),
            border: m(Modifier::DIM),
            status: m(Modifier::REVERSED),
            selected: m(Modifier::REVERSED),
            heading: m(Modifier::BOLD | Modifier::UNDERLINED),
            code: m(Modifier::BOLD),
            quote: m(Modifier::ITALIC),
            link: m(Modifier::UNDERLINED),
            keyword: m(Modifier::BOLD),
            string: plain,
            comment: m(Modifier::DIM),
            number: plain,
        }
    }
}
