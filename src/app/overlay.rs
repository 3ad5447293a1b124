//! Overlays drawn over the chat: the help (keys from the live key map, commands) and the list
//! of saved sessions.
use super::graphics::Protocol;
use super::input::{COMMANDS, SET_KEYS};
use super::keys::Action;
use super::session;
use super::state::App;
use super::wrap::{wrap, Para};
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Widget};
use unicode_width::UnicodeWidthStr;

impl App {
    fn help_lines(&self) -> Vec<Line<'static>> {
        let t = &self.settings.theme;
        let keys = &self.settings.keys;
        let mut rows: Vec<(String, String)> = Action::ALL
            .iter()
            .map(|&a| {
                let names: Vec<String> = keys.keys(a).iter().map(ToString::to_string).collect();
                (names.join(", "), a.describe().to_string())
            })
            .collect();
        rows.extend(
            [
                (
                    "Up (empty prompt)",
                    "edit the last question and send it again",
                ),
                ("Mouse wheel", "scroll (hold Shift to select text)"),
                ("Ctrl+A / Ctrl+E", "start / end of the line"),
                ("Ctrl+K / Ctrl+U", "delete to the end / start of the line"),
                ("Ctrl+W, Alt+Backspace", "delete the word before the cursor"),
                ("Ctrl+Z", "suspend to the shell (fg comes back)"),
            ]
            .map(|(k, d)| (k.to_string(), d.to_string())),
        );
        let mut lines = vec![Line::styled("Keys", t.heading)];
        let kw = rows.iter().map(|(k, _)| k.width()).max().unwrap_or(0);
        for (k, d) in rows {
            lines.push(Line::from(vec![
                Span::styled(format!("  {k:kw$}  "), t.accent),
                Span::raw(d),
            ]));
        }
        lines.push(Line::default());
        lines.push(Line::styled("Commands", t.heading));
        let cw = COMMANDS
            .iter()
            .map(|c| c.0.width() + c.1.width() + 1)
            .max()
            .unwrap_or(0);
        for (name, args, what) in COMMANDS {
            let call = format!("{name} {args}");
            lines.push(Line::from(vec![
                Span::styled(format!("  {call:cw$}  "), t.accent),
                Span::raw(*what),
            ]));
        }
        lines.push(Line::default());
        for text in [
            format!("/set keys: {}.", SET_KEYS.join(", ")),
            "Paths typed, pasted or dropped into the prompt attach the file (quotes, \\ escapes and ~ work).".to_string(),
            "Pictures and grounding boxes show in the preview on the right.".to_string(),
            format!(
                "Pictures are drawn with {} (--graphics or graphics = in config.toml).",
                match self.graphics.map(|g| g.protocol) {
                    Some(Protocol::Kitty) => "kitty graphics",
                    Some(Protocol::Sixel) => "sixel",
                    Some(Protocol::Iterm2) => "iTerm2 inline images",
                    None => "half blocks",
                }
            ),
        ] {
            lines.push(Line::styled(text, t.notice));
        }
        lines
    }

    pub(super) fn render_help(&self, scroll: u16, area: Rect, buf: &mut Buffer) {
        let lines = self.help_lines();
        let widest = lines.iter().map(Line::width).max().unwrap_or(0) as u16;
        let inner_w = widest
            .saturating_add(2)
            .min(area.width.saturating_sub(2))
            .max(1);
        let rows: Vec<Line> = lines
            .into_iter()
            .flat_map(|l| wrap(&Para::indented(vec![Span::raw(" ")], l.spans), inner_w))
            .collect();
        let popup = centered(
            area,
            inner_w.saturating_add(2),
            (rows.len() as u16).saturating_add(2),
        );
        let keys = &self.settings.keys;
        let block = Block::bordered()
            .title(format!(
                " help · ↑↓ PgUp PgDn scroll · {} closes ",
                keys.hint(Action::Cancel)
            ))
            .border_style(self.settings.theme.border);
        let inner = block.inner(popup);
        Clear.render(popup, buf);
        block.render(popup, buf);
        let max_scroll = rows.len().saturating_sub(usize::from(inner.height));
        let first = usize::from(scroll).min(max_scroll);
        for (i, line) in rows
            .iter()
            .skip(first)
            .take(usize::from(inner.height))
            .enumerate()
        {
            buf.set_line(inner.x, inner.y + i as u16, line, inner.width);
        }
    }

    pub(super) fn render_sessions(
        &self,
        list: &[session::Summary],
        selected: usize,
        area: Rect,
        buf: &mut Buffer,
    ) {
        let t = &self.settings.theme;
        let rows: Vec<Line> = list
            .iter()
            .map(|s| match &s.problem {
                None => Line::from(format!(
                    " {:<24} {}  {} turn{} ",
                    s.name,
                    session::format_time(s.saved_at),
                    s.turns,
                    if s.turns == 1 { "" } else { "s" }
                )),
                Some(p) => Line::styled(format!(" {:<24} {p} ", s.name), t.error),
            })
            .collect();
        let widest = rows.iter().map(Line::width).max().unwrap_or(0) as u16;
        let popup = centered(
            area,
            widest.saturating_add(2),
            (rows.len() as u16).saturating_add(2),
        );
        let block = Block::bordered()
            .title(" saved chats · Enter opens ")
            .border_style(t.border);
        let inner = block.inner(popup);
        Clear.render(popup, buf);
        block.render(popup, buf);
        let first = selected.saturating_sub(usize::from(inner.height).saturating_sub(1));
        for (i, row) in rows
            .iter()
            .enumerate()
            .skip(first)
            .take(usize::from(inner.height))
        {
            let y = inner.y + (i - first) as u16;
            buf.set_line(inner.x, y, row, inner.width);
            if i == selected {
                buf.set_style(Rect::new(inner.x, y, inner.width, 1), t.selected);
            }
        }
    }
}

fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}
