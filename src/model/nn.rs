//! The few PyTorch modules the models are built from, holding plain tensors.
use super::weights::Weights;
use tch::{Device, Kind, Tensor};

/// Where and in which dtype a module's weights go.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub dev: Device,
    pub kind: Kind,
    /// Linear layers loaded here keep int8 weights with per-output-channel scales.
    pub int8: bool,
}

impl Place {
    pub fn new(dev: Device, kind: Kind) -> Self {
        Self {
            dev,
            kind,
            int8: false,
        }
    }

    pub fn get(&self, w: &mut Weights, name: &str, shape: &[i64]) -> Tensor {
        w.get(name, shape, self.kind, self.dev)
    }
}

/// `nn.Linear`: `weight` [out, in], optional `bias` [out].
///
/// With `scale` set the weight is int8 (symmetric, one scale per output channel, in the
/// activations' dtype): small batches of rows (decoding) run ATen's int8 weight-only kernel on
/// CPU; larger ones (prefill) and CUDA dequantize the weight on the fly and use the dense GEMM,
/// which is faster there.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub scale: Option<Tensor>,
}

/// Rows up to which the int8 kernel beats dequantize + dense GEMM on CPU (measured on bf16).
const INT8_KERNEL_MAX_ROWS: i64 = 8;

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            scale: None,
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
        if !p.int8 {
            let weight = cat(names
                .iter()
                .zip(parts)
                .map(|(name, (_, dout))| p.get(w, name, &[*dout, din]))
                .collect());
            if parts.len() > 1 {
                // the parts were copied into `weight`: their mapped pages are no longer needed
                names.iter().for_each(|n| w.release(n));
            }
            return Self::dense(weight, bias);
        }
        // each part quantized straight into its rows of the stacked weight
        let total: i64 = parts.iter().map(|(_, dout)| dout).sum();
        let q = Tensor::empty([total, din], (Kind::Int8, Device::Cpu));
        let scale = Tensor::empty([total], (p.kind, Device::Cpu));
        let mut start = 0;
        for (name, (_, dout)) in names.iter().zip(parts) {
            let stored = w.get_stored(name, &[*dout, din]);
            quantize_rows_into(
                &stored,
                &q.narrow(0, start, *dout),
                &scale.narrow(0, start, *dout),
            );
            w.release(name);
            start += dout;
        }
        Self {
            weight: q.to_device(p.dev),
            bias,
            scale: Some(scale.to_device(p.dev)),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if super::gemv::applies(xs, &self.weight) {
            return super::gemv::linear(xs, &self.weight, self.scale.as_ref(), self.bias.as_ref());
        }
        let Some(scale) = &self.scale else {
            return xs.linear(&self.weight, self.bias.as_ref());
        };
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

    /// The weight as the dense GEMM sees it (dequantized when int8).
    pub fn dense_weight(&self) -> Tensor {
        match &self.scale {
            None => self.weight.shallow_clone(),
            Some(s) => self.weight.to_kind(s.kind()) * s.unsqueeze(1),
        }
    }
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
    let rows = w.size()[0];
    let mut start = 0;
    while start < rows {
        let n = QUANTIZE_BLOCK_ROWS.min(rows - start);
        let block = w
            .narrow(0, start, n)
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        let (bq, bs) = quantize_rows(&block, scale.kind());
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

    /// Both int8 paths (the int8 kernel for up to 8 rows, dequantize + GEMM above) compute
    /// x W^T + b with W the dequantized weight.
    #[test]
    fn int8_linear_matches_its_dequantized_weight() {
        tch::manual_seed(2);
        let w = Tensor::randn([48, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let b = Tensor::randn([48], (Kind::Float, Device::Cpu));
        for kind in [Kind::BFloat16, Kind::Float] {
            let (q, scale) = quantize_rows(&w, kind);
            let lin = Linear {
                weight: q,
                bias: Some(b.to_kind(kind)),
                scale: Some(scale),
            };
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
