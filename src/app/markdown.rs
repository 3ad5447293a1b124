//! Markdown answers as styled lines (pulldown-cmark events): headings, emphasis, inline code,
//! fenced code with keyword colouring, lists (nested, numbered, task), quotes, tables, links,
//! rules. Single line breaks are kept, as models mean them. Grounding marks (see
//! [`super::grounding::mark`]) become coloured `[n]` tags.
use super::grounding;
use super::highlight::highlight;
use super::theme::Theme;
use super::wrap::{width_of, Para};
use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};
use ratatui::style::{Modifier, Style};
use ratatui::text::Span;

pub fn render(text: &str, theme: &Theme) -> Vec<Para> {
    let opts = Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TABLES | Options::ENABLE_TASKLISTS;
    let mut r = Renderer {
        theme,
        out: Vec::new(),
        line: Vec::new(),
        styles: Vec::new(),
        containers: Vec::new(),
        blank_before: false,
        code: None,
        table: None,
        links: Vec::new(),
    };
    for event in Parser::new_ext(text, opts) {
        r.event(event);
    }
    r.flush();
    r.out
}

enum Container {
    Quote,
    List(Option<u64>),
    Item { marker: String, used: bool },
}

struct Code {
    lang: String,
    text: String,
}

#[derive(Default)]
struct Table {
    rows: Vec<Vec<Vec<Span<'static>>>>,
    row: Vec<Vec<Span<'static>>>,
    cell: Vec<Span<'static>>,
}

struct Renderer<'t> {
    theme: &'t Theme,
    out: Vec<Para>,
    line: Vec<Span<'static>>,
    styles: Vec<Style>,
    containers: Vec<Container>,
    /// A block ended: the next one starts after a blank line.
    blank_before: bool,
    code: Option<Code>,
    table: Option<Table>,
    /// Link targets and where their text starts in `line`.
    links: Vec<(String, usize)>,
}

impl Renderer<'_> {
    fn event(&mut self, event: Event) {
        match event {
            Event::Start(tag) => self.start(tag),
            Event::End(tag) => self.end(tag),
            Event::Text(t) => match &mut self.code {
                Some(code) => code.text.push_str(&t),
                None => self.text(&t),
            },
            Event::Code(t) => {
                let style = self.style().patch(self.theme.code);
                self.push(Span::styled(t.to_string(), style));
            }
            Event::InlineMath(t) | Event::DisplayMath(t) => {
                self.push(Span::styled(t.to_string(), self.theme.code));
            }
            Event::Html(t) | Event::InlineHtml(t) => {
                for (i, part) in t.split('\n').enumerate() {
                    if i > 0 {
                        self.flush();
                    }
                    if !part.is_empty() {
                        self.push(Span::styled(part.to_string(), self.theme.dim));
                    }
                }
            }
            Event::FootnoteReference(t) => self.push(Span::raw(format!("[^{t}]"))),
            Event::SoftBreak | Event::HardBreak => self.flush(),
            Event::Rule => {
                self.start_block();
                self.push(Span::styled("─".repeat(16), self.theme.dim));
                self.end_block();
            }
            Event::TaskListMarker(done) => {
                self.push(Span::raw(if done { "[x] " } else { "[ ] " }));
            }
        }
    }

    fn start(&mut self, tag: Tag) {
        let t = self.theme;
        match tag {
            Tag::Paragraph | Tag::HtmlBlock | Tag::MetadataBlock(_) => self.start_block(),
            Tag::Heading { level, .. } => {
                self.start_block();
                let style = if level == pulldown_cmark::HeadingLevel::H1 {
                    t.heading.add_modifier(Modifier::UNDERLINED)
                } else {
                    t.heading
                };
                self.styles.push(style);
            }
            Tag::BlockQuote(_) => {
                self.start_block();
                self.containers.push(Container::Quote);
            }
            Tag::CodeBlock(kind) => {
                self.start_block();
                let lang = match kind {
                    CodeBlockKind::Fenced(info) => {
                        info.split_whitespace().next().unwrap_or("").to_string()
                    }
                    CodeBlockKind::Indented => String::new(),
                };
                self.code = Some(Code {
                    lang,
                    text: String::new(),
                });
            }
            Tag::List(start) => {
                self.flush();
                if !self.in_list() {
                    self.start_block();
                }
                self.containers.push(Container::List(start));
            }
            Tag::Item => {
                self.flush();
                let depth = self
                    .containers
                    .iter()
                    .filter(|c| matches!(c, Container::List(_)))
                    .count();
                let marker = match self.containers.last_mut() {
                    Some(Container::List(Some(n))) => {
                        *n += 1;
                        format!("{}. ", *n - 1)
                    }
                    _ if depth > 1 => "◦ ".to_string(),
                    _ => "• ".to_string(),
                };
                self.containers.push(Container::Item {
                    marker,
                    used: false,
                });
            }
            Tag::Table(_) => {
                self.start_block();
                self.table = Some(Table::default());
            }
            Tag::TableHead | Tag::TableRow | Tag::TableCell => {}
            Tag::Emphasis => self
                .styles
                .push(self.style().add_modifier(Modifier::ITALIC)),
            Tag::Strong => self.styles.push(self.style().add_modifier(Modifier::BOLD)),
            Tag::Strikethrough => self
                .styles
                .push(self.style().add_modifier(Modifier::CROSSED_OUT)),
            Tag::Link { dest_url, .. } => {
                self.styles.push(self.style().patch(t.link));
                self.links.push((dest_url.to_string(), self.line.len()));
            }
            Tag::Image { .. } => self.push(Span::styled("[image: ", t.dim)),
            _ => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Paragraph | TagEnd::HtmlBlock | TagEnd::MetadataBlock(_) => self.end_block(),
            TagEnd::Heading(_) => {
                self.styles.pop();
                self.end_block();
            }
            TagEnd::BlockQuote(_) => {
                self.flush();
                self.containers.pop();
                self.blank_before = true;
            }
            TagEnd::CodeBlock => self.code_block(),
            TagEnd::List(_) => {
                self.flush();
                self.containers.pop();
                if !self.in_list() {
                    self.blank_before = true;
                }
            }
            TagEnd::Item => {
                self.flush();
                self.containers.pop();
            }
            TagEnd::TableCell => {
                if let Some(t) = &mut self.table {
                    let cell = std::mem::take(&mut t.cell);
                    t.row.push(cell);
                }
            }
            TagEnd::TableHead | TagEnd::TableRow => {
                if let Some(t) = &mut self.table {
                    let row = std::mem::take(&mut t.row);
                    t.rows.push(row);
                }
            }
            TagEnd::Table => self.table_block(),
            TagEnd::Emphasis | TagEnd::Strong | TagEnd::Strikethrough => {
                self.styles.pop();
            }
            TagEnd::Link => {
                self.styles.pop();
                if let Some((url, start)) = self.links.pop() {
                    let text: String = self.line[start.min(self.line.len())..]
                        .iter()
                        .map(|s| s.content.as_ref())
                        .collect();
                    if !url.is_empty() && text != url {
                        self.push(Span::styled(format!(" <{url}>"), self.theme.dim));
                    }
                }
            }
            TagEnd::Image => self.push(Span::styled("]", self.theme.dim)),
            _ => {}
        }
    }

    fn style(&self) -> Style {
        self.styles.last().copied().unwrap_or_default()
    }

    fn in_list(&self) -> bool {
        self.containers
            .iter()
            .any(|c| matches!(c, Container::List(_)))
    }

    /// Text with grounding marks turned into coloured `[n]` tags.
    fn text(&mut self, text: &str) {
        let style = self.style();
        let mut run = String::new();
        for c in text.chars() {
            match grounding::mark_index(c) {
                Some(n) => {
                    if !run.is_empty() {
                        self.push(Span::styled(std::mem::take(&mut run), style));
                    }
                    let tag = Style::new()
                        .fg(grounding::color(n))
                        .add_modifier(Modifier::BOLD);
                    self.push(Span::styled(format!("[{}]", n + 1), tag));
                }
                None => run.push(c),
            }
        }
        if !run.is_empty() {
            self.push(Span::styled(run, style));
        }
    }

    fn push(&mut self, span: Span<'static>) {
        match &mut self.table {
            Some(t) => t.cell.push(span),
            None => self.line.push(span),
        }
    }

    fn start_block(&mut self) {
        self.flush();
        if self.blank_before && !self.out.is_empty() {
            let (_, rest) = self.prefixes();
            self.out.push(Para::indented(rest, Vec::new()));
        }
        self.blank_before = false;
    }

    fn end_block(&mut self) {
        self.flush();
        self.blank_before = true;
    }

    /// Emits the current line, if any.
    fn flush(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let body = std::mem::take(&mut self.line);
        self.emit(body);
    }

    fn emit(&mut self, body: Vec<Span<'static>>) {
        let (first, rest) = self.prefixes();
        for c in &mut self.containers {
            if let Container::Item { used, .. } = c {
                *used = true;
            }
        }
        self.out.push(Para { first, rest, body });
    }

    /// Prefixes for the next line: quote bars, and list markers not shown yet.
    fn prefixes(&self) -> (Vec<Span<'static>>, Vec<Span<'static>>) {
        let mut first = Vec::new();
        let mut rest = Vec::new();
        for c in &self.containers {
            match c {
                Container::Quote => {
                    first.push(Span::styled("│ ", self.theme.quote));
                    rest.push(Span::styled("│ ", self.theme.quote));
                }
                Container::List(_) => {}
                Container::Item { marker, used } => {
                    let pad = " ".repeat(width_of(&[Span::raw(marker.as_str())]));
                    first.push(if *used {
                        Span::raw(pad.clone())
                    } else {
                        Span::styled(marker.clone(), self.theme.accent)
                    });
                    rest.push(Span::raw(pad));
                }
            }
        }
        (first, rest)
    }

    fn code_block(&mut self) {
        let Some(code) = self.code.take() else {
            return;
        };
        let border = self.theme.border;
        let head = if code.lang.is_empty() {
            "┌".to_string()
        } else {
            format!("┌ {}", code.lang)
        };
        self.emit(vec![Span::styled(head, border)]);
        for line in highlight(&code.lang, &code.text, self.theme) {
            let mut body = vec![Span::styled("│ ", border)];
            body.extend(line);
            self.emit(body);
        }
        self.emit(vec![Span::styled("└", border)]);
        self.blank_before = true;
    }

    fn table_block(&mut self) {
        let Some(table) = self.table.take() else {
            return;
        };
        let cols = table.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                table
                    .rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| width_of(cell))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let border = self.theme.border;
        for (i, row) in table.rows.iter().enumerate() {
            let mut body = Vec::new();
            for (c, w) in widths.iter().enumerate() {
                if c > 0 {
                    body.push(Span::styled(" │ ", border));
                }
                let cell = row.get(c).map_or(&[][..], Vec::as_slice);
                let bold = if i == 0 {
                    Modifier::BOLD
                } else {
                    Modifier::empty()
                };
                body.extend(cell.iter().map(|s| {
                    let mut s = s.clone();
                    s.style = s.style.add_modifier(bold);
                    s
                }));
                body.push(Span::raw(" ".repeat(w - width_of(cell))));
            }
            self.emit(body);
            if i == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "─".repeat(*w)).collect();
                self.emit(vec![Span::styled(rule.join("─┼─"), border)]);
            }
        }
        self.blank_before = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::wrap::wrap;

    fn lines(md: &str, width: u16) -> Vec<String> {
        render(md, &Theme::dark())
            .iter()
            .flat_map(|p| wrap(p, width))
            .map(|l| l.to_string())
            .collect()
    }

    #[test]
    fn blocks_lists_and_breaks() {
        let md = "# Title\n\nSome *text* with `code`.\nNext line.\n\n- one\n- two\n  - nested item that wraps\n3. x\n\n> quoted\n\n---\n";
        assert_eq!(
            lines(md, 20),
            [
                "Title",
                "",
                "Some text with code.",
                "Next line.",
                "",
                "• one",
                "• two",
                "  ◦ nested item that",
                "    wraps",
                "",
                "3. x",
                "",
                "│ quoted",
                "",
                "────────────────",
            ]
        );
    }

    #[test]
    fn code_blocks_are_framed_and_coloured() {
        let t = Theme::dark();
        let paras = render("```rust\nfn main() {}\n```\nafter", &t);
        let text: Vec<String> = paras
            .iter()
            .flat_map(|p| wrap(p, 40))
            .map(|l| l.to_string())
            .collect();
        assert_eq!(text, ["┌ rust", "│ fn main() {}", "└", "", "after"]);
        let fn_span = &paras[1].body[1];
        assert_eq!((fn_span.content.as_ref(), fn_span.style), ("fn", t.keyword));
    }

    #[test]
    fn emphasis_styles_and_links() {
        let t = Theme::dark();
        let paras = render("**bold _both_** [site](https://x.org)", &t);
        let body = &paras[0].body;
        assert!(body[0].style.add_modifier.contains(Modifier::BOLD));
        assert!(body[1]
            .style
            .add_modifier
            .contains(Modifier::BOLD | Modifier::ITALIC));
        assert_eq!(body[3].content, "site");
        assert_eq!(body[3].style, t.link);
        assert_eq!(body[4].content, " <https://x.org>");
    }

    #[test]
    fn tables_align_columns() {
        let md = "| a | bbb |\n|---|---|\n| 中 | 1 |\n";
        assert_eq!(lines(md, 40), ["a  │ bbb", "───┼────", "中 │ 1"]);
    }

    #[test]
    fn grounding_marks_become_coloured_tags() {
        let marked = grounding::mark("A <ref>cat</ref><box>[[1,2,3,4]]</box>.");
        let paras = render(&marked, &Theme::dark());
        let body = &paras[0].body;
        assert_eq!(body[0].content, "A cat");
        assert_eq!(body[1].content, "[1]");
        assert_eq!(body[1].style.fg, Some(grounding::color(0)));
        assert_eq!(body[2].content, ".");
    }
}
