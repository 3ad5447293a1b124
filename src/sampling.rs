//! Next-token choice as transformers' `generate` makes it for InternVL's `chat`: repetition
//! penalty (over the generated tokens: `chat` passes only embeddings, so the prompt is not
//! penalised), min-new-tokens, then for sampling temperature, top-k and top-p, in that order.
//! Greedy takes the first maximum, as `argmax` does. Sampling is seeded and deterministic.

/// Generation settings of one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    pub repetition_penalty: f64,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
}

impl Default for SamplingParams {
    /// The official web demo's settings (and transformers' default top-k of 50).
    fn default() -> Self {
        Self {
            do_sample: true,
            temperature: 0.7,
            top_p: 0.95,
            top_k: 50,
            repetition_penalty: 1.1,
            seed: 0,
            max_new_tokens: 1024,
            min_new_tokens: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            do_sample: false,
            repetition_penalty: 1.0,
            max_new_tokens,
            ..Self::default()
        }
    }

    /// Temperature 0 means greedy, as in the web demo.
    pub fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature <= 0.0
    }

    /// Checks ranges; the message names the field and the value.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(format!(
                "min_new_tokens ({}) exceeds max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            ));
        }
        Ok(())
    }
}

/// Settings given explicitly (flags, a JSONL request) over a base.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
}

/// Largest `max_new_tokens` accepted (the context window bounds it further).
pub const MAX_NEW_TOKENS_LIMIT: usize = 1 << 20;

impl Overrides {
    /// The overrides applied to `base`, validated. Greedy (`do_sample` false or temperature 0)
    /// means model.chat's `do_sample=False`: no repetition penalty unless one is given.
    pub fn apply(&self, base: &SamplingParams) -> Result<SamplingParams, String> {
        let mut p = base.clone();
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f { p.$f = v; })* };
        }
        set!(
            do_sample,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
            max_new_tokens,
            min_new_tokens
        );
        if p.is_greedy() && self.repetition_penalty.is_none() {
            p.repetition_penalty = 1.0;
        }
        if p.max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(format!(
                "max_new_tokens {} is larger than {MAX_NEW_TOKENS_LIMIT}",
                p.max_new_tokens
            ));
        }
        p.validate()?;
        Ok(p)
    }
}

/// SplitMix64: small, seedable, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from the last position's `logits` (modified in place).
    /// `generated`: the tokens generated so far; `stop_ids` are masked while fewer than
    /// `min_new_tokens` have been generated.
    pub fn next(&mut self, logits: &mut [f32], generated: &[u32], stop_ids: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, generated, p.repetition_penalty as f32);
        }
        if generated.len() < p.min_new_tokens {
            for &s in stop_ids {
                if let Some(l) = logits.get_mut(s as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        let t = p.temperature as f32;
        for l in logits.iter_mut() {
            *l /= t;
        }
        if p.top_k > 0 {
            top_k_mask(logits, p.top_k);
        }
        if p.top_p < 1.0 {
            top_p_mask(logits, p.top_p);
        }
        sample(logits, &mut self.rng)
    }
}

/// First index of the maximum (NaN never wins).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// `RepetitionPenaltyLogitsProcessor`: each distinct earlier token's logit is divided by the
/// penalty when positive, multiplied when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], tokens: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::new();
    for &t in tokens {
        if seen.insert(t) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }
}

/// `TopKLogitsWarper`: everything below the k-th largest value becomes -inf (ties kept).
pub fn top_k_mask(logits: &mut [f32], k: usize) {
    let k = k.min(logits.len());
    if k == 0 || k == logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    for l in logits.iter_mut() {
        if *l < kth {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative probability is
/// <= 1 - top_p, always keeping the most likely one.
pub fn top_p_mask(logits: &mut [f32], top_p: f64) {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let probs = softmax(&idx.iter().map(|&i| logits[i]).collect::<Vec<_>>());
    let mut cum = 0f64;
    let last = idx.len().saturating_sub(1);
    for (r, &i) in idx.iter().enumerate() {
        cum += probs[r];
        if cum <= 1.0 - top_p && r != last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

fn softmax(xs: &[f32]) -> Vec<f64> {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = xs.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// Draws from softmax(logits).
fn sample(logits: &[f32], rng: &mut Rng) -> u32 {
    let probs = softmax(logits);
    let mut u = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    // rounding left a sliver: the last token with any probability
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
    }

    #[test]
    fn repetition_penalty_matches_hf_rule() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties_at_the_kth_value() {
        let mut l = vec![1.0, 5.0, 3.0, 3.0, 0.0];
        top_k_mask(&mut l, 2);
        let n = f32::NEG_INFINITY;
        assert_eq!(l, vec![n, 5.0, 3.0, 3.0, n]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.25, 0.125, 0.125 (log-space)
        let base = [0.5f32, 0.25, 0.125, 0.125].map(|p| p.ln());
        let mut l = base.to_vec();
        top_p_mask(&mut l, 0.7);
        assert!(l[0].is_finite() && l[1].is_finite());
        assert!(l[2] == f32::NEG_INFINITY && l[3] == f32::NEG_INFINITY);
        let mut l = base.to_vec();
        top_p_mask(&mut l, 0.01);
        assert_eq!(
            l.iter().filter(|x| x.is_finite()).count(),
            1,
            "top-1 always kept"
        );
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_seed_dependent() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                repetition_penalty: 1.0,
                ..Default::default()
            });
            (0..50)
                .map(|_| s.next(&mut logits.clone(), &[], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // only tokens surviving top-k 50 can appear
        let mut kept = logits.clone();
        top_k_mask(&mut kept, 50);
        for t in run(7) {
            assert!(kept[t as usize].is_finite());
        }
    }

    #[test]
    fn min_new_tokens_masks_stop_ids_and_greedy_when_temperature_zero() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            min_new_tokens: 2,
            repetition_penalty: 1.0,
            ..Default::default()
        });
        assert_eq!(s.next(&mut [0.0, 9.0, 1.0], &[], &[1]), 2);
        assert_eq!(s.next(&mut [0.0, 9.0, 1.0], &[5, 6], &[1]), 1);
    }

    #[test]
    fn validation_names_the_field() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert_eq!(p.validate().unwrap_err(), "top_p must be in (0, 1], got 0");
    }
}
