//! Image input as the InternVL 2.5 model card prepares it: `load_image` =
//! `Image.open(p).convert('RGB')`, `dynamic_preprocess` (aspect-ratio tiling into 448x448 tiles plus
//! a thumbnail) and `build_transform` (ToTensor + ImageNet Normalize).
//!
//! Decoding: JPEG with libjpeg-turbo's decoder (through `mozjpeg`, a libjpeg-turbo fork with the
//! same decoder), as Pillow does, so JPEG pixels are Pillow's bit for bit; GIF with the `gif` crate
//! to reproduce Pillow's first frame; PNG, WebP, BMP and TIFF with the `image` crate. Resizing is
//! Pillow's bicubic, see [`super::resize`].

use std::io::{Cursor, ErrorKind};
use std::path::Path;

use ::image::{
    imageops, DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage,
};

use super::resize::resize_bicubic;

/// Largest accepted pixel count: Pillow refuses images above `2 * Image.MAX_IMAGE_PIXELS`
/// (`DecompressionBombError`).
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// ImageNet statistics used by the model card's `build_transform`.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Why an image could not be loaded; `file` is the path (or the name given to [`decode_rgb`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageLoadError {
    #[error("image {file} does not exist")]
    Missing { file: String },
    #[error("image {file} is a directory, not a file")]
    IsDirectory { file: String },
    #[error("image {file} cannot be read: permission denied")]
    PermissionDenied { file: String },
    #[error("image {file} cannot be read: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("image {file} is an empty file")]
    Empty { file: String },
    #[error("{file} is not an image (unknown format)")]
    UnknownFormat { file: String },
    #[error("image {file} is in an unsupported format or variant: {detail}")]
    Unsupported { file: String, detail: String },
    #[error("image {file} is truncated or corrupt: {detail}")]
    Corrupt { file: String, detail: String },
    #[error("image {file} has a zero dimension ({width}x{height})")]
    ZeroSize {
        file: String,
        width: u64,
        height: u64,
    },
    #[error(
        "image {file} is too large: {width}x{height} exceeds {max} pixels (decompression bomb?)"
    )]
    TooLarge {
        file: String,
        width: u64,
        height: u64,
        max: u64,
    },
    #[error("image {file} needs more memory to decode than allowed: {detail}")]
    OverMemoryLimit { file: String, detail: String },
}

/// Read and decode an image file into RGB exactly as `Image.open(path).convert('RGB')` does.
///
/// The format is guessed from the content, not the extension.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageLoadError> {
    let file = path.display().to_string();
    let bytes = crate::files::read(path, crate::files::MAX_PICTURE_BYTES, "a picture")
        .map_err(|e| io_error(&file, e))?;
    decode_rgb(&bytes, &file)
}

fn io_error(file: &str, source: std::io::Error) -> ImageLoadError {
    let file = file.to_string();
    match source.kind() {
        ErrorKind::NotFound => ImageLoadError::Missing { file },
        ErrorKind::IsADirectory => ImageLoadError::IsDirectory { file },
        ErrorKind::PermissionDenied => ImageLoadError::PermissionDenied { file },
        _ => ImageLoadError::Io { file, source },
    }
}

/// Decode in-memory image data like [`load_rgb`]; `name` identifies the data in errors.
///
/// Accepts JPEG, PNG, WebP, GIF (first frame), BMP and TIFF. The declared size is checked against
/// [`MAX_PIXELS`] before any pixel buffer is allocated.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage, ImageLoadError> {
    let file = || name.to_string();
    if bytes.is_empty() {
        return Err(ImageLoadError::Empty { file: file() });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageLoadError::Corrupt {
            file: file(),
            detail: e.to_string(),
        })?;
    let format = reader
        .format()
        .ok_or_else(|| ImageLoadError::UnknownFormat { file: file() })?;
    match format {
        ImageFormat::Jpeg => return decode_jpeg(bytes, name),
        ImageFormat::Gif => return decode_gif_first_frame(bytes, name),
        ImageFormat::Png | ImageFormat::WebP | ImageFormat::Bmp | ImageFormat::Tiff => {}
        other => {
            return Err(ImageLoadError::Unsupported {
                file: file(),
                detail: format!("{other:?} images are not accepted"),
            })
        }
    }
    let mut limits = Limits::default();
    // Room for the largest accepted image at 16-bit RGBA, the widest layout a decoder returns.
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| decode_error(name, e))?;
    let (width, height) = decoder.dimensions();
    check_size(name, u64::from(width), u64::from(height))?;
    let decoded = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(name, e))?;
    to_rgb_like_pillow(decoded, name)
}

/// A JPEG as Pillow decodes it with its bundled libjpeg-turbo (ISLOW IDCT, fancy upsampling, its
/// YCbCr tables). Four-component JPEGs (CMYK, YCCK) Pillow reads as inverted CMYK (`CMYK;I`, "assume
/// adobe conventions") and converts with its `cmyk2rgb`.
fn decode_jpeg(bytes: &[u8], name: &str) -> Result<RgbImage, ImageLoadError> {
    let corrupt = |detail: String| ImageLoadError::Corrupt {
        file: name.to_string(),
        detail,
    };
    if !jpeg_reaches_end_marker(bytes) {
        return Err(corrupt(
            "jpeg data ends before its end-of-image marker".to_string(),
        ));
    }
    // libjpeg's fatal errors unwind out of the C code as a panic carrying the message.
    let decoded = std::panic::catch_unwind(|| -> Result<RgbImage, ImageLoadError> {
        let io = |e: std::io::Error| corrupt(e.to_string());
        let jpeg = mozjpeg::Decompress::new_mem(bytes).map_err(io)?;
        let (width, height) = jpeg.size();
        check_size(name, width as u64, height as u64)?;
        let data = match jpeg.color_space() {
            mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK => {
                let mut pixels = jpeg
                    .to_colorspace(mozjpeg::ColorSpace::JCS_CMYK)
                    .map_err(io)?;
                let cmyk: Vec<[u8; 4]> = pixels.read_scanlines().map_err(io)?;
                cmyk.into_iter().flat_map(inverted_cmyk_to_rgb).collect()
            }
            _ => jpeg.rgb().map_err(io)?.read_scanlines::<u8>().map_err(io)?,
        };
        RgbImage::from_raw(width as u32, height as u32, data)
            .ok_or_else(|| corrupt("jpeg data ends early".to_string()))
    });
    decoded.unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "libjpeg failed".to_string());
        Err(corrupt(detail))
    })
}

/// Pillow's `CMYK;I` unpacking (each byte inverted) followed by its `cmyk2rgb`:
/// `255 - k' - (c' * (255 - k')) / 255` with `MULDIV255`'s rounding.
fn inverted_cmyk_to_rgb(raw: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = raw.map(|v| 255 - i32::from(v));
    let nk = 255 - k;
    let muldiv255 = |a: i32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v)).clamp(0, 255) as u8)
}

/// Whether the JPEG's segments and entropy-coded data run on to an EOI marker.
///
/// libjpeg's in-memory source quietly fakes an EOI when the data runs out, while Pillow's
/// suspending source fails with "image file is truncated" when the data ends before the marker
/// that closes the last scan.
fn jpeg_reaches_end_marker(bytes: &[u8]) -> bool {
    let mut pos = 2; // past SOI
    loop {
        // Next marker: skip stray bytes (libjpeg warns and skips them) and 0xFF fill bytes.
        while pos < bytes.len() && bytes[pos] != 0xff {
            pos += 1;
        }
        while pos < bytes.len() && bytes[pos] == 0xff {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return false;
        };
        pos += 1;
        match marker {
            0xd9 => return true,
            // Standalone markers carry no length.
            0x01 | 0xd0..=0xd8 => continue,
            _ => {}
        }
        let Some(len) = bytes.get(pos..pos + 2) else {
            return false;
        };
        pos += usize::from(u16::from_be_bytes([len[0], len[1]]));
        if marker == 0xda {
            // Entropy-coded data runs to the next 0xFF that starts a marker, i.e. is not followed
            // by a stuffed 0x00, a restart marker or another fill byte.
            let next = bytes.get(pos..).and_then(|scan| {
                scan.windows(2)
                    .position(|w| w[0] == 0xff && !matches!(w[1], 0x00 | 0xd0..=0xd7 | 0xff))
            });
            match next {
                Some(offset) => pos += offset,
                None => return false,
            }
        }
    }
}

/// Pillow's refusals: a zero dimension, or more than [`MAX_PIXELS`] pixels.
fn check_size(name: &str, width: u64, height: u64) -> Result<(), ImageLoadError> {
    if width == 0 || height == 0 {
        return Err(ImageLoadError::ZeroSize {
            file: name.to_string(),
            width,
            height,
        });
    }
    if width * height > MAX_PIXELS {
        return Err(ImageLoadError::TooLarge {
            file: name.to_string(),
            width,
            height,
            max: MAX_PIXELS,
        });
    }
    Ok(())
}

fn decode_error(name: &str, e: ImageError) -> ImageLoadError {
    let file = name.to_string();
    let detail = e.to_string();
    match e {
        ImageError::Unsupported(_) => ImageLoadError::Unsupported { file, detail },
        ImageError::Limits(_) => ImageLoadError::OverMemoryLimit { file, detail },
        _ => ImageLoadError::Corrupt { file, detail },
    }
}

/// `convert('RGB')` of what Pillow would have opened: alpha is dropped without compositing, gray is
/// replicated, 16-bit RGB(A)/LA keep their high byte (Pillow unpacks `RGB;16B`, `LA;16B`... that
/// way) and 16-bit gray (`I;16`) is clipped to 255 (Pillow's `I16_RGB`).
fn to_rgb_like_pillow(img: DynamicImage, name: &str) -> Result<RgbImage, ImageLoadError> {
    let (width, height) = (img.width(), img.height());
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(rgb) => return Ok(rgb),
        DynamicImage::ImageRgba8(p) => p.chunks_exact(4).flat_map(|c| [c[0], c[1], c[2]]).collect(),
        DynamicImage::ImageLuma8(p) => p.iter().flat_map(|&v| [v; 3]).collect(),
        DynamicImage::ImageLumaA8(p) => p.chunks_exact(2).flat_map(|c| [c[0]; 3]).collect(),
        DynamicImage::ImageRgb16(p) => p.iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(p) => p
            .chunks_exact(4)
            .flat_map(|c| [c[0], c[1], c[2]].map(|v| (v >> 8) as u8))
            .collect(),
        DynamicImage::ImageLuma16(p) => p.iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(p) => p
            .chunks_exact(2)
            .flat_map(|c| [(c[0] >> 8) as u8; 3])
            .collect(),
        other => {
            return Err(ImageLoadError::Unsupported {
                file: name.to_string(),
                detail: format!("{:?} samples", other.color()),
            })
        }
    };
    Ok(RgbImage::from_raw(width, height, data).expect("3 bytes per pixel of a decoded image"))
}

/// The first GIF frame as Pillow renders it: the canvas grows to hold a frame that exceeds the
/// logical screen, pixels outside the frame take the transparency index if the frame has one, else
/// index 0, and indices map through the frame's (local, else global) palette, with indices past its
/// end reading Pillow's gray ramp `(i, i, i)`.
fn decode_gif_first_frame(bytes: &[u8], name: &str) -> Result<RgbImage, ImageLoadError> {
    let corrupt = |e: gif::DecodingError| ImageLoadError::Corrupt {
        file: name.to_string(),
        detail: e.to_string(),
    };
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    let limit = std::num::NonZeroU64::new(MAX_PIXELS).expect("nonzero constant");
    options.set_memory_limit(gif::MemoryLimit::Bytes(limit));
    let mut decoder = options.read_info(bytes).map_err(corrupt)?;
    let (screen_w, screen_h) = (u64::from(decoder.width()), u64::from(decoder.height()));
    let frame =
        decoder
            .next_frame_info()
            .map_err(corrupt)?
            .ok_or_else(|| ImageLoadError::Corrupt {
                file: name.to_string(),
                detail: "no image frame".to_string(),
            })?;
    let (left, top) = (u64::from(frame.left), u64::from(frame.top));
    let (frame_w, frame_h) = (u64::from(frame.width), u64::from(frame.height));
    let fill = frame.transparent.unwrap_or(0);
    let width = screen_w.max(left + frame_w);
    let height = screen_h.max(top + frame_h);
    check_size(name, width, height)?;
    let palette = decoder.palette().map_err(corrupt)?.to_vec();
    let mut indices = vec![0u8; (frame_w * frame_h) as usize];
    decoder.read_into_buffer(&mut indices).map_err(corrupt)?;
    let rgb_of = |i: u8| match palette.get(3 * usize::from(i)..3 * usize::from(i) + 3) {
        Some(c) => [c[0], c[1], c[2]],
        None => [i; 3],
    };
    let img = RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let (fx, fy) = (
            u64::from(x).wrapping_sub(left),
            u64::from(y).wrapping_sub(top),
        );
        let index = if fx < frame_w && fy < frame_h {
            indices[(fy * frame_w + fx) as usize]
        } else {
            fill
        };
        ::image::Rgb(rgb_of(index))
    });
    Ok(img)
}

/// The target grids `(cols, rows)` with `min_num <= cols * rows <= max_num`, in the order of the
/// model card's `sorted(set(...), key=lambda x: x[0] * x[1])`.
///
/// Grids of equal area keep CPython's `set` iteration order (the sort is stable). That order only
/// decides ties between equally distant aspect ratios, which cannot win when `min_num == 1` (a grid
/// of smaller area lies strictly between them), but can for larger `min_num`.
fn target_ratios(min_num: u32, max_num: u32) -> Vec<(u32, u32)> {
    // The set comprehension adds (i, j) first at n = max(i, j, min_num), then in i, j order.
    let mut first_added: Vec<(u32, u32)> = (1..=max_num)
        .flat_map(|i| (1..=max_num / i).map(move |j| (i, j)))
        .filter(|&(i, j)| i * j >= min_num)
        .collect();
    first_added.sort_by_key(|&(i, j)| (i.max(j).max(min_num), i, j));
    let mut ratios = cpython_set_order(&first_added);
    ratios.sort_by_key(|&(i, j)| i * j);
    ratios
}

/// Iteration order of a CPython (3.8+) `set` after adding the distinct pairs of small non-negative
/// ints `pairs` in order: `hash(tuple)` (xxHash-based), open addressing with 9 linear probes then
/// perturbed probing, and growth to 4x the used count when 3/5 full (Objects/setobject.c).
fn cpython_set_order(pairs: &[(u32, u32)]) -> Vec<(u32, u32)> {
    fn tuple_hash((a, b): (u32, u32)) -> u64 {
        const P1: u64 = 11_400_714_785_074_694_791;
        const P2: u64 = 14_029_467_366_897_019_727;
        const P5: u64 = 2_870_177_450_012_600_261;
        let mut acc = P5;
        for lane in [u64::from(a), u64::from(b)] {
            acc = acc.wrapping_add(lane.wrapping_mul(P2));
            acc = acc.rotate_left(31);
            acc = acc.wrapping_mul(P1);
        }
        acc = acc.wrapping_add(2 ^ (P5 ^ 3_527_539));
        if acc == u64::MAX {
            1_546_275_796
        } else {
            acc
        }
    }
    fn insert(table: &mut [Option<(u64, (u32, u32))>], hash: u64, key: (u32, u32)) {
        let mask = table.len() as u64 - 1;
        let mut perturb = hash;
        let mut i = hash & mask;
        loop {
            let probes = if i + 9 <= mask { 9 } else { 0 };
            for slot in &mut table[i as usize..=(i + probes) as usize] {
                if slot.is_none() {
                    *slot = Some((hash, key));
                    return;
                }
            }
            perturb >>= 5;
            i = i.wrapping_mul(5).wrapping_add(1).wrapping_add(perturb) & mask;
        }
    }
    let mut table = vec![None; 8];
    for (used, &key) in pairs.iter().enumerate().map(|(n, k)| (n + 1, k)) {
        insert(&mut table, tuple_hash(key), key);
        if used * 5 >= (table.len() - 1) * 3 {
            let min_used = if used > 50_000 { used * 2 } else { used * 4 };
            let mut size = 8;
            while size <= min_used {
                size <<= 1;
            }
            let old = std::mem::replace(&mut table, vec![None; size]);
            for (hash, key) in old.into_iter().flatten() {
                insert(&mut table, hash, key);
            }
        }
    }
    table.into_iter().flatten().map(|(_, key)| key).collect()
}

/// `a > b` for an integer and a float compared exactly, as Python compares `int > float`.
fn int_gt_float(a: u64, b: f64) -> bool {
    if b.is_nan() || b >= 18_446_744_073_709_551_616.0 {
        return false;
    }
    // For b >= 0, a > b  <=>  a > floor(b); floor(b) < 2^64 is exact as an integer.
    b < 0.0 || a > b.floor() as u64
}

/// The tile grid `(cols, rows)` that `dynamic_preprocess` picks for a `width` x `height` image
/// (the model card's `find_closest_aspect_ratio`, in f64 like Python); the token cost is
/// `cols * rows` tiles, plus one thumbnail when that is more than one.
///
/// `width` and `height` are non-zero for any decoded image.
pub fn find_grid(
    width: u32,
    height: u32,
    min_num: u32,
    max_num: u32,
    image_size: u32,
) -> (u32, u32) {
    let aspect_ratio = f64::from(width) / f64::from(height);
    let area = u64::from(width) * u64::from(height);
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for (i, j) in target_ratios(min_num, max_num) {
        let diff = (aspect_ratio - f64::from(i) / f64::from(j)).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (i, j);
        } else if diff == best_diff {
            let half_tiles_area =
                0.5 * f64::from(image_size) * f64::from(image_size) * f64::from(i) * f64::from(j);
            if int_gt_float(area, half_tiles_area) {
                best = (i, j);
            }
        }
    }
    best
}

/// Tiles of one image: the grid `(cols, rows)` and the `image_size` squares, row by row, then the
/// thumbnail if one was added.
#[derive(Debug, Clone, PartialEq)]
pub struct Tiles {
    pub grid: (u32, u32),
    pub tiles: Vec<RgbImage>,
}

/// The model card's `dynamic_preprocess`: resize (Pillow bicubic) to the chosen grid of
/// `image_size` squares, cut it row by row, and with `use_thumbnail` append the whole image resized
/// to one square when there is more than one tile. `load_image` uses (1, max_num, 448, true).
pub fn dynamic_preprocess(
    img: &RgbImage,
    min_num: u32,
    max_num: u32,
    image_size: u32,
    use_thumbnail: bool,
) -> Tiles {
    let (cols, rows) = find_grid(img.width(), img.height(), min_num, max_num, image_size);
    let resized = resize_bicubic(img, image_size * cols, image_size * rows);
    let mut tiles: Vec<RgbImage> = (0..rows)
        .flat_map(|r| (0..cols).map(move |c| (c, r)))
        .map(|(c, r)| {
            imageops::crop_imm(
                &resized,
                c * image_size,
                r * image_size,
                image_size,
                image_size,
            )
            .to_image()
        })
        .collect();
    if use_thumbnail && tiles.len() != 1 {
        tiles.push(resize_bicubic(img, image_size, image_size));
    }
    Tiles {
        grid: (cols, rows),
        tiles,
    }
}

/// `build_transform` on each tile: ToTensor (`x as f32 / 255`) then Normalize (`(x - mean) / std`,
/// f32 mean/std), in torchvision's operation order. Layout `[n, 3, H, W]`; all tiles must share one
/// size (the `Resize((448, 448))` of the transform is an identity on `dynamic_preprocess` tiles).
pub fn normalize_tiles(tiles: &[&RgbImage]) -> Vec<f32> {
    let mut out = Vec::with_capacity(tiles.iter().map(|t| t.as_raw().len()).sum());
    for tile in tiles {
        for c in 0..3 {
            out.extend(
                tile.pixels()
                    .map(|p| (f32::from(p[c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;
    use ::image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};
    use sha2::{Digest, Sha256};
    use std::path::PathBuf;

    const IMAGES: [&str; 6] = [
        "alpaca.png",
        "benchmark.png",
        "image1.jpg",
        "image2.jpg",
        "image3.jpg",
        "waterview.jpg",
    ];

    struct Golden {
        json: serde_json::Value,
        tensors: Vec<u8>,
    }

    impl Golden {
        fn load(image: &str) -> Self {
            let dir = "golden/preprocess";
            let json = std::fs::read(fixture(&format!("{dir}/{image}.json"))).unwrap();
            let tensors =
                std::fs::read(fixture(&format!("{dir}/{image}.max6.safetensors"))).unwrap();
            Golden {
                json: serde_json::from_slice(&json).unwrap(),
                tensors,
            }
        }

        fn tensor(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
            let st = safetensors::SafeTensors::deserialize(&self.tensors).unwrap();
            let t = st.tensor(name).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::U8);
            (t.shape().to_vec(), t.data().to_vec())
        }

        fn size(&self) -> (u32, u32) {
            let s = &self.json["size"];
            (s[0].as_u64().unwrap() as u32, s[1].as_u64().unwrap() as u32)
        }

        /// The reference's own decode, the exact input of its resizer.
        fn decoded(&self) -> RgbImage {
            let (shape, data) = self.tensor("decoded_rgb_u8");
            let (w, h) = self.size();
            assert_eq!(shape, [h as usize, w as usize, 3]);
            RgbImage::from_raw(w, h, data).unwrap()
        }
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("internvl-image-test-{}-{name}", std::process::id()))
    }

    fn media(image: &str) -> PathBuf {
        fixture(&format!("media/images/{image}"))
    }

    /// Tiles as `load_image` makes them for each max_num of the golden (1, 6, 12), after
    /// asserting the run's grid and tile count; yields (max_num, tiles, the run's tile records).
    fn golden_runs(
        image: &str,
        golden: &Golden,
        img: &RgbImage,
    ) -> Vec<(u32, Vec<RgbImage>, Vec<serde_json::Value>)> {
        let runs = golden.json["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 3, "{image}");
        runs.iter()
            .map(|run| {
                let max_num = run["max_num"].as_u64().unwrap() as u32;
                let tiles = dynamic_preprocess(img, 1, max_num, 448, true);
                let grid: Vec<u32> = serde_json::from_value(run["grid"].clone()).unwrap();
                assert_eq!(tiles.grid, (grid[0], grid[1]), "{image} max_num {max_num}");
                let want = run["tiles"].as_array().unwrap().clone();
                assert_eq!(tiles.tiles.len(), want.len(), "{image} max_num {max_num}");
                (max_num, tiles.tiles, want)
            })
            .collect()
    }

    fn concat(tiles: &[RgbImage]) -> Vec<u8> {
        tiles
            .iter()
            .flat_map(|t| t.as_raw().iter().copied())
            .collect()
    }

    /// Tiles built from the reference's decoded pixels are the reference's tiles, bit for bit:
    /// same grids and counts for max_num 1, 6 and 12, every tile's sha256 and mean equal, and the
    /// max_num 6 tiles equal to the stored `tiles_u8`.
    #[test]
    fn tiles_from_reference_decode_match_bit_for_bit() {
        for image in IMAGES {
            let golden = Golden::load(image);
            for (max_num, tiles, want) in golden_runs(image, &golden, &golden.decoded()) {
                for (i, (tile, w)) in tiles.iter().zip(&want).enumerate() {
                    let what = format!("{image} max_num {max_num} tile {i}");
                    assert_eq!(tile.dimensions(), (448, 448), "{what}");
                    let sha = w["sha256"].as_str().unwrap();
                    assert_eq!(sha256_hex(tile.as_raw()), sha, "{what}");
                    for c in 0..3 {
                        let sum: f64 = tile.pixels().map(|p| f64::from(p[c])).sum();
                        let want_mean = w["mean_rgb"][c].as_f64().unwrap();
                        assert!((sum / 448.0 / 448.0 - want_mean).abs() < 1e-9, "{what} {c}");
                    }
                }
                if max_num == 6 {
                    let (shape, reference) = golden.tensor("tiles_u8");
                    assert_eq!(shape, [tiles.len(), 448, 448, 3]);
                    assert!(concat(&tiles) == reference, "{image}");
                }
            }
        }
    }

    /// Our decoding is Pillow's, bit for bit: the sha256 of the decoded RGB bytes (PNG and JPEG).
    #[test]
    fn decode_matches_reference_bit_for_bit() {
        for image in IMAGES {
            let golden = Golden::load(image);
            let ours = load_rgb(&media(image)).unwrap();
            assert_eq!(ours.dimensions(), golden.size(), "{image}");
            let want = golden.json["decoded_sha256"].as_str().unwrap();
            assert_eq!(sha256_hex(ours.as_raw()), want, "{image}");
        }
    }

    /// The whole pipeline from the files: grids and counts for every max_num, and every tile's
    /// sha256, equal to the reference's.
    #[test]
    fn tiles_from_files_match_reference_bit_for_bit() {
        for image in IMAGES {
            let golden = Golden::load(image);
            let decoded = load_rgb(&media(image)).unwrap();
            for (max_num, tiles, want) in golden_runs(image, &golden, &decoded) {
                for (i, (tile, w)) in tiles.iter().zip(&want).enumerate() {
                    let sha = w["sha256"].as_str().unwrap();
                    assert_eq!(sha256_hex(tile.as_raw()), sha, "{image} {max_num} tile {i}");
                }
            }
        }
    }

    #[test]
    fn grid_for_hand_worked_sizes() {
        // 1000x747 (1.339): (4, 3) = 1.333 needs 12 tiles, so with 6 the closest is (3, 2) = 1.5.
        assert_eq!(find_grid(1000, 747, 1, 6, 448), (3, 2));
        assert_eq!(find_grid(1000, 747, 1, 12, 448), (4, 3));
        assert_eq!(find_grid(1000, 747, 1, 1, 448), (1, 1));
        // Tall: 500x1600 (0.3125) is nearest 1/3 = 0.333.
        assert_eq!(find_grid(500, 1600, 1, 12, 448), (1, 3));
        // An exact ratio wins outright: 2:1 at any size.
        assert_eq!(find_grid(10, 5, 1, 12, 448), (2, 1));
        // min_num > max_num leaves no candidate: Python keeps its initial (1, 1).
        assert_eq!(find_grid(3000, 1000, 5, 4, 448), (1, 1));
    }

    #[test]
    fn grid_tie_break_needs_more_than_half_the_tiles_area() {
        // 1.2 is 0.2 away from (1, 1), (2, 2) and (3, 3) alike (nothing closer within 9 tiles);
        // a larger grid takes over only if the image area exceeds half of its tiles' area:
        // 0.5 * 448^2 * 4 = 401408 and 0.5 * 448^2 * 9 = 903168.
        assert_eq!(find_grid(600, 500, 1, 9, 448), (1, 1)); // 300000
        assert_eq!(find_grid(900, 750, 1, 9, 448), (2, 2)); // 675000
        assert_eq!(find_grid(1200, 1000, 1, 9, 448), (3, 3)); // 1200000
                                                              // Strictly more: with 6-pixel tiles (2, 2) has half area 0.5 * 36 * 4 = 72.
        assert_eq!(find_grid(8, 9, 1, 4, 6), (1, 1)); // 72
        assert_eq!(find_grid(9, 10, 1, 4, 6), (2, 2)); // 90
    }

    #[test]
    fn target_ratios_follow_python_set_then_sort_order() {
        // `sorted(set(...), key=area)` of the model card as CPython 3.11 prints it for (1, 12).
        let want = [
            (1, 1),
            (1, 2),
            (2, 1),
            (3, 1),
            (1, 3),
            (2, 2),
            (4, 1),
            (1, 4),
            (5, 1),
            (1, 5),
            (1, 6),
            (6, 1),
            (3, 2),
            (2, 3),
            (7, 1),
            (1, 7),
            (4, 2),
            (2, 4),
            (1, 8),
            (8, 1),
            (1, 9),
            (3, 3),
            (9, 1),
            (2, 5),
            (5, 2),
            (10, 1),
            (1, 10),
            (11, 1),
            (1, 11),
            (12, 1),
            (3, 4),
            (4, 3),
            (1, 12),
            (6, 2),
            (2, 6),
        ];
        assert_eq!(target_ratios(1, 12), want);
        // With min_num = 2 the equal-area order decides ties; CPython gives (1, 2) before
        // (2, 1), so 5x4 (1.25, 0.75 from both) keeps (1, 2) unless its area exceeds 401408.
        assert_eq!(target_ratios(2, 2), [(1, 2), (2, 1)]);
        assert_eq!(find_grid(5, 4, 2, 2, 448), (1, 2));
        assert_eq!(find_grid(600, 480, 2, 2, 448), (2, 1));
    }

    #[test]
    fn int_float_comparison_is_exact() {
        assert!(int_gt_float(401_409, 401_408.0));
        assert!(!int_gt_float(401_408, 401_408.0));
        assert!(int_gt_float(3, 2.5));
        assert!(!int_gt_float(2, 2.5));
        // 2^53 + 1 is not representable: Python's int > float still sees it as larger.
        assert!(int_gt_float((1 << 53) + 1, 9_007_199_254_740_992.0));
        assert!(!int_gt_float(u64::MAX, 18_446_744_073_709_551_616.0));
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x % 256) as u8, (y % 256) as u8, ((x + 3 * y) % 251) as u8])
        })
    }

    #[test]
    fn tiles_are_cut_row_by_row_and_thumbnail_added_for_several_tiles() {
        // 896x896 with max 4 is a (2, 2) grid already at size: the resize is a copy.
        let img = gradient(896, 896);
        let tiles = dynamic_preprocess(&img, 1, 4, 448, true);
        assert_eq!(tiles.grid, (2, 2));
        assert_eq!(tiles.tiles.len(), 5);
        for (i, (c, r)) in [(0, 0), (1, 0), (0, 1), (1, 1)].into_iter().enumerate() {
            let want = imageops::crop_imm(&img, c * 448, r * 448, 448, 448).to_image();
            assert_eq!(tiles.tiles[i], want, "tile {i}");
        }
        assert_eq!(tiles.tiles[4], resize_bicubic(&img, 448, 448));
        let no_thumb = dynamic_preprocess(&img, 1, 4, 448, false);
        assert_eq!(no_thumb.tiles, tiles.tiles[..4]);
    }

    #[test]
    fn single_tile_gets_no_thumbnail() {
        let img = gradient(300, 280);
        let tiles = dynamic_preprocess(&img, 1, 12, 448, true);
        assert_eq!(tiles.grid, (1, 1));
        assert_eq!(tiles.tiles, [resize_bicubic(&img, 448, 448)]);
    }

    #[test]
    fn normalization_is_totensor_then_imagenet_normalize_in_chw() {
        let a = RgbImage::from_raw(2, 1, vec![0, 128, 255, 255, 0, 64]).unwrap();
        let b = RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let out = normalize_tiles(&[&a, &b]);
        // [n=2, c=3, h=1, w=2]: channel planes of tile a, then of tile b.
        let raw = [[0u8, 255], [128, 0], [255, 64], [1, 4], [2, 5], [3, 6]];
        assert_eq!(out.len(), 12);
        for (plane, values) in raw.iter().enumerate() {
            let c = plane % 3;
            for (x, &v) in values.iter().enumerate() {
                let want =
                    (f64::from(v) / 255.0 - [0.485, 0.456, 0.406][c]) / [0.229, 0.224, 0.225][c];
                let got = f64::from(out[plane * 2 + x]);
                assert!(
                    (got - want).abs() < 2e-6,
                    "plane {plane} x {x}: {got} vs {want}"
                );
            }
        }
        // The f32 steps in torchvision's order, e.g. 0 -> (0 - 0.485f32) / 0.229f32.
        assert_eq!(out[0], -0.485f32 / 0.229f32);
        assert_eq!(out[1], (255f32 / 255.0 - 0.485f32) / 0.229f32);
    }

    fn png_bytes(img: DynamicImage) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    #[test]
    fn conversion_to_rgb_follows_pillow() {
        // RGBA: alpha dropped, no compositing on a background.
        let rgba = ImageBuffer::from_raw(2, 1, vec![10u8, 20, 30, 0, 40, 50, 60, 128]).unwrap();
        let got = decode_rgb(&png_bytes(DynamicImage::ImageRgba8(rgba)), "rgba").unwrap();
        assert_eq!(got.as_raw(), &[10, 20, 30, 40, 50, 60]);
        // LA: the gray replicated.
        let la = ImageBuffer::<LumaA<u8>, _>::from_raw(1, 1, vec![77u8, 0]).unwrap();
        let got = decode_rgb(&png_bytes(DynamicImage::ImageLumaA8(la)), "la").unwrap();
        assert_eq!(got.as_raw(), &[77, 77, 77]);
        // 16-bit RGB: high byte (Pillow's RGB;16B unpacker).
        let rgb16 =
            ImageBuffer::<Rgb<u16>, _>::from_raw(1, 1, vec![0x12ff, 0xffff, 0x00ff]).unwrap();
        let got = decode_rgb(&png_bytes(DynamicImage::ImageRgb16(rgb16)), "rgb16").unwrap();
        assert_eq!(got.as_raw(), &[0x12, 0xff, 0x00]);
        // 16-bit RGBA: high byte, alpha dropped.
        let rgba16 =
            ImageBuffer::<Rgba<u16>, _>::from_raw(1, 1, vec![0x8000, 0x0100, 0x00ff, 0]).unwrap();
        let got = decode_rgb(&png_bytes(DynamicImage::ImageRgba16(rgba16)), "rgba16").unwrap();
        assert_eq!(got.as_raw(), &[0x80, 0x01, 0x00]);
        // 16-bit gray opens as I;16, and I;16 -> RGB clips at 255.
        let l16 = ImageBuffer::<Luma<u16>, _>::from_raw(3, 1, vec![200u16, 255, 0xabcd]).unwrap();
        let got = decode_rgb(&png_bytes(DynamicImage::ImageLuma16(l16)), "l16").unwrap();
        assert_eq!(got.as_raw(), &[200, 200, 200, 255, 255, 255, 255, 255, 255]);
        // 16-bit LA: high byte of the gray (LA;16B).
        let la16 = ImageBuffer::<LumaA<u16>, _>::from_raw(1, 1, vec![0x3456u16, 0xffff]).unwrap();
        let got = decode_rgb(&png_bytes(DynamicImage::ImageLumaA16(la16)), "la16").unwrap();
        assert_eq!(got.as_raw(), &[0x34, 0x34, 0x34]);
    }

    #[test]
    fn cmyk_jpeg_is_read_as_inverted_cmyk_like_pillow() {
        // A flat CMYK JPEG at quality 100 decodes back to its samples (200, 100, 50, 30). Pillow
        // inverts them to (55, 155, 205, 225), so 255 - k' = 30, and each channel is
        // 30 - MULDIV255(c', 30): 30 - 6, 30 - 18, 30 - 24.
        let mut comp = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
        comp.set_size(16, 16);
        comp.set_quality(100.0);
        let mut started = comp.start_compress(Vec::new()).unwrap();
        started
            .write_scanlines(&[200u8, 100, 50, 30].repeat(256))
            .unwrap();
        let jpeg = started.finish().unwrap();
        let img = decode_rgb(&jpeg, "cmyk.jpg").unwrap();
        assert_eq!(img.dimensions(), (16, 16));
        assert!(
            img.pixels().all(|p| p.0 == [24, 12, 6]),
            "{:?}",
            img.get_pixel(0, 0)
        );
    }

    #[test]
    fn gray_jpeg_is_replicated() {
        let gray = ImageBuffer::<Luma<u8>, _>::from_fn(24, 16, |x, y| Luma([(x * 10 + y) as u8]));
        let mut buf = Cursor::new(Vec::new());
        DynamicImage::ImageLuma8(gray)
            .write_to(&mut buf, ImageFormat::Jpeg)
            .unwrap();
        let img = decode_rgb(buf.get_ref(), "gray.jpg").unwrap();
        assert_eq!(img.dimensions(), (24, 16));
        assert!(img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        assert!(img.pixels().any(|p| p[0] != img.get_pixel(0, 0)[0]));
    }

    /// A GIF with a `screen`, the palette [(10,20,30), (40,50,60), (70,80,90), (100,110,120)]
    /// and one frame of `frame_size` at (1, 1) holding the indices `pixels`.
    fn gif_bytes(
        screen: (u16, u16),
        frame_size: (u16, u16),
        pixels: &[u8],
        transparent: Option<u8>,
    ) -> Vec<u8> {
        let palette = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120];
        let mut out = Vec::new();
        {
            let mut enc = gif::Encoder::new(&mut out, screen.0, screen.1, &palette).unwrap();
            let frame = gif::Frame {
                left: 1,
                top: 1,
                width: frame_size.0,
                height: frame_size.1,
                transparent,
                buffer: std::borrow::Cow::Borrowed(pixels),
                ..gif::Frame::default()
            };
            enc.write_frame(&frame).unwrap();
        }
        out
    }

    #[test]
    fn gif_first_frame_is_rendered_like_pillow() {
        const T: [u8; 3] = [70, 80, 90];
        const Z: [u8; 3] = [10, 20, 30];
        let frame = [0u8, 1, 2, 3];
        let inside = [[10u8, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]];
        for (transparent, outside) in [(Some(2), T), (None, Z)] {
            let img =
                decode_rgb(&gif_bytes((4, 3), (2, 2), &frame, transparent), "anim.gif").unwrap();
            assert_eq!(img.dimensions(), (4, 3));
            for (x, y, p) in img.enumerate_pixels() {
                let want = if (1..3).contains(&x) && (1..3).contains(&y) {
                    inside[((y - 1) * 2 + (x - 1)) as usize]
                } else {
                    outside
                };
                assert_eq!(p.0, want, "({x}, {y}) transparent {transparent:?}");
            }
        }
        // A frame reaching past the logical screen grows the canvas, as Pillow does.
        let img = decode_rgb(&gif_bytes((2, 2), (2, 2), &frame, None), "grow.gif").unwrap();
        assert_eq!(img.dimensions(), (3, 3));
        assert_eq!(img.get_pixel(2, 2).0, inside[3]);
    }

    fn assert_err(
        result: Result<RgbImage, ImageLoadError>,
        check: fn(&ImageLoadError) -> bool,
        file: &str,
    ) {
        let err = result.expect_err("must fail");
        assert!(check(&err), "unexpected error: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(file), "message does not name the file: {msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let missing = temp_path("missing.jpg");
        assert_err(
            load_rgb(&missing),
            |e| matches!(e, ImageLoadError::Missing { .. }),
            "missing.jpg",
        );

        let dir = temp_path("dir.jpg");
        std::fs::create_dir_all(&dir).unwrap();
        assert_err(
            load_rgb(&dir),
            |e| matches!(e, ImageLoadError::IsDirectory { .. }),
            "dir.jpg",
        );
        std::fs::remove_dir(&dir).unwrap();

        let empty = temp_path("empty.png");
        std::fs::write(&empty, b"").unwrap();
        assert_err(
            load_rgb(&empty),
            |e| matches!(e, ImageLoadError::Empty { .. }),
            "empty.png",
        );
        std::fs::remove_file(&empty).unwrap();

        let text = temp_path("notes.jpg");
        std::fs::write(&text, b"just some text, not a photo\n").unwrap();
        assert_err(
            load_rgb(&text),
            |e| matches!(e, ImageLoadError::UnknownFormat { .. }),
            "notes.jpg",
        );
        std::fs::remove_file(&text).unwrap();

        // Complete segments but a bogus frame header: libjpeg's fatal error becomes an error.
        let bogus = [0xff, 0xd8, 0xff, 0xc0, 0x00, 0x02, 0xff, 0xd9];
        assert_err(
            decode_rgb(&bogus, "bogus.jpg"),
            |e| matches!(e, ImageLoadError::Corrupt { .. }),
            "bogus.jpg",
        );
        // All scans present but the EOI marker cut off: Pillow reports it truncated too.
        let jpeg = std::fs::read(media("image3.jpg")).unwrap();
        let no_eoi = decode_rgb(&jpeg[..jpeg.len() - 2], "no-eoi.jpg");
        assert_err(
            no_eoi,
            |e| matches!(e, ImageLoadError::Corrupt { .. }),
            "no-eoi.jpg",
        );

        for image in ["image1.jpg", "benchmark.png"] {
            let bytes = std::fs::read(media(image)).unwrap();
            let cut = temp_path(&format!("cut-{image}"));
            std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
            assert_err(
                load_rgb(&cut),
                |e| matches!(e, ImageLoadError::Corrupt { .. }),
                image,
            );
            std::fs::remove_file(&cut).unwrap();
        }
    }

    #[test]
    fn permission_denied_is_reported_as_such() {
        // Root reads any file, so the io error is built directly.
        let err = io_error(
            "secret.png",
            std::io::Error::from(ErrorKind::PermissionDenied),
        );
        assert!(matches!(err, ImageLoadError::PermissionDenied { .. }));
        assert_eq!(
            err.to_string(),
            "image secret.png cannot be read: permission denied"
        );
    }

    #[test]
    fn pixel_cap_is_pillows_decompression_bomb_limit() {
        assert!(check_size("a", MAX_PIXELS, 1).is_ok());
        assert!(matches!(
            check_size("a", MAX_PIXELS + 1, 1),
            Err(ImageLoadError::TooLarge { .. })
        ));
        assert!(matches!(
            check_size("a", 0, 5),
            Err(ImageLoadError::ZeroSize { .. })
        ));
    }

    #[test]
    fn long_strip_decodes() {
        let strip = RgbImage::from_fn(200_000, 1, |x, _| Rgb([(x % 256) as u8, 7, 9]));
        let got = decode_rgb(
            &png_bytes(DynamicImage::ImageRgb8(strip.clone())),
            "strip.png",
        )
        .unwrap();
        assert_eq!(got, strip);
    }

    #[test]
    fn long_strip_is_tiled_like_the_reference() {
        // 200000x1: the widest grid wins (6x1 for max 6) and the one row is stretched to 448,
        // so every row of every tile equals the first; the thumbnail is squeezed the same way.
        let strip = RgbImage::from_fn(200_000, 1, |x, _| {
            Rgb([(x % 256) as u8, (x / 800) as u8, 9])
        });
        let t = dynamic_preprocess(&strip, 1, 6, 448, true);
        assert_eq!(t.grid, (6, 1));
        assert_eq!(t.tiles.len(), 7);
        for tile in &t.tiles {
            assert_eq!(tile.dimensions(), (448, 448));
            let first_row: Vec<_> = (0..448).map(|x| *tile.get_pixel(x, 0)).collect();
            for y in 1..448 {
                assert!((0..448).all(|x| *tile.get_pixel(x, y) == first_row[x as usize]));
            }
        }
        // the green channel counts up along the strip: left tiles are darker than right ones
        let mean_green = |t: &RgbImage| t.pixels().map(|p| u64::from(p[1])).sum::<u64>();
        assert!(mean_green(&t.tiles[0]) < mean_green(&t.tiles[5]));
    }

    /// A GIF of 2x2 frames on a 2x2 screen, one frame per entry of `frames` (palette indices).
    fn animated_gif(frames: &[[u8; 4]]) -> Vec<u8> {
        let palette = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120];
        let mut out = Vec::new();
        {
            let mut enc = gif::Encoder::new(&mut out, 2, 2, &palette).unwrap();
            enc.set_repeat(gif::Repeat::Infinite).unwrap();
            for f in frames {
                let frame = gif::Frame {
                    width: 2,
                    height: 2,
                    delay: 10,
                    buffer: std::borrow::Cow::Borrowed(&f[..]),
                    ..gif::Frame::default()
                };
                enc.write_frame(&frame).unwrap();
            }
        }
        out
    }

    #[test]
    fn animated_gif_gives_its_first_frame_like_pillow_convert() {
        // `Image.open(p).convert('RGB')` of an animated GIF is its first frame.
        let first = [0u8, 1, 2, 3];
        let gif = animated_gif(&[first, [3, 3, 3, 3], [2, 2, 1, 1]]);
        let img = decode_rgb(&gif, "anim.gif").unwrap();
        assert_eq!(img.dimensions(), (2, 2));
        let want = [[10u8, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]];
        for (i, p) in img.pixels().enumerate() {
            assert_eq!(p.0, want[i], "pixel {i}");
        }
        // and the same image as a one-frame GIF
        assert_eq!(decode_rgb(&animated_gif(&[first]), "one.gif").unwrap(), img);
    }

    /// CRC-32 (PNG chunks), to forge headers.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn huge_declared_sizes_are_refused_before_decoding() {
        // A valid 1x1 PNG whose IHDR claims 50000x50000 (2.5e9 pixels, 7.5 GB of RGB).
        let mut png = png_bytes(DynamicImage::ImageRgb8(RgbImage::new(1, 1)));
        png[16..20].copy_from_slice(&50_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&50_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode_rgb(&png, "bomb.png").unwrap_err();
        assert!(
            matches!(
                err,
                ImageLoadError::TooLarge {
                    width: 50_000,
                    height: 50_000,
                    ..
                }
            ),
            "{err:?}"
        );
        // A GIF claiming a 65535x65535 screen and frame.
        let mut gif = gif_bytes((1, 1), (1, 1), &[0], None);
        gif[6..10].copy_from_slice(&[0xff; 4]);
        let descriptor = gif.iter().position(|&b| b == b',').unwrap();
        gif[descriptor + 1..descriptor + 9].copy_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        let err = decode_rgb(&gif, "bomb.gif").unwrap_err();
        assert!(matches!(err, ImageLoadError::TooLarge { .. }), "{err:?}");
        // A real JPEG whose frame header claims 20000x20000 (libjpeg itself stops at 65500).
        let mut jpeg = std::fs::read(media("image3.jpg")).unwrap();
        let sof = jpeg.windows(2).position(|w| w == [0xff, 0xc2]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0x4e, 0x20, 0x4e, 0x20]);
        let err = decode_rgb(&jpeg, "bomb.jpg").unwrap_err();
        assert!(
            matches!(
                err,
                ImageLoadError::TooLarge {
                    width: 20_000,
                    height: 20_000,
                    ..
                }
            ),
            "{err:?}"
        );
        // A BMP header claiming 20000x20000 with no pixel data.
        let mut bmp = Vec::new();
        bmp.extend_from_slice(b"BM");
        bmp.extend_from_slice(&54u32.to_le_bytes()); // file size
        bmp.extend_from_slice(&[0; 4]);
        bmp.extend_from_slice(&54u32.to_le_bytes()); // pixel data offset
        bmp.extend_from_slice(&40u32.to_le_bytes()); // BITMAPINFOHEADER
        bmp.extend_from_slice(&20_000i32.to_le_bytes());
        bmp.extend_from_slice(&20_000i32.to_le_bytes());
        bmp.extend_from_slice(&1u16.to_le_bytes());
        bmp.extend_from_slice(&24u16.to_le_bytes());
        bmp.extend_from_slice(&[0; 24]);
        let err = decode_rgb(&bmp, "bomb.bmp").unwrap_err();
        assert!(matches!(err, ImageLoadError::TooLarge { .. }), "{err:?}");
    }
}
