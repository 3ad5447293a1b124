//! The few PyTorch modules the models are built from, holding plain tensors.
use super::weights::Weights;
use tch::{Device, Kind, Tensor};

/// Where and in which dtype a module's weights go.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub dev: Device,
    pub kind: Kind,
}

impl Place {
    pub fn get(&self, w: &mut Weights, name: &str, shape: &[i64]) -> Tensor {
        w.get(name, shape, self.kind, self.dev)
    }
}

/// `nn.Linear`: `weight` [out, in], optional `bias` [out].
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(w: &mut Weights, p: Place, prefix: &str, din: i64, dout: i64, bias: bool) -> Self {
        Self {
            weight: p.get(w, &format!("{prefix}.weight"), &[dout, din]),
            bias: bias.then(|| p.get(w, &format!("{prefix}.bias"), &[dout])),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, self.bias.as_ref())
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
