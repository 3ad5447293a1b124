//! Pictures and videos to 448px tiles, as the model card's `load_image` and `load_video` make
//! them. No libtorch here: tiles are RGB images and normalised `f32` buffers.
pub mod cache;
pub mod hf;
pub mod image;
pub mod resize;
pub mod video;

use crate::media::{Attachment, AttachmentInfo};
use ::image::RgbImage;
pub use cache::{TileCache, TileKey};

/// Tiling settings from `config.json`.
#[derive(Debug, Clone, Copy)]
pub struct TileConfig {
    pub image_size: u32,
    pub min_tiles: u32,
    pub max_tiles: u32,
    pub use_thumbnail: bool,
    /// LLM tokens per tile (256 for InternVL 2.5).
    pub tokens_per_tile: usize,
    /// -hf checkpoints: transformers' processors instead of the model card's pipeline
    /// (see [`hf`]); `None` for remote-code checkpoints.
    pub hf: Option<hf::HfProcessing>,
}

impl TileConfig {
    /// InternVL 2.5's model card: 448-pixel tiles, up to 12 and a thumbnail, 256 tokens each.
    pub fn internvl_2_5() -> Self {
        TileConfig {
            image_size: 448,
            min_tiles: 1,
            max_tiles: 12,
            use_thumbnail: true,
            tokens_per_tile: 256,
            hf: None,
        }
    }
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
    #[error("{path}: {what}")]
    Unsupported {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("{path}: {frames} frames asked for but the video has {total} (transformers' video processor refuses this)")]
    TooFewFrames {
        path: std::path::PathBuf,
        frames: usize,
        total: usize,
    },
    #[error("{path}: {what} {value} is more than {MAX_TILES_LIMIT}, which already fill the largest context window")]
    OverLimit {
        path: std::path::PathBuf,
        what: &'static str,
        value: usize,
    },
}

pub use crate::media::MAX_TILES_LIMIT;

/// A video attachment's tile and segment counts: at least one tile, both within the limits.
fn check_video_limits(
    path: &std::path::Path,
    segments: usize,
    max_tiles: usize,
) -> Result<(), VisualError> {
    if max_tiles == 0 {
        return Err(VisualError::ZeroTiles { path: path.into() });
    }
    check_limit(path, "max tiles", max_tiles)?;
    check_limit(path, "segments", segments)
}

fn check_limit(
    path: &std::path::Path,
    what: &'static str,
    value: usize,
) -> Result<(), VisualError> {
    if value > MAX_TILES_LIMIT {
        return Err(VisualError::OverLimit {
            path: path.into(),
            what,
            value,
        });
    }
    Ok(())
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
    let m = max_tiles.unwrap_or(cfg.max_tiles as usize);
    check_limit(path, "max tiles", m)?;
    match m {
        0 => Err(VisualError::ZeroTiles { path: path.into() }),
        m => Ok(m as u32),
    }
}

fn tile_frame(img: &RgbImage, cfg: &TileConfig, max_tiles: u32) -> (Vec<RgbImage>, (u32, u32)) {
    if cfg.hf.is_some() {
        let t = hf::crop_to_patches(img, cfg.min_tiles.min(max_tiles), max_tiles, cfg.image_size);
        return (t.tiles, t.grid);
    }
    let t = image::dynamic_preprocess(
        img,
        cfg.min_tiles.min(max_tiles),
        max_tiles,
        cfg.image_size,
        cfg.use_thumbnail,
    );
    (t.tiles, t.grid)
}

/// A decoded picture's tiles.
fn image_visual(img: &RgbImage, cfg: &TileConfig, max_tiles: u32) -> Visual {
    let (tiles, grid) = tile_frame(img, cfg, max_tiles);
    Visual {
        placeholders: vec![tiles],
        grid,
        frame_indices: Vec::new(),
    }
}

/// Decodes and tiles one attachment.
pub fn load_visual(att: &Attachment, cfg: &TileConfig) -> Result<Visual, VisualError> {
    match att {
        Attachment::Image { path, max_tiles } => {
            let max = image_max_tiles(path, *max_tiles, cfg)?;
            Ok(image_visual(&image::load_rgb(path)?, cfg, max))
        }
        Attachment::Video {
            path,
            segments,
            bound,
            max_tiles,
        } => {
            check_video_limits(path, *segments, *max_tiles)?;
            if let Some(p) = &cfg.hf {
                return load_hf_video(path, *segments, bound.map(|b| b.pair()), p);
            }
            let (_meta, indices, frames) =
                video::load_video(path, bound.map(|b| b.pair()), *segments)?;
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

/// -hf: the frames `InternVLVideoProcessor` samples, each resized straight to one tile.
fn hf_video_frames(
    path: &std::path::Path,
    segments: usize,
    bound: Option<(f64, f64)>,
    p: &hf::HfProcessing,
) -> Result<(hf::HfVideo, Vec<usize>), VisualError> {
    let Some(v) = p.video else {
        return Err(VisualError::Unsupported {
            path: path.into(),
            what:
                "this -hf checkpoint has no video_preprocessor_config.json, so it takes no videos",
        });
    };
    if bound.is_some() {
        return Err(VisualError::Unsupported {
            path: path.into(),
            what: "a time range is not supported with -hf checkpoints (transformers samples the whole video)",
        });
    }
    let meta = video::probe(path)?;
    let indices =
        hf::sample_frames(meta.num_frames, segments, v.initial_shift).ok_or_else(|| {
            VisualError::TooFewFrames {
                path: path.into(),
                frames: segments,
                total: meta.num_frames,
            }
        })?;
    Ok((v, indices))
}

fn load_hf_video(
    path: &std::path::Path,
    segments: usize,
    bound: Option<(f64, f64)>,
    p: &hf::HfProcessing,
) -> Result<Visual, VisualError> {
    let (v, indices) = hf_video_frames(path, segments, bound, p)?;
    let frames = video::load_frames(path, &indices)?;
    Ok(Visual {
        placeholders: frames
            .iter()
            .map(|f| vec![hf::resize(f, v.size, v.size)])
            .collect(),
        grid: (1, 1),
        frame_indices: indices,
    })
}

/// Tiles sent for one picture whose grid is chosen among at most `max` tiles.
fn tiles_for(width: u32, height: u32, cfg: &TileConfig, max: u32) -> ((u32, u32), usize) {
    if cfg.hf.is_some() {
        let grid = hf::grid(width, height, cfg.min_tiles.min(max), max, cfg.image_size);
        let n = (grid.0 * grid.1) as usize;
        return (grid, if n > 1 { n + 1 } else { n });
    }
    let grid = image::find_grid(width, height, cfg.min_tiles.min(max), max, cfg.image_size);
    let n = (grid.0 * grid.1) as usize;
    (grid, if n > 1 && cfg.use_thumbnail { n + 1 } else { n })
}

/// The tiles of each placeholder `att` fills, as [`load_visual`] gives them, without resizing
/// anything: an image is decoded for its size; a video's frames are counted from its packet
/// index and tiled by its frame size.
pub fn placeholder_tiles(att: &Attachment, cfg: &TileConfig) -> Result<Vec<usize>, VisualError> {
    match att {
        Attachment::Image { path, max_tiles } => {
            let max = image_max_tiles(path, *max_tiles, cfg)?;
            let img = image::load_rgb(path)?;
            Ok(vec![tiles_for(img.width(), img.height(), cfg, max).1])
        }
        Attachment::Video {
            path,
            segments,
            bound,
            max_tiles,
        } => {
            check_video_limits(path, *segments, *max_tiles)?;
            if let Some(p) = &cfg.hf {
                let frames = hf_video_frames(path, *segments, bound.map(|b| b.pair()), p)?
                    .1
                    .len();
                return Ok(vec![1; frames]);
            }
            let meta = video::probe(path)?;
            let frames =
                video::sample_indices(path, &meta, bound.map(|b| b.pair()), *segments)?.len();
            let per_frame = tiles_for(meta.width, meta.height, cfg, *max_tiles as u32).1;
            Ok(vec![per_frame; frames])
        }
    }
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

/// What staging `att` shows before anything is sent (see [`AttachmentInfo`]): decodes it, so an
/// undecodable file is refused when staged, and computes its tiling and token cost as the
/// engine will send it. Its tiles go into `cache`, so that sending finds them ready: a picture
/// is tiled here, on the caller's thread, from the one decode the preview needs too.
pub fn probe(
    att: &Attachment,
    cfg: &TileConfig,
    cache: &TileCache,
) -> Result<AttachmentInfo, VisualError> {
    // big enough for a sharp picture through a terminal graphics protocol (a preview pane is
    // up to 64 cells, ~600 px, wide); half blocks average it down
    let thumb_side = 512;
    let path = att.path();
    let name = AttachmentInfo::display_name(path);
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    match att {
        Attachment::Image { path, max_tiles } => {
            let max = image_max_tiles(path, *max_tiles, cfg)?;
            let img = image::load_rgb(path)?;
            if let Some(key) = TileKey::of(att, cfg) {
                cache.get_or_load(key, || Ok::<_, VisualError>(image_visual(&img, cfg, max)))?;
            }
            let (grid, tiles) = tiles_for(img.width(), img.height(), cfg, max);
            Ok(AttachmentInfo {
                name,
                bytes,
                grid,
                tiles,
                tokens: tiles * cfg.tokens_per_tile,
                duration: None,
                preview: Some(thumbnail(&img, thumb_side)),
                frames: Vec::new(),
            })
        }
        Attachment::Video { path, .. } => {
            let v = cache.load(att, cfg)?;
            let meta = video::probe(path)?;
            let tiles = v.tiles();
            let frames: Vec<RgbImage> = v
                .placeholders
                .iter()
                .filter_map(|p| p.last().map(|t| thumbnail(t, thumb_side / 2)))
                .collect();
            Ok(AttachmentInfo {
                name,
                bytes,
                grid: v.grid,
                tiles,
                tokens: tiles * cfg.tokens_per_tile,
                duration: Some(meta.num_frames as f64 / meta.avg_fps),
                preview: frames.first().cloned(),
                frames,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::TimeRange;
    use crate::testutil::fixture;

    fn cfg() -> TileConfig {
        TileConfig::internvl_2_5()
    }

    #[test]
    fn placeholder_tiles_are_the_tiles_load_visual_makes() {
        let mut atts: Vec<Attachment> = ["alpaca.png", "benchmark.png", "image1.jpg", "image3.jpg"]
            .iter()
            .flat_map(|i| {
                [None, Some(1), Some(6)].map(|max_tiles| Attachment::Image {
                    path: fixture(&format!("media/images/{i}")),
                    max_tiles,
                })
            })
            .collect();
        for (v, segments, bound, max_tiles) in [
            ("video_90.mov", 4, None, 1),
            ("video_90.mov", 2, None, 3),
            (
                "flipping_a_pancake.mkv",
                8,
                Some(TimeRange::new(1.0, 3.0).unwrap()),
                2,
            ),
            ("unordered.mov", 3, None, 1),
        ] {
            atts.push(Attachment::Video {
                path: fixture(&format!("media/videos/{v}")),
                segments,
                bound,
                max_tiles,
            });
        }
        for a in &atts {
            let v = load_visual(a, &cfg()).unwrap();
            let want: Vec<usize> = v.placeholders.iter().map(Vec::len).collect();
            assert_eq!(placeholder_tiles(a, &cfg()).unwrap(), want, "{a:?}");
        }
    }

    /// -hf tiling: the processor's limits from preprocessor_config.json, placeholder counts
    /// equal to what loading gives, and what transformers cannot sample refused by name.
    #[test]
    fn hf_pictures_and_videos() {
        let dir = fixture("models/tiny-qwen2-hf");
        let hf = hf::tile_config(&dir, cfg()).unwrap();
        assert_eq!((hf.min_tiles, hf.max_tiles, hf.image_size), (1, 12, 448));
        let p = hf.hf.unwrap();
        assert_eq!(p.video.unwrap().initial_shift, hf::Shift::HalfStep);
        // ImageNet mean/std over 0..255, as the processor fuses them
        assert!(
            (p.mean[0] - 0.485 * 255.0).abs() < 1e-4 && (p.std[2] - 0.225 * 255.0).abs() < 1e-4
        );
        let image = Attachment::Image {
            path: fixture("media/images/image1.jpg"),
            max_tiles: Some(6),
        };
        let v = load_visual(&image, &hf).unwrap();
        assert_eq!((v.grid, v.tiles()), ((3, 2), 7));
        assert_eq!(placeholder_tiles(&image, &hf).unwrap(), [7]);
        let pancake = fixture("media/videos/flipping_a_pancake.mkv");
        let video = |segments, bound| Attachment::Video {
            path: pancake.clone(),
            segments,
            bound,
            max_tiles: 4,
        };
        let v = load_visual(&video(8, None), &hf).unwrap();
        assert_eq!(v.frame_indices, [19, 58, 96, 135, 174, 213, 251, 290]);
        assert!(v
            .placeholders
            .iter()
            .all(|p| p.len() == 1 && p[0].dimensions() == (448, 448)));
        assert_eq!(placeholder_tiles(&video(8, None), &hf).unwrap(), [1; 8]);
        let e = load_visual(&video(8, Some(TimeRange::new(1.0, 2.0).unwrap())), &hf)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("flipping_a_pancake.mkv") && e.contains("time range"),
            "{e}"
        );
        let e = load_visual(&video(128, None), &hf).map(|_| ());
        assert!(e.is_ok(), "{e:?}");
        let short = Attachment::Video {
            path: fixture("media/videos/video_90.mov"),
            segments: 4,
            bound: None,
            max_tiles: 1,
        };
        let e = placeholder_tiles(&short, &hf).unwrap_err().to_string();
        assert!(
            e.contains("video_90.mov") && e.contains("4 frames asked for but the video has 3"),
            "{e}"
        );
        // a checkpoint without a video processor takes no videos
        let no_video = TileConfig {
            hf: Some(hf::HfProcessing { video: None, ..p }),
            ..hf
        };
        let e = load_visual(&video(8, None), &no_video)
            .unwrap_err()
            .to_string();
        assert!(e.contains("video_preprocessor_config.json"), "{e}");
    }

    /// Staging a picture tiles it into the cache it is given: the engine then finds exactly
    /// the tiles [`load_visual`] makes, and the probe's counts agree with them.
    #[test]
    fn a_probe_leaves_the_tiles_in_the_cache() {
        let a = Attachment::Image {
            path: fixture("media/images/image1.jpg"),
            max_tiles: Some(4),
        };
        let cache = TileCache::default();
        let p = probe(&a, &cfg(), &cache).unwrap();
        let key = TileKey::of(&a, &cfg()).unwrap();
        assert!(cache.contains(&key));
        let direct = load_visual(&a, &cfg()).unwrap();
        let cached = cache
            .get_or_load(key, || -> Result<Visual, VisualError> {
                panic!("decoded again")
            })
            .unwrap();
        assert_eq!(cached.placeholders, direct.placeholders);
        assert_eq!((p.tiles, p.grid), (direct.tiles(), direct.grid));
    }

    #[test]
    fn tile_and_frame_limits_are_refused_before_any_work() {
        let image = fixture("media/images/image1.jpg");
        for (max_tiles, ok) in [
            (Some(128), true),
            (Some(129), false),
            (Some(usize::MAX), false),
        ] {
            let a = Attachment::Image {
                path: image.clone(),
                max_tiles,
            };
            let r = probe(&a, &cfg(), &TileCache::default());
            assert_eq!(r.is_ok(), ok, "{max_tiles:?}: {r:?}");
            if !ok {
                let e = r.unwrap_err().to_string();
                assert!(
                    e.starts_with(&format!("{}: max tiles ", image.display())),
                    "{e}"
                );
                assert!(e.contains("more than 128"), "{e}");
            }
        }
        // 2^32 + 1 once wrapped to 1 tile when cast to u32
        let a = Attachment::Image {
            path: image.clone(),
            max_tiles: Some((1usize << 32) + 1),
        };
        assert!(matches!(
            load_visual(&a, &cfg()),
            Err(VisualError::OverLimit { .. })
        ));
        let video = fixture("media/videos/video_90.mov");
        for (segments, max_tiles) in [(1_000_000_000, 1), (4, 4096)] {
            let a = Attachment::Video {
                path: video.clone(),
                segments,
                bound: None,
                max_tiles,
            };
            let e = load_visual(&a, &cfg()).unwrap_err();
            assert!(matches!(e, VisualError::OverLimit { .. }), "{e}");
            assert!(e.to_string().contains("video_90.mov"), "{e}");
        }
    }

    /// The probe shows what the engine sends: the tiles `placeholder_tiles` counts, their
    /// tokens, the file's name and size, and a video's length.
    #[test]
    fn probes_show_the_cost_the_engine_counts() {
        let image = Attachment::Image {
            path: fixture("media/images/image1.jpg"),
            max_tiles: Some(6),
        };
        let video = Attachment::Video {
            path: fixture("media/videos/flipping_a_pancake.mkv"),
            segments: 4,
            bound: Some(TimeRange::new(1.0, 3.0).unwrap()),
            max_tiles: 2,
        };
        for a in [&image, &video] {
            let info = probe(a, &cfg(), &TileCache::default()).unwrap();
            let tiles: usize = placeholder_tiles(a, &cfg()).unwrap().iter().sum();
            assert_eq!((info.tiles, info.tokens), (tiles, tiles * 256), "{a:?}");
            assert_eq!(info.bytes, std::fs::metadata(a.path()).unwrap().len());
            assert!(info.preview.is_some());
        }
        let i = probe(&image, &cfg(), &TileCache::default()).unwrap();
        assert_eq!(
            (i.name.as_str(), i.duration, i.frames.len()),
            ("image1.jpg", None, 0)
        );
        let v = probe(&video, &cfg(), &TileCache::default()).unwrap();
        let meta = video::probe(video.path()).unwrap();
        assert_eq!(v.name, "flipping_a_pancake.mkv");
        assert_eq!(v.frames.len(), 4);
        let d = v.duration.unwrap();
        assert!(
            d > 3.0 && (d - meta.num_frames as f64 / meta.avg_fps).abs() < 1e-9,
            "{d}"
        );
    }
}
