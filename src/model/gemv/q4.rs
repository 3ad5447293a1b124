//! `--load-4bit` products in integers, as llama.cpp's Q4_0 weights meet its Q8_0 inputs: each
//! input row is quantized in groups of [`Q4_GROUP`] (the weights' groups) to int8, with the
//! group's largest magnitude / 127 as its scale `d` and `round(x * (127 / absmax))` (ties to
//! even) as the values. A weight row's dot product is then, over its groups,
//! `scale_w * d * sum(q_w * q_x)`, the inner sums exact in integers and the outer sum in f32.
//!
//! The weights are stored as `q_w + 8` (0..=15, see [`Q4_GROUP`]): unsigned bytes, which is what
//! VNNI's `vpdpbusd` (unsigned times signed) and AVX2's `vpmaddubsw` want; the `+ 8` comes off as
//! `-8 * sum(q_x)` per group, a term of the inputs alone (computed once per call) that starts
//! each group's integer sum.
//!
//! The kernels read the weights in [`Q4_TILE`]'s tiles: a vector lane per weight row, each
//! 4-byte chunk of a group meeting its 4 inputs broadcast to every lane. Every row's sum is, on
//! every kernel level and whatever the rows beside it, `acc = fma(sum_g as f32, scale_w * d,
//! acc)` over its groups in order from 0: the levels give the same bits, and a batch row the
//! bits it gets alone.
use super::{
    q4_chunk_at, q4_scale_at, round_small, Level, BLOCK_ROWS, MAX_ROWS, Q4_GROUP, Q4_TILE,
};

/// The input rows of one product, quantized in groups (see the module's doc).
pub struct Q8Input {
    rows: usize,
    groups: usize,
    /// The int8 values [rows, groups * 32] in input order; a partial last group is padded
    /// with 0.
    q: Vec<i8>,
    /// Each group's scale, absmax / 127 (0 for a group of zeros): [rows, groups].
    d: Vec<f32>,
    /// `-8 * sum(q)` of each group: [rows, groups]. Added to the integer sums of `q_w + 8` it
    /// leaves the exact sum of `q_w * q_x`.
    start: Vec<i32>,
}

impl Q8Input {
    /// Quantizes `x` [rows, k] (bf16 bits).
    pub fn new(x: &[u16], rows: usize) -> Self {
        debug_assert!((1..=MAX_ROWS).contains(&rows) && x.len().is_multiple_of(rows));
        let k = x.len() / rows;
        let groups = k.div_ceil(Q4_GROUP);
        let f = |v: u16| f32::from_bits((v as u32) << 16);
        let mut q = vec![0i8; rows * groups * Q4_GROUP];
        let mut d = vec![0f32; rows * groups];
        let mut start = vec![0i32; rows * groups];
        for (r, row) in x.chunks_exact(k).enumerate() {
            for (g, xs) in row.chunks(Q4_GROUP).enumerate() {
                let at = r * groups + g;
                // the largest magnitude as the largest bf16 bit pattern without the sign (the
                // patterns of non-negative values are ordered as the values, and a NaN's lie
                // above infinity's: a NaN wins, and poisons the group as it would any product);
                // an integer max, which vectorises
                let absmax = f(xs.iter().map(|&v| v & 0x7fff).max().unwrap_or(0));
                if absmax == 0.0 || !absmax.is_finite() {
                    // zeros stay 0; a non-finite scale makes the group's products NaN
                    d[at] = if absmax == 0.0 { 0.0 } else { f32::NAN };
                    continue;
                }
                let factor = 127.0 / absmax;
                let qg = &mut q[at * Q4_GROUP..at * Q4_GROUP + xs.len()];
                let mut sum = 0i32;
                for (qv, &v) in qg.iter_mut().zip(xs) {
                    *qv = round_small(f(v) * factor) as i8;
                    sum += *qv as i32;
                }
                d[at] = absmax / 127.0;
                start[at] = -8 * sum;
            }
        }
        Q8Input {
            rows,
            groups,
            q,
            d,
            start,
        }
    }

    /// The bf16 outputs of packed weight rows `lo..hi` of `w` (scales `scales`, `bias` [n])
    /// for every input row: `put(i, r, bits)` for weight row `i` and input row `r`. `lo` is a
    /// multiple of [`Q4_TILE`], and so is `hi` unless it is `n`.
    #[allow(clippy::too_many_arguments)]
    pub fn outputs(
        &self,
        level: Level,
        w: &[u8],
        scales: &[u16],
        bias: Option<&[f32]>,
        lo: usize,
        hi: usize,
        mut put: impl FnMut(usize, usize, u16),
    ) {
        debug_assert!(lo.is_multiple_of(Q4_TILE));
        let (g, wb) = (self.groups, self.groups * super::Q4_GROUP_BYTES);
        // the dot products of a block of weight rows in one kernel call, then their outputs
        let mut dots = [0f32; BLOCK_ROWS * MAX_ROWS];
        let mut i0 = lo;
        while i0 < hi {
            let i1 = (i0 + BLOCK_ROWS).min(hi);
            let dots = &mut dots[..(i1 - i0) * self.rows];
            // whole tiles from i0 on, and the plain rows after the last tile at the end
            self.dots(level, &w[i0 * wb..i1 * wb], &scales[i0 * g..i1 * g], dots);
            // an input row at a time: its sums gathered, rounded in a loop that vectorises,
            // then handed out (a weight row at a time, rounding each output as it went, this
            // took 5% of a 4-bit token)
            let n = i1 - i0;
            let zeros = [0f32; BLOCK_ROWS];
            let b = bias.map_or(&zeros[..n], |b| &b[i0..i1]);
            let (mut sums, mut ys) = ([0f32; BLOCK_ROWS], [0u16; BLOCK_ROWS]);
            for r in 0..self.rows {
                for (s, &d) in sums.iter_mut().zip(dots.iter().skip(r).step_by(self.rows)) {
                    *s = d;
                }
                for ((y, &s), &b) in ys[..n].iter_mut().zip(&sums[..n]).zip(b) {
                    *y = super::bf16_bits(s + b);
                }
                for (i, &y) in (i0..i1).zip(&ys[..n]) {
                    put(i, r, y);
                }
            }
            i0 = i1;
        }
    }

    /// `dots[i * rows + r]` for every input row `r` against each packed weight row `i` of `w`
    /// (whole rows in [`Q4_TILE`]'s tiles, then any plain rows) with `scales`, in one call.
    fn dots(&self, level: Level, w: &[u8], scales: &[u16], dots: &mut [f32]) {
        let nw = scales.len() / self.groups;
        debug_assert!(
            w.len() == nw * self.groups * super::Q4_GROUP_BYTES && dots.len() == nw * self.rows
        );
        let tiled = nw / Q4_TILE * Q4_TILE;
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        {
            if matches!(level, Level::Avx512 | Level::Avx512Bf16) && super::int8::vnni() {
                // SAFETY: the CPU has AVX-512F/BW/DQ/VL and VNNI; the lengths were checked.
                unsafe { simd::tiles_vnni(self, w, scales, tiled, dots) };
                done = tiled;
            } else if level >= Level::Avx2 {
                // SAFETY: the CPU has AVX2 and FMA (the level is at most the detected one).
                unsafe { simd::tiles_avx2(self, w, scales, tiled, dots) };
                done = tiled;
            }
        }
        let _ = level;
        for i in done..nw {
            for r in 0..self.rows {
                dots[i * self.rows + r] = self.dot_portable(w, scales, nw, i, r);
            }
        }
    }

    /// Weight row `i` of the `nw` rows in `w` against input row `r`, portably: the kernels'
    /// arithmetic in the kernels' order.
    fn dot_portable(&self, w: &[u8], scales: &[u16], nw: usize, i: usize, r: usize) -> f32 {
        let mut acc = 0f32;
        for g in 0..self.groups {
            let at = r * self.groups + g;
            let xs = &self.q[at * Q4_GROUP..(at + 1) * Q4_GROUP];
            let mut sum = self.start[at];
            for c in 0..4 {
                let b = &w[q4_chunk_at(nw, self.groups, i, g, c)..][..4];
                for (j, &b) in b.iter().enumerate() {
                    sum += (b & 0x0f) as i32 * xs[4 * c + j] as i32;
                    sum += (b >> 4) as i32 * xs[16 + 4 * c + j] as i32;
                }
            }
            let s = scales[q4_scale_at(nw, self.groups, i, g)];
            let sw = f32::from_bits((s as u32) << 16);
            acc = (sum as f32).mul_add(sw * self.d[at], acc);
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod simd {
    use super::Q8Input;
    use crate::model::gemv::{prefetch, Q4_GROUP, Q4_GROUP_BYTES, Q4_TILE};
    use std::arch::x86_64::*;

    /// Input row `r`'s 4 int8 values from `j` of group `g`, broadcast as one i32.
    #[inline(always)]
    unsafe fn inputs4(x: &Q8Input, r: usize, g: usize, j: usize) -> i32 {
        x.q.as_ptr()
            .add((r * x.groups + g) * Q4_GROUP + j)
            .cast::<i32>()
            .read_unaligned()
    }

    /// `T` tiles from tile `t0` of `w` against `M` input rows: each lane's f32 sum (a weight
    /// row's), group after group (see the module's doc).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn tiles_vnni_tm<const T: usize, const M: usize>(
        x: &Q8Input,
        w: &[u8],
        scales: &[u16],
        t0: usize,
    ) -> [[__m512; M]; T] {
        let groups = x.groups;
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [[_mm512_setzero_ps(); M]; T];
        for g in 0..groups {
            let mut sw = [_mm512_setzero_ps(); T];
            let mut sums = [[_mm512_setzero_si512(); M]; T];
            for t in 0..T {
                let s = _mm256_loadu_si256(
                    scales
                        .as_ptr()
                        .add(((t0 + t) * groups + g) * Q4_TILE)
                        .cast(),
                );
                sw[t] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(s)));
                for r in 0..M {
                    sums[t][r] = _mm512_set1_epi32(x.start[r * groups + g]);
                }
            }
            for c in 0..4 {
                for t in 0..T {
                    let at = (((t0 + t) * groups + g) * 4 + c) * Q4_TILE * 4;
                    prefetch(w.as_ptr().add(at));
                    let b = _mm512_loadu_si512(w.as_ptr().add(at).cast());
                    let lo = _mm512_and_si512(b, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(b), low);
                    for r in 0..M {
                        let xl = _mm512_set1_epi32(inputs4(x, r, g, 4 * c));
                        let xh = _mm512_set1_epi32(inputs4(x, r, g, Q4_GROUP_BYTES + 4 * c));
                        sums[t][r] = _mm512_dpbusd_epi32(sums[t][r], lo, xl);
                        sums[t][r] = _mm512_dpbusd_epi32(sums[t][r], hi, xh);
                    }
                }
            }
            for r in 0..M {
                let d = _mm512_set1_ps(x.d[r * groups + g]);
                for t in 0..T {
                    let scale = _mm512_mul_ps(sw[t], d);
                    acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[t][r]), scale, acc[t][r]);
                }
            }
        }
        acc
    }

    /// [`tiles_vnni_tm`] over the first `tiled` rows of `w` (whole tiles) into `dots`, several
    /// tiles at a time where their sums fit in registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn tiles_vnni_m<const M: usize>(
        x: &Q8Input,
        w: &[u8],
        scales: &[u16],
        tiled: usize,
        dots: &mut [f32],
    ) {
        let tiles = tiled / Q4_TILE;
        let store = |t: usize, acc: &[__m512; M], dots: &mut [f32]| {
            for r in 0..M {
                let v: [f32; Q4_TILE] = std::mem::transmute::<__m512, [f32; Q4_TILE]>(acc[r]);
                for (lane, y) in v.iter().enumerate() {
                    dots[(t * Q4_TILE + lane) * M + r] = *y;
                }
            }
        };
        let mut t = 0;
        if M <= 2 {
            while t + 4 <= tiles {
                let acc = tiles_vnni_tm::<4, M>(x, w, scales, t);
                for (j, a) in acc.iter().enumerate() {
                    store(t + j, a, dots);
                }
                t += 4;
            }
        }
        while t < tiles {
            let [acc] = tiles_vnni_tm::<1, M>(x, w, scales, t);
            store(t, &acc, dots);
            t += 1;
        }
    }

    /// The first `tiled` rows of `w` (whole [`Q4_TILE`] tiles) against each input row (1..=8):
    /// `dots[i * rows + r]`.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/DQ/VL and AVX512-VNNI; `w` and `scales` hold `tiled` whole rows
    /// of the input's groups or more, `dots` the input's rows for each.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub unsafe fn tiles_vnni(
        x: &Q8Input,
        w: &[u8],
        scales: &[u16],
        tiled: usize,
        dots: &mut [f32],
    ) {
        for_rows!(x.rows, tiles_vnni_m(x, w, scales, tiled, dots))
    }

    /// Half `h` (8 rows) of tile `t` against `M` input rows on AVX2: per chunk, `vpmaddubsw`
    /// (unsigned weights times signed inputs: at most 2 * 15 * 127 a pair, no saturation) on
    /// the low and the high nibbles, added in i16 over the group's 4 chunks (at most
    /// 8 * 15 * 127 * 2 = 30,480), then `vpmaddwd` by ones into the lanes' i32 sums: the
    /// integers VNNI gets, the same f32 steps after.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn half_avx2_m<const M: usize>(
        x: &Q8Input,
        w: &[u8],
        scales: &[u16],
        t: usize,
        h: usize,
    ) -> [__m256; M] {
        let groups = x.groups;
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); M];
        for g in 0..groups {
            let s = _mm_loadu_si128(
                scales
                    .as_ptr()
                    .add((t * groups + g) * Q4_TILE + 8 * h)
                    .cast(),
            );
            let sw = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(s)));
            let mut pairs = [_mm256_setzero_si256(); M];
            for c in 0..4 {
                let at = ((t * groups + g) * 4 + c) * Q4_TILE * 4 + 32 * h;
                if h == 0 {
                    prefetch(w.as_ptr().add(at));
                }
                let b = _mm256_loadu_si256(w.as_ptr().add(at).cast());
                let lo = _mm256_and_si256(b, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(b), low);
                for r in 0..M {
                    let xl = _mm256_set1_epi32(inputs4(x, r, g, 4 * c));
                    let xh = _mm256_set1_epi32(inputs4(x, r, g, Q4_GROUP_BYTES + 4 * c));
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, xl),
                        _mm256_maddubs_epi16(hi, xh),
                    );
                    pairs[r] = _mm256_add_epi16(pairs[r], p);
                }
            }
            for r in 0..M {
                let start = _mm256_set1_epi32(x.start[r * groups + g]);
                let sums = _mm256_add_epi32(_mm256_madd_epi16(pairs[r], ones), start);
                let scale = _mm256_mul_ps(sw, _mm256_set1_ps(x.d[r * groups + g]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
            }
        }
        acc
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tiles_avx2_m<const M: usize>(
        x: &Q8Input,
        w: &[u8],
        scales: &[u16],
        tiled: usize,
        dots: &mut [f32],
    ) {
        for t in 0..tiled / Q4_TILE {
            for h in 0..2 {
                let acc = half_avx2_m::<M>(x, w, scales, t, h);
                for r in 0..M {
                    let v: [f32; 8] = std::mem::transmute::<__m256, [f32; 8]>(acc[r]);
                    for (lane, y) in v.iter().enumerate() {
                        dots[(t * Q4_TILE + 8 * h + lane) * M + r] = *y;
                    }
                }
            }
        }
    }

    /// [`tiles_vnni`] on AVX2 + FMA, with the same results.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the lengths are as [`tiles_vnni`] needs them.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tiles_avx2(
        x: &Q8Input,
        w: &[u8],
        scales: &[u16],
        tiled: usize,
        dots: &mut [f32],
    ) {
        for_rows!(x.rows, tiles_avx2_m(x, w, scales, tiled, dots))
    }
}
