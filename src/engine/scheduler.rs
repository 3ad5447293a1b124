//! Continuous batching: several requests decode together, each with its own KV cache, sampling
//! settings, stop strings and seed. A new request joins at the next step (its prompt prefilled
//! alone into its own cache, then decoded with the others); a request that ends (a stop token,
//! its length, a stop string, its cancel switch, or its client gone) leaves at once. A lone
//! request decodes exactly as [`Engine::run`] does; rows decode through [`Llm::decode_rows`].
//!
//! The conversation's KV cache ([`Engine::cache_for`]) goes to a request that can keep a prefix
//! of it, and the cache of the last request to finish becomes the conversation's, so that the
//! chat's next turn only prefills its new tokens.
//!
//! [`Llm::decode_rows`]: crate::model::llm::Llm::decode_rows
use super::chat::{ChatError, ChatInput, Engine, Fit};
use super::features;
use super::protocol::{Cancel, DoneStats, EngineEvent, Fault, Finish, GenerateRequest, RequestId};
use super::stream::AnswerStream;
use crate::model::llm::kv_cache::KvCache;
use crate::model::llm::Mask;
use crate::model::ModelError;
use crate::sampling::Sampler;
use crossbeam_channel::Sender;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// A request as the worker hands it over: what is asked, where its events go, its switch.
pub struct Job {
    pub req: GenerateRequest,
    pub reply: Sender<EngineEvent>,
    pub cancel: Cancel,
}

/// A request being decoded.
struct Row {
    id: RequestId,
    reply: Sender<EngineEvent>,
    cancel: Cancel,
    /// Its client stopped listening (a send failed).
    gone: bool,
    cache: KvCache,
    /// The prompt's ids.
    prompt: Vec<i64>,
    images: Vec<Vec<features::Key>>,
    /// [`Scheduler::epoch`] when it started: a reset since then keeps its cache from becoming
    /// the conversation's.
    epoch: u64,
    sampler: Sampler,
    tokens: Vec<u32>,
    stream: AnswerStream,
    t0: Instant,
    first: Option<Instant>,
}

/// The engine with the requests it is decoding.
pub struct Scheduler {
    pub engine: Engine,
    rows: Vec<Row>,
    epoch: u64,
    /// Prompt positions run through the model since load (the uncached parts of prompts).
    pub prefilled: usize,
    /// Generated ids of finished requests, kept when `record_tokens` is set (for tests).
    pub record_tokens: bool,
    pub finished_tokens: Vec<(RequestId, Vec<u32>)>,
}

impl Scheduler {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            rows: Vec::new(),
            epoch: 0,
            prefilled: 0,
            record_tokens: false,
            finished_tokens: Vec::new(),
        }
    }

    /// Requests being decoded.
    pub fn running(&self) -> usize {
        self.rows.len()
    }

    /// Forgets the cached conversation (requests running keep their own caches, which no
    /// longer become the conversation's).
    pub fn reset(&mut self) {
        self.epoch += 1;
        self.engine.reset();
    }

    /// Takes `job` into the batch: prepares its prompt, sends `Started`, prefills it into its
    /// own cache and chooses its first token (a request can end there). An `Err` is the
    /// request's failure; nothing of it stays.
    pub fn start(&mut self, job: &Job) -> Result<(), ChatError> {
        let t0 = Instant::now();
        let req = &job.req;
        let engine = &mut self.engine;
        let input = ChatInput {
            system: req.system.as_deref(),
            history: &req.history,
            question: &req.question,
            attachments: &req.attachments,
            combine_images: req.combine_images,
        };
        let fit = Fit {
            max_new_tokens: req.params.max_new_tokens,
            truncate_history: req.truncate_history,
        };
        let prepared = engine.prepare_to_fit(&input, fit)?;
        req.params.validate().map_err(ChatError::Invalid)?;
        let started = EngineEvent::Started {
            id: req.id,
            question: prepared.question.clone(),
            prompt_tokens: prepared.prompt_tokens(),
            dropped_turns: prepared.dropped_turns,
        };
        let gone = job.reply.send(started).is_err();
        let _guard = tch::no_grad_guard();
        let (mut cache, images, image_embeds) = engine.cache_for(&prepared);
        // the uncached part of the prompt, alone, as `generate` runs one sequence
        let ids = &prepared.ids;
        let (past, len) = (cache.len(), ids.len() as i64);
        let new_ids = Tensor::from_slice(&ids[past as usize..]).view([1, len - past]);
        let embeds = engine.model.embed_with_images(
            &new_ids,
            engine.img_context_id,
            image_embeds.as_ref(),
        )?;
        let positions = Tensor::arange_start(past, len, (Kind::Int64, Device::Cpu)).view([1, -1]);
        let hidden = engine
            .model
            .llm
            .prefill(&embeds, &positions, &mut cache, &Mask::Causal);
        let logits = engine.model.llm.last_logits(&hidden);
        self.prefilled += (len - past) as usize;
        let row = Row {
            id: req.id,
            reply: job.reply.clone(),
            cancel: job.cancel.clone(),
            gone,
            cache,
            prompt: prepared.ids,
            images,
            epoch: self.epoch,
            sampler: Sampler::new(req.params.clone()),
            tokens: Vec::new(),
            stream: self.engine.answer_stream().with_stop_strings(&req.stop),
            t0,
            first: None,
        };
        self.rows.push(row);
        let at = self.rows.len() - 1;
        let chosen = self.choose(&logits, at);
        if chosen.is_err() {
            self.rows.truncate(at);
        }
        chosen
    }

    /// Drops the rows after the first `n` without a word (a request whose start failed).
    pub fn truncate(&mut self, n: usize) {
        self.rows.truncate(n);
    }

    /// One decoding step of every running request; those that end leave, with their `Done`.
    pub fn step(&mut self) -> Result<(), ChatError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let llm = &self.engine.model.llm;
        let tokens: Vec<i64> = self
            .rows
            .iter()
            .map(|r| *r.tokens.last().expect("a running row has a token to feed") as i64)
            .collect();
        let _threads = llm.decoding_threads(tokens.len());
        let logits = if let [row] = self.rows.as_mut_slice() {
            // alone: exactly `generate`'s step
            let embeds = llm.embed(&Tensor::from_slice(&tokens).view([1, 1]));
            let pos = Tensor::from_slice(&[row.cache.len()]).view([1, 1]);
            let hidden = llm.forward(
                &embeds.to_device(self.engine.model.dev),
                &pos,
                &mut row.cache,
                &Mask::Causal,
            );
            llm.last_logits(&hidden)
        } else {
            let mut caches: Vec<&mut KvCache> =
                self.rows.iter_mut().map(|r| &mut r.cache).collect();
            llm.decode_rows(&mut caches, &tokens)
        };
        drop(_threads);
        self.choose(&logits, 0)
    }

    /// Chooses the next token of rows `from..` from their `logits` (one row of logits each, in
    /// order), sends their text, and ends the rows that are done.
    fn choose(&mut self, logits: &Tensor, from: usize) -> Result<(), ChatError> {
        let vocab = (self.engine.tokenizer.vocab_size() as i64).min(logits.size()[1]);
        let host = logits
            .narrow(1, 0, vocab)
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        let stop_ids = self.engine.stop_ids.clone();
        let mut ended = Vec::new();
        for (i, row) in self.rows[from..].iter_mut().enumerate() {
            let max_new = row.sampler.params().max_new_tokens;
            let finish = if max_new == 0 {
                Some(Finish::Length)
            } else {
                let mut l: Vec<f32> =
                    Vec::try_from(host.get(i as i64)).map_err(ModelError::from)?;
                let tok = row.sampler.next(&mut l, &row.tokens, &stop_ids);
                row.tokens.push(tok);
                row.first.get_or_insert_with(Instant::now);
                if let Some(text) = row.stream.push(tok) {
                    let ev = EngineEvent::Token { id: row.id, text };
                    row.gone |= row.reply.send(ev).is_err();
                }
                let mut finish = if stop_ids.contains(&tok) {
                    Some(Finish::Stop)
                } else if row.tokens.len() >= max_new {
                    Some(Finish::Length)
                } else {
                    None
                };
                let stopped =
                    row.gone || row.cancel.is_cancelled() || row.stream.before_stop().is_some();
                if stopped && finish != Some(Finish::Stop) {
                    finish = Some(Finish::Cancelled);
                }
                finish
            };
            if let Some(f) = finish {
                ended.push((from + i, f));
            }
        }
        for (at, finish) in ended.into_iter().rev() {
            let row = self.rows.remove(at);
            self.finish(row, finish);
        }
        Ok(())
    }

    /// Sends a finished row's `Done` and keeps its cache as the conversation's.
    fn finish(&mut self, mut row: Row, finish: Finish) {
        let engine = &self.engine;
        if let Some(text) = row.stream.finish() {
            let _ = row.reply.send(EngineEvent::Token { id: row.id, text });
        }
        // a stop string ends the answer, whatever else ended generation
        let (answer, finish) = match row.stream.before_stop() {
            Some(text) => (engine.response_text(text), Finish::Stop),
            None => (engine.answer_text(&row.tokens), finish),
        };
        let first = row.first.unwrap_or_else(Instant::now);
        let n = row.tokens.len();
        let decode_s = first.elapsed().as_secs_f64();
        let _ = row.reply.send(EngineEvent::Done {
            id: row.id,
            answer,
            stats: DoneStats {
                finish,
                prompt_tokens: row.prompt.len(),
                completion_tokens: n,
                ttft: first - row.t0,
                tokens_per_s: DoneStats::decode_rate(n, decode_s),
            },
        });
        if self.record_tokens {
            self.finished_tokens.push((row.id, row.tokens.clone()));
        }
        if row.epoch == self.epoch {
            // the cache holds the prompt and every generated token but the last
            let mut ids = row.prompt;
            ids.extend(row.tokens[..n.saturating_sub(1)].iter().map(|&t| t as i64));
            self.engine.keep_conversation(row.cache, ids, row.images);
        }
    }

    /// Ends every running request with an error (after a step failed); their caches are
    /// dropped.
    pub fn fail_all(&mut self, message: &str, fault: Fault) {
        for row in self.rows.drain(..) {
            let _ = row.reply.send(EngineEvent::Error {
                id: row.id,
                message: message.to_string(),
                fault,
            });
        }
    }
}
