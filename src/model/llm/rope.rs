//! Rotary position embeddings as Qwen2 (transformers 4.47) and InternLM2 (remote code) compute
//! them: `inv_freq = 1 / base^(2i/d)` in f32, angles `pos * inv_freq` in f32, cos/sin cast to the
//! activations' dtype, `q * cos + rotate_half(q) * sin`.
//!
//! Dynamic NTK scaling (`rope_scaling: {type: dynamic}`) follows each reference exactly,
//! including its state: InternLM2 recomputes the base from the current length whenever the
//! sequence grows past the longest length seen so far (and never goes back); transformers'
//! modules (Qwen2 in InternVL3) do the same past `max_position_embeddings` and reset when a
//! shorter sequence comes back. Keys keep the rotation they were cached with. The state belongs
//! to one sequence (its KV cache), starting as a freshly loaded model's does, so that a request's
//! result never depends on the requests before it.
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
}

/// The dynamic rope's state within one sequence (it lives with the sequence's KV cache): the
/// base in use and the length it was computed for. `None`: as the rotary module starts, the
/// configured base for `max_position_embeddings`.
pub type RopeState = Option<(f64, i64)>;

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
        }
    }

    /// The dynamic NTK flavor, when the rope scales dynamically.
    pub fn dynamic_flavor(&self) -> Option<DynamicFlavor> {
        self.dynamic.map(|(_, f)| f)
    }

    /// `max_position_embeddings`: past it a dynamic rope grows its base.
    pub fn max_positions(&self) -> i64 {
        self.max_pos
    }

    /// InternLM2's base for `seq_len` positions, computed from Python numbers (f64) as its
    /// `_set_cos_sin_cache` does.
    fn internlm2_base(&self, factor: f64, seq_len: i64) -> f64 {
        let d = self.dim as f64;
        self.base
            * ((factor * seq_len as f64 / self.max_pos as f64) - (factor - 1.0)).powf(d / (d - 2.0))
    }

    /// transformers' `_compute_dynamic_ntk_parameters` base for `seq_len` (> max positions):
    /// the length arrives as a tensor (`max(position_ids) + 1`), so every step is f32
    /// arithmetic, the Python floats cast to f32 as torch's scalar operands are.
    fn hf_base(&self, factor: f64, seq_len: i64) -> f64 {
        let d = self.dim as f64;
        let exponent = (d / (d - 2.0)) as f32;
        let x = factor as f32 * seq_len as f32 / self.max_pos as f32 - (factor - 1.0) as f32;
        (self.base as f32 * x.powf(exponent)) as f64
    }

    /// The base for a forward pass over positions up to `seq_len - 1`, updating the sequence's
    /// `state` as the reference's rotary module updates itself. `seq_len` is the key length
    /// for InternLM2 (`kv_seq_len`) and `max(position_ids) + 1` for transformers' modules.
    pub fn base_for(&self, state: &mut RopeState, seq_len: i64) -> f64 {
        let Some((factor, flavor)) = self.dynamic else {
            return self.base;
        };
        let (base, cached) = state.unwrap_or((self.base, self.max_pos));
        let next = match flavor {
            // `if seq_len > self.max_seq_len_cached: self._set_cos_sin_cache(seq_len)`, which
            // grows the base only past max_position_embeddings (never shrinks it)
            DynamicFlavor::InternLM2 if seq_len > cached => {
                let b = if seq_len > self.max_pos {
                    self.internlm2_base(factor, seq_len)
                } else {
                    base
                };
                (b, seq_len)
            }
            DynamicFlavor::InternLM2 => (base, cached),
            // `_dynamic_frequency_update`: grow past the cached length, reset below the
            // original length once grown
            DynamicFlavor::Hf if seq_len > cached => {
                (self.hf_base(factor, seq_len.max(self.max_pos)), seq_len)
            }
            DynamicFlavor::Hf if seq_len < self.max_pos && cached > self.max_pos => {
                (self.base, self.max_pos)
            }
            DynamicFlavor::Hf => (base, cached),
        };
        *state = Some(next);
        next.0
    }

    /// cos and sin for `positions` [b, q] (int64) with rope base `base` (see
    /// [`Rope::base_for`]), shaped [b, 1, q, dim], in `kind` on `dev`.
    pub fn cos_sin(
        &self,
        positions: &Tensor,
        base: f64,
        kind: Kind,
        dev: Device,
    ) -> (Tensor, Tensor) {
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
        let base = rope.base_for(&mut None, 6);
        assert_eq!(base, 10000.0);
        let (cos, sin) = rope.cos_sin(&pos, base, Kind::Float, Device::Cpu);
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
        let mut st = None;
        assert_eq!(rope.base_for(&mut st, 10), 10000.0);
        let b = rope.base_for(&mut st, 20);
        let expect = 10000.0 * ((2.0 * 20.0 / 16.0) - 1.0f64).powf(8.0 / 6.0);
        assert_eq!(
            b, expect,
            "f64 arithmetic, as the remote code's Python floats"
        );
        // shorter sequences later keep the grown base (the reference never shrinks its cache)
        assert_eq!(rope.base_for(&mut st, 5), b);
        let b2 = rope.base_for(&mut st, 21);
        assert!(b2 > b);
        // a new sequence starts from the module's initial state
        assert_eq!(rope.base_for(&mut None, 5), 10000.0);
    }

    #[test]
    fn hf_dynamic_ntk_resets_for_short_sequences() {
        let rope = Rope::new(8, 10000.0, 16, Some((2.0, DynamicFlavor::Hf)));
        let mut st = None;
        assert_eq!(rope.base_for(&mut st, 16), 10000.0);
        let grown = rope.base_for(&mut st, 40);
        // f32 arithmetic as torch does it on the length tensor: 2*40/16 - 1 = 4, 4^(4/3)
        let want = 10000f32 * 4f32.powf((8.0f64 / 6.0) as f32);
        assert_eq!(grown, want as f64);
        assert_ne!(grown, 10000.0 * 4f64.powf(8.0 / 6.0), "not the f64 value");
        // decoding past it grows again for the new position only
        assert!(rope.base_for(&mut st, 41) > grown);
        // equal to the cached length: kept
        assert_eq!(rope.base_for(&mut st, 41), rope.base_for(&mut st, 41));
        assert_eq!(rope.base_for(&mut st, 10), 10000.0);
    }
}
