//! Pictures and videos to 448px tiles, as the model card's `load_image` and `load_video` make
//! them. No libtorch here: tiles are RGB images and normalised `f32` buffers.
pub mod cache;
pub mod image;
pub mod resize;
pub mod video;

use crate::engine::protocol::Attachment;
use ::image::RgbImage;
pub use cache::{load_visual_shared, prefetch};

/// Tiling settings from `config.json`.
#[derive(Debug, Clone, Copy)]
pub struct TileConfig {
    pub image_size: u32,
    pub min_tiles: u32,
    pub max_tiles: u32,
    pub use_thumbnail: bool,
    /// LLM tokens per tile (256 for InternVL 2.5).
    pub tokens_per_tile: usize,
}

/// An attachment turned into the tiles of each `<image>` placeholder it fills: one entry for an
/// image, one per sampled frame for a video.
#[derive(Debug)]
pub struct Visual {
    pub placeholders: Vec<Vec<RgbImage>>,
    /// (cols, rows) of the first placeholder's tile grid.
    pub grid: (u32, u32),
    /// Video: the sampled frame indices.
    pub frame_indices: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum VisualError {
    #[error(transparent)]
    Image(#[from] image::ImageLoadError),
    #[error(transparent)]
    Video(#[from] video::VideoError),
    #[error("{path}: max tiles must be at least 1")]
    ZeroTiles { path: std::path::PathBuf },
}

impl Visual {
    pub fn tiles(&self) -> usize {
        self.placeholders.iter().map(|p| p.len()).sum()
    }
}

/// An image's tile limit: its own, else the config's; 0 is refused.
fn image_max_tiles(
    path: &std::path::Path,
    max_tiles: Option<usize>,
    cfg: &TileConfig,
) -> Result<u32, VisualError> {
    match max_tiles.map(|m| m as u32).unwrap_or(cfg.max_tiles) {
        0 => Err(VisualError::ZeroTiles { path: path.into() }),
        m => Ok(m),
    }
}

fn tile_frame(img: &RgbImage, cfg: &TileConfig, max_tiles: u32) -> (Vec<RgbImage>, (u32, u32)) {
    let t = image::dynamic_preprocess(
        img,
        cfg.min_tiles.min(max_tiles),
        max_tiles,
        cfg.image_size,
        cfg.use_thumbnail,
    );
    (t.tiles, t.grid)
}

/// Decodes and tiles one attachment.
pub fn load_visual(att: &Attachment, cfg: &TileConfig) -> Result<Visual, VisualError> {
    match att {
        Attachment::Image { path, max_tiles } => {
            let max = image_max_tiles(path, *max_tiles, cfg)?;
            let img = image::load_rgb(path)?;
            let (tiles, grid) = tile_frame(&img, cfg, max);
            Ok(Visual {
                placeholders: vec![tiles],
                grid,
                frame_indices: Vec::new(),
            })
        }
        Attachment::Video {
            path,
            segments,
            bound,
            max_tiles,
        } => {
            if *max_tiles == 0 {
                return Err(VisualError::ZeroTiles { path: path.clone() });
            }
            let (_meta, indices, frames) = video::load_video(path, *bound, *segments)?;
            let mut grid = (1, 1);
            let placeholders = frames
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let (t, g) = tile_frame(f, cfg, *max_tiles as u32);
                    if i == 0 {
                        grid = g;
                    }
                    t
                })
                .collect();
            Ok(Visual {
                placeholders,
                grid,
                frame_indices: indices,
            })
        }
    }
}

/// What staging an attachment shows before anything is sent: its tile grid and token cost,
/// and small pictures (the image, or the sampled video frames).
#[derive(Debug)]
pub struct Probe {
    pub grid: (u32, u32),
    pub tiles: usize,
    pub tokens: usize,
    pub preview: Option<RgbImage>,
    pub frames: Vec<RgbImage>,
}

fn thumbnail(img: &RgbImage, max_side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = (max_side as f64 / w.max(h) as f64).min(1.0);
    let (tw, th) = (
        ((w as f64 * s).round() as u32).max(1),
        ((h as f64 * s).round() as u32).max(1),
    );
    resize::resize_bicubic(img, tw, th)
}

/// Decodes an attachment (so an undecodable file is refused when staged) and computes its cost.
pub fn probe(att: &Attachment, cfg: &TileConfig) -> Result<Probe, VisualError> {
    // big enough for a sharp picture through a terminal graphics protocol (a preview pane is
    // up to 64 cells, ~600 px, wide); half blocks average it down
    let thumb_side = 512;
    match att {
        Attachment::Image { path, max_tiles } => {
            let max = image_max_tiles(path, *max_tiles, cfg)?;
            let img = image::load_rgb(path)?;
            // tile it in the background now, so that sending finds the tiles ready
            prefetch(att, cfg);
            let (w, h) = img.dimensions();
            let grid = image::find_grid(w, h, cfg.min_tiles.min(max), max, cfg.image_size);
            let n = (grid.0 * grid.1) as usize;
            let tiles = if n > 1 && cfg.use_thumbnail { n + 1 } else { n };
            Ok(Probe {
                grid,
                tiles,
                tokens: tiles * cfg.tokens_per_tile,
                preview: Some(thumbnail(&img, thumb_side)),
                frames: Vec::new(),
            })
        }
        Attachment::Video { .. } => {
            let v = load_visual_shared(att, cfg)?;
            let tiles = v.tiles();
            let frames: Vec<RgbImage> = v
                .placeholders
                .iter()
                .filter_map(|p| p.last().map(|t| thumbnail(t, thumb_side / 2)))
                .collect();
            Ok(Probe {
                grid: v.grid,
                tiles,
                tokens: tiles * cfg.tokens_per_tile,
                preview: frames.first().cloned(),
                frames,
            })
        }
    }
}
