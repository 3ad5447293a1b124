//! Pictures and videos as transformers' processors make them for -hf checkpoints
//! (`GotOcr2ImageProcessorFast` with `crop_to_patches`, `InternVLVideoProcessor`), read from the
//! checkpoint's `preprocessor_config.json` and `video_preprocessor_config.json`.
//!
//! Where this differs from the model card's pipeline (the remote-code checkpoints):
//! - the grid search walks `get_all_supported_aspect_ratios` (columns, then rows, stably sorted
//!   by area) instead of a Python set;
//! - resizing is torchvision's antialiased bicubic on the uint8 tensor, i.e. libtorch's
//!   `_upsample_bicubic2d_aa` on `uint8`, called here through tch: its fixed-point rounding
//!   differs from Pillow's by up to 2 levels, and computing what the reference computes means
//!   calling the same kernel (the one place preprocessing uses libtorch);
//! - normalisation is the processor's fused `(x - mean / rescale) / (std / rescale)` in f32;
//! - a video samples `int(shift + i * total / n)` over the decoded frames and resizes each frame
//!   straight to the frame size (no tiling, no thumbnail).
use super::image::Tiles;
use ::image::{imageops, RgbImage};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The processors' settings that shape tiles and pixel values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HfProcessing {
    /// `image_mean / rescale_factor` and `image_std / rescale_factor` as f32, per channel.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// `video_preprocessor_config.json`: the frame size and `initial_shift`; `None` when the
    /// checkpoint has no video processor (videos are then refused).
    pub video: Option<HfVideo>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HfVideo {
    pub size: u32,
    pub initial_shift: Shift,
}

/// `initial_shift`: `true` (half a step), `false` (0) or a number of frames.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shift {
    HalfStep,
    Frames(f64),
}

#[derive(Debug, thiserror::Error)]
pub enum HfConfigError {
    #[error("{path}: not found (an -hf checkpoint needs its {what})")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// Tiling limits and processing of a -hf checkpoint's image processor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HfImageConfig {
    pub min_patches: u32,
    pub max_patches: u32,
    pub processing: HfProcessing,
}

fn read_json(path: &Path, what: &'static str) -> Result<Option<Value>, HfConfigError> {
    if !path.exists() {
        return Ok(None);
    }
    let _ = what;
    let text = crate::files::read_to_string(
        path,
        crate::files::MAX_METADATA_BYTES,
        "a model's metadata file",
    )
    .map_err(|source| HfConfigError::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| HfConfigError::Parse {
            path: path.into(),
            source,
        })
}

/// The settings both processors share: square `size`, bicubic, rescale + normalise, RGB.
fn common(v: &Value, path: &Path, image_size: u32) -> Result<([f32; 3], [f32; 3]), HfConfigError> {
    let invalid = |what: String| HfConfigError::Invalid {
        path: path.into(),
        what,
    };
    let size = v.get("size").unwrap_or(&Value::Null);
    let side = |k: &str| size.get(k).and_then(Value::as_u64);
    match (side("height"), side("width")) {
        (Some(h), Some(w)) if h == w && h == u64::from(image_size) => {}
        _ => {
            return Err(invalid(format!(
                "size {size} is not supported ({{\"height\": {image_size}, \"width\": {image_size}}}, the vision model's image size)"
            )))
        }
    }
    let resample = v.get("resample").and_then(Value::as_u64).unwrap_or(3);
    if resample != 3 {
        return Err(invalid(format!(
            "resample {resample} is not supported (3, bicubic)"
        )));
    }
    for field in ["do_resize", "do_rescale", "do_normalize", "do_convert_rgb"] {
        if v.get(field).and_then(Value::as_bool) == Some(false) {
            return Err(invalid(format!("{field} false is not supported")));
        }
    }
    if v.get("do_center_crop").and_then(Value::as_bool) == Some(true) {
        return Err(invalid("do_center_crop true is not supported".into()));
    }
    let rescale = v
        .get("rescale_factor")
        .map_or(Some(1.0 / 255.0), Value::as_f64)
        .filter(|r| *r > 0.0)
        .ok_or_else(|| invalid("rescale_factor is not a positive number".into()))?;
    let triple = |field: &str| -> Result<[f32; 3], HfConfigError> {
        let a = v
            .get(field)
            .and_then(Value::as_array)
            .filter(|a| a.len() == 3)
            .ok_or_else(|| invalid(format!("{field} missing or not 3 numbers")))?;
        let mut out = [0f32; 3];
        for (o, x) in out.iter_mut().zip(a) {
            // transformers fuses the rescale into normalize: `x * (1.0 / rescale_factor)`
            let x = x
                .as_f64()
                .ok_or_else(|| invalid(format!("{field} holds {x}, not a number")))?;
            *o = (x * (1.0 / rescale)) as f32;
        }
        Ok(out)
    };
    Ok((triple("image_mean")?, triple("image_std")?))
}

/// Reads `preprocessor_config.json` and, when present, `video_preprocessor_config.json`.
///
/// `crop_to_patches` is always on: `InternVLProcessor` passes `crop_to_patches=True` over the
/// image processor's own value (its `_defaults`), so the file's `false` never reaches tiling.
pub fn load_config(dir: &Path, image_size: u32) -> Result<HfImageConfig, HfConfigError> {
    let path = dir.join("preprocessor_config.json");
    let what = "image processor config (preprocessor_config.json)";
    let v = read_json(&path, what)?.ok_or_else(|| HfConfigError::Missing {
        path: path.clone(),
        what,
    })?;
    let invalid = |what: String| HfConfigError::Invalid {
        path: path.clone(),
        what,
    };
    let kind = v
        .get("image_processor_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if kind != "GotOcr2ImageProcessorFast" {
        return Err(invalid(format!(
            "image_processor_type {kind:?} is not supported (GotOcr2ImageProcessorFast)"
        )));
    }
    let (mean, std) = common(&v, &path, image_size)?;
    let count = |field: &str, default: u64| -> Result<u32, HfConfigError> {
        match v.get(field) {
            None | Some(Value::Null) => Ok(default as u32),
            Some(x) => x
                .as_u64()
                .filter(|n| (1..=super::MAX_TILES_LIMIT as u64).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| {
                    invalid(format!(
                        "{field} {x} is not a number from 1 to {}",
                        super::MAX_TILES_LIMIT
                    ))
                }),
        }
    };
    let (min_patches, max_patches) = (count("min_patches", 1)?, count("max_patches", 12)?);
    if min_patches > max_patches {
        return Err(invalid(format!(
            "min_patches {min_patches} is more than max_patches {max_patches}"
        )));
    }
    let vpath = dir.join("video_preprocessor_config.json");
    let video = match read_json(&vpath, "video processor config")? {
        None => None,
        Some(vv) => {
            let (vmean, vstd) = common(&vv, &vpath, image_size)?;
            if (vmean, vstd) != (mean, std) {
                return Err(HfConfigError::Invalid {
                    path: vpath,
                    what: "image_mean/image_std differ from preprocessor_config.json's, which is not supported".into(),
                });
            }
            let initial_shift = match vv.get("initial_shift") {
                None | Some(Value::Null) | Some(Value::Bool(true)) => Shift::HalfStep,
                Some(Value::Bool(false)) => Shift::Frames(0.0),
                Some(x) => {
                    Shift::Frames(x.as_f64().filter(|f| f.is_finite()).ok_or_else(|| {
                        HfConfigError::Invalid {
                            path: vpath.clone(),
                            what: format!("initial_shift {x} is not a boolean or a number"),
                        }
                    })?)
                }
            };
            Some(HfVideo {
                size: image_size,
                initial_shift,
            })
        }
    };
    Ok(HfImageConfig {
        min_patches,
        max_patches,
        processing: HfProcessing { mean, std, video },
    })
}

/// The tiling of a -hf checkpoint in `dir`: `base` (from its config.json) with the image
/// processor's limits and processing.
pub fn tile_config(
    dir: &Path,
    base: super::TileConfig,
) -> Result<super::TileConfig, HfConfigError> {
    let c = load_config(dir, base.image_size)?;
    Ok(super::TileConfig {
        min_tiles: c.min_patches,
        max_tiles: c.max_patches,
        use_thumbnail: true,
        hf: Some(c.processing),
        ..base
    })
}

/// `get_optimal_tiled_canvas` of transformers' GotOcr2 image processor: the `(cols, rows)`
/// grid whose aspect ratio is closest to the image's, among the grids of `min..=max` tiles in
/// `get_all_supported_aspect_ratios` order (columns outer, rows inner, stably sorted by area); a
/// tie goes to the later grid while the image's area is more than half the grid's.
pub fn grid(width: u32, height: u32, min: u32, max: u32, tile: u32) -> (u32, u32) {
    let mut grids: Vec<(u32, u32)> = (1..=max)
        .flat_map(|c| (1..=max).map(move |r| (c, r)))
        .filter(|&(c, r)| c * r <= max && c * r >= min)
        .collect();
    grids.sort_by_key(|&(c, r)| c * r);
    let aspect = f64::from(width) / f64::from(height);
    let area = f64::from(width) * f64::from(height);
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for (c, r) in grids {
        let diff = (aspect - f64::from(c) / f64::from(r)).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (c, r);
        } else if diff == best_diff
            && area > 0.5 * f64::from(tile) * f64::from(tile) * f64::from(c * r)
        {
            best = (c, r);
        }
    }
    best
}

/// torchvision's `resize(..., InterpolationMode.BICUBIC, antialias=True)` of a uint8 image: the
/// same libtorch kernel on the same `[1, 3, H, W]` uint8 tensor (an unchanged size is returned
/// as is, as torchvision does).
pub fn resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let chw = Tensor::from_slice(img.as_raw())
        .view([1, h, w, 3])
        .permute([0, 3, 1, 2])
        .contiguous();
    let out = chw
        .internal_upsample_bicubic2d_aa([i64::from(height), i64::from(width)], false, None, None)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(Device::Cpu)
        .to_kind(Kind::Uint8)
        .view([-1]);
    let bytes = Vec::<u8>::try_from(&out).expect("a uint8 tensor converts to bytes");
    RgbImage::from_raw(width, height, bytes).expect("the resized buffer has width*height*3 bytes")
}

/// `crop_image_to_patches`: resize to the grid, cut row by row, and a thumbnail of the whole
/// image when there is more than one tile.
pub fn crop_to_patches(img: &RgbImage, min: u32, max: u32, tile: u32) -> Tiles {
    let (cols, rows) = grid(img.width(), img.height(), min, max, tile);
    let resized = resize(img, tile * cols, tile * rows);
    let mut tiles: Vec<RgbImage> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (c, r)))
        .map(|(c, r)| imageops::crop_imm(&resized, c * tile, r * tile, tile, tile).to_image())
        .collect();
    if tiles.len() != 1 {
        tiles.push(resize(img, tile, tile));
    }
    Tiles {
        grid: (cols, rows),
        tiles,
    }
}

/// `InternVLVideoProcessor.sample_frames`: `torch.arange(shift, total, total / n).int()`, the
/// shift `total / n / 2` for `initial_shift=True`. `None` when `n` is 0 or more than `total`
/// (transformers raises).
pub fn sample_frames(total: usize, n: usize, shift: Shift) -> Option<Vec<usize>> {
    if n == 0 || n > total {
        return None;
    }
    let step = total as f64 / n as f64;
    let start = match shift {
        Shift::HalfStep => step / 2.0,
        Shift::Frames(f) => f,
    };
    // arange's length is ceil((end - start) / step); its values are computed in double and
    // stored as float32 before `.int()` truncates them
    let len = ((total as f64 - start) / step).ceil().max(0.0) as usize;
    Some(
        (0..len)
            .map(|i| (start + i as f64 * step) as f32)
            .map(|x| x as usize)
            .collect(),
    )
}

/// The fused rescale + normalize on `[n, 3, H, W]`: `(x - mean) / std` in f32 with the
/// processor's `mean / rescale_factor` and `std / rescale_factor`.
pub fn normalize_tiles(tiles: &[&RgbImage], p: &HfProcessing) -> Vec<f32> {
    let mut out = Vec::with_capacity(tiles.iter().map(|t| t.as_raw().len()).sum());
    for tile in tiles {
        for c in 0..3 {
            out.extend(
                tile.pixels()
                    .map(|px| (f32::from(px[c]) - p.mean[c]) / p.std[c]),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_sampled_like_the_video_processor() {
        // the pancake video: 310 frames, 8 sampled (fixtures README)
        assert_eq!(
            sample_frames(310, 8, Shift::HalfStep).unwrap(),
            [19, 58, 96, 135, 174, 213, 251, 290]
        );
        assert_eq!(sample_frames(3, 3, Shift::Frames(0.0)).unwrap(), [0, 1, 2]);
        assert_eq!(sample_frames(3, 4, Shift::HalfStep), None);
        assert_eq!(sample_frames(3, 0, Shift::HalfStep), None);
    }

    #[test]
    fn grids_follow_got_ocr2() {
        // image1.jpg (1024x683) with 6: 3x2, as the golden records
        assert_eq!(grid(1024, 683, 1, 6, 448), (3, 2));
        assert_eq!(grid(448, 448, 1, 12, 448), (1, 1));
        // a tie between 1x1 and 2x2 (same ratio): the later one only for a large image
        assert_eq!(grid(1000, 1000, 1, 4, 448), (2, 2));
        assert_eq!(grid(500, 500, 1, 4, 448), (1, 1));
        assert_eq!(grid(200, 200, 1, 4, 448), (1, 1));
        assert_eq!(grid(200, 200, 2, 4, 448), (2, 2));
    }
}
