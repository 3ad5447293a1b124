//! Rotary position embeddings as Qwen2 (transformers 4.47) and InternLM2 (remote code) compute
//! them: `inv_freq = 1 / base^(2i/d)` in f32, angles `pos * inv_freq` in f32, cos/sin cast to the
//! activations' dtype, `q * cos + rotate_half(q) * sin`.
//!
//! Dynamic NTK scaling (`rope_scaling: {type: dynamic}`) follows each reference exactly,
//! including its state: InternLM2 recomputes the base from the current length whenever the
//! sequence grows past the longest length seen so far (and never goes back); Qwen2 does the same
//! past `max_position_embeddings` and resets when a shorter sequence comes back.
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DynamicFlavor {
    /// `InternLM2DynamicNTKScalingRotaryEmbedding`
    InternLM2,
    /// transformers' `_dynamic_frequency_update`
    Hf,
}

pub struct Rope {
    dim: i64,
    base: f64,
    max_pos: i64,
    dynamic: Option<(f64, DynamicFlavor)>,
    /// (inv_freq base currently in use, length it was computed for)
    state: Mutex<(f64, i64)>,
}

impl Rope {
    pub fn new(
        dim: usize,
        base: f64,
        max_pos: usize,
        dynamic: Option<(f64, DynamicFlavor)>,
    ) -> Self {
        Self {
            dim: dim as i64,
            base,
            max_pos: max_pos as i64,
            dynamic,
            state: Mutex::new((base, max_pos as i64)),
        }
    }

    fn scaled_base(&self, factor: f64, seq_len: i64) -> f64 {
        let d = self.dim as f64;
        self.base
            * ((factor * seq_len as f64 / self.max_pos as f64) - (factor - 1.0)).powf(d / (d - 2.0))
    }

    /// The base to use for a forward pass whose keys span `kv_len` positions.
    fn base_for(&self, kv_len: i64) -> f64 {
        let Some((factor, flavor)) = self.dynamic else {
            return self.base;
        };
        let mut st = self.state.lock().expect("rope state lock");
        match flavor {
            DynamicFlavor::InternLM2 => {
                if kv_len > st.1 {
                    let b = if kv_len > self.max_pos {
                        self.scaled_base(factor, kv_len)
                    } else {
                        st.0
                    };
                    *st = (b, kv_len);
                }
            }
            DynamicFlavor::Hf => {
                if kv_len > st.1 {
                    *st = (self.scaled_base(factor, kv_len.max(self.max_pos)), kv_len);
                }
                if kv_len < self.max_pos && st.1 > self.max_pos {
                    *st = (self.base, self.max_pos);
                }
            }
        }
        st.0
    }

    /// cos and sin for `positions` [b, q] (int64), shaped [b, 1, q, dim], in `kind` on `dev`.
    pub fn cos_sin(
        &self,
        positions: &Tensor,
        kv_len: i64,
        kind: Kind,
        dev: Device,
    ) -> (Tensor, Tensor) {
        let base = self.base_for(kv_len);
        let exps = Tensor::arange_start_step(0, self.dim, 2, (Kind::Int64, dev))
            .to_kind(Kind::Float)
            / self.dim as f64;
        let inv_freq = Tensor::pow_scalar(base, &exps).reciprocal();
        let freqs =
            positions.to_device(dev).to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

fn rotate_half(xs: &Tensor) -> Tensor {
    let half = xs
        .size()
        .last()
        .copied()
        .expect("rope input has a last dim")
        / 2;
    let x1 = xs.narrow(-1, 0, half);
    let x2 = xs.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

/// `q * cos + rotate_half(q) * sin` for q/k of shape [b, heads, q, dim].
pub fn apply(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    xs * cos + rotate_half(xs) * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_rotation_preserves_norm() {
        let rope = Rope::new(8, 10000.0, 32, None);
        let pos = Tensor::from_slice(&[0i64, 5]).view([1, 2]);
        let (cos, sin) = rope.cos_sin(&pos, 2, Kind::Float, Device::Cpu);
        let q = Tensor::randn([1, 1, 2, 8], (Kind::Float, Device::Cpu));
        let r = apply(&q, &cos, &sin);
        let d0 = (r.narrow(2, 0, 1) - q.narrow(2, 0, 1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d0 < 1e-7, "{d0}");
        let n_q = q.narrow(2, 1, 1).norm().double_value(&[]);
        let n_r = r.narrow(2, 1, 1).norm().double_value(&[]);
        assert!((n_q - n_r).abs() < 1e-5);
        // angle of the first pair at position 5 is exactly 5 rad (inv_freq[0] = 1)
        assert!((cos.double_value(&[0, 0, 1, 0]) - 5f64.cos()).abs() < 1e-6);
    }

    #[test]
    fn internlm2_dynamic_ntk_grows_base_past_max_positions_and_keeps_it() {
        let rope = Rope::new(8, 10000.0, 16, Some((2.0, DynamicFlavor::InternLM2)));
        assert_eq!(rope.base_for(10), 10000.0);
        let b = rope.base_for(20);
        let expect = 10000.0 * ((2.0 * 20.0 / 16.0) - 1.0f64).powf(8.0 / 6.0);
        assert!((b - expect).abs() < 1e-6, "{b} vs {expect}");
        // shorter sequences later keep the grown base (the reference never shrinks its cache)
        assert_eq!(rope.base_for(5), b);
        let b2 = rope.base_for(21);
        assert!(b2 > b);
    }

    #[test]
    fn hf_dynamic_ntk_resets_for_short_sequences() {
        let rope = Rope::new(8, 10000.0, 16, Some((2.0, DynamicFlavor::Hf)));
        assert_eq!(rope.base_for(16), 10000.0);
        assert!(rope.base_for(40) > 10000.0);
        assert_eq!(rope.base_for(10), 10000.0);
    }
}
