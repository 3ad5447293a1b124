//! The generation loop of `model.chat` / `batch_chat`: prefill (left-padded for batches, with
//! positions from the attention mask as transformers computes them), then one token at a time
//! until every row has produced a stop token or `max_new_tokens`.
use super::protocol::Finish;
use crate::model::llm::kv_cache::KvCache;
use crate::model::llm::{padded_mask, Mask};
use crate::model::{InternVL, ModelError};
use crate::sampling::Sampler;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct RowOutput {
    /// New tokens, the stop token included when generated.
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

#[derive(Debug)]
pub struct GenOutput {
    pub rows: Vec<RowOutput>,
    /// Last-position logits of the prefill, [b, vocab] f32, when asked for.
    pub first_logits: Option<Tensor>,
    /// Positions run through the model in the prefill (the uncached part of the prompt).
    pub prefill_tokens: usize,
    pub prefill: Duration,
    pub decode: Duration,
}

/// What the token callback tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Cancel,
}

pub struct GenInput<'a> {
    /// Token ids of each row (unpadded). With one row and a non-empty `cache`, the first
    /// `cache.len()` ids are taken as already cached.
    pub rows: &'a [Vec<i64>],
    /// Features of every image, in prompt order: [tiles, 256, hidden]. Only the images whose
    /// `<IMG_CONTEXT>` tokens are not cached.
    pub image_embeds: Option<&'a Tensor>,
    pub img_context_id: i64,
    pub stop_ids: &'a [u32],
    pub pad_id: i64,
    pub keep_first_logits: bool,
    /// Ids the tokenizer can decode: logits past them (the padding rows of a padded vocabulary,
    /// e.g. Qwen3's 151936 rows over 151678 tokens) are never sampled.
    pub vocab: usize,
}

/// Runs generation. `on_token(row, token)` sees each token as it is chosen.
pub fn generate(
    model: &InternVL,
    cache: &mut KvCache,
    input: &GenInput,
    samplers: &mut [Sampler],
    on_token: &mut dyn FnMut(usize, u32) -> Flow,
) -> Result<GenOutput, ModelError> {
    let b = input.rows.len();
    assert_eq!(b, samplers.len(), "one sampler per row");
    let dev = model.dev;
    let t0 = Instant::now();
    let past = if b == 1 { cache.len() } else { 0 };
    if b > 1 {
        cache.truncate(0);
    }
    let max_len = input.rows.iter().map(|r| r.len()).max().unwrap_or(0);
    // left padding
    let mut ids = Vec::with_capacity(b * max_len);
    let mut valid = Vec::with_capacity(b * max_len);
    for r in input.rows {
        let pad = max_len - r.len();
        ids.extend(std::iter::repeat_n(input.pad_id, pad));
        ids.extend(r.iter().copied());
        valid.extend(std::iter::repeat_n(false, pad));
        valid.extend(std::iter::repeat_n(true, r.len()));
    }
    let ids = Tensor::from_slice(&ids).view([b as i64, max_len as i64]);
    let mut valid = Tensor::from_slice(&valid).view([b as i64, max_len as i64]);
    let padded = b > 1 && input.rows.iter().any(|r| r.len() != max_len);
    let new_ids = ids.narrow(1, past, max_len as i64 - past);
    let embeds = model.embed_with_images(&new_ids, input.img_context_id, input.image_embeds)?;
    // position_ids = cumsum(mask) - 1, pads set to 1 (transformers' prepare_inputs_for_generation)
    let positions = (valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1)
        .masked_fill(&valid.logical_not(), 1)
        .narrow(1, past, max_len as i64 - past);
    let mask = if padded {
        Mask::Explicit(padded_mask(&valid, max_len as i64 - past))
    } else {
        Mask::Causal
    };
    let hidden = model.llm.prefill(&embeds, &positions, cache, &mask);
    let mut logits = model.llm.last_logits(&hidden);
    let first_logits = input
        .keep_first_logits
        .then(|| logits.to_device(tch::Device::Cpu));
    let prefill = t0.elapsed();
    let t1 = Instant::now();
    let _threads = model.llm.decoding_threads(b);

    let mut rows: Vec<RowOutput> = (0..b)
        .map(|_| RowOutput {
            tokens: Vec::new(),
            finish: Finish::Length,
        })
        .collect();
    let mut done = vec![false; b];
    let mut next_pos: Vec<i64> = input.rows.iter().map(|r| r.len() as i64).collect();
    let max_new = samplers
        .iter()
        .map(|s| s.params().max_new_tokens)
        .max()
        .unwrap_or(0);
    'steps: for step in 0..max_new {
        let vocab = (input.vocab as i64).min(logits.size()[1]);
        let host = logits
            .narrow(1, 0, vocab)
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float);
        let mut next = vec![input.pad_id; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            let mut l: Vec<f32> = Vec::try_from(host.get(r as i64)).map_err(ModelError::from)?;
            let tok = samplers[r].next(&mut l, &rows[r].tokens, input.stop_ids);
            rows[r].tokens.push(tok);
            next[r] = tok as i64;
            if input.stop_ids.contains(&tok) {
                rows[r].finish = Finish::Stop;
                done[r] = true;
            } else if rows[r].tokens.len() >= samplers[r].params().max_new_tokens {
                done[r] = true;
            }
            if on_token(r, tok) == Flow::Cancel {
                for (row, d) in rows.iter_mut().zip(done.iter()) {
                    if !*d {
                        row.finish = Finish::Cancelled;
                    }
                }
                if rows[r].finish != Finish::Stop {
                    rows[r].finish = Finish::Cancelled;
                }
                break 'steps;
            }
        }
        if done.iter().all(|d| *d) || step + 1 == max_new {
            break;
        }
        let step_ids = Tensor::from_slice(&next).view([b as i64, 1]);
        let embeds = model.llm.embed(&step_ids);
        let pos = Tensor::from_slice(&next_pos).view([b as i64, 1]);
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        let mask = if padded {
            valid = Tensor::cat(
                &[
                    &valid,
                    &Tensor::ones([b as i64, 1], (Kind::Bool, valid.device())),
                ],
                1,
            );
            Mask::Explicit(padded_mask(&valid, 1))
        } else {
            Mask::Causal
        };
        let hidden = model
            .llm
            .forward(&embeds.to_device(dev), &pos, cache, &mask);
        logits = model.llm.last_logits(&hidden);
    }
    Ok(GenOutput {
        rows,
        first_logits,
        prefill_tokens: max_len - past as usize,
        prefill,
        decode: t1.elapsed(),
    })
}
