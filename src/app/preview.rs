//! Pictures drawn with half blocks: each cell is `▀` with the upper pixel as foreground and the
//! lower one as background, so a cell holds two roughly square pixels. Grounding boxes are drawn
//! into the pixels (one-pixel outlines) and labelled in the cells above them.
//!
//! This is the fallback. Where the terminal speaks kitty's graphics protocol, sixel or iTerm2's
//! inline images, the preview draws through `graphics` instead (the view reserves the cells,
//! the images are written after each frame). Half blocks remain for every other terminal, for
//! tmux (which does not pass images on), for `--graphics halfblocks`, and under an overlay:
//! while the help or the session list is open the pictures are drawn here, in cells, so the
//! popup covers them as it covers text.
use super::grounding::{self, Grounding};
use image::RgbImage;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};

/// The largest size (cells wide, pixel rows high) with the picture's aspect that fits `area`.
pub fn fit(img_w: u32, img_h: u32, area: Rect) -> (u16, u32) {
    if img_w == 0 || img_h == 0 || area.width == 0 || area.height == 0 {
        return (0, 0);
    }
    let max_w = f64::from(area.width);
    let max_h = f64::from(area.height) * 2.0;
    let scale = (max_w / f64::from(img_w)).min(max_h / f64::from(img_h));
    let w = (f64::from(img_w) * scale).round().clamp(1.0, max_w) as u16;
    let h = (f64::from(img_h) * scale).round().clamp(1.0, max_h) as u32;
    (w, h)
}

/// Draws `img` centred in `area` with the boxes of `groundings` over it; returns the cells used.
pub fn render(img: &RgbImage, groundings: &[Grounding], area: Rect, buf: &mut Buffer) -> Rect {
    let (w, h) = fit(img.width(), img.height(), area);
    if w == 0 {
        return Rect::new(area.x, area.y, 0, 0);
    }
    let rows = h.div_ceil(2) as u16;
    let used = Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - rows) / 2,
        w,
        rows,
    );
    let mut px = downscale(img, u32::from(w), h);
    for (n, g) in groundings.iter().enumerate() {
        for b in &g.boxes {
            outline(&mut px, u32::from(w), h, b, rgb(grounding::color(n)));
        }
    }
    for cy in 0..rows {
        for cx in 0..w {
            let top = px[(2 * u32::from(cy) * u32::from(w) + u32::from(cx)) as usize];
            let below = 2 * u32::from(cy) + 1;
            let bottom = (below < h).then(|| px[(below * u32::from(w) + u32::from(cx)) as usize]);
            let style = Style::new()
                .fg(color(top))
                .bg(bottom.map_or(Color::Reset, color));
            buf[(used.x + cx, used.y + cy)]
                .set_char('▀')
                .set_style(style);
        }
    }
    for (n, g) in groundings.iter().enumerate() {
        label(n, g, used, h, buf);
    }
    used
}

/// Area-averaged resize to `w` x `h` pixels (row-major RGB).
fn downscale(img: &RgbImage, w: u32, h: u32) -> Vec<[u8; 3]> {
    let (sw, sh) = img.dimensions();
    let span = |i: u32, n: u32, src: u32| {
        let a = u64::from(i) * u64::from(src) / u64::from(n);
        let b = (u64::from(i + 1) * u64::from(src) / u64::from(n)).max(a + 1);
        (a as u32, b.min(u64::from(src)) as u32)
    };
    let mut out = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        let (y0, y1) = span(y, h, sh);
        for x in 0..w {
            let (x0, x1) = span(x, w, sw);
            let mut sum = [0u64; 3];
            for sy in y0..y1 {
                for sx in x0..x1 {
                    let p = img.get_pixel(sx, sy).0;
                    for c in 0..3 {
                        sum[c] += u64::from(p[c]);
                    }
                }
            }
            let n = u64::from((y1 - y0) * (x1 - x0)).max(1);
            out.push(sum.map(|s| (s / n) as u8));
        }
    }
    out
}

/// Box corners (0..=1000) as pixel bounds, inclusive.
fn box_pixels(b: &[f32; 4], w: u32, h: u32) -> (u32, u32, u32, u32) {
    let px = |v: f32, n: u32| ((v / 1000.0 * n as f32) as u32).min(n - 1);
    (px(b[0], w), px(b[1], h), px(b[2], w), px(b[3], h))
}

fn outline(px: &mut [[u8; 3]], w: u32, h: u32, b: &[f32; 4], c: [u8; 3]) {
    let (x1, y1, x2, y2) = box_pixels(b, w, h);
    for x in x1..=x2 {
        px[(y1 * w + x) as usize] = c;
        px[(y2 * w + x) as usize] = c;
    }
    for y in y1..=y2 {
        px[(y * w + x1) as usize] = c;
        px[(y * w + x2) as usize] = c;
    }
}

/// `n label` in the box's colour on the row above its first box (on its top row at the edge).
fn label(n: usize, g: &Grounding, pic: Rect, h: u32, buf: &mut Buffer) {
    let Some(b) = g.boxes.first() else {
        return;
    };
    let (x1, y1, _, _) = box_pixels(b, u32::from(pic.width), h);
    let row = (y1 / 2) as u16;
    let y = pic.y + row.saturating_sub(1);
    let x = pic.x + x1 as u16;
    let text = if g.label.is_empty() {
        format!("{}", n + 1)
    } else {
        format!("{} {}", n + 1, g.label)
    };
    let style = Style::new().fg(Color::Black).bg(grounding::color(n));
    buf.set_stringn(x, y, text, usize::from(pic.right() - x), style);
}

fn color(p: [u8; 3]) -> Color {
    Color::Rgb(p[0], p[1], p[2])
}

fn rgb(c: Color) -> [u8; 3] {
    match c {
        Color::Rgb(r, g, b) => [r, g, b],
        _ => [255, 255, 255],
    }
}

/// Splits `area` into `n` cells in a grid that leaves each picture (of aspect `w/h`) largest.
pub fn gallery(n: usize, aspect: f64, area: Rect) -> Vec<Rect> {
    if n == 0 || area.is_empty() {
        return Vec::new();
    }
    let n16 = u16::try_from(n).unwrap_or(u16::MAX);
    let best_cols = (1..=n16.min(area.width))
        .max_by_key(|&cols| {
            let rows = n16.div_ceil(cols);
            let cw = f64::from(area.width / cols);
            let ch = f64::from(area.height / rows.max(1)) * 2.0;
            // picture width in pixels when fitted in cw x ch
            (cw.min(ch * aspect) * 1000.0) as u64
        })
        .unwrap_or(1);
    let rows = n16.div_ceil(best_cols);
    let (cw, ch) = (area.width / best_cols, area.height / rows);
    (0..n16)
        .filter(|_| cw > 0 && ch > 0)
        .map(|i| {
            Rect::new(
                area.x + (i % best_cols) * cw,
                area.y + (i / best_cols) * ch,
                cw,
                ch,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// Left half red, right half blue, 40x20.
    fn two_tone() -> RgbImage {
        RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    #[test]
    fn fit_keeps_the_aspect_in_half_block_pixels() {
        // 2:1 picture into 10x10 cells = 10x20 pixels: 10 wide, 5 pixel rows
        assert_eq!(fit(40, 20, Rect::new(0, 0, 10, 10)), (10, 5));
        // tall picture: limited by height (4 cells = 8 pixels)
        assert_eq!(fit(10, 40, Rect::new(0, 0, 10, 4)), (2, 8));
        assert_eq!(fit(10, 10, Rect::new(0, 0, 0, 5)), (0, 0));
    }

    #[test]
    fn half_blocks_carry_the_two_pixels_of_each_cell() {
        let img = two_tone();
        let area = Rect::new(0, 0, 8, 2);
        let mut buf = Buffer::empty(area);
        let used = render(&img, &[], area, &mut buf);
        assert_eq!(used, Rect::new(0, 0, 8, 2));
        let red = Color::Rgb(255, 0, 0);
        let blue = Color::Rgb(0, 0, 255);
        assert_eq!(buf[(0, 0)].symbol(), "▀");
        assert_eq!((buf[(0, 0)].fg, buf[(0, 0)].bg), (red, red));
        assert_eq!((buf[(7, 1)].fg, buf[(7, 1)].bg), (blue, blue));
    }

    #[test]
    fn grounding_boxes_outline_pixels_and_get_a_label() {
        let img = RgbImage::from_pixel(100, 100, Rgb([0, 0, 0]));
        let area = Rect::new(0, 0, 10, 5);
        let mut buf = Buffer::empty(area);
        let g = Grounding {
            label: "cat".into(),
            boxes: vec![[500.0, 400.0, 900.0, 900.0]],
        };
        let used = render(&img, std::slice::from_ref(&g), area, &mut buf);
        // 10x10 pixels in 10x5 cells
        assert_eq!(used, Rect::new(0, 0, 10, 5));
        let c = grounding::color(0);
        // box pixels: x 5..=9, y 4..=9; pixel row 4 is the top half of cell row 2
        assert_eq!(buf[(7, 2)].fg, c, "top edge");
        assert_eq!(buf[(7, 2)].bg, Color::Rgb(0, 0, 0), "inside the box");
        assert_eq!((buf[(5, 3)].fg, buf[(5, 3)].bg), (c, c), "left edge");
        assert_eq!(buf[(2, 3)].fg, Color::Rgb(0, 0, 0), "outside the box");
        // label on the row above the top edge, from the box's left column, cut at the edge
        let label: String = (5..10).map(|x| buf[(x, 1)].symbol().to_string()).collect();
        assert_eq!(label, "1 cat");
        assert_eq!(buf[(5, 1)].bg, c);
    }

    #[test]
    fn gallery_picks_the_grid_that_shows_pictures_largest() {
        // 4 square pictures in 40x10 cells: one row of 4 (10x10 cells = 10x20 px) wins
        let cells = gallery(4, 1.0, Rect::new(0, 0, 40, 10));
        assert_eq!(cells.len(), 4);
        assert_eq!(cells[1], Rect::new(10, 0, 10, 10));
        // tall narrow area: a column
        let cells = gallery(3, 1.0, Rect::new(0, 0, 10, 30));
        assert_eq!(cells[2], Rect::new(0, 20, 10, 10));
        assert!(gallery(3, 1.0, Rect::new(0, 0, 0, 0)).is_empty());
    }

    #[test]
    fn tiny_areas_do_not_panic() {
        let img = two_tone();
        for (w, h) in [(1, 1), (1, 3), (3, 1), (0, 2)] {
            let area = Rect::new(2, 1, w, h);
            let mut buf = Buffer::empty(Rect::new(0, 0, 6, 5));
            let g = Grounding {
                label: "a long label".into(),
                boxes: vec![[0.0, 0.0, 1000.0, 1000.0]],
            };
            render(&img, &[g], area, &mut buf);
        }
    }
}
