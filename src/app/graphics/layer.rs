//! What is on screen beside the cells, and the escape sequences that bring it to what the
//! view wants after each frame. [`plan`] is the decision (pure, tested like `update`);
//! [`Layer::apply`] writes it.
use super::{iterm2, kitty, raster, sixel, Picture, Protocol};
use image::ImageFormat;
use ratatui::backend::Backend;
use ratatui::buffer::{Buffer, Cell, CellDiffOption};
use ratatui::layout::Rect;
use std::io::{self, Write};
use unicode_width::UnicodeWidthStr;

/// A picture on screen, or wanted there: its cells, its geometry in pixels and what is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub rect: Rect,
    pub canvas: (u32, u32),
    pub picture: (u32, u32, u32, u32),
    /// [`Picture::key`]: pixels, boxes and geometry.
    pub key: u64,
}

impl Slot {
    pub fn of(p: &Picture) -> Self {
        Self {
            rect: p.place.rect,
            canvas: p.place.canvas,
            picture: p.place.picture,
            key: p.key(),
        }
    }

    /// Draws over every pixel `other` drew (same cells, same geometry).
    fn covers(&self, other: &Slot) -> bool {
        self.rect == other.rect && self.canvas == other.canvas && self.picture == other.picture
    }
}

/// The changes for one frame.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Shown pictures to take away (kitty: delete the placement).
    pub remove: Vec<Slot>,
    /// Indices of wanted pictures to draw.
    pub add: Vec<usize>,
    /// Cells to repaint from the frame (sixel, iTerm2: their images are in the cells, which
    /// ratatui believes blank and would never rewrite).
    pub repaint: Vec<Rect>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty() && self.repaint.is_empty()
    }
}

/// From what is `shown` to what is `wanted`. After a resize ratatui has cleared the screen
/// and redrawn every cell, so everything is drawn again and nothing needs repainting.
pub fn plan(protocol: Protocol, shown: &[Slot], wanted: &[Slot], resized: bool) -> Plan {
    let mut p = Plan::default();
    if resized {
        if protocol == Protocol::Kitty {
            p.remove = shown.to_vec();
        }
        p.add = (0..wanted.len()).collect();
        return p;
    }
    p.remove = shown
        .iter()
        .filter(|s| !wanted.contains(s))
        .copied()
        .collect();
    p.add = (0..wanted.len())
        .filter(|&i| !shown.contains(&wanted[i]))
        .collect();
    if protocol != Protocol::Kitty {
        p.repaint = p
            .remove
            .iter()
            .filter(|old| !p.add.iter().any(|&i| wanted[i].covers(old)))
            .map(|old| old.rect)
            .collect();
    }
    p
}

/// The cells of `rects` in `buf`, as ratatui would write them (a wide character cut by a
/// rectangle's left edge is written whole; the cells it covers are not written).
pub fn cells(rects: &[Rect], buf: &Buffer) -> Vec<(u16, u16, Cell)> {
    let mut out = Vec::new();
    for r in rects {
        let r = r.intersection(buf.area);
        for y in r.top()..r.bottom() {
            let mut x = r.left();
            if x > buf.area.left() && buf[(x - 1, y)].symbol().width() > 1 {
                x -= 1;
            }
            while x < r.right() {
                let cell = &buf[(x, y)];
                let w = cell.symbol().width().max(1) as u16;
                if cell.diff_option != CellDiffOption::Skip {
                    out.push((x, y, cell.clone()));
                }
                x = x.saturating_add(w);
            }
        }
    }
    out
}

/// A shown picture and, for kitty, its image and placement ids.
#[derive(Debug, Clone, Copy)]
struct Shown {
    slot: Slot,
    id: u32,
    pid: u32,
}

/// Encoded pictures kept for redrawing (after an overlay closes) without encoding again.
const CACHE: usize = 24;
/// kitty ids start here (ids are per terminal window; keep clear of small ones others use).
const FIRST_ID: u32 = 0x4956_0001;

pub struct Layer {
    protocol: Protocol,
    shown: Vec<Shown>,
    area: Option<Rect>,
    /// (key, kitty id or encoded sequence), most recently used last.
    cache: Vec<(u64, Encoded)>,
    next_id: u32,
}

enum Encoded {
    /// Transmitted to the terminal under this id.
    Kitty(u32),
    /// The whole sixel or iTerm2 sequence.
    Bytes(Vec<u8>),
}

impl Layer {
    pub fn new(protocol: Protocol) -> Self {
        Self {
            protocol,
            shown: Vec::new(),
            area: None,
            cache: Vec::new(),
            next_id: FIRST_ID,
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// What to change now that a frame of `area` was drawn with `wanted` reserved.
    pub fn plan(&self, area: Rect, wanted: &[Picture]) -> Plan {
        let shown: Vec<Slot> = self.shown.iter().map(|s| s.slot).collect();
        let wanted: Vec<Slot> = wanted.iter().map(Slot::of).collect();
        let resized = self.area.is_some_and(|a| a != area);
        plan(self.protocol, &shown, &wanted, resized)
    }

    /// Writes `plan` (with `repaint`, the cells of its `repaint` rectangles from the frame)
    /// to `out`, the terminal's backend, cursor saved and restored around it.
    pub fn apply<B: Backend<Error = io::Error> + Write>(
        &mut self,
        area: Rect,
        wanted: &[Picture],
        plan: &Plan,
        repaint: &[(u16, u16, Cell)],
        out: &mut B,
    ) -> io::Result<()> {
        self.area = Some(area);
        if plan.is_empty() {
            return Ok(());
        }
        out.write_all(b"\x1b7")?;
        for old in &plan.remove {
            if let Some(k) = self.shown.iter().position(|s| s.slot == *old) {
                let s = self.shown.remove(k);
                if self.protocol == Protocol::Kitty {
                    out.write_all(&kitty::delete_placement(s.id, s.pid))?;
                }
            }
        }
        if !repaint.is_empty() {
            out.draw(repaint.iter().map(|(x, y, c)| (*x, *y, c)))?;
        }
        for &i in &plan.add {
            let Some(pic) = wanted.get(i) else { continue };
            let slot = Slot::of(pic);
            let r = slot.rect;
            let (id, pid) = match self.encoded(pic, slot.key, out)? {
                Some(id) => {
                    let pid = (1..)
                        .find(|p| !self.shown.iter().any(|s| s.id == id && s.pid == *p))
                        .unwrap_or(1);
                    write!(out, "\x1b[{};{}H", r.y + 1, r.x + 1)?;
                    out.write_all(&kitty::place(id, pid, r.width, r.height))?;
                    (id, pid)
                }
                None => {
                    write!(out, "\x1b[{};{}H", r.y + 1, r.x + 1)?;
                    if let Some((_, Encoded::Bytes(seq))) =
                        self.cache.iter().find(|(k, _)| *k == slot.key)
                    {
                        out.write_all(seq)?;
                    }
                    (0, 0)
                }
            };
            self.shown.push(Shown { slot, id, pid });
        }
        out.write_all(b"\x1b8")?;
        Write::flush(out)
    }

    /// Makes sure `pic` is encoded (kitty: transmitted); returns the kitty id.
    fn encoded<W: Write>(
        &mut self,
        pic: &Picture,
        key: u64,
        out: &mut W,
    ) -> io::Result<Option<u32>> {
        if let Some(k) = self.cache.iter().position(|(k, _)| *k == key) {
            let entry = self.cache.remove(k);
            let id = match &entry.1 {
                Encoded::Kitty(id) => Some(*id),
                Encoded::Bytes(_) => None,
            };
            self.cache.push(entry);
            return Ok(id);
        }
        let canvas = raster::canvas(pic);
        let (entry, id) = match self.protocol {
            Protocol::Kitty => {
                let id = self.next_id;
                self.next_id = self.next_id.checked_add(1).unwrap_or(FIRST_ID);
                out.write_all(&kitty::transmit(id, &png(&canvas)?))?;
                (Encoded::Kitty(id), Some(id))
            }
            Protocol::Iterm2 => {
                let (w, h) = (pic.place.rect.width, pic.place.rect.height);
                (Encoded::Bytes(iterm2::inline(&png(&canvas)?, w, h)), None)
            }
            Protocol::Sixel => {
                let reserved: Vec<[u8; 3]> =
                    (0..pic.groundings.len()).map(raster::box_rgb).collect();
                let q = sixel::quantize(&canvas, &reserved, sixel::MAX_COLORS);
                (Encoded::Bytes(sixel::encode(&q)), None)
            }
        };
        self.cache.push((key, entry));
        self.evict(out)?;
        Ok(id)
    }

    /// Drops the least recently used encodings beyond [`CACHE`] that are not on screen
    /// (kitty: frees the terminal's copy).
    fn evict<W: Write>(&mut self, out: &mut W) -> io::Result<()> {
        while self.cache.len() > CACHE {
            let on_screen = |key: u64| self.shown.iter().any(|s| s.slot.key == key);
            // never the newest: it is about to be shown
            let older = &self.cache[..self.cache.len() - 1];
            let Some(k) = older.iter().position(|(key, _)| !on_screen(*key)) else {
                break;
            };
            if let (_, Encoded::Kitty(id)) = self.cache.remove(k) {
                out.write_all(&kitty::delete_image(id))?;
            }
        }
        Ok(())
    }

    /// Before leaving: frees every kitty image (sixel and iTerm2 images go with the
    /// alternate screen).
    pub fn clear<W: Write>(&mut self, out: &mut W) -> io::Result<()> {
        self.shown.clear();
        for (_, e) in self.cache.drain(..) {
            if let Encoded::Kitty(id) = e {
                out.write_all(&kitty::delete_image(id))?;
            }
        }
        out.flush()
    }
}

fn png(img: &image::RgbaImage) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(&mut io::Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(io::Error::other)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::super::{place, CellSize, Graphics};
    use super::*;
    use image::{Rgb, RgbImage};
    use ratatui::backend::CrosstermBackend;
    use ratatui::style::{Color, Style};

    fn slot(x: u16, key: u64) -> Slot {
        Slot {
            rect: Rect::new(x, 1, 4, 2),
            canvas: (40, 40),
            picture: (0, 0, 40, 40),
            key,
        }
    }

    #[test]
    fn a_steady_frame_changes_nothing() {
        for p in [Protocol::Kitty, Protocol::Sixel, Protocol::Iterm2] {
            let s = [slot(0, 1), slot(10, 2)];
            assert!(plan(p, &s, &s, false).is_empty());
            assert!(plan(p, &[], &[], false).is_empty());
        }
    }

    #[test]
    fn pictures_come_and_go() {
        let a = slot(0, 1);
        let b = slot(10, 2);
        // one appears
        let p = plan(Protocol::Kitty, &[a], &[a, b], false);
        assert_eq!(p.add, [1]);
        assert!(p.remove.is_empty() && p.repaint.is_empty());
        // one goes (an overlay opened, the preview closed): kitty deletes it, ...
        let p = plan(Protocol::Kitty, &[a, b], &[a], false);
        assert_eq!(
            (p.remove.as_slice(), p.repaint.as_slice()),
            (&[b][..], &[][..])
        );
        // ... sixel and iTerm2 repaint its cells
        for proto in [Protocol::Sixel, Protocol::Iterm2] {
            let p = plan(proto, &[a, b], &[], false);
            assert_eq!(p.remove, [a, b]);
            assert_eq!(p.repaint, [a.rect, b.rect]);
            assert!(p.add.is_empty());
        }
    }

    #[test]
    fn a_new_picture_in_the_same_place_is_drawn_over_the_old_one() {
        // boxes arrive: same geometry, new pixels: no repaint needed under sixel
        let old = slot(0, 1);
        let new = slot(0, 7);
        let p = plan(Protocol::Sixel, &[old], &[new], false);
        assert_eq!((p.remove, p.add, p.repaint), (vec![old], vec![0], vec![]));
        // a different geometry in the same cells leaves old pixels in the margin: repaint
        let mut narrower = new;
        narrower.picture = (5, 0, 30, 40);
        let p = plan(Protocol::Sixel, &[old], &[narrower], false);
        assert_eq!(p.repaint, [old.rect]);
        // moved: repaint where it was
        let moved = slot(2, 1);
        let p = plan(Protocol::Iterm2, &[old], &[moved], false);
        assert_eq!((p.add, p.repaint), (vec![0], vec![old.rect]));
    }

    #[test]
    fn after_a_resize_everything_is_drawn_again() {
        let a = slot(0, 1);
        let p = plan(Protocol::Kitty, &[a], &[a], true);
        assert_eq!((p.remove, p.add, p.repaint), (vec![a], vec![0], vec![]));
        // the resize cleared the screen, and with it cell-bound images
        let p = plan(Protocol::Sixel, &[a], &[a], true);
        assert_eq!((p.remove, p.add, p.repaint), (vec![], vec![0], vec![]));
    }

    #[test]
    fn cells_keep_wide_characters_whole() {
        let mut buf = Buffer::empty(Rect::new(0, 0, 8, 2));
        buf.set_string(0, 0, "a字bc", Style::new().fg(Color::Red));
        // the rectangle starts on the second half of 字 (x 1..3): start at its head
        let got: Vec<(u16, u16, String)> = cells(&[Rect::new(2, 0, 3, 1)], &buf)
            .into_iter()
            .map(|(x, y, c)| (x, y, c.symbol().to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 0, "字".to_string()),
                (3, 0, "b".into()),
                (4, 0, "c".into())
            ]
        );
        assert_eq!(cells(&[Rect::new(6, 1, 5, 5)], &buf).len(), 2, "clipped");
    }

    fn picture(img: &RgbImage, x: u16, protocol: Protocol) -> Picture<'_> {
        let g = Graphics {
            protocol,
            cell: CellSize { w: 4, h: 8 },
        };
        Picture {
            place: place(img.width(), img.height(), Rect::new(x, 2, 6, 3), g).unwrap(),
            image: img,
            groundings: Vec::new(),
        }
    }

    /// Plans and applies one frame; returns the bytes written.
    fn frame(layer: &mut Layer, area: Rect, wanted: &[Picture], buf: &Buffer) -> String {
        let mut bytes = Vec::new();
        let mut out = CrosstermBackend::new(&mut bytes);
        let p = layer.plan(area, wanted);
        let repaint = cells(&p.repaint, buf);
        layer.apply(area, wanted, &p, &repaint, &mut out).unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    #[test]
    fn kitty_transmits_once_places_per_frame_and_deletes_by_id() {
        let img = RgbImage::from_pixel(24, 24, Rgb([10, 20, 30]));
        let area = Rect::new(0, 0, 20, 8);
        let buf = Buffer::empty(area);
        let mut layer = Layer::new(Protocol::Kitty);
        let pics = [picture(&img, 3, Protocol::Kitty)];
        let r = pics[0].place.rect;
        let id = FIRST_ID;
        let first = frame(&mut layer, area, &pics, &buf);
        assert!(first.starts_with("\x1b7") && first.ends_with("\x1b8"));
        assert_eq!(count(&first, &format!("\x1b_Ga=t,t=d,f=100,i={id},q=2")), 1);
        let placed = format!(
            "\x1b[{};{}H\x1b_Ga=p,i={id},p=1,c={},r={},C=1,q=2\x1b\\",
            r.y + 1,
            r.x + 1,
            r.width,
            r.height
        );
        assert!(first.contains(&placed), "{first:?}");
        // nothing changes: nothing written
        assert_eq!(frame(&mut layer, area, &pics, &buf), "");
        // an overlay hides it: the placement goes, the image stays
        let hidden = frame(&mut layer, area, &[], &buf);
        assert_eq!(
            hidden,
            format!("\x1b7\x1b_Ga=d,d=i,i={id},p=1,q=2\x1b\\\x1b8")
        );
        // back: placed again without transmitting
        let back = frame(&mut layer, area, &pics, &buf);
        assert_eq!(back, format!("\x1b7{placed}\x1b8"));
        // a resize: the old placement is deleted and the same image placed again
        let bigger = Rect::new(0, 0, 30, 8);
        let resized = frame(&mut layer, bigger, &pics, &buf);
        assert_eq!(count(&resized, "a=d,d=i"), 1);
        assert_eq!(count(&resized, "a=p,"), 1);
        assert_eq!(count(&resized, "a=t,"), 0);
        // leaving frees the image
        let mut out = Vec::new();
        layer.clear(&mut out).unwrap();
        assert_eq!(out, format!("\x1b_Ga=d,d=I,i={id},q=2\x1b\\").into_bytes());
    }

    #[test]
    fn the_same_picture_twice_gets_two_placements() {
        let img = RgbImage::from_pixel(24, 24, Rgb([10, 20, 30]));
        let area = Rect::new(0, 0, 20, 8);
        let mut layer = Layer::new(Protocol::Kitty);
        // same size, same pixels: one image, placements 1 and 2
        let a = picture(&img, 0, Protocol::Kitty);
        let b = picture(&img, 10, Protocol::Kitty);
        let out = frame(&mut layer, area, &[a, b], &Buffer::empty(area));
        assert_eq!(count(&out, "a=t,"), 1);
        assert_eq!(count(&out, ",p=1,"), 1);
        assert_eq!(count(&out, ",p=2,"), 1);
    }

    #[test]
    fn sixel_repaints_the_cells_an_image_leaves() {
        let img = RgbImage::from_pixel(24, 24, Rgb([200, 20, 30]));
        let area = Rect::new(0, 0, 20, 8);
        let mut layer = Layer::new(Protocol::Sixel);
        let pics = [picture(&img, 3, Protocol::Sixel)];
        let r = pics[0].place.rect;
        let first = frame(&mut layer, area, &pics, &Buffer::empty(area));
        let at = format!("\x1b[{};{}H\x1bP0;1;0q\"1;1;", r.y + 1, r.x + 1);
        assert!(first.contains(&at), "{first:?}");
        assert_eq!(frame(&mut layer, area, &pics, &Buffer::empty(area)), "");
        // the help overlay covers it: its text is written where the image was
        let mut buf = Buffer::empty(area);
        buf.set_string(r.x, r.y, "HELP", Style::new());
        let hidden = frame(&mut layer, area, &[], &buf);
        assert!(hidden.contains("HELP"), "{hidden:?}");
        assert!(
            !hidden.contains("\x1bP"),
            "no image while the overlay is up"
        );
        // closed: the image is drawn again from the cache, nothing else
        let back = frame(&mut layer, area, &pics, &Buffer::empty(area));
        assert!(back.contains(&at) && !back.contains("HELP"));
    }

    #[test]
    fn iterm2_draws_an_inline_png_sized_in_cells() {
        let img = RgbImage::from_pixel(24, 24, Rgb([1, 2, 3]));
        let area = Rect::new(0, 0, 20, 8);
        let mut layer = Layer::new(Protocol::Iterm2);
        let pics = [picture(&img, 3, Protocol::Iterm2)];
        let r = pics[0].place.rect;
        let out = frame(&mut layer, area, &pics, &Buffer::empty(area));
        let head = format!("\x1b[{};{}H\x1b]1337;File=inline=1;", r.y + 1, r.x + 1);
        assert!(out.contains(&head), "{out:?}");
        assert!(out.contains(&format!(";width={};height={};", r.width, r.height)));
    }
}
