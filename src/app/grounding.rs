//! InternVL's grounding output: `<ref>label</ref><box>[[x1, y1, x2, y2], ...]</box>` with
//! coordinates in 0..=1000 of the image's width and height. A `<box>` may come without a
//! `<ref>`. Each grounding gets a number and a colour shared by the answer text and the preview.
use ratatui::style::Color;

#[derive(Debug, Clone, PartialEq)]
pub struct Grounding {
    pub label: String,
    /// `[x1, y1, x2, y2]`, each clamped to 0..=1000.
    pub boxes: Vec<[f32; 4]>,
}

/// Marks in rendered text stand for grounding `n` as the private-use character `MARK_BASE + n`.
const MARK_BASE: u32 = 0xE000;
const MARK_LAST: u32 = 0xF8FF;

const PALETTE: [Color; 6] = [
    Color::Rgb(255, 80, 80),
    Color::Rgb(80, 220, 100),
    Color::Rgb(255, 200, 40),
    Color::Rgb(70, 190, 255),
    Color::Rgb(230, 110, 255),
    Color::Rgb(255, 150, 60),
];

pub fn color(n: usize) -> Color {
    PALETTE[n % PALETTE.len()]
}

/// Every grounding in `text`, in order.
pub fn parse(text: &str) -> Vec<Grounding> {
    scan(text).into_iter().map(|(_, g)| g).collect()
}

/// `text` with each grounding replaced by its label followed by a mark character
/// (see [`mark_index`]), so the markdown renderer can show a coloured `[n]` there.
pub fn mark(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (n, (span, g)) in scan(text).into_iter().enumerate() {
        out.push_str(&text[last..span.start]);
        out.push_str(&g.label);
        let mark = u32::try_from(n)
            .ok()
            .and_then(|n| n.checked_add(MARK_BASE))
            .filter(|&c| c <= MARK_LAST)
            .and_then(char::from_u32);
        if let Some(c) = mark {
            out.push(c);
        }
        last = span.end;
    }
    out.push_str(&text[last..]);
    out
}

/// The grounding number a mark character stands for.
pub fn mark_index(c: char) -> Option<usize> {
    let c = u32::from(c);
    (MARK_BASE..=MARK_LAST)
        .contains(&c)
        .then(|| (c - MARK_BASE) as usize)
}

fn scan(text: &str) -> Vec<(std::ops::Range<usize>, Grounding)> {
    let mut found = Vec::new();
    let mut pos = 0;
    while let Some(rel) = text[pos..].find("<box>") {
        let box_start = pos + rel;
        let Some(close) = text[box_start..].find("</box>") else {
            break;
        };
        let box_end = box_start + close + "</box>".len();
        let inner = &text[box_start + "<box>".len()..box_start + close];
        let Some(boxes) = parse_boxes(inner) else {
            pos = box_end;
            continue;
        };
        // a <ref>label</ref> right before the box (whitespace allowed) names it
        let before = text[pos..box_start].trim_end();
        let (start, label) = match before.strip_suffix("</ref>") {
            Some(head) => match head.rfind("<ref>") {
                Some(open) => (pos + open, head[open + "<ref>".len()..].trim().to_string()),
                None => (box_start, String::new()),
            },
            None => (box_start, String::new()),
        };
        found.push((start..box_end, Grounding { label, boxes }));
        pos = box_end;
    }
    found
}

/// `[[x1, y1, x2, y2], [...]]`; `None` unless every box has four numbers.
fn parse_boxes(inner: &str) -> Option<Vec<[f32; 4]>> {
    let inner = inner.trim().strip_prefix('[')?.strip_suffix(']')?;
    let mut boxes = Vec::new();
    for part in inner.split(']') {
        let part = part.trim().trim_start_matches(',').trim();
        if part.is_empty() {
            continue;
        }
        let nums: Vec<f32> = part
            .strip_prefix('[')?
            .split(',')
            .map(|n| n.trim().parse::<f32>().ok().filter(|v| v.is_finite()))
            .collect::<Option<_>>()?;
        let [x1, y1, x2, y2] = <[f32; 4]>::try_from(nums).ok()?;
        let c = |v: f32| v.clamp(0.0, 1000.0);
        boxes.push([c(x1.min(x2)), c(y1.min(y2)), c(x1.max(x2)), c(y1.max(y2))]);
    }
    (!boxes.is_empty()).then_some(boxes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labelled_and_bare_boxes() {
        let text = "Here: <ref>a cat</ref><box>[[10, 20, 300, 400]]</box> and \
                    <ref>dogs</ref> <box>[[0,0,5,5], [900, 950, 1200, 990]]</box>, \
                    also <box>[[1,2,3,4]]</box>.";
        let g = parse(text);
        assert_eq!(g.len(), 3);
        assert_eq!(g[0].label, "a cat");
        assert_eq!(g[0].boxes, vec![[10.0, 20.0, 300.0, 400.0]]);
        assert_eq!(g[1].label, "dogs");
        // clamped to 1000
        assert_eq!(
            g[1].boxes,
            vec![[0.0, 0.0, 5.0, 5.0], [900.0, 950.0, 1000.0, 990.0]]
        );
        assert_eq!(g[2].label, "");
    }

    #[test]
    fn malformed_boxes_are_left_as_text() {
        let text = "<ref>x</ref><box>[[1,2,3]]</box> <box>[[a,b,c,d]]</box> <box>[[1,2,3,4]]";
        assert!(parse(text).is_empty());
        assert_eq!(mark(text), text);
    }

    #[test]
    fn mark_replaces_each_grounding_with_label_and_numbered_mark() {
        let text = "<ref>cat</ref><box>[[1,2,3,4]]</box> near <ref>mat</ref><box>[[5,6,7,8]]</box>";
        let marked = mark(text);
        let marks: Vec<usize> = marked.chars().filter_map(mark_index).collect();
        assert_eq!(marks, vec![0, 1]);
        let plain: String = marked
            .chars()
            .filter(|&c| mark_index(c).is_none())
            .collect();
        assert_eq!(plain, "cat near mat");
    }
}
