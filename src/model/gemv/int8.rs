//! `--load-8bit` products in integers: bitsandbytes' LLM.int8() (what the model card's
//! `load_in_8bit=True` runs), for the few rows of a decoding step.
//!
//! The input rows are quantized as bitsandbytes' `int8_vectorwise_quant` does with the default
//! `llm_int8_threshold` of 6: an element whose magnitude is at least [`THRESHOLD`] is an
//! outlier (its column is an outlier column of its row, see [`Int8Input::new`]); each row's
//! scale is the largest magnitude among its other elements (its "row stat"), and its values are
//! `round(x * (127 / absmax))` (ties to even) with the outlier columns set to 0. The int8 weights
//! (one scale per output row, [`crate::model::nn::quantize_rows`]) multiply those values in
//! integers (exact i32 sums: VNNI's `vpdpbusd` on AVX-512, `vpmaddubsw` on AVX2, a plain loop
//! elsewhere), then `int8_mm_dequant`: the sum times `(absmax / 127) * scale` in f32, plus the
//! bias, rounded to bf16. The outlier columns are added as bitsandbytes adds them: the inputs in
//! their own precision times the dequantized weight columns (`q * scale` in bf16), accumulated
//! in f32 onto the bf16 result and rounded once more.
//!
//! Because the integer sums are exact, every kernel level gives the same bits. Where ours
//! differs from bitsandbytes: its row stats and weight scales are f32 (the weights' scale here
//! is bf16, as the checkpoint's dtype), and it casts bf16 inputs to f16 before quantizing them
//! (here they are quantized from bf16 directly).
use super::{bf16_bits, round_small, Level, BLOCK_ROWS, MAX_ROWS};
use half::bf16;

/// bitsandbytes' default `llm_int8_threshold`: inputs at least this large stay out of the
/// integer product.
pub const THRESHOLD: f32 = 6.0;

/// The input rows of one product, quantized to int8 (see the module's doc).
pub struct Int8Input {
    k: usize,
    rows: usize,
    /// The int8 values [rows, k], 0 in outlier columns.
    q: Vec<i8>,
    /// Each row's sum of `q`: `vpdpbusd` takes the weights plus 128 (its unsigned operand),
    /// and `128 * sum(q)` comes off the row's sums.
    qsum: [i32; MAX_ROWS],
    /// Each row's absmax / 127 (0 for a row with no value below the threshold).
    step: [f32; MAX_ROWS],
    /// Each row's outlier columns, ascending: row `r`'s are `cols[ends[r]..ends[r + 1]]`.
    cols: Vec<usize>,
    ends: [usize; MAX_ROWS + 1],
    /// The inputs in those columns, in the same order.
    outliers: Vec<f32>,
}

impl Int8Input {
    /// Quantizes `x` [rows, k] (bf16 bits).
    ///
    /// Each row takes its own outlier columns: bitsandbytes takes, for every row, the columns
    /// where any row of the batch has an outlier, so that a row's result would depend on the
    /// rows decoded beside it; for one row (a decoding step of one conversation) the two rules
    /// are the same.
    pub fn new(x: &[u16], rows: usize) -> Self {
        debug_assert!((1..=MAX_ROWS).contains(&rows) && x.len().is_multiple_of(rows));
        let k = x.len() / rows;
        let f = |v: u16| f32::from_bits((v as u32) << 16);
        // bf16 bit patterns without the sign are ordered as the magnitudes, NaNs above
        // infinity: an input is an outlier where its pattern is at least the threshold's (a
        // NaN too: it stays in the f32 part, where it propagates), and the largest pattern of
        // the rest is the row stat, an integer max that vectorises
        let limit = bf16::from_f32(THRESHOLD).to_bits();
        debug_assert_eq!(bf16::from_bits(limit).to_f32(), THRESHOLD);
        let outlier = |v: u16| v & 0x7fff >= limit;
        let mut q = vec![0i8; rows * k];
        let mut step = [0f32; MAX_ROWS];
        let mut cols = Vec::new();
        let mut outliers = Vec::new();
        let mut ends = [0usize; MAX_ROWS + 1];
        for (r, row) in x.chunks_exact(k).enumerate() {
            let absmax = f(row
                .iter()
                .filter(|&&v| !outlier(v))
                .map(|&v| v & 0x7fff)
                .max()
                .unwrap_or(0));
            let factor = 127.0 / absmax;
            for (j, (qv, &v)) in q[r * k..(r + 1) * k].iter_mut().zip(row).enumerate() {
                if outlier(v) {
                    cols.push(j);
                    outliers.push(f(v));
                } else if absmax > 0.0 {
                    // within ±127: |v| <= absmax
                    *qv = round_small(f(v) * factor) as i8;
                }
            }
            if absmax > 0.0 {
                step[r] = absmax / 127.0;
            }
            ends[r + 1] = cols.len();
        }
        let mut qsum = [0i32; MAX_ROWS];
        for (s, row) in qsum.iter_mut().zip(q.chunks_exact(k)) {
            *s = row.iter().map(|&v| v as i32).sum();
        }
        Int8Input {
            k,
            rows,
            q,
            qsum,
            step,
            cols,
            ends,
            outliers,
        }
    }

    /// The bf16 outputs of weight rows `lo..hi` of `w` [n, k] (scales `scales` [n], `bias`
    /// [n]) for every input row: `put(i, r, bits)` for weight row `i` and input row `r`.
    #[allow(clippy::too_many_arguments)]
    pub fn outputs(
        &self,
        level: Level,
        w: &[i8],
        scales: &[u16],
        bias: Option<&[f32]>,
        lo: usize,
        hi: usize,
        mut put: impl FnMut(usize, usize, u16),
    ) {
        let k = self.k;
        let row = |i: usize| &w[i * k..(i + 1) * k];
        let scale = |i: usize| f32::from_bits((scales[i] as u32) << 16);
        let bias = |i: usize| bias.map_or(0.0, |b| b[i]);
        // the sums of a block of weight rows in one kernel call, then their outputs
        let mut sums = [0i32; BLOCK_ROWS * MAX_ROWS];
        let mut i0 = lo;
        while i0 < hi {
            let i1 = (i0 + BLOCK_ROWS).min(hi);
            let sums = &mut sums[..(i1 - i0) * self.rows];
            dots(level, self, &w[i0 * k..i1 * k], sums);
            for r in 0..self.rows {
                if self.ends[r] == self.ends[r + 1] {
                    // no outlier columns in this input row: `finish` without its branches, a
                    // loop that vectorises
                    let step = self.step[r];
                    for i in i0..i1 {
                        let sum = sums[(i - i0) * self.rows + r];
                        put(i, r, bf16_bits(sum as f32 * (step * scale(i)) + bias(i)));
                    }
                    continue;
                }
                for i in i0..i1 {
                    let sum = sums[(i - i0) * self.rows + r];
                    put(i, r, self.finish(r, sum, row(i), scale(i), bias(i)));
                }
            }
            i0 = i1;
        }
    }

    /// Input row `r`'s output for weight row `w` (scale `scale`) from their integer `sum`:
    /// scaled, plus `bias`, rounded to bf16, then the outlier columns added in f32 and rounded
    /// again.
    #[inline]
    fn finish(&self, r: usize, sum: i32, w: &[i8], scale: f32, bias: f32) -> u16 {
        let y = bf16::from_f32(sum as f32 * (self.step[r] * scale) + bias);
        let (from, to) = (self.ends[r], self.ends[r + 1]);
        if from == to {
            return y.to_bits();
        }
        let mut acc = y.to_f32();
        for (&c, &xv) in self.cols[from..to].iter().zip(&self.outliers[from..to]) {
            acc += xv * bf16::from_f32(w[c] as f32 * scale).to_f32();
        }
        bf16::from_f32(acc).to_bits()
    }
}

/// `sums[i * rows + r]` = the exact integer dot product of input row `r`'s int8 values with
/// weight row `i` of `w` (whole rows of `k`).
fn dots(level: Level, x: &Int8Input, w: &[i8], sums: &mut [i32]) {
    debug_assert_eq!(sums.len(), w.len() / x.k * x.rows);
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(level, Level::Avx512 | Level::Avx512Bf16) && vnni() {
            // SAFETY: the CPU has AVX-512F/BW/DQ/VL and VNNI; the lengths are the input's.
            unsafe { simd::dots_vnni(&x.q, &x.qsum[..x.rows], x.k, w, sums) };
            return;
        }
        if level >= Level::Avx2 {
            // SAFETY: the CPU has AVX2 (the level is at most the detected one).
            unsafe { simd::dots_avx2(&x.q, x.rows, x.k, w, sums) };
            return;
        }
    }
    let _ = level;
    for (wr, out) in w.chunks_exact(x.k).zip(sums.chunks_exact_mut(x.rows)) {
        for (s, row) in out.iter_mut().zip(x.q.chunks_exact(x.k)) {
            *s = row.iter().zip(wr).map(|(&a, &b)| a as i32 * b as i32).sum();
        }
    }
}

/// Whether the CPU has AVX-512F/BW/DQ/VL and VNNI (the integer kernels' best level).
#[cfg(target_arch = "x86_64")]
pub(super) fn vnni() -> bool {
    simd::vnni()
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod simd {
    use super::super::prefetch;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn vnni() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        })
    }

    /// [`dots_vnni_m`] for one input row: four chunks of 64 per step into separate
    /// accumulators (independent chains), the weights read in order.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn dots_vnni_1(q: &[i8], qsum: i32, w: &[i8], sums: &mut [i32]) {
        let k = w.len();
        let mut acc = [_mm512_setzero_si512(); 4];
        let flip = _mm512_set1_epi8(-128);
        let mut j = 0;
        while j + 256 <= k {
            for t in 0..4 {
                prefetch(w.as_ptr().add(j + 64 * t).cast());
                let wv = _mm512_loadu_si512(w.as_ptr().add(j + 64 * t).cast());
                let xv = _mm512_loadu_si512(q.as_ptr().add(j + 64 * t).cast());
                acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_xor_si512(wv, flip), xv);
            }
            j += 256;
        }
        while j < k {
            let m: __mmask64 = if k - j >= 64 {
                !0
            } else {
                (1u64 << (k - j)) - 1
            };
            let wv = _mm512_maskz_loadu_epi8(m, w.as_ptr().add(j));
            let xv = _mm512_maskz_loadu_epi8(m, q.as_ptr().add(j));
            acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_xor_si512(wv, flip), xv);
            j += 64;
        }
        let a = _mm512_add_epi32(
            _mm512_add_epi32(acc[0], acc[1]),
            _mm512_add_epi32(acc[2], acc[3]),
        );
        sums[0] = _mm512_reduce_add_epi32(a).wrapping_sub(qsum.wrapping_mul(128));
    }

    /// `vpdpbusd` multiplies unsigned bytes by signed ones: the weights go in as `w + 128`
    /// (their top bit flipped, one `xor` per 64 for every input row), the inputs as they are,
    /// and `128 * sum(q)` (each input row's, once per call) comes off at the end. A masked load
    /// takes the tail (its weights 0 + 128, its inputs 0). The i32 lanes cannot overflow: the
    /// sum is at most 255 * 128 * k in magnitude. The sums are exact, so they equal the other
    /// levels' bit for bit.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn dots_vnni_m<const M: usize>(q: &[i8], qsum: &[i32], w: &[i8], sums: &mut [i32]) {
        let k = w.len();
        let mut acc = [_mm512_setzero_si512(); M];
        let flip = _mm512_set1_epi8(-128);
        let mut j = 0;
        while j < k {
            let m: __mmask64 = if k - j >= 64 {
                !0
            } else {
                (1u64 << (k - j)) - 1
            };
            prefetch(w.as_ptr().add(j).cast());
            let wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w.as_ptr().add(j)), flip);
            for r in 0..M {
                let xv = _mm512_maskz_loadu_epi8(m, q.as_ptr().add(r * k + j));
                acc[r] = _mm512_dpbusd_epi32(acc[r], wv, xv);
            }
            j += 64;
        }
        for r in 0..M {
            sums[r] = _mm512_reduce_add_epi32(acc[r]).wrapping_sub(qsum[r].wrapping_mul(128));
        }
    }

    /// [`dots_vnni_m`] for the input's rows (1..=8, `qsum` one sum each) and each weight row
    /// of `w` (rows of `k`), in one call: `sums[i * rows + r]`.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/DQ/VL and AVX512-VNNI; `q` holds `rows * k` values, `sums`
    /// `rows` for each weight row.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub unsafe fn dots_vnni(q: &[i8], qsum: &[i32], k: usize, w: &[i8], sums: &mut [i32]) {
        let rows = qsum.len();
        debug_assert!(q.len() >= rows * k && sums.len() >= rows * (w.len() / k));
        for (wr, s) in w.chunks_exact(k).zip(sums.chunks_exact_mut(rows)) {
            match rows {
                1 => dots_vnni_1(q, qsum[0], wr, s),
                2 => dots_vnni_m::<2>(q, qsum, wr, s),
                3 => dots_vnni_m::<3>(q, qsum, wr, s),
                4 => dots_vnni_m::<4>(q, qsum, wr, s),
                5 => dots_vnni_m::<5>(q, qsum, wr, s),
                6 => dots_vnni_m::<6>(q, qsum, wr, s),
                7 => dots_vnni_m::<7>(q, qsum, wr, s),
                _ => dots_vnni_m::<8>(q, qsum, wr, s),
            }
        }
    }

    /// `vpmaddubsw` multiplies unsigned bytes by signed ones into saturating i16 pairs: the
    /// weights go in as |w| and the inputs take their signs (`vpsignb`), so each pair is at most
    /// 2 * 127 * 127 and never saturates; `vpmaddwd` by ones widens the pairs to i32.
    #[target_feature(enable = "avx2")]
    unsafe fn dots_avx2_m<const M: usize>(q: &[i8], w: &[i8], sums: &mut [i32]) {
        let k = w.len();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); M];
        let mut j = 0;
        while j + 32 <= k {
            if j % 64 == 0 {
                prefetch(w.as_ptr().add(j).cast());
            }
            let wv = _mm256_loadu_si256(w.as_ptr().add(j).cast());
            let aw = _mm256_abs_epi8(wv);
            for r in 0..M {
                let xv = _mm256_loadu_si256(q.as_ptr().add(r * k + j).cast());
                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
                acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
            }
            j += 32;
        }
        for r in 0..M {
            let h = _mm_add_epi32(
                _mm256_castsi256_si128(acc[r]),
                _mm256_extracti128_si256::<1>(acc[r]),
            );
            let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01_00_11_10>(h));
            let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b10_11_00_01>(h));
            let mut s = _mm_cvtsi128_si32(h);
            for t in j..k {
                s += q[r * k + t] as i32 * w[t] as i32;
            }
            sums[r] = s;
        }
    }

    /// [`dots_avx2_m`] for `rows` (1..=8) input rows and each weight row of `w` (rows of
    /// `k`), in one call: `sums[i * rows + r]`.
    ///
    /// # Safety
    /// The CPU has AVX2; `q` holds `rows * k` values, `sums` `rows` for each weight row.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dots_avx2(q: &[i8], rows: usize, k: usize, w: &[i8], sums: &mut [i32]) {
        debug_assert!(q.len() >= rows * k && sums.len() >= rows * (w.len() / k));
        for (wr, s) in w.chunks_exact(k).zip(sums.chunks_exact_mut(rows)) {
            for_rows!(rows, dots_avx2_m(q, wr, s))
        }
    }
}
