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
//! The quantized inputs are laid out for the packed weights, so that no kernel shuffles
//! weights: in blocks of 4 groups, the first 16 inputs of each of the 4 groups (which meet the
//! low nibbles of the groups' 64 packed bytes), then their last 16 (the high nibbles). Every
//! 16 bytes (4 i32 lanes of a sum) then belong to one group.
//!
//! Kernel levels differ only in the order of the f32 sum over groups.
use super::{round_small, Level, BLOCK_ROWS, MAX_ROWS, Q4_GROUP, Q4_GROUP_BYTES};

/// Groups in one block of the inputs' layout.
const BLOCK: usize = 4;
/// i32 / f32 lanes of one group in [`Q8Input::d`] and [`Q8Input::start`].
const LANES: usize = 4;

/// The input rows of one product, quantized in groups (see the module's doc).
pub struct Q8Input {
    rows: usize,
    groups: usize,
    /// Groups per row in the arrays below: `groups` rounded up to whole blocks, the extra ones
    /// zero.
    stride: usize,
    /// The int8 values [rows, stride * 32] in blocks (see the module's doc); a partial last
    /// group is padded with 0.
    q: Vec<i8>,
    /// Each group's scale, absmax / 127 (0 for a group of zeros), 4 times: [rows, stride, 4].
    d: Vec<f32>,
    /// `-8 * sum(q)` of each group in the first of its 4 lanes, 0 in the others:
    /// [rows, stride, 4]. Added to the integer sums of `q_w + 8` it leaves the exact sum of
    /// `q_w * q_x`.
    start: Vec<i32>,
}

/// Where input `j` (0..32) of group `g` of a row goes in the row's blocked layout.
fn position(g: usize, j: usize) -> usize {
    let half = j / Q4_GROUP_BYTES;
    (g / BLOCK) * BLOCK * Q4_GROUP
        + half * BLOCK * Q4_GROUP_BYTES
        + (g % BLOCK) * Q4_GROUP_BYTES
        + j % Q4_GROUP_BYTES
}

impl Q8Input {
    /// Quantizes `x` [rows, k] (bf16 bits).
    pub fn new(x: &[u16], rows: usize) -> Self {
        debug_assert!((1..=MAX_ROWS).contains(&rows) && x.len().is_multiple_of(rows));
        let k = x.len() / rows;
        let groups = k.div_ceil(Q4_GROUP);
        let stride = groups.next_multiple_of(BLOCK);
        let f = |v: u16| f32::from_bits((v as u32) << 16);
        let mut q = vec![0i8; rows * stride * Q4_GROUP];
        let mut d = vec![0f32; rows * stride * LANES];
        let mut start = vec![0i32; rows * stride * LANES];
        for (r, row) in x.chunks_exact(k).enumerate() {
            let qr = &mut q[r * stride * Q4_GROUP..(r + 1) * stride * Q4_GROUP];
            for (g, xs) in row.chunks(Q4_GROUP).enumerate() {
                let at = r * stride + g;
                // (a NaN wins, and poisons the group as it would any product)
                let absmax = xs.iter().map(|&v| f(v).abs()).fold(0f32, |m, a| {
                    if a > m || a.is_nan() {
                        a
                    } else {
                        m
                    }
                });
                if absmax == 0.0 || !absmax.is_finite() {
                    // zeros stay 0; a non-finite scale makes the group's products NaN
                    let dg = if absmax == 0.0 { 0.0 } else { f32::NAN };
                    d[at * LANES..(at + 1) * LANES].fill(dg);
                    continue;
                }
                let factor = 127.0 / absmax;
                let mut sum = 0i32;
                for (j, &v) in xs.iter().enumerate() {
                    let qv = round_small(f(v) * factor) as i8;
                    qr[position(g, j)] = qv;
                    sum += qv as i32;
                }
                d[at * LANES..(at + 1) * LANES].fill(absmax / 127.0);
                start[at * LANES] = -8 * sum;
            }
        }
        Q8Input {
            rows,
            groups,
            stride,
            q,
            d,
            start,
        }
    }

    /// The bf16 outputs of packed weight rows `lo..hi` of `w` (scales `scales`, `bias` [n])
    /// for every input row: `put(i, r, bits)` for weight row `i` and input row `r`.
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
        let (g, wb) = (self.groups, self.groups * Q4_GROUP_BYTES);
        // the dot products of a block of weight rows in one kernel call, then their outputs
        let mut dots = [0f32; BLOCK_ROWS * MAX_ROWS];
        let mut i0 = lo;
        while i0 < hi {
            let i1 = (i0 + BLOCK_ROWS).min(hi);
            let dots = &mut dots[..(i1 - i0) * self.rows];
            self.dots(level, &w[i0 * wb..i1 * wb], &scales[i0 * g..i1 * g], dots);
            for i in i0..i1 {
                let b = bias.map_or(0.0, |b| b[i]);
                for r in 0..self.rows {
                    let y = dots[(i - i0) * self.rows + r] + b;
                    put(i, r, super::bf16_bits(y));
                }
            }
            i0 = i1;
        }
    }

    /// `dots[i * rows + r]` for every input row `r` against each packed weight row `i` of `w`
    /// (its groups' bytes, whole rows) with `scales` (one bf16 scale per group), in one call.
    fn dots(&self, level: Level, w: &[u8], scales: &[u16], dots: &mut [f32]) {
        let nw = scales.len() / self.groups;
        debug_assert!(w.len() == nw * self.groups * Q4_GROUP_BYTES && dots.len() == nw * self.rows);
        #[cfg(target_arch = "x86_64")]
        {
            if matches!(level, Level::Avx512 | Level::Avx512Bf16) && super::int8::vnni() {
                // SAFETY: the CPU has AVX-512F/BW/DQ/VL and VNNI; the lengths were checked.
                unsafe { simd::dots_vnni(self, w, scales, dots) };
                return;
            }
            if level >= Level::Avx2 {
                // SAFETY: the CPU has AVX2 and FMA (the level is at most the detected one).
                unsafe { simd::dots_avx2(self, w, scales, dots) };
                return;
            }
        }
        let _ = level;
        let wb = self.groups * Q4_GROUP_BYTES;
        for ((w, scales), dots) in w
            .chunks_exact(wb)
            .zip(scales.chunks_exact(self.groups))
            .zip(dots.chunks_exact_mut(self.rows))
        {
            self.dots_portable(w, scales, dots);
        }
    }

    /// One weight row's `dots[r]`, portably.
    fn dots_portable(&self, w: &[u8], scales: &[u16], dots: &mut [f32]) {
        for (r, dot) in dots.iter_mut().enumerate().take(self.rows) {
            let qr = &self.q[r * self.stride * Q4_GROUP..];
            let mut acc = 0f32;
            for (g, (bytes, &s)) in w.chunks_exact(Q4_GROUP_BYTES).zip(scales).enumerate() {
                let at = r * self.stride + g;
                let mut sum = self.start[at * LANES];
                for (j, &b) in bytes.iter().enumerate() {
                    sum += (b & 0x0f) as i32 * qr[position(g, j)] as i32;
                    sum += (b >> 4) as i32 * qr[position(g, j + Q4_GROUP_BYTES)] as i32;
                }
                let sw = f32::from_bits((s as u32) << 16);
                acc += sum as f32 * (sw * self.d[at * LANES]);
            }
            *dot = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod simd {
    use super::{Q8Input, BLOCK, LANES};
    use crate::model::gemv::{Q4_GROUP, Q4_GROUP_BYTES};
    use std::arch::x86_64::*;

    /// Lanes `4i..4i+4` take group `i` of block `j` (0..4) among 16 groups' scales.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn spread(j: i32) -> __m512i {
        let g = 4 * j;
        _mm512_setr_epi32(
            g,
            g,
            g,
            g,
            g + 1,
            g + 1,
            g + 1,
            g + 1,
            g + 2,
            g + 2,
            g + 2,
            g + 2,
            g + 3,
            g + 3,
            g + 3,
            g + 3,
        )
    }

    /// Up to 16 bf16 scales from `p` (`m` says which) as f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn scales16(p: *const u16, m: __mmask16) -> __m512 {
        let s = _mm256_maskz_loadu_epi16(m, p.cast());
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(s)))
    }

    /// One block of 4 groups from group `g` (its 64 packed bytes `b`, the groups' scales `sv`
    /// spread over their 4 lanes each) into each input row's accumulator: the low nibbles
    /// (the groups' first 16 inputs) and the high ones (the last 16) each meet 64 bytes of
    /// the blocked inputs in one `vpdpbusd`, started from the inputs' `-8 * sum(q)` terms,
    /// which leaves 4 exact partial sums of each group, scaled by `scale_w * d` of their group.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn block<const M: usize>(
        x: &Q8Input,
        g: usize,
        b: __m512i,
        sv: __m512,
        acc: &mut [__m512; M],
    ) {
        let low = _mm512_set1_epi8(0x0f);
        let lo = _mm512_and_si512(b, low);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(b), low);
        for r in 0..M {
            let at = r * x.stride + g;
            let xp = x.q.as_ptr().add(at * Q4_GROUP);
            let init = _mm512_loadu_si512(x.start.as_ptr().add(at * LANES).cast());
            let sums = _mm512_dpbusd_epi32(init, lo, _mm512_loadu_si512(xp.cast()));
            let sums = _mm512_dpbusd_epi32(sums, hi, _mm512_loadu_si512(xp.add(64).cast()));
            let dv = _mm512_loadu_ps(x.d.as_ptr().add(at * LANES));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(sv, dv), acc[r]);
        }
    }

    /// One weight row (its groups' bytes `w`, their `scales`) against each input row: the
    /// 16 lanes of each row's f32 sum, blocks of 4 groups added in order into one accumulator
    /// per input row, the same order for every number of rows (so a row's dot product does not
    /// depend on the rows beside it). Scales load 16 groups at a time; only a partial last
    /// block's bytes and a last run of fewer than 16 scales load masked.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn row_sums<const M: usize>(x: &Q8Input, w: &[u8], scales: &[u16]) -> [__m512; M] {
        let groups = x.groups;
        let mut acc = [_mm512_setzero_ps(); M];
        let (wp, sp) = (w.as_ptr(), scales.as_ptr());
        let spreads = [spread(0), spread(1), spread(2), spread(3)];
        let blocks = groups.div_ceil(BLOCK);
        let whole = groups / BLOCK;
        let mut blk = 0;
        while blk < blocks {
            let g = blk * BLOCK;
            let left = groups - g;
            let m: __mmask16 = if left >= 16 {
                !0
            } else {
                ((1u32 << left) - 1) as __mmask16
            };
            let s16 = scales16(sp.add(g), m);
            for (j, spread) in spreads.iter().enumerate().take(blocks - blk) {
                let at = g + j * BLOCK;
                let b = if blk + j < whole {
                    _mm512_loadu_si512(wp.add(at * Q4_GROUP_BYTES).cast())
                } else {
                    let mb = (1u64 << ((groups - at) * Q4_GROUP_BYTES)) - 1;
                    _mm512_maskz_loadu_epi8(mb, wp.add(at * Q4_GROUP_BYTES).cast())
                };
                block::<M>(x, at, b, _mm512_permutexvar_ps(*spread, s16), &mut acc);
            }
            blk += 4;
        }
        acc
    }

    /// The lane sums of 4 vectors, `[sum(a), sum(b), sum(c), sum(d)]`, in one pass of shuffles
    /// (instead of a separate reduction of each).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], the same of c and d
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        // per 128-bit lane: a, b, c and d's partial sums
        let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
        let abcd = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
        );
        let half = _mm256_add_ps(
            _mm512_castps512_ps256(abcd),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(abcd))),
        );
        _mm_add_ps(
            _mm256_castps256_ps128(half),
            _mm256_extractf128_ps::<1>(half),
        )
    }

    /// [`row_sums`] for `M` input rows and each weight row of `w`, four weight rows' sums
    /// reduced together.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn dots_vnni_m<const M: usize>(x: &Q8Input, w: &[u8], scales: &[u16], dots: &mut [f32]) {
        let (g, wb) = (x.groups, x.groups * Q4_GROUP_BYTES);
        let nw = scales.len() / g;
        let mut i = 0;
        while i + 4 <= nw {
            // (row_sums called here, not from a closure such as array::from_fn's: a closure
            // would not inherit the target features, and the calls would not inline)
            let row = |k: usize| (&w[(i + k) * wb..][..wb], &scales[(i + k) * g..][..g]);
            let (w0, s0) = row(0);
            let (w1, s1) = row(1);
            let (w2, s2) = row(2);
            let (w3, s3) = row(3);
            let s = [
                row_sums::<M>(x, w0, s0),
                row_sums::<M>(x, w1, s1),
                row_sums::<M>(x, w2, s2),
                row_sums::<M>(x, w3, s3),
            ];
            for r in 0..M {
                let v: [f32; 4] = std::mem::transmute::<__m128, [f32; 4]>(reduce4(
                    s[0][r], s[1][r], s[2][r], s[3][r],
                ));
                for k in 0..4 {
                    dots[(i + k) * M + r] = v[k];
                }
            }
            i += 4;
        }
        while i < nw {
            let s = row_sums::<M>(x, &w[i * wb..][..wb], &scales[i * g..][..g]);
            // the same reduction with zeros beside it: a row's lanes add in the same order
            // whether or not it falls in a group of four
            let z = _mm512_setzero_ps();
            for r in 0..M {
                dots[i * M + r] = _mm_cvtss_f32(reduce4(s[r], z, z, z));
            }
            i += 1;
        }
    }

    /// [`dots_vnni_m`] for the input's rows (1..=8) and each weight row of `w`, in one call.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/DQ/VL and AVX512-VNNI; `w` and `scales` hold whole weight rows
    /// of the input's groups, `dots` the input's rows for each.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub unsafe fn dots_vnni(x: &Q8Input, w: &[u8], scales: &[u16], dots: &mut [f32]) {
        match x.rows {
            1 => dots_vnni_m::<1>(x, w, scales, dots),
            2 => dots_vnni_m::<2>(x, w, scales, dots),
            3 => dots_vnni_m::<3>(x, w, scales, dots),
            4 => dots_vnni_m::<4>(x, w, scales, dots),
            5 => dots_vnni_m::<5>(x, w, scales, dots),
            6 => dots_vnni_m::<6>(x, w, scales, dots),
            7 => dots_vnni_m::<7>(x, w, scales, dots),
            _ => dots_vnni_m::<8>(x, w, scales, dots),
        }
    }

    /// Two groups at a time on AVX2 (half a block: their 32 inputs of each nibble half are
    /// adjacent in the layout): `vpmaddubsw` (unsigned weights times signed inputs: at most
    /// 2 * 15 * 127, no saturation) on the low and the high nibbles, added, `vpmaddwd` by ones,
    /// plus the `-8 * sum(q)` terms: 4 partial sums of each group, scaled by `scale_w * d` into
    /// f32. An odd last group reads its own 16 bytes alone.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_avx2_m<const M: usize>(x: &Q8Input, w: &[u8], scales: &[u16], dots: &mut [f32]) {
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); M];
        let mut g = 0;
        while g < x.groups {
            let two = x.groups - g >= 2;
            let wp = w.as_ptr().add(g * Q4_GROUP_BYTES);
            let b = if two {
                _mm256_loadu_si256(wp.cast())
            } else {
                _mm256_castsi128_si256(_mm_loadu_si128(wp.cast()))
            };
            let lo = _mm256_and_si256(b, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(b), low);
            let s0 = f32::from_bits((scales[g] as u32) << 16);
            let s1 = if two {
                f32::from_bits((scales[g + 1] as u32) << 16)
            } else {
                0.0
            };
            let sv = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
            // where this pair sits in its block's halves
            let off = (g % BLOCK) * Q4_GROUP_BYTES;
            for r in 0..M {
                let at = r * x.stride + g;
                let bp =
                    x.q.as_ptr()
                        .add((r * x.stride + g / BLOCK * BLOCK) * Q4_GROUP);
                let xl = _mm256_loadu_si256(bp.add(off).cast());
                let xh = _mm256_loadu_si256(bp.add(BLOCK * Q4_GROUP_BYTES + off).cast());
                let pairs =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                let init = _mm256_loadu_si256(x.start.as_ptr().add(at * LANES).cast());
                let sums = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), init);
                let dv = _mm256_loadu_ps(x.d.as_ptr().add(at * LANES));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(sv, dv), acc[r]);
            }
            g += 2;
        }
        for r in 0..M {
            let v = acc[r];
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
            dots[r] = _mm_cvtss_f32(h);
        }
    }

    /// [`dots_avx2_m`] for the input's rows (1..=8) and each weight row of `w`, in one call.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `w` and `scales` hold whole weight rows of the input's
    /// groups, `dots` the input's rows for each.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_avx2(x: &Q8Input, w: &[u8], scales: &[u16], dots: &mut [f32]) {
        let wb = x.groups * Q4_GROUP_BYTES;
        for ((w, s), d) in w
            .chunks_exact(wb)
            .zip(scales.chunks_exact(x.groups))
            .zip(dots.chunks_exact_mut(x.rows))
        {
            match x.rows {
                1 => dots_avx2_m::<1>(x, w, s, d),
                2 => dots_avx2_m::<2>(x, w, s, d),
                3 => dots_avx2_m::<3>(x, w, s, d),
                4 => dots_avx2_m::<4>(x, w, s, d),
                5 => dots_avx2_m::<5>(x, w, s, d),
                6 => dots_avx2_m::<6>(x, w, s, d),
                7 => dots_avx2_m::<7>(x, w, s, d),
                _ => dots_avx2_m::<8>(x, w, s, d),
            }
        }
    }
}
