//! The decoding step on the CPU in the project's own code: one pass per layer over plain
//! buffers (RMSNorm, the products, Qwen3's q/k norms, rope, the KV cache write, attention over
//! the cache, SiLU-gate, the router and experts of a mixture of experts, residuals), no libtorch
//! call inside the layer loop.
//!
//! Why: a decoding step of libtorch ops pays some 25 dispatches per layer (each a few
//! microseconds, on one thread while the products' pool waits) that the weight products do not
//! amortise. This path does the same arithmetic without them.
//!
//! What it computes is what the libtorch path computes in bf16: activations are bf16 values held
//! in f32, every operation is done in f32 and rounded to bf16 where libtorch's bf16 op rounds
//! its output (the norm's statistics and the attention's softmax in f32 as the reference and
//! ATen's CPU flash attention keep them; the probabilities rounded to bf16 before they weight
//! the values, as that kernel does, in blocks of 512 keys). The products are the same kernels
//! ([`gemv`]). Only the order of f32 additions inside reductions differs. It runs for bf16
//! activations on the CPU (bf16, int8 or 4-bit weights), up to [`gemv::MAX_ROWS`] rows, where the
//! products' kernels run; prefill, f32 and GPUs stay with libtorch.
use super::kv_cache::KvCache;
use super::{Attention, DecoderLayer, Ffn, Llm, Mask, Mlp, Qkv, SparseMoe};
use crate::model::gemv::{self, slice_of, to_f32_vec, Weight, WeightRef};
use crate::model::nn::{Linear, RmsNorm};
use std::cell::Cell;
use tch::{Device, Kind, Tensor};

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Turns this path off (the libtorch layer loop, with the same products) or on again, for the
/// calling thread: for comparisons.
pub fn set_enabled(on: bool) {
    ENABLED.with(|e| e.set(on));
}

/// The environment variable that turns the native step off (`INTERNVL_NATIVE=0`), so `bench`
/// can measure what it gains.
pub const NATIVE_ENV: &str = "INTERNVL_NATIVE";

fn env_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(NATIVE_ENV).map_or(true, |v| v != "0"))
}

/// Keys per block of the attention's online softmax, as ATen's CPU flash attention splits a
/// long key sequence (`kvSplitSize`).
const KV_BLOCK: usize = 512;

/// Rounds to the nearest bf16 (ties to even), as libtorch's bf16 ops round their results.
#[inline]
fn bf(x: f32) -> f32 {
    f32::from_bits((gemv::bf16_bits(x) as u32) << 16)
}

#[inline]
fn bits(x: f32) -> u16 {
    gemv::bf16_bits(x)
}

/// A linear layer as the kernels read it, with its bias in f32.
struct Lin<'a> {
    w: WeightRef<'a>,
    bias: Option<Vec<f32>>,
    out: usize,
}

impl<'a> Lin<'a> {
    fn of(l: &'a Linear) -> Self {
        Self {
            w: l.weight_ref().expect("checked by native_decodes"),
            bias: l.bias.as_ref().map(to_f32_vec),
            out: l.weight.size()[0] as usize,
        }
    }

    /// `x` [rows, in] (bf16 bits) -> [rows, out] (bf16 bits).
    fn run(&self, x: &[u16], rows: usize) -> Vec<u16> {
        let mut out = vec![0u16; rows * self.out];
        gemv::gemv(x, rows, &self.w, self.bias.as_deref(), &mut out);
        out
    }
}

/// Whether a linear layer's weights are ones the kernels read (bf16, int8 or 4-bit with bf16
/// scales, contiguous, on the CPU) and its bias is bf16.
fn kernel_reads(l: &Linear) -> bool {
    l.weight_ref().is_some()
        && l.bias
            .as_ref()
            .is_none_or(|b| b.kind() == Kind::BFloat16 && b.is_contiguous())
}

fn linears(layer: &DecoderLayer) -> Vec<&Linear> {
    let mut v = vec![
        match &layer.attn.qkv {
            Qkv::Stacked(l) | Qkv::Fused(l) => l,
        },
        &layer.attn.o,
    ];
    match &layer.mlp {
        Ffn::Dense(m) => v.extend([&m.gate_up, &m.down]),
        Ffn::Moe(moe) => {
            v.push(&moe.gate);
            for m in &moe.experts {
                v.extend([&m.gate_up, &m.down]);
            }
        }
    }
    v
}

impl Llm {
    /// Whether the native step decodes `rows` rows of this model: bf16 on the CPU, every layer
    /// there, weights the kernels read, the kernels available and the path not turned off.
    pub fn native_decodes(&self, rows: usize) -> bool {
        let norms_ok = |n: &RmsNorm| n.weight.kind() == Kind::BFloat16 && n.weight.is_contiguous();
        ENABLED.with(Cell::get)
            && env_enabled()
            && gemv::enabled_here()
            && (1..=gemv::MAX_ROWS).contains(&rows)
            && self.kind == Kind::BFloat16
            && self.embed_tokens.device() == Device::Cpu
            && norms_ok(&self.norm)
            && self.layers.iter().all(|l| {
                l.dev == Device::Cpu
                    && norms_ok(&l.input_norm)
                    && norms_ok(&l.post_attn_norm)
                    && l.attn
                        .qk_norm
                        .as_ref()
                        .is_none_or(|[q, k]| norms_ok(q) && norms_ok(k))
                    && linears(l).into_iter().all(kernel_reads)
            })
    }

    /// One decoding step of `embeds` [b, 1, hidden] at `positions` [b, 1] with rope base
    /// `base`, appending to `cache` (all rows in one cache, left-padded batches masked by
    /// `mask`); the final-normed hidden states [b, 1, hidden] (bf16), as [`Llm::forward`]
    /// returns them. Call where [`Llm::native_decodes`] holds.
    pub(super) fn native_step(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        cache: &mut KvCache,
        mask: &Mask,
        base: f64,
    ) -> Tensor {
        let b = embeds.size()[0] as usize;
        let (cos, sin) = self
            .rope
            .cos_sin(positions, base, Kind::BFloat16, Device::Cpu);
        let kv = cache.len() as usize + 1;
        // keys row r may attend to: all of them (one sequence) or the batch mask's
        let allowed: Option<Vec<bool>> = match mask {
            Mask::Causal => None,
            Mask::Explicit(m) => Some(
                Vec::try_from(
                    m.to_device(Device::Cpu)
                        .reshape([b as i64, kv as i64])
                        .flatten(0, -1),
                )
                .expect("an attention mask is boolean"),
            ),
        };
        // every layer's room for this step first: growing a buffer is the only libtorch work
        let slots: Vec<Vec<Slot>> = self
            .layers
            .iter()
            .zip(cache.layers.iter_mut())
            .map(|(l, lc)| {
                let (kvh, d) = (l.attn.num_kv_heads, l.attn.head_dim);
                let slot = lc.append_slot(b as i64, kvh, d, Kind::BFloat16);
                (0..b).map(|r| slot.row(r, (kvh * d) as usize)).collect()
            })
            .collect();
        self.native_layers(embeds, &cos, &sin, slots, allowed.as_deref())
    }

    /// One decoding step of `tokens`, each row with its own cache (the scheduler's rows, at
    /// different lengths), rope bases from each cache's state; final-normed hidden states
    /// [n, 1, hidden] (bf16). Call where [`Llm::native_decodes`] holds.
    pub(super) fn native_rows(&self, caches: &mut [&mut KvCache], tokens: &[i64]) -> Tensor {
        let n = tokens.len();
        let mut cos = Vec::with_capacity(n);
        let mut sin = Vec::with_capacity(n);
        for c in caches.iter_mut() {
            let p = c.len();
            // the reference's length for the dynamic base: the key length, which for one new
            // token is also `max(position_ids) + 1`
            let base = self.rope.base_for(&mut c.rope, p + 1);
            let pos = Tensor::from_slice(&[p]).view([1, 1]);
            let (c, s) = self.rope.cos_sin(&pos, base, Kind::BFloat16, Device::Cpu);
            cos.push(c);
            sin.push(s);
        }
        let (cos, sin) = (Tensor::cat(&cos, 0), Tensor::cat(&sin, 0));
        let slots: Vec<Vec<Slot>> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (kvh, d) = (l.attn.num_kv_heads, l.attn.head_dim);
                caches
                    .iter_mut()
                    .map(|c| c.layers[i].append_slot(1, kvh, d, Kind::BFloat16))
                    .collect()
            })
            .collect();
        let embeds = self.embed(&Tensor::from_slice(tokens).view([n as i64, 1]));
        self.native_layers(&embeds, &cos, &sin, slots, None)
    }

    /// The layers and the final norm for `embeds` [b, 1, hidden], each row's cos and sin
    /// ([b, .., dim]) and its cache slot in every layer (`slots[layer][row]`).
    fn native_layers(
        &self,
        embeds: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        slots: Vec<Vec<Slot>>,
        allowed: Option<&[bool]>,
    ) -> Tensor {
        let b = embeds.size()[0] as usize;
        let hidden = self.hidden as usize;
        let mut x = to_f32_vec(&embeds.to_kind(Kind::BFloat16).contiguous());
        let (cos, sin) = (to_f32_vec(&cos.contiguous()), to_f32_vec(&sin.contiguous()));
        for (layer, slots) in self.layers.iter().zip(slots) {
            let a = &layer.attn;
            let h = rms_norm(&x, &layer.input_norm, b);
            let o = attention(a, &h, b, &cos, &sin, &slots, allowed);
            let o = Lin::of(&a.o).run(&o, b);
            add_into(&mut x, &o);
            let h = rms_norm(&x, &layer.post_attn_norm, b);
            let y = match &layer.mlp {
                Ffn::Dense(m) => mlp(m, &h, b),
                Ffn::Moe(moe) => sparse_moe(moe, &h, b, hidden),
            };
            add_into(&mut x, &y);
        }
        let out = rms_norm(&x, &self.norm, b);
        let t = Tensor::empty([b as i64, 1, hidden as i64], (Kind::BFloat16, Device::Cpu));
        // SAFETY: a fresh contiguous bf16 tensor of b * hidden elements, written only here.
        unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u16, out.len()) }
            .copy_from_slice(&out);
        t
    }
}

/// `x += y` in bf16 (`xs += ...` on bf16 tensors).
fn add_into(x: &mut [f32], y: &[u16]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a = bf(*a + b.to_f32());
    }
}

/// [`RmsNorm::forward`] of each `dim`-sized row of `x` (bf16 values): the statistics in f32, the
/// normed values rounded to bf16, times the weight rounded again. bf16 bits out.
fn rms_norm(x: &[f32], n: &RmsNorm, rows: usize) -> Vec<u16> {
    let w = slice_of::<u16>(&n.weight);
    let dim = w.len();
    debug_assert_eq!(x.len(), rows * dim);
    let mut out = vec![0u16; x.len()];
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        norm_row(xr, w, n.eps, or);
    }
    out
}

fn norm_row(x: &[f32], w: &[u16], eps: f64, out: &mut [u16]) {
    // the mean of squares, as libtorch's f32 reduction gives it (to within its last bit)
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let var = (ss / x.len() as f64) as f32;
    let r = 1.0 / (var + eps as f32).sqrt();
    for ((o, &v), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = bits(wi.to_f32() * bf(v * r));
    }
}

/// Where this step's keys and values go in one layer's cache: its buffers [b, kv_heads, cap, d]
/// (or one row's part of them, see [`Slot::row`]) and the position written (the cache then
/// holds `len` positions).
#[derive(Clone, Copy)]
pub struct Slot {
    pub k: *mut u16,
    pub v: *mut u16,
    pub cap: usize,
    pub pos: usize,
    pub len: usize,
}

impl Slot {
    /// Row `r`'s part of a [b, kv_heads, cap, d] slot, `per_position` = kv_heads * d.
    fn row(&self, r: usize, per_position: usize) -> Slot {
        let at = r * per_position * self.cap;
        // SAFETY: r < b: the offset stays inside the buffers
        unsafe {
            Slot {
                k: self.k.add(at),
                v: self.v.add(at),
                ..*self
            }
        }
    }

    /// The keys and values of positions 0..len from element `base` of the buffers (one row's
    /// key-value head), `d` values each.
    fn cached(&self, base: usize, d: usize) -> (&[u16], &[u16]) {
        // SAFETY: positions 0..len of the buffers are written (earlier steps and this one, before
        // any reader starts) and nothing writes them while the borrow lasts.
        unsafe {
            (
                std::slice::from_raw_parts(self.k.add(base), self.len * d),
                std::slice::from_raw_parts(self.v.add(base), self.len * d),
            )
        }
    }
}

// SAFETY: a slot points into one layer's cache buffers, which the step owns (`&mut KvCache`)
// while it runs; its parallel tasks only read positions written before they start.
unsafe impl Sync for Slot {}
unsafe impl Send for Slot {}

/// The attention block up to (not including) the output projection: q, k, v of the normed
/// input `h` (bf16 bits, [b, hidden]), Qwen3's q/k norms, rope, the new key and value written
/// into the cache, attention of each query head over its key-value head's cached keys. bf16 bits
/// [b, heads * d], heads in order, as `o.transpose(1, 2).reshape(..)` lays them out.
fn attention(
    a: &Attention,
    h: &[u16],
    b: usize,
    cos: &[f32],
    sin: &[f32],
    slots: &[Slot],
    allowed: Option<&[bool]>,
) -> Vec<u16> {
    let (heads, kvh, d) = (
        a.num_heads as usize,
        a.num_kv_heads as usize,
        a.head_dim as usize,
    );
    let groups = heads / kvh;
    let (lin, fused) = match &a.qkv {
        Qkv::Stacked(l) => (l, false),
        Qkv::Fused(l) => (l, true),
    };
    let t = Lin::of(lin).run(h, b);
    let width = (heads + 2 * kvh) * d;
    // offsets of head `i`'s query, and of key-value head `g`'s key and value, within a row
    let q_at = |i: usize| {
        if fused {
            ((i / groups) * (groups + 2) + i % groups) * d
        } else {
            i * d
        }
    };
    let k_at = |g: usize| {
        if fused {
            (g * (groups + 2) + groups) * d
        } else {
            (heads + g) * d
        }
    };
    let v_at = |g: usize| k_at(g) + if fused { d } else { kvh * d };
    let norms = a.qk_norm.as_ref().map(|[q, k]| {
        (
            (slice_of::<u16>(&q.weight), q.eps),
            (slice_of::<u16>(&k.weight), k.eps),
        )
    });
    let mut q = vec![0f32; b * heads * d];
    let mut head = vec![0u16; d];
    for r in 0..b {
        let row = &t[r * width..(r + 1) * width];
        let (cr, sr) = (&cos[r * d..(r + 1) * d], &sin[r * d..(r + 1) * d]);
        // one head's values, q/k-normed when the model has the norms, rotated
        let mut prepare = |start: usize, norm: Option<(&[u16], f64)>, out: &mut [f32]| {
            let src = &row[start..start + d];
            match norm {
                Some((w, eps)) => {
                    let vals: Vec<f32> = src.iter().map(|&x| x.to_f32()).collect();
                    norm_row(&vals, w, eps, &mut head);
                }
                None => head.copy_from_slice(src),
            }
            rope_into(&head, cr, sr, out);
        };
        for i in 0..heads {
            let out = &mut q[(r * heads + i) * d..(r * heads + i + 1) * d];
            prepare(q_at(i), norms.map(|n| n.0), out);
        }
        let mut kr = vec![0f32; d];
        for g in 0..kvh {
            prepare(k_at(g), norms.map(|n| n.1), &mut kr);
            let slot = &slots[r];
            let at = (g * slot.cap + slot.pos) * d;
            // SAFETY: row r's slot holds [kvh, cap, d] bf16 values from its pointers and pos < cap;
            // this step alone writes position `pos`.
            unsafe {
                for (j, &kv) in kr.iter().enumerate() {
                    *slot.k.add(at + j) = bits(kv);
                }
                let vs = &row[v_at(g)..v_at(g) + d];
                std::ptr::copy_nonoverlapping(vs.as_ptr(), slot.v.add(at), d);
            }
        }
    }
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut out = vec![0u16; b * heads * d];
    let out_ptr = OutPtr(out.as_mut_ptr());
    // one task per row and key-value head: its query heads read its keys and values once
    gemv::for_each_task(b * kvh, |task| {
        let (r, g) = (task / kvh, task % kvh);
        let slot = &slots[r];
        let (ks, vs) = slot.cached(g * slot.cap * d, d);
        let keep = allowed.map(|m| &m[r * slot.len..(r + 1) * slot.len]);
        let first = r * heads + g * groups;
        let qs = &q[first * d..(first + groups) * d];
        let o = attend_group(qs, ks, vs, d, scale, keep);
        // SAFETY: each task writes its own query heads' outputs.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(first * d), groups * d) };
        for (x, y) in dst.iter_mut().zip(o) {
            *x = bits(y);
        }
    });
    out
}

struct OutPtr(*mut u16);
// SAFETY: the tasks write disjoint parts, and the scope ends before the buffer is read.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(&self) -> *mut u16 {
        self.0
    }
}

/// `q * cos + rotate_half(q) * sin` for one head (bf16 bits in), each product and the sum
/// rounded to bf16 as the libtorch ops round them.
fn rope_into(x: &[u16], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for j in 0..x.len() {
        let v = x[j].to_f32();
        let rot = if j < half {
            -x[j + half].to_f32()
        } else {
            x[j - half].to_f32()
        };
        out[j] = bf(bf(v * cos[j]) + bf(rot * sin[j]));
    }
}

/// The query heads `qs` ([groups, d], f32) of one key-value head over its cached keys and
/// values (bf16 bits, [len, d]): softmax(q k^T * scale) v with keys where `keep` is false left
/// out, as ATen's CPU flash attention computes it in bf16: scores and their running max and sum
/// in f32, per block of [`KV_BLOCK`] keys the probabilities rounded to bf16 before weighting the
/// values, the sums rescaled when the max grows, the output times the sum's reciprocal at the
/// end. f32 out [groups, d] (rounded by the caller).
fn attend_group(
    qs: &[f32],
    ks: &[u16],
    vs: &[u16],
    d: usize,
    scale: f32,
    keep: Option<&[bool]>,
) -> Vec<f32> {
    let groups = qs.len() / d;
    let len = ks.len() / d;
    let mut acc = vec![0f32; groups * d];
    let mut max = vec![f32::NEG_INFINITY; groups];
    let mut sum = vec![0f32; groups];
    let block = KV_BLOCK.min(len);
    let mut scores = vec![0f32; groups * block];
    let mut start = 0;
    while start < len {
        let end = (start + KV_BLOCK).min(len);
        let n = end - start;
        for j in 0..n {
            let kj = &ks[(start + j) * d..(start + j + 1) * d];
            let kept = keep.is_none_or(|m| m[start + j]);
            for g in 0..groups {
                scores[g * block + j] = if kept {
                    simd::dot(&qs[g * d..(g + 1) * d], kj) * scale
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        for g in 0..groups {
            let sc = &mut scores[g * block..g * block + n];
            let new_max = sc.iter().copied().fold(max[g], f32::max);
            if new_max == f32::NEG_INFINITY {
                // every key so far left out: nothing to weight yet
                sc.iter_mut().for_each(|p| *p = 0.0);
                continue;
            }
            let rescale = if max[g] == f32::NEG_INFINITY {
                0.0
            } else {
                (max[g] - new_max).exp()
            };
            let mut block_sum = 0f32;
            for p in sc.iter_mut() {
                let e = (*p - new_max).exp();
                block_sum += e;
                *p = bf(e);
            }
            if rescale != 1.0 {
                acc[g * d..(g + 1) * d]
                    .iter_mut()
                    .for_each(|a| *a *= rescale);
            }
            sum[g] = sum[g] * rescale + block_sum;
            max[g] = new_max;
        }
        for j in 0..n {
            let vj = &vs[(start + j) * d..(start + j + 1) * d];
            for g in 0..groups {
                let p = scores[g * block + j];
                if p != 0.0 {
                    simd::axpy(&mut acc[g * d..(g + 1) * d], p, vj);
                }
            }
        }
        start = end;
    }
    for g in 0..groups {
        let inv = 1.0 / sum[g];
        acc[g * d..(g + 1) * d].iter_mut().for_each(|a| *a *= inv);
    }
    acc
}

/// The attention's inner loops over bf16 keys and values, compiled for AVX2 + FMA where the CPU
/// has it (eight f32 lanes), portable otherwise; both sum in the same order.
mod simd {
    use crate::model::gemv::Weight;

    /// `q . k` with eight partial sums, combined pairwise at the end.
    #[inline(always)]
    fn dot_impl(q: &[f32], k: &[u16]) -> f32 {
        let mut part = [0f32; 8];
        let (qc, qr) = q.split_at(q.len() / 8 * 8);
        let (kc, kr) = k.split_at(qc.len());
        for (qq, kk) in qc.chunks_exact(8).zip(kc.chunks_exact(8)) {
            for l in 0..8 {
                part[l] += qq[l] * kk[l].to_f32();
            }
        }
        let mut s = ((part[0] + part[4]) + (part[1] + part[5]))
            + ((part[2] + part[6]) + (part[3] + part[7]));
        for (qq, kk) in qr.iter().zip(kr) {
            s += qq * kk.to_f32();
        }
        s
    }

    /// `acc += p * v`.
    #[inline(always)]
    fn axpy_impl(acc: &mut [f32], p: f32, v: &[u16]) {
        for (a, &x) in acc.iter_mut().zip(v) {
            *a += p * x.to_f32();
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(q: &[f32], k: &[u16]) -> f32 {
        dot_impl(q, k)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpy_avx2(acc: &mut [f32], p: f32, v: &[u16]) {
        axpy_impl(acc, p, v)
    }

    fn avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    pub fn dot(q: &[f32], k: &[u16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked above)
            return unsafe { dot_avx2(q, k) };
        }
        dot_impl(q, k)
    }

    pub fn axpy(acc: &mut [f32], p: f32, v: &[u16]) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked above)
            return unsafe { axpy_avx2(acc, p, v) };
        }
        axpy_impl(acc, p, v)
    }
}

/// Elements of the MLP's activation one task computes.
const ACT_PART: usize = 1024;

/// `down(silu(gate(h)) * up(h))` for `rows` rows (bf16 bits in and out), the activation and the
/// product each rounded to bf16.
fn mlp(m: &Mlp, h: &[u16], rows: usize) -> Vec<u16> {
    let inter = m.inter as usize;
    let t = Lin::of(&m.gate_up).run(h, rows);
    let mut act = vec![0u16; rows * inter];
    // spread over the products' threads in parts of ACT_PART (an `exp` per element: on one
    // thread this was ~4% of a 4-bit token with the other thread waiting)
    let parts = inter.div_ceil(ACT_PART);
    let out = OutPtr(act.as_mut_ptr());
    gemv::for_each_task(rows * parts, |task| {
        let (r, p) = (task / parts, task % parts);
        let row = &t[r * 2 * inter..(r + 1) * 2 * inter];
        let (lo, hi) = (p * ACT_PART, ((p + 1) * ACT_PART).min(inter));
        // SAFETY: each task writes its own elements lo..hi of row r.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(r * inter + lo), hi - lo) };
        for ((a, &g), &u) in dst
            .iter_mut()
            .zip(&row[lo..hi])
            .zip(&row[inter + lo..inter + hi])
        {
            let (g, u) = (g.to_f32(), u.to_f32());
            let silu = bf(g / (1.0 + (-g).exp()));
            *a = bits(silu * u);
        }
    });
    Lin::of(&m.down).run(&act, rows)
}

/// [`SparseMoe`] for each row: the router's softmax in f32 over its bf16 logits, the top-k
/// (renormalised when `norm_topk_prob`), the weights cast to bf16, each chosen expert's output
/// times its weight added in ascending expert order, rounding as the bf16 tensors do.
fn sparse_moe(moe: &SparseMoe, h: &[u16], rows: usize, hidden: usize) -> Vec<u16> {
    let logits = Lin::of(&moe.gate).run(h, rows);
    let n_exp = moe.experts.len();
    let mut out = vec![0u16; rows * hidden];
    for r in 0..rows {
        let l: Vec<f32> = logits[r * n_exp..(r + 1) * n_exp]
            .iter()
            .map(|&x| x.to_f32())
            .collect();
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = l.iter().map(|&x| (x - max).exp()).collect();
        let total = e.iter().map(|&v| v as f64).sum::<f64>() as f32;
        let p: Vec<f32> = e.iter().map(|&v| v / total).collect();
        // top-k by probability, the lower index first among equals (as topk's sorted output)
        let mut order: Vec<usize> = (0..n_exp).collect();
        order.sort_by(|&i, &j| p[j].total_cmp(&p[i]).then(i.cmp(&j)));
        let chosen = &order[..moe.top_k as usize];
        let picked: f32 = chosen.iter().map(|&i| p[i] as f64).sum::<f64>() as f32;
        let mut routed: Vec<(usize, f32)> = chosen
            .iter()
            .map(|&i| {
                let w = if moe.norm_topk_prob {
                    p[i] / picked
                } else {
                    p[i]
                };
                (i, bf(w))
            })
            .collect();
        routed.sort_by_key(|&(i, _)| i);
        let hr = &h[r * hidden..(r + 1) * hidden];
        let mut acc: Option<Vec<f32>> = None;
        for (e, w) in routed {
            let y = mlp(&moe.experts[e], hr, 1);
            let scaled: Vec<f32> = y.iter().map(|&v| bf(v.to_f32() * w)).collect();
            acc = Some(match acc {
                None => scaled,
                Some(a) => a.iter().zip(&scaled).map(|(x, y)| bf(x + y)).collect(),
            });
        }
        let acc = acc.expect("top_k >= 1 experts");
        for (o, v) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(acc) {
            *o = bits(v);
        }
    }
    out
}
