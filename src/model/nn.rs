//! The few PyTorch modules the models are built from, holding plain tensors.
use super::gemv::{slice_of, Q4_GROUP, Q4_GROUP_BYTES, Q4_TILE};
use super::weights::Weights;
use tch::{Device, Kind, Tensor};

/// How the linear layers loaded at a [`Place`] keep their weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quant {
    /// In the model's dtype.
    #[default]
    None,
    /// int8 with one scale per output channel (`--load-8bit`).
    Int8,
    /// 4-bit with one scale per group of [`super::gemv::Q4_GROUP`] inputs (`--load-4bit`).
    Q4,
}

/// Where and in which dtype a module's weights go.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub dev: Device,
    pub kind: Kind,
    /// How linear layers loaded here keep their weights.
    pub quant: Quant,
    /// Dense CPU weights of linear layers loaded here are copied out of the checkpoint's
    /// memory map ([`Weights::own`]): the decoder's, which every decoding step streams. The
    /// vision model's stay mapped, so that their pages can be given back after each image.
    pub owned: bool,
}

impl Place {
    pub fn new(dev: Device, kind: Kind) -> Self {
        Self {
            dev,
            kind,
            quant: Quant::None,
            owned: false,
        }
    }

    pub fn get(&self, w: &mut Weights, name: &str, shape: &[i64]) -> Tensor {
        w.get(name, shape, self.kind, self.dev)
    }
}

/// `nn.Linear`: `weight` [out, in], optional `bias` [out].
///
/// With `scale` set the weight is int8 (symmetric, one scale per output channel, in the
/// activations' dtype): small batches of bf16 rows (decoding) on CPU multiply int8-quantized
/// inputs in integers (gemv's LLM.int8(), `gemv/int8.rs`); a few f16/f32 rows run ATen's int8
/// weight-only kernel; larger ones (prefill) and CUDA dequantize the weight on the fly and use
/// the dense GEMM, which is faster there.
///
/// With `scale` set and a uint8 `weight` [out, groups * 16] the weight is 4-bit (`--load-4bit`):
/// symmetric, one bf16 scale per group of 32 inputs (`scale` [out, groups]; layout at
/// [`super::gemv::Q4_GROUP`]). Decoding on the CPU in bf16 runs gemv's 4-bit kernels (inputs
/// quantized per group, `gemv/q4.rs`); anything
/// else (prefill, f16/f32, CUDA) dequantizes the weight and uses the dense GEMM.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub scale: Option<Tensor>,
    /// Input features (a 4-bit weight's packed rows do not tell them: their last group is
    /// padded).
    in_features: i64,
}

/// Rows up to which the int8 kernel beats dequantize + dense GEMM on CPU (measured on bf16).
const INT8_KERNEL_MAX_ROWS: i64 = 8;

/// Rows up to which gemv's 4-bit kernel, 8 rows at a time, beats dequantizing the weight to
/// bf16 and libtorch's GEMM (`examples/q4_prefill.rs`, 2 threads, the 1B decoder's 4864x896 and
/// 896x4864: at 9 and 16 rows the kernel took 0.2x to 0.9x the time, at 64 rows 0.7x to 1.8x,
/// at 311 rows 2x to 8x).
const Q4_KERNEL_MAX_ROWS: i64 = 32;

impl Linear {
    /// The weight is packed 4-bit.
    pub fn is_q4(&self) -> bool {
        self.scale.is_some() && self.weight.kind() == Kind::Uint8
    }

    /// The weight as gemv reads it, where it is on the CPU in the layouts gemv takes (bf16,
    /// int8 with bf16 scales, 4-bit): for callers of [`super::gemv::gemv`] with bf16
    /// activations (the decoding step). `None` elsewhere (use [`Linear::forward`]).
    pub fn weight_ref(&self) -> Option<super::gemv::WeightRef<'_>> {
        use super::gemv::WeightRef;
        let cpu = |t: &Tensor| t.device() == Device::Cpu && t.is_contiguous();
        match (&self.scale, self.weight.kind()) {
            _ if !cpu(&self.weight) => None,
            (None, Kind::BFloat16) => Some(WeightRef::Bf16(slice_of(&self.weight))),
            (Some(s), k) if cpu(s) && s.kind() == Kind::BFloat16 => match k {
                Kind::Int8 => Some(WeightRef::Int8(slice_of(&self.weight), slice_of(s))),
                Kind::Uint8 => Some(WeightRef::Q4(slice_of(&self.weight), slice_of(s))),
                _ => None,
            },
            _ => None,
        }
    }

    /// Input features.
    pub fn in_features(&self) -> i64 {
        self.in_features
    }

    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        let in_features = weight.size()[1];
        Self {
            weight,
            bias,
            scale: None,
            in_features,
        }
    }

    /// An int8 weight [out, in] with its per-row scales [out] (see [`quantize_rows`]).
    pub fn int8(weight: Tensor, scale: Tensor, bias: Option<Tensor>) -> Self {
        let in_features = weight.size()[1];
        Self {
            weight,
            bias,
            scale: Some(scale),
            in_features,
        }
    }

    /// A packed 4-bit weight [out, groups * 16] of `in_features` inputs with its scales
    /// [out, groups] (see [`quantize_q4`]).
    pub fn q4(weight: Tensor, scale: Tensor, bias: Option<Tensor>, in_features: i64) -> Self {
        let groups = (in_features as usize).div_ceil(Q4_GROUP) as i64;
        assert_eq!(weight.size()[1], groups * Q4_GROUP_BYTES as i64);
        assert_eq!(scale.size()[1], groups);
        Self {
            weight,
            bias,
            scale: Some(scale),
            in_features,
        }
    }

    pub fn load(w: &mut Weights, p: Place, prefix: &str, din: i64, dout: i64, bias: bool) -> Self {
        Self::load_stacked(w, p, &[(prefix, dout)], din, bias)
    }

    /// Several `nn.Linear`s that read the same input, stacked into one whose output is theirs
    /// concatenated in order (`parts`: prefix and output size). One GEMM instead of several; each
    /// output row is computed exactly as before (the same dot product), so results are
    /// bit-identical, and int8 scales are per row anyway.
    pub fn load_stacked(
        w: &mut Weights,
        p: Place,
        parts: &[(&str, i64)],
        din: i64,
        bias: bool,
    ) -> Self {
        let cat = |ts: Vec<Tensor>| match ts.len() {
            1 => ts.into_iter().next().expect("one part"),
            _ => Tensor::cat(&ts, 0),
        };
        let bias = bias.then(|| {
            cat(parts
                .iter()
                .map(|(prefix, dout)| p.get(w, &format!("{prefix}.bias"), &[*dout]))
                .collect())
        });
        let names: Vec<String> = parts
            .iter()
            .map(|(pre, _)| format!("{pre}.weight"))
            .collect();
        if p.quant == Quant::None {
            let weight = cat(names
                .iter()
                .zip(parts)
                .map(|(name, (_, dout))| p.get(w, name, &[*dout, din]))
                .collect());
            if parts.len() > 1 {
                // the parts were copied into `weight`: their mapped pages are no longer needed
                names.iter().for_each(|n| w.release(n));
            }
            let weight = if p.owned { w.own(weight) } else { weight };
            return Self::dense(weight, bias);
        }
        // each part quantized straight into its rows of the stacked weight
        let total: i64 = parts.iter().map(|(_, dout)| dout).sum();
        let groups = (din as usize).div_ceil(Q4_GROUP) as i64;
        let (q, scale) = match p.quant {
            Quant::Q4 => (
                Tensor::empty(
                    [total, groups * Q4_GROUP_BYTES as i64],
                    (Kind::Uint8, Device::Cpu),
                ),
                // bf16 whatever the dtype: a 4-bit value times a bf16 scale is exact in f32
                Tensor::empty([total, groups], (Kind::BFloat16, Device::Cpu)),
            ),
            _ => (
                Tensor::empty([total, din], (Kind::Int8, Device::Cpu)),
                Tensor::empty([total], (p.kind, Device::Cpu)),
            ),
        };
        let mut start = 0;
        for (name, (_, dout)) in names.iter().zip(parts) {
            let stored = w.get_stored(name, &[*dout, din]);
            let (q, scale) = (q.narrow(0, start, *dout), scale.narrow(0, start, *dout));
            match p.quant {
                // plain rows: the tiles span the parts (see below)
                Quant::Q4 => quantize_blocks(&stored, &q, &scale, quantize_q4_plain),
                _ => quantize_rows_into(&stored, &q, &scale),
            }
            w.release(name);
            start += dout;
        }
        if p.quant == Quant::Q4 {
            tile_q4(&q, &scale);
        }
        let (q, scale) = (q.to_device(p.dev), scale.to_device(p.dev));
        match p.quant {
            Quant::Q4 => Self::q4(q, scale, bias, din),
            _ => Self::int8(q, scale, bias),
        }
    }

    /// A quantized copy of `weight` [out, in] (e.g. tied embeddings serving as the output
    /// head), in `p.quant`'s format on `p.dev`, without a bias.
    pub fn quantized(weight: &Tensor, p: Place) -> Self {
        let (out, din) = weight.size2().expect("a linear weight is 2-d");
        match p.quant {
            Quant::None => Self::dense(weight.to_device(p.dev), None),
            Quant::Int8 => {
                let q = Tensor::empty([out, din], (Kind::Int8, Device::Cpu));
                let scale = Tensor::empty([out], (p.kind, Device::Cpu));
                quantize_rows_into(weight, &q, &scale);
                Self::int8(q.to_device(p.dev), scale.to_device(p.dev), None)
            }
            Quant::Q4 => {
                let groups = (din as usize).div_ceil(Q4_GROUP) as i64;
                let q = Tensor::empty(
                    [out, groups * Q4_GROUP_BYTES as i64],
                    (Kind::Uint8, Device::Cpu),
                );
                let scale = Tensor::empty([out, groups], (Kind::BFloat16, Device::Cpu));
                quantize_q4_into(weight, &q, &scale);
                Self::q4(q.to_device(p.dev), scale.to_device(p.dev), None, din)
            }
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if super::gemv::applies(xs, &self.weight) {
            return super::gemv::linear(xs, &self.weight, self.scale.as_ref(), self.bias.as_ref());
        }
        let Some(scale) = &self.scale else {
            return xs.linear(&self.weight, self.bias.as_ref());
        };
        if self.is_q4() {
            let k = self.in_features;
            let rows = xs.numel() as i64 / k.max(1);
            let kernel = super::gemv::MAX_ROWS as i64;
            if rows <= Q4_KERNEL_MAX_ROWS && super::gemv::takes(xs, &self.weight) {
                // a few prefill rows: the kernel, 8 rows at a time, beats dequantizing
                let flat = xs.reshape([rows, k]);
                let parts: Vec<Tensor> = (0..rows)
                    .step_by(kernel as usize)
                    .map(|r| {
                        super::gemv::linear(
                            &flat.narrow(0, r, kernel.min(rows - r)),
                            &self.weight,
                            self.scale.as_ref(),
                            self.bias.as_ref(),
                        )
                    })
                    .collect();
                let mut shape = xs.size();
                *shape.last_mut().expect("linear input has a last dim") = self.weight.size()[0];
                return Tensor::cat(&parts, 0).view(shape.as_slice());
            }
            return xs.linear(&self.dense_weight_as(xs.kind()), self.bias.as_ref());
        }
        let din = self.weight.size()[1];
        let rows = xs.numel() as i64 / din;
        // libtorch's int8 kernel silently computes garbage unless the inner size is a multiple of 64
        let y = if rows <= INT8_KERNEL_MAX_ROWS && xs.device() == Device::Cpu && din % 64 == 0 {
            let mut shape = xs.size();
            *shape.last_mut().expect("linear input has a last dim") = self.weight.size()[0];
            xs.reshape([rows, din])
                .contiguous()
                .internal_weight_int8pack_mm(&self.weight, scale)
                .view(shape.as_slice())
        } else {
            let w = self.weight.to_kind(xs.kind()) * scale.unsqueeze(1);
            xs.linear::<&Tensor>(&w, None)
        };
        match &self.bias {
            Some(b) => y + b,
            None => y,
        }
    }

    /// The weight as the dense GEMM sees it (dequantized when int8 or 4-bit; 4-bit in bf16).
    pub fn dense_weight(&self) -> Tensor {
        match &self.scale {
            None => self.weight.shallow_clone(),
            Some(_) if self.is_q4() => self.dense_weight_as(Kind::BFloat16),
            Some(s) => self.weight.to_kind(s.kind()) * s.unsqueeze(1),
        }
    }

    /// A 4-bit weight dequantized to [out, in] in `kind`: on the CPU in bf16 by gemv's
    /// threads, elsewhere with libtorch's ops (exact in f32, then rounded to `kind`).
    fn dense_weight_as(&self, kind: Kind) -> Tensor {
        let scale = self.scale.as_ref().expect("a 4-bit weight has scales");
        let (n, k) = (self.weight.size()[0], self.in_features);
        if kind == Kind::BFloat16 && self.weight.device() == Device::Cpu {
            let out = Tensor::empty([n, k], (Kind::BFloat16, Device::Cpu));
            // SAFETY: `out` is a fresh contiguous bf16 CPU tensor of n * k elements, written
            // only here, through this one slice.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut u16, (n * k) as usize)
            };
            super::gemv::dequantize_q4(
                slice_of(&self.weight.contiguous()),
                slice_of(&scale.contiguous()),
                k as usize,
                dst,
            );
            return out;
        }
        dequantize_q4(&self.weight, scale, k).to_kind(kind)
    }
}

/// Symmetric 4-bit quantization of `w` [out, in] (f32) in groups of [`Q4_GROUP`] inputs, values
/// -8..=7 times a bf16 scale per group. Like llama.cpp's Q4_0, with the scale chosen for the
/// smallest squared error of each group instead of max|w| / 8 (see
/// [`super::gemv::quantize_q4`]; measured on the goldens' first-step logits with seven
/// divisors: cosine to bf16's from 0.929 to 0.979 on tiny-qwen2's text case, 0.985 to 0.989 on
/// its image case, against plain Q4_0). Returns the packed bytes [out, groups * 16] (uint8, layout
/// at [`Q4_GROUP`], rows in [`Q4_TILE`]'s tiles) and the scales [out, groups] (bf16).
pub fn quantize_q4(w: &Tensor) -> (Tensor, Tensor) {
    let (q, scale) = quantize_q4_plain(w);
    tile_q4(&q, &scale);
    (q, scale)
}

/// [`quantize_q4`] in plain row order, before [`tile_q4`].
fn quantize_q4_plain(w: &Tensor) -> (Tensor, Tensor) {
    let (rows, k) = w.size2().expect("a linear weight is 2-d");
    let groups = (k as usize).div_ceil(Q4_GROUP) as i64;
    let w = w.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let q = Tensor::empty(
        [rows, groups * Q4_GROUP_BYTES as i64],
        (Kind::Uint8, Device::Cpu),
    );
    let scale = Tensor::empty([rows, groups], (Kind::BFloat16, Device::Cpu));
    if rows > 0 {
        // SAFETY: `q` and `scale` are fresh, written only here, through these slices.
        let (qs, ss) = unsafe { q4_slices_mut(&q, &scale) };
        super::gemv::quantize_q4(slice_of(&w), k as usize, qs, ss);
    }
    (q, scale)
}

/// A packed 4-bit weight's bytes and its scales' bf16 bits as mutable slices, after checking
/// that they are contiguous CPU tensors of those types.
///
/// # Safety
/// Nothing else reads or writes the two tensors' storage while the slices live.
#[allow(clippy::mut_from_ref)]
unsafe fn q4_slices_mut<'a>(q: &'a Tensor, scale: &'a Tensor) -> (&'a mut [u8], &'a mut [u16]) {
    assert!(q.is_contiguous() && scale.is_contiguous());
    assert!(q.device() == Device::Cpu && scale.device() == Device::Cpu);
    assert!(q.kind() == Kind::Uint8 && scale.kind() == Kind::BFloat16);
    (
        std::slice::from_raw_parts_mut(q.data_ptr() as *mut u8, q.numel()),
        std::slice::from_raw_parts_mut(scale.data_ptr() as *mut u16, scale.numel()),
    )
}

/// [`super::gemv::tile_q4`] on a packed weight [out, groups * 16] and its scales [out, groups]
/// in plain row order (contiguous CPU tensors), in place.
fn tile_q4(q: &Tensor, scale: &Tensor) {
    if q.numel() == 0 {
        return;
    }
    let groups = scale.size()[1] as usize;
    // SAFETY: the caller made these tensors, and nothing else reads or writes them while the
    // slices live.
    let (qs, ss) = unsafe { q4_slices_mut(q, scale) };
    super::gemv::tile_q4(qs, ss, groups);
}

/// A packed weight [out, groups * 16] and its scales [out, groups] with their rows out of
/// [`Q4_TILE`]'s tiles, in plain row order, with libtorch's ops on their device.
pub fn untile_q4(packed: &Tensor, scale: &Tensor) -> (Tensor, Tensor) {
    let (rows, bytes) = packed.size2().expect("a packed weight is 2-d");
    let groups = bytes / Q4_GROUP_BYTES as i64;
    let tile = Q4_TILE as i64;
    let full = rows / tile * tile;
    if full == 0 {
        return (packed.shallow_clone(), scale.shallow_clone());
    }
    // a tile's bytes are [groups, chunk, row, byte], its scales [groups, row]
    let bytes_plain = packed
        .narrow(0, 0, full)
        .reshape([full / tile, groups, 4, tile, 4])
        .permute([0, 3, 1, 2, 4])
        .reshape([full, bytes]);
    let scale_plain = scale
        .narrow(0, 0, full)
        .reshape([full / tile, groups, tile])
        .permute([0, 2, 1])
        .reshape([full, groups]);
    (
        Tensor::cat(&[bytes_plain, packed.narrow(0, full, rows - full)], 0),
        Tensor::cat(&[scale_plain, scale.narrow(0, full, rows - full)], 0),
    )
}

/// [`quantize_q4`]'s packed weight [out, groups * 16] and scales [out, groups] back to the
/// weight [out, `k`] in f32 (exact: a 4-bit value times a bf16 scale), with libtorch's ops on
/// the weight's device.
pub fn dequantize_q4(packed: &Tensor, scale: &Tensor, k: i64) -> Tensor {
    let (rows, bytes) = packed.size2().expect("a packed weight is 2-d");
    let half = Q4_GROUP_BYTES as i64;
    let groups = bytes / half;
    let (packed, scale) = untile_q4(packed, scale);
    let b = packed.view([rows, groups, half]);
    let lo = b.bitwise_and(0x0f);
    let hi = b.bitwise_right_shift_tensor_scalar(4);
    let q = Tensor::cat(&[lo, hi], -1).to_kind(Kind::Float) - 8.0;
    let w = q * scale.to_kind(Kind::Float).unsqueeze(-1);
    w.view([rows, groups * Q4_GROUP as i64]).narrow(1, 0, k)
}

/// [`quantize_q4`] of `w` [out, in] (any float dtype, e.g. the mapped bf16 checkpoint) one block
/// of rows at a time into `q` [out, groups * 16] (uint8) and `scale` [out, groups] (bf16), so that
/// quantizing a model never holds an f32 copy of a whole weight.
pub fn quantize_q4_into(w: &Tensor, q: &Tensor, scale: &Tensor) {
    quantize_blocks(w, q, scale, quantize_q4_plain);
    tile_q4(q, scale);
}

/// Symmetric per-row int8 quantization of `w` [out, in] (f32): the scale of a row is its
/// largest magnitude / 127, rounded to `kind` first so that the int8 values are computed with
/// exactly the scale the kernels use. Returns (int8 [out, in], scale [out] in `kind`).
pub fn quantize_rows(w: &Tensor, kind: Kind) -> (Tensor, Tensor) {
    let amax = w.abs().amax([1].as_slice(), false);
    let scale = (amax / 127.0).to_kind(kind);
    // a row whose scale is 0 in `kind` (all zeros, or underflow in f16) gets scale 1: its values
    // quantize to 0 either way, and nothing divides by zero
    let scale = scale.where_self(&scale.gt(0.0), &scale.ones_like());
    let q = (w / scale.to_kind(Kind::Float).unsqueeze(1))
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    (q, scale)
}

/// Rows quantized at a time by [`quantize_rows_into`]: the f32 temporaries stay at a few MB
/// instead of four bytes per weight.
const QUANTIZE_BLOCK_ROWS: i64 = 256;

/// [`quantize_rows`] of `w` [out, in] (any float dtype, e.g. the mapped bf16 checkpoint) one
/// block of rows at a time into `q` [out, in] (int8) and `scale` [out] (in the scales' dtype),
/// so that quantizing a model never holds an f32 copy of a whole weight.
pub fn quantize_rows_into(w: &Tensor, q: &Tensor, scale: &Tensor) {
    quantize_blocks(w, q, scale, |block| quantize_rows(block, scale.kind()));
}

/// `quantize` (f32 rows -> values and scales) over `w` [out, in] one block of
/// [`QUANTIZE_BLOCK_ROWS`] rows at a time, written into the same rows of `q` and `scale`.
fn quantize_blocks(
    w: &Tensor,
    q: &Tensor,
    scale: &Tensor,
    quantize: impl Fn(&Tensor) -> (Tensor, Tensor),
) {
    let rows = w.size()[0];
    let mut start = 0;
    while start < rows {
        let n = QUANTIZE_BLOCK_ROWS.min(rows - start);
        let block = w
            .narrow(0, start, n)
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        let (bq, bs) = quantize(&block);
        q.narrow(0, start, n).copy_(&bq);
        scale.narrow(0, start, n).copy_(&bs);
        start += n;
    }
}

/// `nn.LayerNorm` with weight and bias.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &mut Weights, p: Place, prefix: &str, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.get(w, &format!("{prefix}.weight"), &[dim]),
            bias: p.get(w, &format!("{prefix}.bias"), &[dim]),
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let dim = *xs.size().last().expect("layer norm input has a last dim");
        xs.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}

/// RMSNorm as written in Qwen2/InternLM2/InternViT: statistics in f32, the weight applied after
/// casting back to the input dtype (`weight * hidden.to(input_dtype)`).
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &mut Weights, p: Place, name: &str, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.get(w, name, &[dim]),
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        // upcast to f32 as the reference does
        let h = xs.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

/// Either norm, as InternViT's `norm_type` selects.
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Norm::Layer(n) => n.forward(xs),
            Norm::Rms(n) => n.forward(xs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().max().double_value(&[])
    }

    /// Every value within half a step of its row's scale, the row maximum on ±127, an all-zero
    /// row on scale 1 (even in f16, where tiny scales underflow).
    #[test]
    fn quantize_rows_is_symmetric_per_channel() {
        tch::manual_seed(1);
        let w = Tensor::randn([16, 40], (Kind::Float, Device::Cpu)) * 0.05;
        let _ = w.get(3).fill_(0.0);
        let _ = w.get(5).fill_(1e-9);
        for kind in [Kind::BFloat16, Kind::Half, Kind::Float] {
            let (q, scale) = quantize_rows(&w, kind);
            assert_eq!(q.kind(), Kind::Int8);
            assert_eq!(scale.kind(), kind);
            let s = scale.to_kind(Kind::Float);
            let deq = q.to_kind(Kind::Float) * s.unsqueeze(1);
            let err = (&deq - &w).abs() / s.unsqueeze(1);
            assert!(max_abs(&err) <= 0.5 + 1e-3, "{kind:?}: {}", max_abs(&err));
            let qmax = q.abs().amax([1].as_slice(), false).to_kind(Kind::Int64);
            for r in 0..16 {
                let want = if r == 3 || (r == 5 && kind == Kind::Half) {
                    0
                } else {
                    127
                };
                assert!(
                    (qmax.int64_value(&[r]) - want).abs() <= 1,
                    "{kind:?} row {r}: {}",
                    qmax.int64_value(&[r])
                );
            }
            assert_eq!(s.double_value(&[3]), 1.0);
        }
    }

    /// 4-bit groups of 32 (and a shorter last one): each group's squared error at most plain
    /// Q4_0's (scale max|w| / 8 with the peak on -8, in bf16), no value further than one step
    /// from its weight, an all-zero group on scale 1, the padding of a partial group 0, and the
    /// bytes hold the values as documented (input j in the low nibble of byte j, input j + 16
    /// in the high one, plus 8).
    #[test]
    fn quantize_q4_beats_plain_q4_0_per_group() {
        tch::manual_seed(10);
        let w = Tensor::randn([6, 72], (Kind::Float, Device::Cpu)) * 0.05;
        let _ = w.get(2).narrow(0, 32, 32).fill_(0.0);
        let _ = w.get(4).get(40).fill_(0.7);
        let (q, scale) = quantize_q4(&w);
        assert_eq!(q.size(), vec![6, 3 * 16]);
        assert_eq!(q.kind(), Kind::Uint8);
        assert_eq!(scale.size(), vec![6, 3]);
        assert_eq!(scale.kind(), Kind::BFloat16);
        assert_eq!(scale.double_value(&[2, 1]), 1.0);
        let deq = dequantize_q4(&q, &scale, 72);
        assert_eq!(deq.size(), vec![6, 72]);
        let per_group = |t: &Tensor| {
            t.constant_pad_nd([0, 24])
                .view([6, 3, 32])
                .square()
                .sum_dim_intlist(-1, false, Kind::Float)
        };
        // plain Q4_0
        let blocks = w.constant_pad_nd([0, 24]).view([6, 3, 32]);
        let peak = blocks.gather(-1, &blocks.abs().argmax(-1, true), false);
        let s0 = (peak / -8.0).to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let s0 = s0.where_self(&s0.ne(0.0), &s0.ones_like());
        let plain = ((&blocks / &s0).round().clamp(-8.0, 7.0) * &s0)
            .view([6, 96])
            .narrow(1, 0, 72);
        let ours_err = per_group(&(&deq - &w));
        let plain_err = per_group(&(&plain - &w));
        assert!(
            ours_err
                .le_tensor(&(&plain_err + 1e-12))
                .all()
                .int64_value(&[])
                == 1,
            "{ours_err} vs {plain_err}"
        );
        assert!(
            ours_err.sum(Kind::Float).double_value(&[])
                < plain_err.sum(Kind::Float).double_value(&[])
        );
        let steps = scale
            .to_kind(Kind::Float)
            .abs()
            .repeat_interleave_self_int(32, 1, None)
            .narrow(1, 0, 72);
        let err = (&deq - &w).abs() / &steps;
        assert!(max_abs(&err) <= 1.0, "{}", max_abs(&err));
        // byte layout: row 0, group 0
        let bytes = Vec::<u8>::try_from(q.get(0).narrow(0, 0, 16)).unwrap();
        let s00 = scale.double_value(&[0, 0]);
        for (j, b) in bytes.iter().enumerate() {
            let lo = ((b & 15) as f64 - 8.0) * s00;
            let hi = ((b >> 4) as f64 - 8.0) * s00;
            assert_eq!(lo, deq.double_value(&[0, j as i64]));
            assert_eq!(hi, deq.double_value(&[0, j as i64 + 16]));
        }
        // the padding of the last (partial) group is q = 0, stored as 8
        let last = Vec::<u8>::try_from(q.get(1).narrow(0, 32 + 8, 8)).unwrap();
        assert!(last.iter().all(|&b| b == 0x88), "{last:?}");
        // quantizing block by block from bf16 equals quantizing the whole f32 copy
        let wb =
            (Tensor::randn([300, 40], (Kind::Float, Device::Cpu)) * 0.05).to_kind(Kind::BFloat16);
        let (q1, s1) = quantize_q4(&wb.to_kind(Kind::Float));
        let q2 = Tensor::empty([300, 32], (Kind::Uint8, Device::Cpu));
        let s2 = Tensor::empty([300, 2], (Kind::BFloat16, Device::Cpu));
        quantize_q4_into(&wb, &q2, &s2);
        assert!(q1.equal(&q2) && s1.equal(&s2));
    }

    /// The tiles hold the plain rows' bytes and scales: the plain quantization tiled in place
    /// (gemv's loop) and then untiled with libtorch's reshapes (written apart from it) gives
    /// the plain quantization back, on whole tiles with and without a last partial one; the
    /// first tile's first 64 bytes are chunk 0 of group 0 of its 16 rows, in row order.
    #[test]
    fn q4_tiles_hold_the_plain_rows() {
        tch::manual_seed(12);
        for (n, k) in [(16i64, 32i64), (40, 72), (35, 8), (7, 64)] {
            let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.05;
            let (plain_q, plain_s) = quantize_q4_plain(&w);
            let (q, s) = quantize_q4(&w);
            let tiles = n / Q4_TILE as i64;
            assert_eq!(q.equal(&plain_q), tiles == 0, "n {n} k {k}");
            let (uq, us) = untile_q4(&q, &s);
            assert!(uq.equal(&plain_q) && us.equal(&plain_s), "n {n} k {k}");
            if tiles > 0 {
                let first = Vec::<u8>::try_from(q.view([-1]).narrow(0, 0, 64)).unwrap();
                for r in 0..16 {
                    let want = Vec::<u8>::try_from(plain_q.get(r).narrow(0, 0, 4)).unwrap();
                    assert_eq!(&first[r as usize * 4..r as usize * 4 + 4], want.as_slice());
                }
            }
        }
    }

    /// A 4-bit linear computes x W^T + b with W its dequantized weight, through gemv for up to
    /// 8 rows of bf16 and through the dequantized dense GEMM above and in f32; `weight_ref`
    /// hands gemv the same weight.
    #[test]
    fn q4_linear_matches_its_dequantized_weight() {
        tch::manual_seed(11);
        let (n, k) = (48i64, 72i64);
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.05;
        let b = Tensor::randn([n], (Kind::Float, Device::Cpu));
        let (q, scale) = quantize_q4(&w);
        for kind in [Kind::BFloat16, Kind::Float] {
            let lin = Linear::q4(q.copy(), scale.copy(), Some(b.to_kind(kind)), k);
            assert!(lin.is_q4());
            assert_eq!(lin.in_features(), k);
            let dense = dequantize_q4(&q, &scale, k);
            assert!(lin.dense_weight().equal(&dense.to_kind(Kind::BFloat16)));
            for rows in [1, 3, 8, 9, 40] {
                let x = Tensor::randn([1, rows, k], (Kind::Float, Device::Cpu)).to_kind(kind);
                let want = x.to_kind(Kind::Float).linear(&dense, Some(&b));
                let got = lin.forward(&x);
                assert_eq!(got.size(), vec![1, rows, n]);
                assert_eq!(got.kind(), kind);
                let tol = if kind == Kind::Float { 1e-4 } else { 0.05 };
                let d = max_abs(&(got.to_kind(Kind::Float) - &want));
                assert!(d < tol, "{kind:?} rows {rows}: {d}");
            }
        }
        let lin = Linear::q4(q, scale, None, k);
        assert!(matches!(
            lin.weight_ref(),
            Some(super::super::gemv::WeightRef::Q4(..))
        ));
    }

    /// Both int8 paths (the int8 kernel for up to 8 rows, dequantize + GEMM above) compute
    /// x W^T + b with W the dequantized weight.
    #[test]
    fn int8_linear_matches_its_dequantized_weight() {
        tch::manual_seed(2);
        let w = Tensor::randn([48, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let b = Tensor::randn([48], (Kind::Float, Device::Cpu));
        for kind in [Kind::BFloat16, Kind::Float] {
            let (q, scale) = quantize_rows(&w, kind);
            let lin = Linear::int8(q, scale, Some(b.to_kind(kind)));
            let dense = lin.dense_weight().to_kind(Kind::Float);
            for rows in [1, 3, 8, 9, 40] {
                let x = Tensor::randn([1, rows, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
                let want = x.to_kind(Kind::Float).linear(&dense, Some(&b));
                let got = lin.forward(&x);
                assert_eq!(got.size(), vec![1, rows, 48]);
                assert_eq!(got.kind(), kind);
                let tol = if kind == Kind::Float { 1e-4 } else { 0.05 };
                let d = max_abs(&(got.to_kind(Kind::Float) - &want));
                assert!(d < tol, "{kind:?} rows {rows}: {d}");
            }
        }
    }
}
