//! The pixels sent for a placement: the picture scaled into its canvas (transparent around
//! it), each grounding box outlined in its colour with its number in a tag at the top-left
//! corner (the labels are in the preview's legend: text cannot go over a graphics image).
use super::Picture;
use crate::app::grounding;
use image::imageops::{self, FilterType};
use image::{Rgba, RgbaImage};
use ratatui::style::Color;

/// 3x5 digits for the box tags, one row per entry, high bit on the left.
const DIGITS: [[u8; 5]; 10] = [
    [0b111, 0b101, 0b101, 0b101, 0b111],
    [0b010, 0b110, 0b010, 0b010, 0b111],
    [0b111, 0b001, 0b111, 0b100, 0b111],
    [0b111, 0b001, 0b111, 0b001, 0b111],
    [0b101, 0b101, 0b111, 0b001, 0b001],
    [0b111, 0b100, 0b111, 0b001, 0b111],
    [0b111, 0b100, 0b111, 0b101, 0b111],
    [0b111, 0b001, 0b001, 0b001, 0b001],
    [0b111, 0b101, 0b111, 0b101, 0b111],
    [0b111, 0b101, 0b111, 0b001, 0b111],
];

/// The colour of grounding `n` as pixels.
pub fn box_rgb(n: usize) -> [u8; 3] {
    match grounding::color(n) {
        Color::Rgb(r, g, b) => [r, g, b],
        _ => [255, 255, 255],
    }
}

/// The canvas of `pic`: RGBA, alpha 0 where nothing is drawn.
pub fn canvas(pic: &Picture) -> RgbaImage {
    let (cw, ch) = pic.place.canvas;
    let (x0, y0, pw, ph) = pic.place.picture;
    let mut out = RgbaImage::new(cw, ch);
    if pw == 0 || ph == 0 || pic.image.width() == 0 || pic.image.height() == 0 {
        return out;
    }
    let scaled = imageops::resize(pic.image, pw, ph, FilterType::Triangle);
    let mut px = RgbaImage::from_fn(pw, ph, |x, y| {
        let p = scaled.get_pixel(x, y).0;
        Rgba([p[0], p[1], p[2], 255])
    });
    // lines about 1/150 of the picture, at least one pixel
    let thick = (pw.min(ph) / 150).max(1);
    for (n, g) in pic.groundings.iter().enumerate() {
        let c = box_rgb(n);
        for b in &g.boxes {
            outline(&mut px, b, thick, c);
        }
        if let Some(b) = g.boxes.first() {
            tag(&mut px, b, n + 1, thick, c);
        }
    }
    imageops::replace(&mut out, &px, i64::from(x0), i64::from(y0));
    out
}

/// Box corners (0..=1000) as pixel bounds, inclusive.
fn bounds(b: &[f32; 4], w: u32, h: u32) -> (u32, u32, u32, u32) {
    let px = |v: f32, n: u32| ((v / 1000.0 * n as f32) as u32).min(n - 1);
    (px(b[0], w), px(b[1], h), px(b[2], w), px(b[3], h))
}

fn fill(img: &mut RgbaImage, x0: u32, y0: u32, x1: u32, y1: u32, c: [u8; 3]) {
    let (w, h) = img.dimensions();
    for y in y0..y1.min(h) {
        for x in x0..x1.min(w) {
            img.put_pixel(x, y, Rgba([c[0], c[1], c[2], 255]));
        }
    }
}

fn outline(img: &mut RgbaImage, b: &[f32; 4], thick: u32, c: [u8; 3]) {
    let (w, h) = img.dimensions();
    let (x1, y1, x2, y2) = bounds(b, w, h);
    let t = thick;
    fill(img, x1, y1, x2 + 1, y1 + t, c);
    fill(img, x1, (y2 + 1).saturating_sub(t), x2 + 1, y2 + 1, c);
    fill(img, x1, y1, x1 + t, y2 + 1, c);
    fill(img, (x2 + 1).saturating_sub(t), y1, x2 + 1, y2 + 1, c);
}

/// `number` in black on the box's colour, inside the box's top-left corner (moved in when
/// it would stick out of the picture).
fn tag(img: &mut RgbaImage, b: &[f32; 4], number: usize, scale: u32, c: [u8; 3]) {
    let (w, h) = img.dimensions();
    let digits: Vec<usize> = number
        .to_string()
        .bytes()
        .map(|d| usize::from(d - b'0'))
        .collect();
    let s = scale.max(1);
    let tag_w = (digits.len() as u32 * 4 + 1) * s;
    let tag_h = 7 * s;
    if tag_w > w || tag_h > h {
        return;
    }
    let (x1, y1, _, _) = bounds(b, w, h);
    let x = x1.min(w - tag_w);
    let y = y1.min(h - tag_h);
    fill(img, x, y, x + tag_w, y + tag_h, c);
    for (i, &d) in digits.iter().enumerate() {
        let gx = x + (1 + 4 * i as u32) * s;
        for (row, bits) in DIGITS[d].iter().enumerate() {
            for col in 0..3u32 {
                if bits & (0b100 >> col) != 0 {
                    let px = gx + col * s;
                    let py = y + (1 + row as u32) * s;
                    fill(img, px, py, px + s, py + s, [0, 0, 0]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CellSize, Graphics, Placement, Protocol};
    use super::*;
    use crate::app::grounding::Grounding;
    use image::{Rgb, RgbImage};
    use ratatui::layout::Rect;

    fn pic<'a>(img: &'a RgbImage, place: Placement, groundings: Vec<Grounding>) -> Picture<'a> {
        Picture {
            place,
            image: img,
            groundings,
        }
    }

    #[test]
    fn the_picture_is_centred_and_the_rest_transparent() {
        let img = RgbImage::from_pixel(20, 10, Rgb([200, 10, 10]));
        let g = Graphics {
            protocol: Protocol::Kitty,
            cell: CellSize { w: 4, h: 8 },
            tmux: false,
        };
        let place = super::super::place(20, 10, Rect::new(0, 0, 10, 3), g).unwrap();
        // 40x24 px available: 40x20 picture in a 40x24 canvas, 2 rows of padding above
        assert_eq!(place.canvas, (40, 24));
        assert_eq!(place.picture, (0, 2, 40, 20));
        let c = canvas(&pic(&img, place, vec![]));
        assert_eq!(c.get_pixel(0, 0).0[3], 0);
        assert_eq!(c.get_pixel(0, 23).0[3], 0);
        assert_eq!(c.get_pixel(5, 2).0, [200, 10, 10, 255]);
        assert_eq!(c.get_pixel(39, 21).0, [200, 10, 10, 255]);
    }

    #[test]
    fn boxes_are_outlined_and_numbered() {
        let img = RgbImage::from_pixel(100, 100, Rgb([0, 0, 0]));
        let place = Placement {
            rect: Rect::new(0, 0, 10, 5),
            canvas: (100, 100),
            picture: (0, 0, 100, 100),
        };
        let g = Grounding {
            label: "cat".into(),
            boxes: vec![[500.0, 400.0, 900.0, 900.0]],
        };
        let c = canvas(&pic(&img, place, vec![g]));
        let red = box_rgb(0);
        let at = |x, y| {
            let p = c.get_pixel(x, y).0;
            [p[0], p[1], p[2]]
        };
        assert_eq!(at(70, 90), red, "bottom edge");
        assert_eq!(at(90, 60), red, "right edge");
        assert_eq!(at(70, 60), [0, 0, 0], "inside");
        assert_eq!(at(40, 60), [0, 0, 0], "outside");
        // the tag "1" at the top-left corner: background in the box colour, a black stroke
        assert_eq!(at(50, 40), red);
        assert_eq!(at(52, 41), [0, 0, 0], "top of the 1");
    }

    #[test]
    fn degenerate_boxes_and_tiny_pictures_do_not_panic() {
        let img = RgbImage::from_pixel(3, 3, Rgb([9, 9, 9]));
        let place = Placement {
            rect: Rect::new(0, 0, 1, 1),
            canvas: (2, 2),
            picture: (0, 0, 2, 2),
        };
        let g = Grounding {
            label: String::new(),
            boxes: vec![[1000.0, 1000.0, 1000.0, 1000.0], [0.0, 0.0, 0.0, 0.0]],
        };
        let many: Vec<Grounding> = (0..12).map(|_| g.clone()).collect();
        let c = canvas(&pic(&img, place, many));
        assert_eq!(c.dimensions(), (2, 2));
    }
}
