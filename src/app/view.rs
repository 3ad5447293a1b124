//! `impl Widget for &App`: the conversation, the picture preview, staged attachments, the
//! prompt and the status line, with the help and session overlays on top. Degrades to the
//! prompt and status line on tiny terminals; never indexes outside the area it is given.
use super::graphics::{self, Graphics, Picture};
use super::grounding::{self, Grounding};
use super::keys::Action;
use super::markdown;
use super::preview;
use super::state::{App, Entry, EntryKind, Exchange, Mode, ModelState, Staged, Status};
use super::wrap::{wrap, Para};
use super::AttachmentInfo;
use crate::engine::protocol::{Attachment, Finish};
use crate::prompt::thinking;
use image::RgbImage;
use ratatui::buffer::Buffer;
use ratatui::layout::{Position, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Widget};
use std::rc::Rc;
use unicode_width::UnicodeWidthStr;

const SPINNER: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
/// Columns before the prompt text ("› ").
const GUTTER: u16 = 2;
const MAX_STAGED_ROWS: usize = 4;

/// Where each part goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Areas {
    pub transcript: Rect,
    pub preview: Option<Rect>,
    pub staged: Rect,
    pub input_title: Option<Rect>,
    pub input: Rect,
    pub status: Rect,
}

impl App {
    pub(super) fn areas(&self, area: Rect) -> Areas {
        let h = area.height;
        let status_h = u16::from(h >= 2);
        let title_h = u16::from(h >= 8);
        let rows = self.editor.layout(self.text_width(area.width)).rows.len();
        let input_h = u16::try_from(rows)
            .unwrap_or(u16::MAX)
            .clamp(1, (h / 3).clamp(1, 10))
            .min(h - status_h);
        let mut left = h - status_h - input_h;
        let title_h = title_h.min(left);
        left -= title_h;
        let staged_h = if h >= 12 {
            let n = self.staged.len();
            (n.min(MAX_STAGED_ROWS) + usize::from(n > MAX_STAGED_ROWS)) as u16
        } else {
            0
        }
        .min(left);
        let transcript_h = left - staged_h;
        let mut y = area.y;
        let mut next = |height: u16| {
            let r = Rect::new(area.x, y, area.width, height);
            y += height;
            r
        };
        let mut transcript = next(transcript_h);
        let staged = next(staged_h);
        let input_title = (title_h > 0).then(|| next(title_h));
        let input = next(input_h);
        let status = next(status_h);
        let preview = if self.show_preview
            && self.preview_source().is_some()
            && area.width >= 60
            && transcript_h >= 6
        {
            let w = (area.width * 2 / 5).clamp(24, 64);
            transcript.width -= w;
            Some(Rect::new(
                transcript.right(),
                transcript.y,
                w,
                transcript.height,
            ))
        } else {
            None
        };
        Areas {
            transcript,
            preview,
            staged,
            input_title,
            input,
            status,
        }
    }

    fn text_width(&self, width: u16) -> u16 {
        if width > GUTTER + 1 {
            width - GUTTER
        } else {
            width.max(1)
        }
    }

    /// Where the terminal cursor goes: in the prompt, in chat mode.
    pub fn cursor(&self, area: Rect) -> Option<Position> {
        if self.mode != Mode::Chat || area.is_empty() {
            return None;
        }
        let a = self.areas(area);
        if a.input.is_empty() {
            return None;
        }
        let layout = self.editor.layout(self.text_width(a.input.width));
        let (row, col) = layout.cursor;
        let first = row.saturating_sub(usize::from(a.input.height) - 1);
        let gutter = if a.input.width > GUTTER + 1 {
            GUTTER
        } else {
            0
        };
        let x = (a.input.x + gutter + col).min(a.input.right() - 1);
        Some(Position::new(x, a.input.y + (row - first) as u16))
    }

    fn spinner(&self) -> &'static str {
        SPINNER[(self.ticks % SPINNER.len() as u64) as usize]
    }

    fn model_name(&self) -> &str {
        self.info.as_ref().map_or("InternVL", |i| i.name.as_str())
    }

    fn render_transcript(&self, area: Rect, buf: &mut Buffer) {
        let width = area.width.max(1);
        let mut chunks: Vec<Rc<Vec<Line<'static>>>> = Vec::with_capacity(self.entries.len());
        {
            let mut cache = self.view.lines.borrow_mut();
            for e in &self.entries {
                let fixed = match &e.kind {
                    EntryKind::Notice { .. } => true,
                    EntryKind::Exchange(x) => {
                        matches!(x.status, Status::Done(_) | Status::Failed(_))
                            && self.editing != Some(e.id)
                    }
                };
                match cache.get(&e.id) {
                    Some((w, lines)) if fixed && *w == width => chunks.push(lines.clone()),
                    _ => {
                        let lines = Rc::new(self.entry_lines(e, width));
                        if fixed {
                            cache.insert(e.id, (width, lines.clone()));
                        }
                        chunks.push(lines);
                    }
                }
            }
        }
        // every entry ends with a blank line; the last one's is not worth a row
        let total = chunks
            .iter()
            .map(|c| c.len())
            .sum::<usize>()
            .saturating_sub(1);
        let height = usize::from(area.height);
        let max_top = total.saturating_sub(height);
        let top = self.scroll.map_or(max_top, |t| t.min(max_top));
        let mut metrics = self.view.metrics.get();
        metrics.lines = total;
        metrics.height = height;
        self.view.metrics.set(metrics);
        for (i, line) in chunks
            .iter()
            .flat_map(|c| c.iter())
            .skip(top)
            .take(height)
            .enumerate()
        {
            buf.set_line(area.x, area.y + i as u16, line, area.width);
        }
        if top < max_top && area.height > 0 {
            let more = format!(
                " ↓ {} more ({}) ",
                max_top - top,
                self.settings.keys.hint(Action::Bottom)
            );
            let w = (more.width() as u16).min(area.width);
            let style = self.settings.theme.accent.add_modifier(Modifier::REVERSED);
            buf.set_stringn(
                area.right() - w,
                area.bottom() - 1,
                more,
                usize::from(w),
                style,
            );
        }
    }

    fn entry_lines(&self, entry: &Entry, width: u16) -> Vec<Line<'static>> {
        let t = &self.settings.theme;
        let mut paras = Vec::new();
        match &entry.kind {
            EntryKind::Notice { text, error } => {
                let (mark, style) = if *error {
                    ("✗ ", t.error)
                } else {
                    ("• ", t.notice)
                };
                for (i, line) in text.split('\n').enumerate() {
                    let first = if i == 0 { mark } else { "  " };
                    paras.push(Para {
                        first: vec![Span::styled(first, style)],
                        rest: vec![Span::raw("  ")],
                        body: vec![Span::styled(line.to_string(), style)],
                    });
                }
            }
            EntryKind::Exchange(x) => {
                self.exchange_paras(x, self.editing == Some(entry.id), &mut paras)
            }
        }
        paras.push(Para::default());
        paras.iter().flat_map(|p| wrap(p, width)).collect()
    }

    fn exchange_paras(&self, x: &Exchange, editing: bool, out: &mut Vec<Para>) {
        let t = &self.settings.theme;
        let indent = || vec![Span::raw("  ")];
        let mut head = vec![Span::styled("You", t.user)];
        if editing {
            head.push(Span::styled(" · editing", t.dim));
        }
        out.push(Para::indented(vec![], head));
        for line in x.typed.split('\n') {
            out.push(Para::indented(indent(), vec![Span::raw(line.to_string())]));
        }
        for (a, info) in x.attachments.iter().zip(&x.infos) {
            let mut body = vec![Span::styled(attachment_name(a, info.as_ref()), t.accent)];
            if let Some(info) = info {
                body.push(Span::styled(format!("  {}", cost(a, info)), t.dim));
            }
            out.push(Para::indented(indent(), body));
        }
        out.push(Para::indented(
            vec![],
            vec![Span::styled(self.model_name().to_string(), t.assistant)],
        ));
        let waiting = |what: String| Para::indented(indent(), vec![Span::styled(what, t.dim)]);
        match &x.status {
            Status::Waiting => out.push(waiting(match &self.model {
                ModelState::Loading { progress, .. } => format!(
                    "{} waiting for the model to load ({:.0}%)",
                    self.spinner(),
                    progress * 100.0
                ),
                _ => format!("{} waiting for the model", self.spinner()),
            })),
            Status::Streaming if x.answer.is_empty() => out.push(waiting(match x.prompt_tokens {
                Some(n) => format!("{} reading the prompt ({n} tokens)", self.spinner()),
                None => format!("{} reading the prompt", self.spinner()),
            })),
            Status::Done(Finish::Cancelled) if x.answer.is_empty() => {
                out.push(waiting("(stopped before any answer)".into()));
            }
            Status::Failed(e) => {
                out.push(Para::indented(
                    indent(),
                    vec![Span::styled(format!("✗ {e}"), t.error)],
                ));
                out.push(waiting("/retry tries again".into()));
            }
            status => {
                let streaming = *status == Status::Streaming;
                let split = thinking::split(&x.answer);
                let start = out.len();
                if let Some(reasoning) = split.reasoning {
                    self.thinking_paras(reasoning, streaming && split.thinking(), out);
                }
                // the thinking is never part of the answer's Markdown
                let content = if split.reasoning.is_some() {
                    split.content
                } else {
                    &x.answer
                };
                for mut p in markdown::render(&grounding::mark(content), t) {
                    p.first.insert(0, Span::raw("  "));
                    p.rest.insert(0, Span::raw("  "));
                    out.push(p);
                }
                if streaming {
                    let cursor = Span::styled("▍", t.accent);
                    let has_text = out.len() > start;
                    match out.last_mut().filter(|_| has_text) {
                        Some(p) => p.body.push(cursor),
                        None => out.push(Para::indented(indent(), vec![cursor])),
                    }
                }
            }
        }
        if let (Status::Done(finish), Some(s)) = (&x.status, &x.stats) {
            let mut text = format!(
                "{} · {:.1} tok/s · first token after {:.2} s",
                count(s.completion_tokens, "token"),
                s.tokens_per_s,
                s.ttft.as_secs_f64()
            );
            match finish {
                Finish::Length => text.push_str(" · cut at max_new_tokens"),
                Finish::Cancelled => text.push_str(" · stopped"),
                Finish::Stop => {}
            }
            if x.dropped_turns > 0 {
                text.push_str(&format!(
                    " · {} left out to fit the context",
                    count(x.dropped_turns, "earlier turn")
                ));
            }
            out.push(Para::indented(indent(), vec![Span::styled(text, t.dim)]));
        }
    }

    /// A think block: whole and dimmed while the model thinks (or when expanded), else one
    /// line that says how to open it.
    fn thinking_paras(&self, reasoning: &str, live: bool, out: &mut Vec<Para>) {
        let t = &self.settings.theme;
        let key = self.settings.keys.hint(Action::ToggleThinking);
        let lines = reasoning.lines().count();
        let head = if live {
            "▾ thinking…".to_string()
        } else if reasoning.is_empty() {
            return;
        } else if self.thinking_expanded {
            format!("▾ thought for {} — {key} to collapse", count(lines, "line"))
        } else {
            format!("▸ thought for {} — {key} to expand", count(lines, "line"))
        };
        let style = t.dim.add_modifier(Modifier::ITALIC);
        out.push(Para::indented(
            vec![Span::raw("  ")],
            vec![Span::styled(head, t.dim)],
        ));
        if live || self.thinking_expanded {
            let gutter = || vec![Span::styled("  │ ", t.dim)];
            for line in reasoning.lines() {
                out.push(Para::indented(
                    gutter(),
                    vec![Span::styled(line.to_string(), style)],
                ));
            }
        }
    }

    fn render_staged(&self, area: Rect, buf: &mut Buffer) {
        let t = &self.settings.theme;
        for (i, s) in self
            .staged
            .iter()
            .take(usize::from(area.height))
            .enumerate()
        {
            let y = area.y + i as u16;
            let mut spans = vec![
                Span::styled(format!(" [{}] ", i + 1), t.accent),
                Span::raw(attachment_name(&s.attachment, s.info.as_ref())),
            ];
            match &s.info {
                Some(info) => spans.push(Span::styled(
                    format!("  {}", cost(&s.attachment, info)),
                    t.dim,
                )),
                None => spans.push(Span::styled(
                    format!("  {} reading…", self.spinner()),
                    t.dim,
                )),
            }
            if i == MAX_STAGED_ROWS && self.staged.len() > MAX_STAGED_ROWS {
                spans = vec![Span::styled(
                    format!(" +{} more (/detach N)", self.staged.len() - MAX_STAGED_ROWS),
                    t.dim,
                )];
            }
            buf.set_line(area.x, y, &Line::from(spans), area.width);
        }
    }

    fn render_input(&self, title: Option<Rect>, area: Rect, buf: &mut Buffer) {
        let t = &self.settings.theme;
        if let Some(r) = title {
            let keys = &self.settings.keys;
            let (label, style) = if self.editing.is_some() {
                (
                    format!(
                        "editing the last question ({} leaves it)",
                        keys.hint(Action::Cancel)
                    ),
                    t.accent,
                )
            } else if self.pending.is_some() {
                (
                    format!("{} reading attachments, then sending", self.spinner()),
                    t.accent,
                )
            } else if self.busy() {
                (
                    format!("answering · {} stops", keys.hint(Action::Cancel)),
                    t.dim,
                )
            } else {
                let tokens: usize = self
                    .staged
                    .iter()
                    .filter_map(|s| s.info.as_ref())
                    .map(|i| i.tokens)
                    .sum();
                match self.staged.len() {
                    0 => ("message".to_string(), t.dim),
                    n => (
                        format!(
                            "message + {n} attachment{} ≈ {tokens} image tokens",
                            if n == 1 { "" } else { "s" }
                        ),
                        self.token_budget_style(tokens),
                    ),
                }
            };
            let hint = format!(
                " {} send · {} new line · {} help ",
                keys.hint(Action::Send),
                keys.hint(Action::Newline),
                keys.hint(Action::Help)
            );
            let rule = "─".repeat(usize::from(r.width));
            buf.set_stringn(r.x, r.y, &rule, usize::from(r.width), t.border);
            let left = format!("─ {label} ");
            buf.set_stringn(r.x, r.y, &left, usize::from(r.width), style);
            let room = usize::from(r.width).saturating_sub(left.width() + 1);
            if hint.width() <= room {
                let x = r.right() - hint.width() as u16 - 1;
                buf.set_stringn(x, r.y, &hint, hint.width(), t.dim);
            }
        }
        if area.is_empty() {
            return;
        }
        let gutter = if area.width > GUTTER + 1 { GUTTER } else { 0 };
        let text_w = self.text_width(area.width);
        if self.editor.is_empty() {
            if gutter > 0 {
                buf.set_stringn(area.x, area.y, "› ", 2, t.accent);
            }
            let hint = if self.busy() {
                "type the next question while this one is answered"
            } else {
                "ask about a picture, or anything (/image PATH, /help)"
            };
            buf.set_stringn(area.x + gutter, area.y, hint, usize::from(text_w), t.dim);
            return;
        }
        let layout = self.editor.layout(text_w);
        let first = layout.cursor.0.saturating_sub(usize::from(area.height) - 1);
        for (i, range) in layout
            .rows
            .iter()
            .skip(first)
            .take(usize::from(area.height))
            .enumerate()
        {
            let y = area.y + i as u16;
            if gutter > 0 {
                let mark = if first + i == 0 { "› " } else { "  " };
                buf.set_stringn(area.x, y, mark, 2, t.accent);
            }
            let text = &self.editor.text()[range.clone()];
            buf.set_stringn(area.x + gutter, y, text, usize::from(text_w), Style::new());
        }
        let mut metrics = self.view.metrics.get();
        metrics.input_width = text_w;
        self.view.metrics.set(metrics);
    }

    fn token_budget_style(&self, tokens: usize) -> Style {
        match &self.info {
            Some(i) if tokens >= i.context_len => self.settings.theme.error,
            _ => self.settings.theme.accent,
        }
    }

    fn render_status(&self, area: Rect, buf: &mut Buffer) {
        if area.is_empty() {
            return;
        }
        let t = &self.settings.theme;
        buf.set_style(area, t.status);
        let mut model = match &self.info {
            Some(i) => format!("{} · {} · {}", i.name, i.device, i.dtype),
            None => "InternVL".to_string(),
        };
        if self.settings.think {
            model.push_str(" · thinking on");
        }
        let mut state_style = t.status;
        let state = match (&self.model, &self.gen) {
            (ModelState::Loading { progress, what }, _) => {
                let filled = (progress.clamp(0.0, 1.0) * 10.0).round() as usize;
                format!(
                    "{} loading {}{} {:.0}% {what}",
                    self.spinner(),
                    "▰".repeat(filled),
                    "▱".repeat(10 - filled),
                    progress * 100.0
                )
            }
            (ModelState::Failed(_), _) => {
                state_style = state_style.patch(t.error);
                "model failed to load".to_string()
            }
            (ModelState::Gone, _) => {
                state_style = state_style.patch(t.error);
                "model stopped".to_string()
            }
            (ModelState::Ready, Some(g)) => {
                let pieces = self.generating_pieces();
                let doing = if self.generating_thinks() {
                    "thinking"
                } else {
                    "answering"
                };
                let mut s = format!("{} {doing}, {}", self.spinner(), count(pieces, "token"));
                if let (Some(first), Some(now)) = (g.first_token, self.now) {
                    let secs = now.duration_since(first).as_secs_f64();
                    if secs > 0.2 && pieces > 1 {
                        s.push_str(&format!(" · {:.1} tok/s", (pieces - 1) as f64 / secs));
                    }
                }
                s
            }
            (ModelState::Ready, None) => "ready".to_string(),
        };
        let stats = match (&self.last_stats, &self.gen, &self.model) {
            (Some(s), None, ModelState::Ready) => format!(
                " │ {:.1} tok/s · prompt {}",
                s.tokens_per_s,
                count(s.prompt_tokens, "token")
            ),
            _ => String::new(),
        };
        let with_stats = format!(" {model} │ {state}{stats} ");
        let full = format!(" {model} │ {state} ");
        let short = format!(" {state} ");
        // the most that fits: a message outranks the state, the state outranks the model,
        // and the model outranks the last answer's figures
        let (right, right_style) = match &self.flash {
            Some(f) => (
                format!(" {} ", f.text),
                t.status.patch(if f.error { t.error } else { t.accent }),
            ),
            None => (
                format!(
                    " {} · {} help ",
                    self.session.name,
                    self.settings.keys.hint(Action::Help)
                ),
                t.status,
            ),
        };
        let choices = if self.flash.is_some() {
            vec![
                (with_stats, true),
                (full, true),
                (short, true),
                (String::new(), true),
            ]
        } else {
            vec![
                (with_stats.clone(), true),
                (with_stats, false),
                (full, false),
                (short, false),
            ]
        };
        let width = usize::from(area.width);
        let fits =
            |(l, r): &(String, bool)| l.width() + if *r { right.width() } else { 0 } <= width;
        let (left, show_right) = choices
            .iter()
            .find(|c| fits(c))
            .or(choices.last())
            .cloned()
            .unwrap_or_default();
        buf.set_stringn(area.x, area.y, &left, width, state_style);
        if show_right {
            let right_w = right.width().min(width);
            let x = area.x + (width - right_w) as u16;
            buf.set_stringn(x, area.y, &right, right_w, right_style);
        }
    }

    /// The answer being generated is still in its think block.
    fn generating_thinks(&self) -> bool {
        let entry = self.gen.as_ref().map(|g| g.entry);
        self.exchanges()
            .find(|(id, _)| Some(*id) == entry)
            .is_some_and(|(_, x)| thinking::split(&x.answer).thinking())
    }

    fn generating_pieces(&self) -> usize {
        let entry = self.gen.as_ref().map(|g| g.entry);
        self.entries
            .iter()
            .find(|e| Some(e.id) == entry)
            .and_then(|e| match &e.kind {
                EntryKind::Exchange(x) => Some(x.pieces),
                EntryKind::Notice { .. } => None,
            })
            .unwrap_or(0)
    }

    /// What the preview shows: the staged attachments, else the latest exchange with pictures.
    fn preview_source(&self) -> Option<PreviewSource<'_>> {
        let has_picture = |i: &AttachmentInfo| i.preview.is_some() || !i.frames.is_empty();
        if self
            .staged
            .iter()
            .filter_map(|s| s.info.as_ref())
            .any(has_picture)
        {
            return Some(PreviewSource::Staged(&self.staged));
        }
        let (n, x) = self
            .exchanges()
            .enumerate()
            .filter(|(_, (_, x))| x.infos.iter().flatten().any(has_picture))
            .last()
            .map(|(n, (_, x))| (n, x))?;
        Some(PreviewSource::Turn { number: n + 1, x })
    }

    /// Where the preview's title, captions, pictures and legend go inside `area`.
    fn preview_layout(&self, area: Rect) -> Option<PreviewLayout<'_>> {
        let source = self.preview_source()?;
        let inner = preview_block(&self.settings.theme).inner(area);
        let (title, pictures, groundings) = match source {
            PreviewSource::Staged(staged) => (
                " staged".to_string(),
                staged
                    .iter()
                    .filter_map(|s| Some((&s.attachment, s.info.as_ref()?)))
                    .collect::<Vec<_>>(),
                Vec::new(),
            ),
            PreviewSource::Turn { number, x } => (
                format!(" turn {number}"),
                x.attachments
                    .iter()
                    .zip(&x.infos)
                    .filter_map(|(a, i)| Some((a, i.as_ref()?)))
                    .collect(),
                grounding::parse(thinking::split(&x.answer).content),
            ),
        };
        let mut layout = PreviewLayout {
            inner,
            title,
            legend_h: 0,
            groundings,
            captions: Vec::new(),
            pictures: Vec::new(),
        };
        if inner.height < 2 || inner.width < 2 {
            return Some(layout);
        }
        layout.legend_h = (layout.groundings.len().min(5) as u16).min(inner.height - 1);
        let body = Rect::new(
            inner.x,
            inner.y + 1,
            inner.width,
            (inner.height - 1).saturating_sub(layout.legend_h),
        );
        let shown = pictures.len().min(usize::from(body.height / 3).max(1));
        let mut y = body.y;
        for (k, (a, info)) in pictures.iter().take(shown).enumerate() {
            let h = if k + 1 == shown {
                body.bottom() - y
            } else {
                body.height / shown as u16
            };
            let section = Rect::new(body.x, y, body.width, h);
            y += h;
            if section.height == 0 {
                continue;
            }
            let mut caption = attachment_name(a, Some(info));
            if k + 1 == shown && pictures.len() > shown {
                caption.push_str(&format!("  (+{} more)", pictures.len() - shown));
            }
            layout.captions.push((section, caption));
            let pic_area = Rect::new(section.x, section.y + 1, section.width, section.height - 1);
            // boxes belong to the first picture of the turn
            layout.pictures.extend(
                picture_cells(info, pic_area)
                    .into_iter()
                    .map(|(img, r, single)| (img, r, k == 0 && single)),
            );
        }
        Some(layout)
    }

    /// The protocol pictures are drawn with now: none while an overlay covers the preview.
    fn graphics_in_use(&self) -> Option<Graphics> {
        self.graphics.filter(|_| self.mode == Mode::Chat)
    }

    /// The pictures [`graphics::Images`] is to draw in a frame of `area` (none with half
    /// blocks).
    pub fn pictures(&self, area: Rect) -> Vec<Picture<'_>> {
        let Some(g) = self.graphics_in_use() else {
            return Vec::new();
        };
        let Some(preview) = self.areas(area).preview else {
            return Vec::new();
        };
        self.preview_layout(preview)
            .map_or_else(Vec::new, |l| placed(&l, g))
    }

    fn render_preview(&self, area: Rect, buf: &mut Buffer) {
        let Some(layout) = self.preview_layout(area) else {
            return;
        };
        let t = &self.settings.theme;
        preview_block(t).render(area, buf);
        let inner = layout.inner;
        if inner.height < 2 || inner.width < 2 {
            return;
        }
        buf.set_stringn(
            inner.x,
            inner.y,
            &layout.title,
            usize::from(inner.width),
            t.accent,
        );
        for (section, caption) in &layout.captions {
            buf.set_stringn(
                section.x,
                section.y,
                caption,
                usize::from(section.width),
                t.dim,
            );
        }
        match self.graphics_in_use() {
            // blank cells under the images, which are drawn after the frame
            Some(g) => {
                for p in placed(&layout, g) {
                    for pos in p.place.rect.intersection(buf.area).positions() {
                        buf[pos].reset();
                    }
                }
            }
            None => {
                for &(img, r, boxes) in &layout.pictures {
                    let groundings = if boxes { &layout.groundings[..] } else { &[] };
                    preview::render(img, groundings, r, buf);
                }
            }
        }
        let legend_h = layout.legend_h;
        for (n, g) in layout
            .groundings
            .iter()
            .take(usize::from(legend_h))
            .enumerate()
        {
            let ly = inner.bottom() - legend_h + n as u16;
            let text = format!(
                "[{}] {}",
                n + 1,
                if g.label.is_empty() { "box" } else { &g.label }
            );
            let style = Style::new()
                .fg(grounding::color(n))
                .add_modifier(Modifier::BOLD);
            buf.set_stringn(inner.x, ly, text, usize::from(inner.width), style);
        }
    }
}

enum PreviewSource<'a> {
    Staged(&'a [Staged]),
    Turn { number: usize, x: &'a Exchange },
}

struct PreviewLayout<'a> {
    inner: Rect,
    title: String,
    groundings: Vec<Grounding>,
    legend_h: u16,
    /// Each attachment's section and its caption (on the section's first row).
    captions: Vec<(Rect, String)>,
    /// Each picture, the cells it may use, and whether the turn's boxes go on it.
    pictures: Vec<(&'a RgbImage, Rect, bool)>,
}

fn preview_block(t: &super::theme::Theme) -> Block<'static> {
    Block::new().borders(Borders::LEFT).border_style(t.border)
}

/// The layout's pictures placed for graphics protocol `g`.
fn placed<'a>(layout: &PreviewLayout<'a>, g: Graphics) -> Vec<Picture<'a>> {
    layout
        .pictures
        .iter()
        .filter_map(|&(image, r, boxes)| {
            Some(Picture {
                place: graphics::place(image.width(), image.height(), r, g)?,
                image,
                groundings: if boxes {
                    layout.groundings.clone()
                } else {
                    Vec::new()
                },
            })
        })
        .collect()
}

/// The picture of an attachment in `area`, or its video frames as a gallery; true for a
/// single picture (boxes are only drawn on one).
fn picture_cells(info: &AttachmentInfo, area: Rect) -> Vec<(&RgbImage, Rect, bool)> {
    if area.is_empty() {
        return Vec::new();
    }
    let frames: Vec<&RgbImage> = if info.frames.is_empty() {
        info.preview.iter().collect()
    } else {
        info.frames.iter().collect()
    };
    if let [one] = frames.as_slice() {
        return vec![(one, area, true)];
    }
    let aspect = frames
        .first()
        .map_or(1.0, |f| f64::from(f.width()) / f64::from(f.height().max(1)));
    frames
        .iter()
        .zip(preview::gallery(frames.len(), aspect, area))
        .map(|(frame, cell)| {
            // a column and a row between frames
            let inner = Rect::new(
                cell.x,
                cell.y,
                cell.width.saturating_sub(u16::from(cell.width > 2)),
                cell.height.saturating_sub(u16::from(cell.height > 2)),
            );
            (*frame, inner, false)
        })
        .collect()
}

/// The probe's name for it, else its file name, after a picture or video mark.
fn attachment_name(a: &Attachment, info: Option<&AttachmentInfo>) -> String {
    let name = match (info, a.path().file_name()) {
        (Some(i), _) => i.name.clone(),
        (None, Some(n)) => n.to_string_lossy().into_owned(),
        (None, None) => a.path().display().to_string(),
    };
    match a {
        Attachment::Image { .. } => format!("▣ {name}"),
        Attachment::Video { .. } => format!("▶ {name}"),
    }
}

/// Size, tiling and token cost of an attachment.
fn cost(a: &Attachment, info: &AttachmentInfo) -> String {
    let size = human_size(info.bytes);
    match a {
        Attachment::Image { .. } => {
            let (c, r) = info.grid;
            let thumb = if info.tiles > (c * r) as usize {
                "+thumbnail"
            } else {
                ""
            };
            format!(
                "{size} · {c}×{r}{thumb} = {} tiles · {} tokens",
                info.tiles, info.tokens
            )
        }
        Attachment::Video { segments, .. } => {
            let length = info
                .duration
                .map_or_else(String::new, |d| format!("{d:.1} s · "));
            format!(
                "{size} · {length}{segments} frames · {} tiles · {} tokens",
                info.tiles, info.tokens
            )
        }
    }
}

/// "1 token", "2 tokens".
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KB", "MB", "GB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl Widget for &App {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let area = area.intersection(buf.area);
        if area.is_empty() {
            return;
        }
        let a = self.areas(area);
        self.render_transcript(a.transcript, buf);
        if let Some(p) = a.preview {
            self.render_preview(p, buf);
        }
        self.render_staged(a.staged, buf);
        self.render_input(a.input_title, a.input, buf);
        self.render_status(a.status, buf);
        match &self.mode {
            Mode::Chat => {}
            Mode::Help { scroll } => self.render_help(*scroll, area, buf),
            Mode::Sessions { list, selected } => self.render_sessions(list, *selected, area, buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(250_880), "245.0 KB");
        assert_eq!(human_size(3_250_000), "3.1 MB");
    }
}
