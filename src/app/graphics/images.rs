//! Pictures as terminal images through `ratatui-image`: each wanted [`Picture`] is rastered
//! (scaled into its canvas, grounding boxes drawn: [`raster::canvas`]) and encoded once for the
//! protocol in use, then rendered like any widget into the frame's buffer. ratatui-image keeps
//! the escape sequence in the picture's first cell and marks the others skipped, so ratatui
//! writes it when it changes and writes text over the cells once the picture goes (sixel,
//! iTerm2 images are then covered; kitty's unicode placeholders are replaced).
//!
//! Encodings are kept for the last [`KEEP`] pictures, so a picture that an overlay hid comes
//! back without being encoded, or for kitty transmitted, again. kitty images keep their pixels
//! in the terminal until deleted: one that leaves the cache, and all at exit, are deleted.
use super::{raster, Graphics, Picture, Protocol};
use ratatui::buffer::Buffer;
use ratatui::layout::Size;
use ratatui::widgets::Widget;
use ratatui_image::protocol::iterm2::Iterm2;
use ratatui_image::protocol::kitty::Kitty;
use ratatui_image::protocol::sixel::Sixel;
use ratatui_image::protocol::Protocol as Encoded;
use std::io::{self, Write};

/// Encoded pictures kept.
pub const KEEP: usize = 8;

/// kitty ids start here (ids are per terminal window; keep clear of small ones others use).
const FIRST_KITTY_ID: u32 = 0x2a_0000;

pub struct Images {
    graphics: Graphics,
    /// By [`Picture::key`], most recently wanted last.
    cache: Vec<Entry>,
    next_id: u32,
    /// kitty images to delete before the next frame's pictures are written.
    evicted: Vec<u32>,
}

struct Entry {
    key: u64,
    encoded: Encoded,
    kitty_id: Option<u32>,
}

impl Images {
    pub fn new(graphics: Graphics) -> Self {
        Self {
            graphics,
            cache: Vec::new(),
            next_id: FIRST_KITTY_ID,
            evicted: Vec::new(),
        }
    }

    /// The cell size changed (a resize may change the font): placements change with it.
    pub fn set_graphics(&mut self, graphics: Graphics) {
        self.graphics = graphics;
    }

    /// Renders `wanted` into `buf`, encoding what is not cached. A picture that cannot be
    /// encoded is left out (its cells stay blank) and logged.
    pub fn render(&mut self, wanted: &[Picture], buf: &mut Buffer) {
        for pic in wanted {
            let key = pic.key();
            let at = match self.cache.iter().position(|e| e.key == key) {
                Some(i) => {
                    let e = self.cache.remove(i);
                    self.cache.push(e);
                    self.cache.len() - 1
                }
                None => {
                    let id = self.next_id;
                    match encode(pic, self.graphics, id) {
                        Ok(encoded) => {
                            let kitty_id = (self.graphics.protocol == Protocol::Kitty).then(|| {
                                self.next_id = self.next_id.wrapping_add(1).max(FIRST_KITTY_ID);
                                id
                            });
                            self.cache.push(Entry {
                                key,
                                encoded,
                                kitty_id,
                            });
                            self.cache.len() - 1
                        }
                        Err(e) => {
                            tracing::warn!("a picture could not be encoded: {e}");
                            continue;
                        }
                    }
                }
            };
            let rect = pic.place.rect.intersection(buf.area);
            ratatui_image::Image::new(&self.cache[at].encoded).render(rect, buf);
        }
        while self.cache.len() > KEEP.max(wanted.len()) {
            let e = self.cache.remove(0);
            self.evicted.extend(e.kitty_id);
        }
    }

    /// Deletes the kitty images that left the cache (after the frame that stopped showing
    /// them).
    pub fn flush_evicted<W: Write>(&mut self, out: &mut W) -> io::Result<()> {
        for id in std::mem::take(&mut self.evicted) {
            out.write_all(&delete_kitty(id, self.graphics.tmux))?;
        }
        Ok(())
    }

    /// At exit: every kitty image is deleted.
    pub fn clear<W: Write>(&mut self, out: &mut W) -> io::Result<()> {
        let ids = self.cache.drain(..).filter_map(|e| e.kitty_id);
        self.evicted.extend(ids.collect::<Vec<_>>());
        self.flush_evicted(out)?;
        out.flush()
    }
}

/// `pic` rastered and encoded for `g`'s protocol (kitty: as image `kitty_id`), inside tmux
/// wrapped for its passthrough.
pub fn encode(pic: &Picture, g: Graphics, kitty_id: u32) -> Result<Encoded, String> {
    let canvas = image::DynamicImage::ImageRgba8(raster::canvas(pic));
    let size = Size::new(pic.place.rect.width, pic.place.rect.height);
    let r = match g.protocol {
        Protocol::Kitty => Kitty::new(canvas, size, kitty_id, g.tmux, false).map(Encoded::Kitty),
        Protocol::Sixel => Sixel::new(canvas, size, g.tmux).map(Encoded::Sixel),
        Protocol::Iterm2 => Iterm2::new(canvas, size, g.tmux).map(Encoded::ITerm2),
    };
    r.map_err(|e| e.to_string())
}

/// kitty's delete of image `id` and its pixels (quietly), for tmux in its passthrough.
fn delete_kitty(id: u32, tmux: bool) -> Vec<u8> {
    let cmd = format!("_Ga=d,d=I,i={id},q=2");
    if tmux {
        format!("\x1bPtmux;\x1b\x1b{cmd}\x1b\x1b\\\x1b\\").into_bytes()
    } else {
        format!("\x1b{cmd}\x1b\\").into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{place, CellSize};
    use super::*;
    use crate::app::grounding::Grounding;
    use base64::Engine as _;
    use image::{Rgb, RgbImage};
    use ratatui::layout::Rect;

    /// Sixel canvases are whole bands of 6 rows: with 12 px rows every protocol gets the
    /// same canvas.
    const CELL: CellSize = CellSize { w: 8, h: 12 };

    fn graphics(protocol: Protocol, tmux: bool) -> Graphics {
        Graphics {
            protocol,
            cell: CELL,
            tmux,
        }
    }

    /// A grey 16x16 picture with one box (its right half), placed in 2x2 cells: a 16x24 px
    /// canvas, the picture 4 px down.
    fn picture(img: &RgbImage, g: Graphics) -> Picture<'_> {
        let place = place(16, 16, Rect::new(1, 1, 2, 2), g).unwrap();
        assert_eq!((place.canvas, place.picture), ((16, 24), (0, 4, 16, 16)));
        Picture {
            place,
            image: img,
            groundings: vec![Grounding {
                label: "boat".into(),
                boxes: vec![[500.0, 0.0, 1000.0, 1000.0]],
            }],
        }
    }

    /// What the picture writes: the escape sequence in its first cell.
    fn written(protocol: Protocol, tmux: bool) -> (String, Buffer) {
        let img = RgbImage::from_pixel(16, 16, Rgb([128, 128, 128]));
        let g = graphics(protocol, tmux);
        let pic = picture(&img, g);
        let mut buf = Buffer::empty(Rect::new(0, 0, 10, 5));
        let mut images = Images::new(g);
        images.render(std::slice::from_ref(&pic), &mut buf);
        let r = pic.place.rect;
        (buf[(r.x, r.y)].symbol().to_string(), buf)
    }

    /// The box's colour on its edges, the grey outside it and transparency around the
    /// picture, in the RGBA canvas (16 px wide).
    fn assert_boxed(rgba: &[u8]) {
        let px = |x: usize, y: usize| &rgba[(y * 16 + x) * 4..(y * 16 + x) * 4 + 4];
        let red = raster::box_rgb(0);
        assert_eq!(px(12, 4 + 15)[..3], red, "the box's bottom edge");
        assert_eq!(px(15, 4 + 8)[..3], red, "the box's right edge");
        assert_eq!(px(2, 4 + 8), [128, 128, 128, 255], "outside the box");
        assert_eq!(px(2, 1)[3], 0, "transparent above the picture");
    }

    #[test]
    fn kitty_transmits_rgba_once_and_places_by_unicode_placeholders() {
        let (s, buf) = written(Protocol::Kitty, false);
        let head = format!("\x1b_Gq=2,i={FIRST_KITTY_ID},a=T,U=1,f=32,t=d,s=16,v=24,m=0;");
        assert!(s.starts_with(&head), "{:?}", &s[..s.len().min(80)]);
        let payload = &s[head.len()..s.find("\x1b\\").unwrap()];
        let rgba = base64::engine::general_purpose::STANDARD
            .decode(payload)
            .unwrap();
        assert_eq!(rgba.len(), 16 * 24 * 4);
        assert_boxed(&rgba);
        // every cell of the picture is a placeholder, coloured with the image id
        let id = FIRST_KITTY_ID.to_be_bytes();
        for pos in Rect::new(1, 1, 2, 2).positions() {
            let c = &buf[pos];
            assert!(
                c.symbol().contains('\u{10EEEE}'),
                "{pos:?}: {:?}",
                c.symbol()
            );
            assert_eq!(
                c.fg,
                ratatui::style::Color::Rgb(id[1], id[2], id[3]),
                "{pos:?}"
            );
        }
    }

    #[test]
    fn sixel_clears_its_cells_then_draws_bands_with_the_box_colour() {
        let (s, _) = written(Protocol::Sixel, false);
        // erase 2 cells on each of the 2 rows, back up, then DCS ... q, sixel data, ST
        assert!(
            s.starts_with("\x1b[2X\x1b[1B\x1b[2X\x1b[1B\x1b[2A\x1bP"),
            "{:?}",
            &s[..s.len().min(40)]
        );
        let dcs = s.find("\x1bP").unwrap();
        let q = dcs + s[dcs..].find('q').unwrap();
        assert!(s.ends_with("\x1b\\"));
        // transparent background (P2 = 1), raster attributes: 1:1 pixels, 16x24
        assert_eq!(&s[dcs..q], "\x1bP9;1;0");
        assert!(s[q..].starts_with("q\"1;1;16;24"), "{:?}", &s[q..q + 20]);
        // the palette holds the grey and the box's red (in percent)
        let [r, g, b] = raster::box_rgb(0).map(|v| (u32::from(v) * 100 + 127) / 255);
        assert!(s.contains(&format!(";2;{r};{g};{b}")), "red in {s:?}");
        assert!(s.contains(";2;50;50;50"), "grey in {s:?}");
    }

    #[test]
    fn iterm2_sends_a_png_of_the_canvas() {
        let (s, _) = written(Protocol::Iterm2, false);
        let head = "\x1b]1337;File=inline=1;size=";
        let start = s.find(head).expect("an iTerm2 file");
        assert!(s[..start].starts_with("\x1b[2X"), "its cells cleared first");
        let rest = &s[start + head.len()..];
        let (meta, data) = rest.split_once(':').unwrap();
        assert!(
            meta.ends_with(";width=16px;height=24px;doNotMoveCursor=1"),
            "{meta}"
        );
        let data = data.strip_suffix('\x07').expect("ends with BEL");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        assert_eq!(meta.split(';').next(), Some(png.len().to_string().as_str()));
        let img = image::load_from_memory(&png).unwrap().to_rgba8();
        assert_eq!(img.dimensions(), (16, 24));
        assert_boxed(img.as_raw());
    }

    #[test]
    fn inside_tmux_every_protocol_goes_through_its_passthrough() {
        for p in [Protocol::Kitty, Protocol::Sixel, Protocol::Iterm2] {
            let (s, _) = written(p, true);
            // kitty's placeholder follows its transmission, outside the passthrough
            let seq = &s[..s.rfind("\x1b\\").unwrap() + 2];
            assert!(
                seq.starts_with("\x1bPtmux;\x1b\x1b"),
                "{p:?}: {:?}",
                &s[..20]
            );
            // each passthrough ends with ST, and every escape inside it is doubled
            let parts: Vec<&str> = seq.split("\x1bPtmux;").skip(1).collect();
            assert!(!parts.is_empty() && seq.split("\x1bPtmux;").next() == Some(""));
            for part in &parts {
                let mut inner = part.strip_suffix("\x1b\\").expect("ends with ST");
                if p == Protocol::Sixel {
                    // ratatui-image doubles the DCS's introducer but not the ST that ends the
                    // sixel data (tmux then ends its passthrough there, and the outer
                    // terminal's DCS with it)
                    let dcs = inner
                        .find("\x1b\x1bP9;1;0q")
                        .expect("the sixel DCS, doubled");
                    assert!(inner.ends_with("\x1b\\"));
                    inner = &inner[..dcs];
                }
                assert!(
                    !inner.replace("\x1b\x1b", "").contains('\x1b'),
                    "{p:?}: a bare escape in {:?}",
                    &inner[..inner.len().min(60)]
                );
            }
        }
        assert_eq!(
            delete_kitty(7, true),
            b"\x1bPtmux;\x1b\x1b_Ga=d,d=I,i=7,q=2\x1b\x1b\\\x1b\\"
        );
    }

    #[test]
    fn encodings_are_kept_and_kitty_images_deleted_when_they_leave() {
        let g = graphics(Protocol::Kitty, false);
        let imgs: Vec<RgbImage> = (0..=KEEP as u8)
            .map(|v| RgbImage::from_pixel(16, 16, Rgb([v, v, v])))
            .collect();
        let mut images = Images::new(g);
        let mut buf = Buffer::empty(Rect::new(0, 0, 10, 5));
        let first = picture(&imgs[0], g);
        images.render(std::slice::from_ref(&first), &mut buf);
        let sent = buf[(1, 1)].symbol().to_string();
        assert!(sent.contains("a=T,"));
        // drawn again: placeholders only, not transmitted again
        images.render(std::slice::from_ref(&first), &mut buf);
        assert!(!buf[(1, 1)].symbol().contains("\x1b_G"));
        let mut out = Vec::new();
        images.flush_evicted(&mut out).unwrap();
        assert!(out.is_empty());
        // KEEP other pictures push the first one out: deleted by id
        for img in &imgs[1..] {
            images.render(&[picture(img, g)], &mut buf);
        }
        images.flush_evicted(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("\x1b_Ga=d,d=I,i={FIRST_KITTY_ID},q=2\x1b\\")
        );
        // leaving deletes the rest
        let mut out = Vec::new();
        images.clear(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap().matches("a=d,d=I,").count(),
            KEEP
        );
    }
}
