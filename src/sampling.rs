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
    /// Scratch kept across tokens: candidate indices, then (value, index) pairs, and their
    /// exponentials.
    cand: Vec<u32>,
    sorted: Vec<(f32, u32)>,
    exps: Vec<f64>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            cand: Vec::new(),
            sorted: Vec::new(),
            exps: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from the last position's `logits`, which this changes in place (the
    /// repetition penalty, the masked stop ids, the temperature; the top-k and top-p cuts are
    /// not written back).
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
        // over the whole vocabulary, as transformers does: dividing can make neighbours equal,
        // which top-k's ties then keep
        let t = p.temperature as f32;
        for l in logits.iter_mut() {
            *l /= t;
        }
        self.draw(logits)
    }

    /// Top-k, top-p and the draw over the tempered `logits`, touching only the candidates that
    /// top-k keeps (all finite ones without top-k).
    ///
    /// The draw equals transformers' (and this module's earlier whole-vocabulary code) bit for
    /// bit: a masked token's probability is exactly 0, so the sums over the candidates alone
    /// add the same f64 values in the same order: ascending value (ties by index, a stable
    /// sort's order) for top-p's softmax, index order for the draw's.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        // one uniform per sampled token whatever happens, so that later draws stay aligned
        let u = self.rng.next_f64();
        let k = self.params.top_k;
        let finite = if k > 0 && k < logits.len() {
            top_k_candidates(logits, k, &mut self.cand)
        } else {
            all_candidates(logits, &mut self.cand)
        };
        // A NaN or +inf logit makes the whole softmax NaN and the draw token 0; no finite one
        // (all masked): softmax of -inf only, NaN too.
        if finite.is_err() || self.cand.is_empty() {
            return 0;
        }
        let sorted = &mut self.sorted;
        sorted.clear();
        sorted.extend(self.cand.iter().map(|&i| (logits[i as usize], i)));
        let by_value = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        // the max survives top-p (always kept): the softmax's max is the same before and after
        let max = sorted
            .iter()
            .copied()
            .max_by(by_value)
            .expect("at least one candidate")
            .0;
        if max == f32::INFINITY {
            return 0;
        }
        let m = max as f64;
        let exps = &mut self.exps;
        if self.params.top_p < 1.0 {
            // `TopPLogitsWarper`: ascending, drop while the cumulative probability is
            // <= 1 - top_p, never the most likely token
            sorted.sort_unstable_by(by_value);
            exps.clear();
            exps.extend(sorted.iter().map(|&(x, _)| (x as f64 - m).exp()));
            let s: f64 = exps.iter().sum();
            let last = sorted.len() - 1;
            let mut cum = 0f64;
            let mut cut = 0;
            for (r, e) in exps.iter().enumerate() {
                cum += e / s;
                if cum <= 1.0 - self.params.top_p && r != last {
                    cut = r + 1;
                } else {
                    // cum only grows: the dropped tokens are a prefix
                    break;
                }
            }
            sorted.drain(..cut);
            sorted.sort_unstable_by_key(|&(_, i)| i);
        } else if k > 0 && k < logits.len() {
            // top_k_candidates leaves them in no particular order
            sorted.sort_unstable_by_key(|&(_, i)| i);
        }
        exps.clear();
        exps.extend(sorted.iter().map(|&(x, _)| (x as f64 - m).exp()));
        let s: f64 = exps.iter().sum();
        let mut u = u;
        for (&(_, i), e) in sorted.iter().zip(exps.iter()) {
            let p = e / s;
            if u < p {
                return i;
            }
            u -= p;
        }
        // rounding left a sliver: the last token with any probability
        sorted
            .iter()
            .zip(exps.iter())
            .rev()
            .find(|(_, e)| *e / s > 0.0)
            .map_or(0, |(&(_, i), _)| i)
    }
}

/// A NaN or +inf among the logits (the draw is then token 0).
#[derive(Debug, PartialEq)]
struct NotFinite;

/// Every index whose logit is finite, into `out` (index order).
fn all_candidates(logits: &[f32], out: &mut Vec<u32>) -> Result<(), NotFinite> {
    out.clear();
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() || x == f32::INFINITY {
            return Err(NotFinite);
        }
        if x > f32::NEG_INFINITY {
            out.push(i as u32);
        }
    }
    Ok(())
}

/// `TopKLogitsWarper`'s survivors with finite logits, into `out` (in no particular order):
/// every value not below the k-th largest (under `total_cmp`), ties kept, as its `<` mask
/// keeps them. 0 < `k` < `logits.len()`.
///
/// One pass with a threshold that only rises: a value below the k-th largest of a subset is
/// below the k-th largest of all, so it can be dropped at once; the buffer of values at or above
/// the threshold is cut back to its top k whenever it fills.
fn top_k_candidates(logits: &[f32], k: usize, out: &mut Vec<u32>) -> Result<(), NotFinite> {
    debug_assert!(k > 0 && k < logits.len());
    let kth = |out: &mut Vec<u32>| {
        let (_, kth, _) = out.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        logits[*kth as usize]
    };
    out.clear();
    let mut cap = (8 * k).max(1024);
    let mut thr = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        // IEEE `>=` keeps -0.0 at a threshold of +0.0, which the `<` mask keeps too
        if x >= thr {
            out.push(i as u32);
            if out.len() >= cap {
                thr = kth(out);
                out.retain(|&j| logits[j as usize] >= thr);
                if out.len() * 2 > cap {
                    // many ties at the threshold: room for them, so that cutting stays rare
                    cap *= 2;
                }
            }
        } else if x.is_nan() {
            return Err(NotFinite);
        }
    }
    let kth = kth(out);
    out.retain(|&j| {
        let x = logits[j as usize];
        x >= kth && x > f32::NEG_INFINITY
    });
    Ok(())
}

/// First index of the maximum (NaN never wins).
/// All NaN: the last index (0 when empty).
pub fn argmax(xs: &[f32]) -> u32 {
    // the largest value in eight independent lanes, then its first position: one running
    // maximum is a dependency chain of several cycles per value (0.8 ms over 151k logits)
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let m = lanes
        .into_iter()
        .chain(tail.iter().copied())
        .fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
    match xs.iter().position(|&x| x == m) {
        Some(i) => i as u32,
        None => xs.len().saturating_sub(1) as u32,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampler as it was before candidates: transformers' warpers over the whole vocabulary,
    /// in f64. The new one must draw the same tokens.
    mod reference {
        use super::super::{apply_repetition_penalty, Rng, SamplingParams};

        /// First index of the maximum (NaN never wins), one value at a time.
        pub fn argmax(xs: &[f32]) -> u32 {
            let mut best = 0usize;
            for (i, &x) in xs.iter().enumerate() {
                if x > xs[best] || xs[best].is_nan() {
                    best = i;
                }
            }
            best as u32
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
    }

    #[test]
    fn argmax_takes_first_maximum() {
        let (n, inf) = (f32::NAN, f32::INFINITY);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[n, 0.5]), 1);
        assert_eq!(argmax(&[0.5, n]), 0);
        assert_eq!(argmax(&[n, n, n]), 2);
        assert_eq!(argmax(&[-inf, -inf]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
        // past the lanes: ties, NaNs and the maximum in the tail
        let mut rng = Rng::new(5);
        for len in [1usize, 7, 8, 9, 17, 1000, 151_936] {
            for _ in 0..20 {
                let l: Vec<f32> = (0..len)
                    .map(|_| match rng.next_u64() % 50 {
                        0 => n,
                        1 => -inf,
                        _ => (rng.next_u64() % 40) as f32,
                    })
                    .collect();
                assert_eq!(argmax(&l), reference::argmax(&l), "len {len}");
            }
        }
    }

    #[test]
    fn repetition_penalty_matches_hf_rule() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties_at_the_kth_value() {
        let l = [1.0, 5.0, 3.0, 3.0, 0.0, f32::NEG_INFINITY];
        let mut out = Vec::new();
        top_k_candidates(&l, 2, &mut out).unwrap();
        out.sort();
        assert_eq!(out, vec![1, 2, 3]);
        // -inf never is a candidate, even inside the top k
        top_k_candidates(&[f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY], 2, &mut out).unwrap();
        assert_eq!(out, vec![1]);
        assert_eq!(
            top_k_candidates(&[1.0, f32::NAN, 0.0], 1, &mut out),
            Err(NotFinite)
        );
    }

    /// Past the buffer's first cut: a long vector whose largest values come last (every value
    /// raises the threshold) and one of ties only (the buffer must grow, not cut forever).
    #[test]
    fn top_k_over_long_vectors_keeps_exactly_the_top() {
        let rising: Vec<f32> = (0..20_000).map(|i| i as f32).collect();
        let mut out = Vec::new();
        top_k_candidates(&rising, 50, &mut out).unwrap();
        out.sort();
        assert_eq!(out, (19_950..20_000).collect::<Vec<u32>>());
        let ties = vec![0.5f32; 20_000];
        top_k_candidates(&ties, 50, &mut out).unwrap();
        assert_eq!(out.len(), 20_000);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.25, 0.125, 0.125 (log-space): 0.7 keeps the first two
        let base = [0.5f32, 0.25, 0.125, 0.125].map(|p| p.ln());
        let drawn = |top_p| {
            let mut seen = [false; 4];
            for seed in 0..200 {
                let mut s = Sampler::new(SamplingParams {
                    temperature: 1.0,
                    top_k: 0,
                    top_p,
                    repetition_penalty: 1.0,
                    seed,
                    ..Default::default()
                });
                seen[s.next(&mut base.clone(), &[], &[]) as usize] = true;
            }
            seen
        };
        assert_eq!(drawn(0.7), [true, true, false, false]);
        assert_eq!(
            drawn(0.01),
            [true, false, false, false],
            "top-1 always kept"
        );
        assert_eq!(drawn(1.0), [true; 4]);
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
        reference::top_k_mask(&mut kept, 50);
        for t in run(7) {
            assert!(kept[t as usize].is_finite());
        }
    }

    /// Normal-ish values from the seeded generator (sum of four uniforms, centred).
    fn noise(rng: &mut Rng) -> f32 {
        ((0..4).map(|_| rng.next_f64()).sum::<f64>() - 2.0) as f32
    }

    fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
        xs[(rng.next_u64() % xs.len() as u64) as usize]
    }

    /// A logit vector of one of several kinds: smooth, scaled like a model's; heavy ties (with
    /// both zeros); mostly -inf; all -inf; a NaN or +inf among smooth values.
    fn logits(rng: &mut Rng, len: usize) -> Vec<f32> {
        let kind = rng.next_u64() % 10;
        let scale = pick(rng, &[0.5f32, 3.0, 10.0, 40.0]);
        let mut l: Vec<f32> = (0..len)
            .map(|_| match kind {
                0..=4 => noise(rng) * scale,
                5 | 6 => pick(rng, &[-1.0f32, -0.0, 0.0, 0.5, 1.0, 1.5]),
                7 => {
                    if rng.next_u64().is_multiple_of(8) {
                        noise(rng) * scale
                    } else {
                        f32::NEG_INFINITY
                    }
                }
                8 if rng.next_u64().is_multiple_of(4) => f32::NEG_INFINITY,
                _ => noise(rng) * scale,
            })
            .collect();
        if kind == 8 && rng.next_u64().is_multiple_of(2) {
            let at = (rng.next_u64() % len as u64) as usize;
            l[at] = pick(rng, &[f32::NAN, f32::INFINITY]);
        }
        if kind == 9 {
            l.fill(f32::NEG_INFINITY);
        }
        l
    }

    /// The same tokens as the whole-vocabulary sampler on every kind of logits and settings,
    /// over several steps (the generator's state must stay aligned too).
    #[test]
    fn draws_equal_the_whole_vocabulary_reference() {
        let mut rng = Rng::new(12);
        let mut distinct = std::collections::HashSet::new();
        let mut cases = 0;
        for len in [1usize, 2, 3, 7, 64, 1000, 5000, 151_936] {
            let n_cases = if len > 10_000 { 40 } else { 600 };
            for case in 0..n_cases {
                let base = logits(&mut rng, len);
                let params = SamplingParams {
                    do_sample: !rng.next_u64().is_multiple_of(8),
                    temperature: pick(&mut rng, &[0.7, 1.0, 0.05, 3.0, 1e-3, 1.7]),
                    top_p: pick(&mut rng, &[1.0, 0.95, 0.8, 0.5, 1e-9, 0.999_999]),
                    top_k: pick(&mut rng, &[0, 1, 2, 5, 50, len - 1, len, len + 3]),
                    repetition_penalty: pick(&mut rng, &[1.0, 1.1, 2.0, 0.8]),
                    seed: rng.next_u64(),
                    max_new_tokens: 100,
                    min_new_tokens: pick(&mut rng, &[0, 5]),
                };
                let stops: Vec<u32> = (0..3)
                    .map(|_| (rng.next_u64() % len as u64) as u32)
                    .collect();
                let mut generated: Vec<u32> = (0..rng.next_u64() % 8)
                    .map(|_| (rng.next_u64() % len as u64) as u32)
                    .collect();
                let (mut ours, mut theirs) = (
                    Sampler::new(params.clone()),
                    reference::Sampler::new(params.clone()),
                );
                for step in 0..3 {
                    let a = ours.next(&mut base.clone(), &generated, &stops);
                    let b = theirs.next(&mut base.clone(), &generated, &stops);
                    assert_eq!(a, b, "len {len} case {case} step {step}: {params:?}");
                    distinct.insert((len, a));
                    generated.push(a);
                    cases += 1;
                }
            }
        }
        // the cases draw many different tokens, not a constant that both would agree on
        assert!(distinct.len() > 1000, "{} distinct", distinct.len());
        assert!(cases > 10_000);
    }

    /// A NaN or +inf makes the draw token 0 (the reference's softmax is NaN throughout), and
    /// the generator still moves on by one draw.
    #[test]
    fn non_finite_logits_draw_token_zero_and_keep_the_stream() {
        let params = SamplingParams {
            repetition_penalty: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let mut s = Sampler::new(params.clone());
        assert_eq!(s.next(&mut [1.0, f32::NAN, 2.0, 3.0], &[], &[]), 0);
        assert_eq!(s.next(&mut [1.0, 2.0, f32::INFINITY, 3.0], &[], &[]), 0);
        assert_eq!(s.next(&mut [f32::NEG_INFINITY; 3], &[], &[]), 0);
        let mut fresh = Sampler::new(params);
        for _ in 0..3 {
            fresh.rng.next_f64();
        }
        let even = [1.0f32; 64];
        for _ in 0..20 {
            assert_eq!(
                s.next(&mut even.clone(), &[], &[]),
                fresh.next(&mut even.clone(), &[], &[])
            );
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
