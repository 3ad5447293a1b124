//! Pictures through terminal graphics protocols: kitty, sixel and iTerm2 (inside tmux through
//! its passthrough), encoded by the `ratatui-image` crate, with half blocks (preview.rs) as the
//! fallback.
//!
//! - the view reserves the picture's cells as blanks ([`place`] decides which, from the cell
//!   size in pixels);
//! - in the same frame, [`Images`] renders the pictures wanted into those cells: each one
//!   scaled into its canvas with the grounding boxes drawn ([`raster`]), encoded once by
//!   ratatui-image and kept while it is shown; ratatui writes it with the frame's other cells;
//! - an overlay (help, sessions) hides the pictures: while one is open the preview falls back
//!   to half blocks under it, and the images come back when it closes.
//!
//! Which protocol, if any, is decided once at start-up ([`detect`]): the environment, then a
//! short query of the terminal before the input thread starts. ratatui-image's own query
//! (`Picker::from_query_stdio`) is not used: it waits up to 2 s for a silent terminal and
//! leaves its late answers to the input; ours waits 150 ms and filters them.
pub mod detect;
mod images;
mod raster;

pub use detect::{detect, Detected, LateReplyFilter};
pub use images::Images;

use super::grounding::Grounding;
use image::RgbImage;
use ratatui::layout::Rect;
use std::hash::{Hash, Hasher};

/// `graphics` in config.toml and `--graphics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GraphicsMode {
    /// The environment, then a terminal query; half blocks inside tmux.
    #[default]
    Auto,
    Kitty,
    Sixel,
    Iterm2,
    Halfblocks,
}

impl GraphicsMode {
    pub const NAMES: [&'static str; 5] = ["auto", "kitty", "sixel", "iterm2", "halfblocks"];

    pub fn named(name: &str) -> Option<Self> {
        Some(match name {
            "auto" => Self::Auto,
            "kitty" => Self::Kitty,
            "sixel" => Self::Sixel,
            "iterm2" => Self::Iterm2,
            "halfblocks" => Self::Halfblocks,
            _ => return None,
        })
    }

    /// The protocol the user forces, if any.
    pub fn forced(self) -> Option<Protocol> {
        match self {
            Self::Kitty => Some(Protocol::Kitty),
            Self::Sixel => Some(Protocol::Sixel),
            Self::Iterm2 => Some(Protocol::Iterm2),
            Self::Auto | Self::Halfblocks => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Kitty,
    Sixel,
    Iterm2,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kitty => "kitty",
            Self::Sixel => "sixel",
            Self::Iterm2 => "iterm2",
        }
    }
}

/// A character cell in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CellSize {
    pub w: u16,
    pub h: u16,
}

impl CellSize {
    /// When the terminal does not say: a common size with the half blocks' 1:2 aspect.
    pub const DEFAULT: Self = Self { w: 10, h: 20 };

    /// `None` unless both are plausible (a terminal may report zeros or nonsense).
    pub fn new(w: u32, h: u32) -> Option<Self> {
        ((2..=64).contains(&w) && (4..=128).contains(&h)).then_some(Self {
            w: w as u16,
            h: h as u16,
        })
    }

    /// From a window size in cells and pixels (TIOCGWINSZ).
    pub fn from_window(cols: u16, rows: u16, width_px: u16, height_px: u16) -> Option<Self> {
        if cols == 0 || rows == 0 {
            return None;
        }
        Self::new(
            u32::from(width_px) / u32::from(cols),
            u32::from(height_px) / u32::from(rows),
        )
    }
}

/// The protocol in use and the cell size it draws with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Graphics {
    pub protocol: Protocol,
    pub cell: CellSize,
    /// Inside tmux: every sequence goes through its passthrough (`allow-passthrough on`).
    pub tmux: bool,
}

/// Largest canvas side in pixels (bounds memory and encoding time on huge terminals).
const MAX_CANVAS: u32 = 4096;

/// Where a picture goes: the cells it covers and, in pixels, the canvas sent for those cells
/// and the picture inside it (centred; the rest is transparent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Placement {
    pub rect: Rect,
    pub canvas: (u32, u32),
    /// x, y, width, height inside the canvas.
    pub picture: (u32, u32, u32, u32),
}

/// The largest placement of a `img_w` x `img_h` picture, keeping its aspect, centred in
/// `area`. Sixel images are drawn in bands of six pixel rows, so their canvas height is a
/// multiple of six that stays inside the reserved rows.
pub fn place(img_w: u32, img_h: u32, area: Rect, g: Graphics) -> Option<Placement> {
    if img_w == 0 || img_h == 0 || area.is_empty() {
        return None;
    }
    let (cw, ch) = (u32::from(g.cell.w), u32::from(g.cell.h));
    let sixel = g.protocol == Protocol::Sixel;
    let floor6 = |v: u32| v / 6 * 6;
    let max_w = (u32::from(area.width) * cw).min(MAX_CANVAS);
    let mut max_h = (u32::from(area.height) * ch).min(MAX_CANVAS);
    if sixel {
        max_h = floor6(max_h);
    }
    if max_w == 0 || max_h == 0 {
        return None;
    }
    let scale = (f64::from(max_w) / f64::from(img_w)).min(f64::from(max_h) / f64::from(img_h));
    let pw = ((f64::from(img_w) * scale).round() as u32).clamp(1, max_w);
    let ph = ((f64::from(img_h) * scale).round() as u32).clamp(1, max_h);
    let cols = pw.div_ceil(cw).min(u32::from(area.width)) as u16;
    // a sixel band that starts inside the last row may reach into the next: count it
    let rows_px = if sixel { ph.div_ceil(6) * 6 } else { ph };
    let rows = rows_px.div_ceil(ch).min(u32::from(area.height)) as u16;
    let canvas_w = (u32::from(cols) * cw).min(MAX_CANVAS);
    let canvas_h = (u32::from(rows) * ch).min(MAX_CANVAS);
    let canvas_h = if sixel { floor6(canvas_h) } else { canvas_h };
    let rect = Rect::new(
        area.x + (area.width - cols) / 2,
        area.y + (area.height - rows) / 2,
        cols,
        rows,
    );
    Some(Placement {
        rect,
        canvas: (canvas_w, canvas_h),
        picture: ((canvas_w - pw) / 2, (canvas_h - ph) / 2, pw, ph),
    })
}

/// A picture the view wants on screen.
#[derive(Debug, Clone)]
pub struct Picture<'a> {
    pub place: Placement,
    pub image: &'a RgbImage,
    /// Boxes drawn into it (in the colours of their `[n]` tags).
    pub groundings: Vec<Grounding>,
}

impl Picture<'_> {
    /// Identifies what is drawn (not where): the pixels, the boxes and the geometry.
    pub fn key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.place.canvas.hash(&mut h);
        self.place.picture.hash(&mut h);
        self.image.dimensions().hash(&mut h);
        self.image.as_raw().hash(&mut h);
        for g in &self.groundings {
            g.label.hash(&mut h);
            for b in &g.boxes {
                b.map(f32::to_bits).hash(&mut h);
            }
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KITTY: Graphics = Graphics {
        protocol: Protocol::Kitty,
        cell: CellSize { w: 10, h: 20 },
        tmux: false,
    };

    #[test]
    fn modes_by_name() {
        for name in GraphicsMode::NAMES {
            assert!(GraphicsMode::named(name).is_some(), "{name}");
        }
        assert_eq!(GraphicsMode::named("iterm2"), Some(GraphicsMode::Iterm2));
        assert_eq!(GraphicsMode::named("Kitty"), None);
        assert_eq!(GraphicsMode::Sixel.forced(), Some(Protocol::Sixel));
        assert_eq!(GraphicsMode::Auto.forced(), None);
    }

    #[test]
    fn cell_sizes_must_be_plausible() {
        assert_eq!(CellSize::new(9, 18), Some(CellSize { w: 9, h: 18 }));
        assert_eq!(CellSize::new(0, 18), None);
        assert_eq!(CellSize::new(5000, 5000), None);
        assert_eq!(
            CellSize::from_window(80, 24, 800, 480),
            Some(CellSize { w: 10, h: 20 })
        );
        assert_eq!(CellSize::from_window(80, 24, 0, 0), None);
        assert_eq!(CellSize::from_window(0, 0, 800, 480), None);
    }

    #[test]
    fn placement_keeps_the_aspect_and_centres() {
        // 2:1 picture into 30x10 cells of 10x20 px = 300x200 px: 300x150 px, 30x8 cells
        let p = place(400, 200, Rect::new(5, 2, 30, 10), KITTY).unwrap();
        assert_eq!(p.rect, Rect::new(5, 3, 30, 8));
        assert_eq!(p.canvas, (300, 160));
        assert_eq!(p.picture, (0, 5, 300, 150));
        // tall picture: limited by height, centred horizontally
        let p = place(100, 400, Rect::new(0, 0, 30, 10), KITTY).unwrap();
        assert_eq!(p.picture.2, 50);
        assert_eq!(p.rect, Rect::new(12, 0, 5, 10));
        assert_eq!(place(0, 10, Rect::new(0, 0, 5, 5), KITTY), None);
        assert_eq!(place(10, 10, Rect::new(0, 0, 0, 5), KITTY), None);
    }

    #[test]
    fn sixel_canvases_are_whole_bands_inside_their_rows() {
        let g = Graphics {
            protocol: Protocol::Sixel,
            cell: CellSize { w: 7, h: 15 },
            tmux: false,
        };
        for (w, h, aw, ah) in [
            (400, 200, 30, 10),
            (100, 400, 9, 7),
            (1, 1, 1, 1),
            (37, 5, 3, 2),
        ] {
            let area = Rect::new(1, 1, aw, ah);
            let p = place(w, h, area, g).unwrap();
            let (_, y, _, ph) = p.picture;
            assert_eq!(p.canvas.1 % 6, 0, "{p:?}");
            assert!(y + ph <= p.canvas.1, "{p:?}");
            assert!(p.canvas.1 <= u32::from(p.rect.height) * 15, "{p:?}");
            assert!(area.contains(p.rect.as_position()) && p.rect.bottom() <= area.bottom());
        }
    }

    #[test]
    fn keys_change_with_pixels_boxes_and_geometry() {
        let img = RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]));
        let place = place(4, 4, Rect::new(0, 0, 4, 2), KITTY).unwrap();
        let a = Picture {
            place,
            image: &img,
            groundings: vec![],
        };
        let mut other = img.clone();
        other.put_pixel(3, 3, image::Rgb([0, 0, 0]));
        let b = Picture {
            image: &other,
            ..a.clone()
        };
        let c = Picture {
            groundings: vec![Grounding {
                label: "x".into(),
                boxes: vec![[0.0, 0.0, 10.0, 10.0]],
            }],
            ..a.clone()
        };
        let mut moved = a.clone();
        moved.place.rect.x += 1;
        let mut smaller = a.clone();
        smaller.place.picture.2 -= 1;
        assert_eq!(a.key(), a.clone().key());
        assert_ne!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
        assert_ne!(a.key(), smaller.key());
        assert_eq!(a.key(), moved.key(), "the same image wherever it is");
    }
}
