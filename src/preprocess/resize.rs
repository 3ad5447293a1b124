//! Pillow's `Image.resize(size, Image.BICUBIC)` for 8-bit RGB, bit for bit.
//!
//! Reference: Pillow `src/libImaging/Resample.c` (`ImagingResampleInner`, `precompute_coeffs`,
//! `normalize_coeffs_8bpc`, `ImagingResample{Horizontal,Vertical}_8bpc`): a separable convolution,
//! horizontal pass first (into an 8-bit intermediate), then vertical; the bicubic kernel (a = -0.5)
//! is widened by the scale factor when downscaling (antialiasing), its weights are normalised in
//! f64 and then rounded to 22-bit fixed point; each output sums from 2^21 and is clipped to 0..=255.

use ::image::RgbImage;

/// Fractional bits of the fixed-point weights (`32 - 8 - 2` in Pillow).
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel (support 2) with a = -0.5, in its exact operation order.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one axis: output `i` reads `len[i]` inputs from `start[i]` with the
/// weights `coeffs[i * ksize..][..len[i]]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    coeffs: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the full box `0..in_size`.
fn precompute(in_size: u32, out_size: u32) -> Coeffs {
    // Pillow passes the box as C floats; (in1 - in0) of an integer size is exact.
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let n = out_size as usize;
    let mut out = Coeffs {
        ksize,
        start: Vec::with_capacity(n),
        len: Vec::with_capacity(n),
        coeffs: vec![0; n * ksize],
    };
    let mut w = vec![0f64; ksize];
    for xx in 0..n {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero; negatives clamp to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let count = (xmax - xmin).max(0) as usize;
        let mut ww = 0.0;
        for (x, wx) in w[..count].iter_mut().enumerate() {
            *wx = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        let row = &mut out.coeffs[xx * ksize..][..count];
        for (k, &wx) in row.iter_mut().zip(&w[..count]) {
            let wx = if ww != 0.0 { wx / ww } else { wx };
            let fixed = wx * f64::from(1u32 << PRECISION_BITS);
            *k = if wx < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        out.start.push(xmin as usize);
        out.len.push(count);
    }
    out
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift) and saturate to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Weighted sum of `taps` RGB pixels, the pixel `t` being at `src[base + t * stride..][..3]`.
fn convolve(src: &[u8], base: usize, stride: usize, k: &[i32]) -> [u8; 3] {
    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
    for (t, &w) in k.iter().enumerate() {
        let p = &src[base + t * stride..][..3];
        for (a, &v) in acc.iter_mut().zip(p) {
            *a += i32::from(v) * w;
        }
    }
    acc.map(clip8)
}

/// Resize like Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image.
///
/// Same size is a plain copy, as in Pillow. A zero target dimension gives an empty image.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (width, height) {
        return img.clone();
    }
    if width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    let mut cur = img.clone();
    if width != in_w {
        let c = precompute(in_w, width);
        let src = cur.as_raw();
        let src_stride = in_w as usize * 3;
        let mut buf = Vec::with_capacity(width as usize * in_h as usize * 3);
        for y in 0..in_h as usize {
            for xx in 0..width as usize {
                let k = &c.coeffs[xx * c.ksize..][..c.len[xx]];
                let base = y * src_stride + c.start[xx] * 3;
                buf.extend_from_slice(&convolve(src, base, 3, k));
            }
        }
        cur = RgbImage::from_raw(width, in_h, buf).expect("buffer sized width x height x 3");
    }
    if height != in_h {
        let c = precompute(in_h, height);
        let src = cur.as_raw();
        let stride = width as usize * 3;
        let mut buf = Vec::with_capacity(width as usize * height as usize * 3);
        for yy in 0..height as usize {
            let k = &c.coeffs[yy * c.ksize..][..c.len[yy]];
            for x in 0..width as usize {
                let base = c.start[yy] * stride + x * 3;
                buf.extend_from_slice(&convolve(src, base, stride, k));
            }
        }
        cur = RgbImage::from_raw(width, height, buf).expect("buffer sized width x height x 3");
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::image::Rgb;

    #[test]
    fn kernel_is_keys_cubic_with_a_minus_half() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(0.5), 0.5625);
        assert_eq!(bicubic(-0.5), 0.5625);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(1.5), -0.0625);
        assert_eq!(bicubic(2.0), 0.0);
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = RgbImage::from_fn(5, 3, |x, y| Rgb([x as u8 * 40, y as u8 * 90, 7]));
        assert_eq!(resize_bicubic(&img, 5, 3), img);
    }

    #[test]
    fn constant_images_stay_constant() {
        let img = RgbImage::from_pixel(37, 23, Rgb([0, 128, 255]));
        for (w, h) in [(448, 448), (5, 9), (37, 100), (1, 1)] {
            let out = resize_bicubic(&img, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [0, 128, 255]), "{w}x{h}");
        }
    }

    #[test]
    fn halving_four_pixels_by_hand() {
        // Scale 2 widens the support to 4 and halves the kernel's argument. Output 0 (center 1.0)
        // weighs inputs 0..4 by bicubic(0.25, 0.25, 0.75, 1.25) = (0.8671875, 0.8671875,
        // 0.2265625, -0.0703125) / 1.890625, in 22-bit fixed point (1923826, 1923826, 502624,
        // -155987): (100 * 1923826 + 200 * 502624 - 255 * 155987 + 2^21) >> 22 = 60. Output 1
        // mirrors it: (100 * 502624 + (200 + 255) * 1923826 + 2^21) >> 22 = 221.
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([[0, 100, 200, 255][x as usize]; 3]));
        let out = resize_bicubic(&img, 2, 1);
        assert_eq!(out.as_raw(), &[60, 60, 60, 221, 221, 221]);
    }
}
