//! Word wrapping of styled text by display width. Lines break at spaces, on either side of a
//! wide character (CJK text has no spaces), and inside words longer than a line.
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

/// One logical line: a prefix for its first visual line, one for the lines it wraps onto
/// (indentation, list markers, quote bars), and the body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Para {
    pub first: Vec<Span<'static>>,
    pub rest: Vec<Span<'static>>,
    pub body: Vec<Span<'static>>,
}

impl Para {
    /// A line whose prefix is the same on every visual line.
    pub fn indented(prefix: Vec<Span<'static>>, body: Vec<Span<'static>>) -> Self {
        Self {
            first: prefix.clone(),
            rest: prefix,
            body,
        }
    }
}

pub fn width_of(spans: &[Span<'_>]) -> usize {
    spans.iter().map(|s| s.content.width()).sum()
}

struct Cell<'a> {
    g: &'a str,
    w: usize,
    style: Style,
}

/// Wraps `para` to `width` columns (prefixes included). Never returns an empty list.
pub fn wrap(para: &Para, width: u16) -> Vec<Line<'static>> {
    let width = usize::from(width.max(1));
    let cells: Vec<Cell> = para
        .body
        .iter()
        .flat_map(|s| {
            s.content.graphemes(true).map(move |g| Cell {
                g,
                w: g.width(),
                style: s.style,
            })
        })
        .collect();
    let mut lines = Vec::new();
    let mut row: Vec<&Cell> = Vec::new();
    let mut row_w = 0;
    // index in `row` where the line may break (the rest moves down)
    let mut brk: Option<usize> = None;
    for cell in &cells {
        let prefix = if lines.is_empty() {
            &para.first
        } else {
            &para.rest
        };
        let avail = width.saturating_sub(width_of(prefix)).max(1);
        let space = cell.g.chars().all(char::is_whitespace);
        if row_w + cell.w > avail && !row.is_empty() {
            if space {
                // a space at the end of a line is where it breaks; drop it
                lines.push(emit(prefix, &row));
                row.clear();
                row_w = 0;
                brk = None;
                continue;
            }
            let carry = match brk {
                Some(b) if b > 0 => row.split_off(b),
                _ => Vec::new(),
            };
            lines.push(emit(prefix, &row));
            row = carry;
            row_w = row.iter().map(|c| c.w).sum();
            brk = None;
        }
        if cell.w >= 2 && !space {
            brk = Some(row.len());
        }
        row.push(cell);
        row_w += cell.w;
        if space || cell.w >= 2 {
            brk = Some(row.len());
        }
    }
    let prefix = if lines.is_empty() {
        &para.first
    } else {
        &para.rest
    };
    lines.push(emit(prefix, &row));
    lines
}

/// Prefix plus the cells, merging runs of one style into one span; trailing spaces dropped.
fn emit(prefix: &[Span<'static>], row: &[&Cell]) -> Line<'static> {
    let end = row
        .iter()
        .rposition(|c| !c.g.chars().all(char::is_whitespace))
        .map_or(0, |i| i + 1);
    let mut spans: Vec<Span<'static>> = prefix.to_vec();
    let mut run = String::new();
    let mut style = None;
    for c in &row[..end] {
        if style.is_some_and(|s| s != c.style) {
            spans.push(Span::styled(
                std::mem::take(&mut run),
                style.unwrap_or_default(),
            ));
        }
        style = Some(c.style);
        run.push_str(c.g);
    }
    if let Some(style) = style {
        spans.push(Span::styled(run, style));
    }
    Line::from(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(lines: &[Line]) -> Vec<String> {
        lines.iter().map(|l| l.to_string()).collect()
    }

    fn plain(s: &str) -> Para {
        Para::indented(vec![], vec![Span::raw(s.to_string())])
    }

    #[test]
    fn breaks_at_spaces_and_splits_long_words() {
        let lines = wrap(&plain("the quick brown fox jumps"), 10);
        assert_eq!(texts(&lines), ["the quick", "brown fox", "jumps"]);
        let lines = wrap(&plain("abcdefghijkl xy"), 5);
        assert_eq!(texts(&lines), ["abcde", "fghij", "kl xy"]);
    }

    #[test]
    fn cjk_breaks_between_characters_and_respects_width_two() {
        let lines = wrap(&plain("中文字符测试"), 5);
        assert_eq!(texts(&lines), ["中文", "字符", "测试"]);
        for l in &lines {
            assert!(l.width() <= 5);
        }
        // mixed: the ASCII word stays whole, the wide characters break anywhere
        let lines = wrap(&plain("hi 你好世界 ok"), 6);
        assert_eq!(texts(&lines), ["hi 你", "好世界", "ok"]);
    }

    #[test]
    fn emoji_are_two_columns() {
        let lines = wrap(&plain("🙂🙂🙂 done"), 4);
        assert_eq!(texts(&lines), ["🙂🙂", "🙂", "done"]);
    }

    #[test]
    fn prefixes_and_styles_survive() {
        let bold = Style::new().bold();
        let para = Para {
            first: vec![Span::raw("• ")],
            rest: vec![Span::raw("  ")],
            body: vec![Span::raw("one "), Span::styled("two three", bold)],
        };
        let lines = wrap(&para, 9);
        assert_eq!(texts(&lines), ["• one two", "  three"]);
        assert_eq!(lines[0].spans[2].style, bold);
        assert_eq!(lines[1].spans[1].content, "three");
    }

    #[test]
    fn degenerate_widths_do_not_panic_and_keep_every_character() {
        for w in 0..4 {
            let lines = wrap(&plain("a中🙂 b"), w);
            let joined: String = texts(&lines).concat();
            assert_eq!(joined, "a中🙂b");
        }
        assert_eq!(texts(&wrap(&plain(""), 3)), [""]);
    }
}
