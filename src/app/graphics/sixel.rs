//! Sixel: `ESC P 0;1;0 q "1;1;W;H`, colour registers `#n;2;r;g;b` (percent), then bands of
//! six pixel rows: per colour, one character per column whose six bits are that colour's
//! pixels in the band (`!n` repeats, `$` back to the band's start, `-` next band), `ESC \`.
//! P2 = 1 leaves pixels no colour sets untouched: the canvas' transparent margin.
//!
//! Palette: median cut over the picture's colours, at most 256 (the registers most sixel
//! terminals have), with exact entries for the grounding boxes' colours so the outlines keep
//! the colours of their `[n]` tags. No dithering: it would fray the
//! one-pixel outlines, and previews are small. A fixed 6x6x6 cube would be faster but bands
//! visibly on photos; median cut spends the registers where the picture's colours are.
use image::RgbaImage;

pub const MAX_COLORS: usize = 256;

/// A picture as palette indices (`None`: transparent).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub width: u32,
    pub height: u32,
    pub palette: Vec<[u8; 3]>,
    pub index: Vec<Option<u8>>,
}

/// Maps the opaque pixels (alpha >= 128) of `img` to at most `max_colors` colours: the
/// `reserved` ones first, exact, then the means of median-cut boxes of the picture's other
/// colours (each colour goes to its box's mean, so up to the budget every colour is exact).
pub fn quantize(img: &RgbaImage, reserved: &[[u8; 3]], max_colors: usize) -> Quantized {
    let max_colors = max_colors.clamp(1, MAX_COLORS);
    let mut palette: Vec<[u8; 3]> = Vec::new();
    for &c in reserved {
        if !palette.contains(&c) && palette.len() < max_colors {
            palette.push(c);
        }
    }
    let reserved_n = palette.len();
    let pack = |[r, g, b]: [u8; 3]| (u32::from(r) << 16) | (u32::from(g) << 8) | u32::from(b);
    let reserved_packed: Vec<u32> = palette.iter().map(|&c| pack(c)).collect();
    // the picture's other colours, sorted, with their pixel counts
    let mut all: Vec<u32> = img
        .pixels()
        .filter(|p| p.0[3] >= 128)
        .map(|p| pack([p.0[0], p.0[1], p.0[2]]))
        .filter(|c| !reserved_packed.contains(c))
        .collect();
    all.sort_unstable();
    let mut colours: Vec<([u8; 3], u32)> = Vec::new();
    for c in all {
        match colours.last_mut() {
            Some((last, n)) if pack(*last) == c => *n += 1,
            _ => colours.push(([(c >> 16) as u8, (c >> 8) as u8, c as u8], 1)),
        }
    }
    let distinct: Vec<u32> = colours.iter().map(|&(c, _)| pack(c)).collect();
    let mut slot = vec![0u8; distinct.len()];
    for b in median_cut(colours, max_colors - reserved_n) {
        let n: u64 = b.iter().map(|&(_, k)| u64::from(k)).sum();
        let mut sum = [0u64; 3];
        for (c, k) in &b {
            for (s, v) in sum.iter_mut().zip(c) {
                *s += u64::from(*v) * u64::from(*k);
            }
        }
        let i = palette.len() as u8;
        palette.push(sum.map(|s| ((s + n / 2) / n.max(1)) as u8));
        for (c, _) in b {
            if let Ok(k) = distinct.binary_search(&pack(c)) {
                slot[k] = i;
            }
        }
    }
    let index = img
        .pixels()
        .map(|p| {
            let [r, g, b, a] = p.0;
            let c = pack([r, g, b]);
            (a >= 128).then(|| match reserved_packed.iter().position(|&x| x == c) {
                Some(i) => i as u8,
                None => distinct.binary_search(&c).map_or(0, |k| slot[k]),
            })
        })
        .collect();
    Quantized {
        width: img.width(),
        height: img.height(),
        palette,
        index,
    }
}

/// A median-cut box: colours with their pixel counts, its pixel total and widest side.
struct ColourBox {
    colours: Vec<([u8; 3], u32)>,
    pixels: u64,
    axis: usize,
    range: u8,
}

impl ColourBox {
    fn new(colours: Vec<([u8; 3], u32)>) -> Self {
        let pixels = colours.iter().map(|c| u64::from(c.1)).sum();
        let (mut axis, mut range) = (0, 0);
        for a in 0..3 {
            let lo = colours.iter().map(|c| c.0[a]).min().unwrap_or(0);
            let hi = colours.iter().map(|c| c.0[a]).max().unwrap_or(0);
            if hi - lo > range {
                (axis, range) = (a, hi - lo);
            }
        }
        Self {
            colours,
            pixels,
            axis,
            range,
        }
    }

    fn score(&self) -> u64 {
        if self.colours.len() > 1 {
            self.pixels * u64::from(self.range)
        } else {
            0
        }
    }
}

/// Splits the colours (with their pixel counts) into at most `n` boxes: each time the box
/// with the most pixels times its widest side, along that side, at the pixel median.
fn median_cut(colours: Vec<([u8; 3], u32)>, n: usize) -> Vec<Vec<([u8; 3], u32)>> {
    if colours.is_empty() || n == 0 {
        return Vec::new();
    }
    let mut boxes = vec![ColourBox::new(colours)];
    while boxes.len() < n {
        let Some((k, _)) = boxes
            .iter()
            .map(ColourBox::score)
            .enumerate()
            .filter(|&(_, score)| score > 0)
            .max_by_key(|&(k, score)| (score, std::cmp::Reverse(k)))
        else {
            break;
        };
        let ColourBox {
            colours: mut b,
            pixels,
            axis,
            ..
        } = boxes.remove(k);
        // by the axis, ties by the whole colour (deterministic)
        b.sort_unstable_by_key(|c| {
            let [r, g, b] = c.0;
            let rest = u32::from(r) << 16 | u32::from(g) << 8 | u32::from(b);
            u32::from(c.0[axis]) << 24 | rest
        });
        let half = pixels.div_ceil(2);
        let mut acc = 0;
        let mut cut = b.len() - 1;
        for (j, c) in b.iter().enumerate() {
            acc += u64::from(c.1);
            if acc >= half {
                cut = j + 1;
                break;
            }
        }
        let cut = cut.clamp(1, b.len() - 1);
        let upper = b.split_off(cut);
        boxes.insert(k, ColourBox::new(upper));
        boxes.insert(k, ColourBox::new(b));
    }
    boxes.into_iter().map(|b| b.colours).collect()
}

/// 0..=255 as the percent sixel colour registers take.
pub fn percent(v: u8) -> u8 {
    ((u32::from(v) * 100 + 127) / 255) as u8
}

/// The DCS sequence drawing `q` at the cursor.
pub fn encode(q: &Quantized) -> Vec<u8> {
    let (w, h) = (q.width as usize, q.height as usize);
    let mut out = format!("\x1bP0;1;0q\"1;1;{w};{h}").into_bytes();
    for (i, c) in q.palette.iter().enumerate() {
        let [r, g, b] = c.map(percent);
        out.extend_from_slice(format!("#{i};2;{r};{g};{b}").as_bytes());
    }
    let mut rows: Vec<Vec<u8>> = vec![Vec::new(); q.palette.len()];
    let bands = h.div_ceil(6);
    for band in 0..bands {
        for row in rows.iter_mut() {
            row.clear();
        }
        for dy in 0..6.min(h - band * 6) {
            let y = band * 6 + dy;
            for x in 0..w {
                if let Some(i) = q.index[y * w + x] {
                    let row = &mut rows[usize::from(i)];
                    if row.is_empty() {
                        row.resize(w, 0);
                    }
                    row[x] |= 1 << dy;
                }
            }
        }
        let mut first = true;
        for (i, row) in rows.iter().enumerate() {
            let Some(end) = row.iter().rposition(|&bits| bits != 0) else {
                continue;
            };
            if !first {
                out.push(b'$');
            }
            first = false;
            out.extend_from_slice(format!("#{i}").as_bytes());
            run_length(&row[..=end], &mut out);
        }
        if band + 1 < bands {
            out.push(b'-');
        }
    }
    out.extend_from_slice(b"\x1b\\");
    out
}

/// Sixel characters for `bits`, runs of four or more as `!n`.
fn run_length(bits: &[u8], out: &mut Vec<u8>) {
    let mut x = 0;
    while x < bits.len() {
        let run = bits[x..].iter().take_while(|&&b| b == bits[x]).count();
        let ch = 63 + bits[x];
        if run >= 4 {
            out.extend_from_slice(format!("!{run}").as_bytes());
            out.push(ch);
        } else {
            out.extend(std::iter::repeat_n(ch, run));
        }
        x += run;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgba;

    /// A small sixel decoder: the colours each pixel was painted with (`None`: untouched).
    fn decode(seq: &[u8]) -> (usize, usize, Vec<Option<[u8; 3]>>) {
        let text = std::str::from_utf8(seq).unwrap();
        let body = text
            .strip_prefix("\x1bP0;1;0q")
            .and_then(|t| t.strip_suffix("\x1b\\"))
            .expect("DCS q ... ST");
        let mut chars = body.chars().peekable();
        let num = |chars: &mut std::iter::Peekable<std::str::Chars>| -> usize {
            let mut n = 0;
            while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                n = n * 10 + d as usize;
                chars.next();
            }
            n
        };
        assert_eq!(chars.next(), Some('"'));
        let mut attrs = Vec::new();
        for _ in 0..4 {
            attrs.push(num(&mut chars));
            if chars.peek() == Some(&';') {
                chars.next();
            }
        }
        assert_eq!(&attrs[..2], [1, 1], "square pixels");
        let (w, h) = (attrs[2], attrs[3]);
        let mut px = vec![None; w * h];
        let mut regs = std::collections::HashMap::new();
        let (mut color, mut x, mut band) = (0, 0, 0);
        while let Some(c) = chars.next() {
            match c {
                '#' => {
                    color = num(&mut chars);
                    if chars.peek() == Some(&';') {
                        chars.next();
                        let mut v = Vec::new();
                        for _ in 0..4 {
                            v.push(num(&mut chars));
                            if chars.peek() == Some(&';') {
                                chars.next();
                            }
                        }
                        assert_eq!(v[0], 2, "RGB colour space");
                        let back = |p: usize| ((p * 255 + 50) / 100) as u8;
                        regs.insert(color, [back(v[1]), back(v[2]), back(v[3])]);
                    }
                }
                '$' => x = 0,
                '-' => {
                    x = 0;
                    band += 1;
                }
                '!' | '?'..='~' => {
                    let (n, ch) = if c == '!' {
                        let n = num(&mut chars);
                        (n, chars.next().unwrap())
                    } else {
                        (1, c)
                    };
                    let bits = ch as u8 - 63;
                    for _ in 0..n {
                        for dy in 0..6 {
                            let y = band * 6 + dy;
                            if bits & (1 << dy) != 0 && x < w && y < h {
                                px[y * w + x] = Some(regs[&color]);
                            }
                        }
                        x += 1;
                    }
                }
                other => panic!("unexpected {other:?} in sixel data"),
            }
        }
        (w, h, px)
    }

    #[test]
    fn a_2x6_picture_in_exact_bytes() {
        let img = RgbaImage::from_fn(2, 6, |x, _| {
            if x == 0 {
                Rgba([255, 0, 0, 255])
            } else {
                Rgba([0, 0, 255, 255])
            }
        });
        let q = quantize(&img, &[], MAX_COLORS);
        assert_eq!(q.palette, [[0, 0, 255], [255, 0, 0]]);
        assert_eq!(
            String::from_utf8(encode(&q)).unwrap(),
            "\x1bP0;1;0q\"1;1;2;6#0;2;0;0;100#1;2;100;0;0#0?~$#1~\x1b\\"
        );
    }

    #[test]
    fn runs_bands_and_transparency() {
        // 9x7: one colour, the last column transparent: a run of 8, then a second band of one row
        let img = RgbaImage::from_fn(9, 7, |x, _| {
            Rgba([10, 200, 30, if x < 8 { 255 } else { 0 }])
        });
        let seq = String::from_utf8(encode(&quantize(&img, &[], MAX_COLORS))).unwrap();
        assert_eq!(seq, "\x1bP0;1;0q\"1;1;9;7#0;2;4;78;12#0!8~-#0!8@\x1b\\");
    }

    #[test]
    fn decoding_gives_back_the_quantized_picture() {
        // a gradient with more colours than registers, a transparent corner and box colours
        let red = [255, 80, 80];
        let green = [80, 220, 100];
        let img = RgbaImage::from_fn(64, 45, |x, y| {
            if x < 4 && y < 4 {
                Rgba([0, 0, 0, 0])
            } else if y == 20 {
                Rgba([red[0], red[1], red[2], 255])
            } else if x == 30 {
                Rgba([green[0], green[1], green[2], 255])
            } else {
                Rgba([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8, 255])
            }
        });
        let q = quantize(&img, &[red, green], MAX_COLORS);
        assert!(q.palette.len() <= MAX_COLORS);
        assert_eq!(&q.palette[..2], [red, green], "box colours reserved, exact");
        let (w, h, px) = decode(&encode(&q));
        assert_eq!((w, h), (64, 45));
        let round = |c: [u8; 3]| c.map(|v| ((usize::from(percent(v)) * 255 + 50) / 100) as u8);
        let (mut worst, mut total, mut n) = (0, 0, 0);
        for y in 0..45 {
            for x in 0..64 {
                let i = y * 64 + x;
                let want = q.index[i].map(|k| round(q.palette[usize::from(k)]));
                assert_eq!(px[i], want, "pixel {x},{y}");
                if let Some(got) = px[i] {
                    let orig = img.get_pixel(x as u32, y as u32).0;
                    for c in 0..3 {
                        let e = (i32::from(got[c]) - i32::from(orig[c])).abs();
                        worst = worst.max(e);
                        total += e;
                        n += 1;
                    }
                }
            }
        }
        assert_eq!(px[0], None, "transparent corner untouched");
        assert_eq!(px[20 * 64 + 10], Some(round(red)));
        assert_eq!(px[10 * 64 + 30], Some(round(green)));
        // ~2800 colours into 256, a step of 4-5 levels per pixel: within a few levels (a
        // 6x6x6 cube would be off by ~12 on average)
        let mean = f64::from(total) / f64::from(n);
        assert!(worst <= 16 && mean <= 4.0, "worst {worst}, mean {mean:.2}");
    }

    #[test]
    fn up_to_256_colours_are_kept_exactly() {
        // 240 colours, some one level apart
        let colours: Vec<[u8; 3]> = (0..240u32)
            .map(|i| [(i / 16 * 16) as u8, (i % 16) as u8, 100])
            .collect();
        let img = RgbaImage::from_fn(16, 15, |x, y| {
            let c = colours[(y * 16 + x) as usize];
            Rgba([c[0], c[1], c[2], 255])
        });
        let q = quantize(&img, &[], MAX_COLORS);
        for (i, p) in img.pixels().enumerate() {
            let got = q.palette[usize::from(q.index[i].unwrap())];
            assert_eq!(got, [p.0[0], p.0[1], p.0[2]], "pixel {i}");
        }
    }

    #[test]
    fn empty_and_fully_transparent_pictures() {
        let q = quantize(&RgbaImage::new(3, 2), &[], MAX_COLORS);
        assert!(q.palette.is_empty());
        assert_eq!(
            String::from_utf8(encode(&q)).unwrap(),
            "\x1bP0;1;0q\"1;1;3;2\x1b\\"
        );
        let q = quantize(&RgbaImage::new(0, 0), &[[1, 2, 3]], 1);
        assert_eq!(q.palette, [[1, 2, 3]]);
        assert_eq!(decode(&encode(&q)).0, 0);
    }
}
