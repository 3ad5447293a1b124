//! The multi-line prompt editor: a text buffer and a cursor, edited by grapheme and laid out by
//! display width, so wide characters (CJK, emoji) keep the cursor where the terminal draws it.
use std::ops::Range;
use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Editor {
    text: String,
    /// Byte offset, always on a grapheme boundary.
    cursor: usize,
}

/// Where the text falls on screen at a given width: byte ranges of the visual rows (a row never
/// holds a newline) and the cursor's cell.
#[derive(Debug, Clone, PartialEq)]
pub struct EditorLayout {
    pub rows: Vec<Range<usize>>,
    pub cursor: (usize, u16),
}

impl Editor {
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn cursor(&self) -> usize {
        self.cursor
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Replaces the text; the cursor goes to the end.
    pub fn set(&mut self, text: &str) {
        self.text.clear();
        self.cursor = 0;
        self.insert_str(text);
    }

    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }

    /// Inserts at the cursor. Line ends become `\n`, tabs four spaces, other control
    /// characters are dropped (they have no width and would confuse the layout).
    pub fn insert_str(&mut self, s: &str) {
        let clean = clean_text(s);
        self.text.insert_str(self.cursor, &clean);
        self.cursor += clean.len();
    }

    pub fn insert_char(&mut self, c: char) {
        self.insert_str(c.encode_utf8(&mut [0; 4]));
    }

    /// Replaces `range` (bytes on grapheme boundaries) and puts the cursor after the new text.
    pub fn replace_range(&mut self, range: Range<usize>, s: &str) {
        let clean = clean_text(s);
        self.cursor = range.start + clean.len();
        self.text.replace_range(range, &clean);
    }

    pub fn backspace(&mut self) {
        let start = self.prev_boundary(self.cursor);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    pub fn delete(&mut self) {
        let end = self.next_boundary(self.cursor);
        self.text.replace_range(self.cursor..end, "");
    }

    pub fn left(&mut self) {
        self.cursor = self.prev_boundary(self.cursor);
    }

    pub fn right(&mut self) {
        self.cursor = self.next_boundary(self.cursor);
    }

    pub fn word_left(&mut self) {
        self.cursor = self.word_start_before(self.cursor);
    }

    pub fn word_right(&mut self) {
        let rest = &self.text[self.cursor..];
        let skip_space = rest.len() - rest.trim_start().len();
        let word = rest[skip_space..]
            .find(char::is_whitespace)
            .unwrap_or(rest.len() - skip_space);
        self.cursor += skip_space + word;
    }

    pub fn line_start(&mut self) {
        self.cursor = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1);
    }

    pub fn line_end(&mut self) {
        self.cursor += self.text[self.cursor..]
            .find('\n')
            .unwrap_or(self.text.len() - self.cursor);
    }

    pub fn kill_to_line_start(&mut self) {
        let end = self.cursor;
        self.line_start();
        self.text.replace_range(self.cursor..end, "");
    }

    pub fn kill_to_line_end(&mut self) {
        let start = self.cursor;
        self.line_end();
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    pub fn kill_word_back(&mut self) {
        let start = self.word_start_before(self.cursor);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    /// Moves up one visual row at `width`; false when already on the first row.
    pub fn up(&mut self, width: u16) -> bool {
        self.vertical(width, -1)
    }

    /// Moves down one visual row at `width`; false when already on the last row.
    pub fn down(&mut self, width: u16) -> bool {
        self.vertical(width, 1)
    }

    fn vertical(&mut self, width: u16, step: isize) -> bool {
        let layout = self.layout(width);
        let (row, col) = layout.cursor;
        let Some(target) = row.checked_add_signed(step) else {
            return false;
        };
        let Some(range) = layout.rows.get(target) else {
            return false;
        };
        // the grapheme whose cells cover `col`, else the row's end
        let mut x = 0u16;
        let mut pos = range.end;
        for (i, g) in self.text[range.clone()].grapheme_indices(true) {
            let w = g.width() as u16;
            if x + w > col {
                pos = range.start + i;
                break;
            }
            x += w;
        }
        self.cursor = pos;
        true
    }

    /// Visual rows at `width` columns (at least 1) and the cursor's (row, column).
    pub fn layout(&self, width: u16) -> EditorLayout {
        let width = width.max(1);
        let mut rows = Vec::new();
        let mut start = 0;
        let mut col = 0u16;
        let mut cursor = None;
        for (i, g) in self.text.grapheme_indices(true) {
            if g == "\n" {
                if i == self.cursor {
                    cursor = Some((rows.len(), col));
                }
                rows.push(start..i);
                start = i + 1;
                col = 0;
                continue;
            }
            let w = g.width() as u16;
            if col > 0 && col + w > width {
                rows.push(start..i);
                start = i;
                col = 0;
            }
            if i == self.cursor {
                cursor = Some((rows.len(), col));
            }
            col += w;
        }
        rows.push(start..self.text.len());
        let cursor = cursor.unwrap_or_else(|| {
            if col >= width {
                // the last row is full: the cursor starts a new, empty row
                rows.push(self.text.len()..self.text.len());
                (rows.len() - 1, 0)
            } else {
                (rows.len() - 1, col)
            }
        });
        EditorLayout { rows, cursor }
    }

    fn prev_boundary(&self, at: usize) -> usize {
        self.text[..at]
            .grapheme_indices(true)
            .next_back()
            .map_or(0, |(i, _)| i)
    }

    fn next_boundary(&self, at: usize) -> usize {
        self.text[at..]
            .graphemes(true)
            .next()
            .map_or(at, |g| at + g.len())
    }

    fn word_start_before(&self, at: usize) -> usize {
        let before = self.text[..at].trim_end();
        before.rfind(char::is_whitespace).map_or(0, |i| {
            i + before[i..].chars().next().map_or(1, char::len_utf8)
        })
    }
}

fn clean_text(s: &str) -> String {
    let s = s.replace("\r\n", "\n").replace('\r', "\n");
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\t' => out.push_str("    "),
            '\n' => out.push('\n'),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn editor(text: &str) -> Editor {
        let mut e = Editor::default();
        e.set(text);
        e
    }

    #[test]
    fn backspace_and_arrows_move_by_grapheme() {
        // "e" + combining acute is one grapheme; the family emoji is one ZWJ grapheme
        let mut e = editor("ae\u{301}👨‍👩‍👧");
        e.backspace();
        assert_eq!(e.text(), "ae\u{301}");
        e.left();
        assert_eq!(e.cursor(), 1);
        e.insert_char('中');
        assert_eq!(e.text(), "a中e\u{301}");
        e.right();
        e.right();
        assert_eq!(e.cursor(), e.text().len());
        e.delete();
        assert_eq!(e.text(), "a中e\u{301}");
    }

    #[test]
    fn pasted_line_ends_and_tabs_are_normalised() {
        let e = editor("a\r\nb\rc\td\u{7}");
        assert_eq!(e.text(), "a\nb\nc    d");
    }

    #[test]
    fn layout_wraps_wide_characters_and_places_the_cursor() {
        // width 5: "ab中" is 4 columns, the next wide char does not fit in the 5th
        let e = editor("ab中文x");
        let l = e.layout(5);
        assert_eq!(l.rows, vec![0..5, 5..9]);
        assert_eq!(l.cursor, (1, 3));
        let mut e = e;
        e.left();
        e.left();
        assert_eq!(e.layout(5).cursor, (1, 0));
    }

    #[test]
    fn cursor_after_a_full_row_starts_a_new_row() {
        let e = editor("abcd");
        let l = e.layout(4);
        assert_eq!(l.rows, vec![0..4, 4..4]);
        assert_eq!(l.cursor, (1, 0));
    }

    #[test]
    fn newlines_make_rows_and_up_down_keep_the_column() {
        let mut e = editor("hello\n中文字\nxy");
        assert_eq!(e.layout(20).rows.len(), 3);
        assert!(e.up(20));
        // column 2 of "中文字" is the start of "文"
        assert_eq!(e.layout(20).cursor, (1, 2));
        assert_eq!(&e.text()[e.cursor()..], "文字\nxy");
        assert!(e.up(20));
        assert_eq!(e.layout(20).cursor, (0, 2));
        assert!(!e.up(20));
        assert!(e.down(20));
        assert!(e.down(20));
        assert!(!e.down(20));
    }

    #[test]
    fn line_and_word_kills() {
        let mut e = editor("first line\nsecond  word here");
        e.kill_word_back();
        assert_eq!(e.text(), "first line\nsecond  word ");
        e.word_left();
        e.word_left();
        assert_eq!(&e.text()[e.cursor()..], "second  word ");
        e.word_right();
        assert_eq!(&e.text()[e.cursor()..], "  word ");
        e.kill_to_line_end();
        assert_eq!(e.text(), "first line\nsecond");
        e.kill_to_line_start();
        assert_eq!(e.text(), "first line\n");
        e.line_start();
        assert_eq!(e.cursor(), 11);
    }

    #[test]
    fn replace_range_puts_cursor_after_insert() {
        let mut e = editor("see ~/pi and");
        e.replace_range(4..8, "~/pictures/");
        assert_eq!(e.text(), "see ~/pictures/ and");
        assert_eq!(e.cursor(), 15);
    }
}
