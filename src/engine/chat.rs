//! `model.chat` end to end: attachments -> tiles -> query -> ids -> generation -> answer, with the
//! conversation's KV cache kept between turns so a follow-up only prefills its new tokens.
use super::features::{self, FeatureCache};
use super::fit::{smallest_cut, Cut, Room};
use super::generate::{generate, Flow, GenInput, GenOutput};
use super::protocol::{Attachment, Finish, Turn};
use super::reuse::{self, Cached, Reuse};
use super::stream::AnswerStream;
use crate::model::config::Layout;
use crate::model::llm::kv_cache::KvCache;
use crate::model::{InternVL, LoadOptions, ModelError};
use crate::preprocess::{self, TileCache, TileConfig, TileKey, Visual, VisualError};
use crate::prompt::conversation::{
    droppable_turns, expand, Conversation, Expanded, Media, PastTurn,
};
use crate::prompt::hf::HfPrompt;
use crate::prompt::template::{get_template, Template};
use crate::prompt::tokenizer::Tokenizer;
use crate::prompt::PromptError;
use crate::sampling::{Sampler, SamplingParams};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Visual(#[from] VisualError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Template(#[from] crate::prompt::template::TemplateError),
    #[error("{0}")]
    Tokenizer(String),
    #[error("{0}")]
    Invalid(String),
    #[error("prompt of {prompt} tokens plus {max_new} new tokens exceeds the context window of {context} tokens")]
    TooLong {
        prompt: usize,
        max_new: usize,
        context: usize,
    },
    #[error("question of {bytes} bytes is at least {min_tokens} tokens (no token covers more than {max_token_bytes} bytes), which with {max_new} new tokens exceeds the context window of {context} tokens")]
    TextTooLong {
        bytes: usize,
        min_tokens: usize,
        max_token_bytes: usize,
        max_new: usize,
        context: usize,
    },
    #[error("prompt of {prompt} tokens plus {max_new} new tokens exceeds the context window of {context} tokens even with the {dropped} oldest turns left out")]
    TooLongAlone {
        prompt: usize,
        max_new: usize,
        context: usize,
        dropped: usize,
    },
}

/// One question of a request, ready for the model.
pub struct Prepared {
    /// The question as sent, with placeholders.
    pub question: String,
    pub query: String,
    pub ids: Vec<i64>,
    /// Tiles of each placeholder of the whole conversation, in prompt order.
    pub num_patches: Vec<usize>,
    /// The visuals of the whole conversation (history first), for the placeholders in order.
    visuals: Vec<Arc<Visual>>,
    /// Oldest turns of the history left out of the prompt to fit the context window.
    pub dropped_turns: usize,
}

impl Prepared {
    pub fn prompt_tokens(&self) -> usize {
        self.ids.len()
    }
}

/// What a prompt must leave room for (see [`Engine::prepare_to_fit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    pub max_new_tokens: usize,
    /// Leave out the oldest turns when the prompt would not fit, instead of refusing it.
    pub truncate_history: bool,
}

/// A chat request in model.chat's terms.
#[derive(Clone, Copy)]
pub struct ChatInput<'a> {
    pub system: Option<&'a str>,
    pub history: &'a [Turn],
    pub question: &'a str,
    pub attachments: &'a [Attachment],
    pub combine_images: bool,
}

pub struct ChatOutput {
    pub answer: String,
    pub tokens: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub gen: GenOutput,
}

pub struct Engine {
    pub model: InternVL,
    pub tokenizer: Arc<Tokenizer>,
    /// The conversation template of a remote-code checkpoint (unused for -hf ones, whose
    /// prompts come from `hf`).
    pub template: Template,
    /// -hf checkpoints: their chat template and processor tokens.
    pub hf: Option<HfPrompt>,
    pub dir: PathBuf,
    pub img_context_id: i64,
    pub stop_ids: Vec<u32>,
    pub tiles: TileConfig,
    /// Conversation state: the ids the KV cache holds.
    cached_ids: Vec<i64>,
    /// Fingerprints of the pictures behind the cached ids' `<IMG_CONTEXT>` runs, in order: the
    /// ids of two different pictures with the same tile count are the same.
    cached_images: Vec<Vec<features::Key>>,
    cache: KvCache,
    /// Vision features by tile content; kept across conversations (see features.rs).
    features: FeatureCache,
    /// Decoded attachments; the chat shares it with its attachment probe
    /// ([`Engine::with_tile_cache`]).
    tile_cache: Arc<TileCache>,
    /// The context window: prompt plus answer (`LoadOptions::context`, else the config's).
    context: usize,
    /// Tile counts of attachments already read, so that fitting a long history into the
    /// context does not decode every old picture again on every request. Keyed by the
    /// attachment, the tile limit and the file's size and modification time.
    tile_counts: RefCell<HashMap<TileKey, Vec<usize>>>,
}

/// Bytes of image features the engine keeps (about 570 tiles of InternVL2_5-1B, 64 of -78B).
const FEATURE_CACHE_BYTES: u64 = 256 << 20;

/// Entries of [`Engine::tile_counts`] kept at most (a few bytes each).
const TILE_COUNTS_KEPT: usize = 4096;

impl Engine {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, ChatError> {
        let model = InternVL::load(dir, opts)?;
        let tokenizer =
            Tokenizer::from_dir(dir).map_err(|e| ChatError::Tokenizer(e.to_string()))?;
        let template = get_template(model.cfg.template_name())?;
        let need = |tok: &str| {
            tokenizer.token_to_id(tok).ok_or_else(|| {
                ChatError::Tokenizer(format!(
                    "{}: tokenizer has no {tok} token (needed by the model)",
                    dir.display()
                ))
            })
        };
        let hf = match model.cfg.layout {
            Layout::RemoteCode => None,
            Layout::Hf => Some(HfPrompt::load(dir).map_err(|e| ChatError::Invalid(e.to_string()))?),
        };
        let (img_context_id, mut stop_ids) = match &hf {
            None => (
                need("<IMG_CONTEXT>")? as i64,
                vec![need(template.stop_token())?],
            ),
            Some(p) => hf_tokens(dir, &model, &tokenizer, p)?,
        };
        if let Some(eos) = tokenizer.eos_id() {
            if !stop_ids.contains(&eos) {
                stop_ids.push(eos);
            }
        }
        // -hf tokenizers may add the processor's video token past the embedding rows
        // (InternVL3-hf: `<video>` 151674 with vocab_size 151674); the processor replaces it
        // before the model sees it (a prompt whose media tokens are not all replaced is refused)
        let past_rows = hf.as_ref().map_or(0, |p| {
            usize::from(
                tokenizer
                    .token_to_id(&p.video_token)
                    .is_some_and(|id| id as usize + 1 == tokenizer.vocab_size()),
            )
        });
        if tokenizer.vocab_size() - past_rows > model.cfg.llm_config.vocab_size {
            return Err(ChatError::Tokenizer(format!(
                "{}: tokenizer has {} tokens but the model's vocab_size is {}",
                dir.display(),
                tokenizer.vocab_size(),
                model.cfg.llm_config.vocab_size
            )));
        }
        let tiles = model
            .cfg
            .tile_config_in(dir)
            .map_err(|e| ChatError::Invalid(e.to_string()))?;
        let context = opts
            .context
            .unwrap_or_else(|| model.cfg.llm_config.context_window());
        let mut cache = model.llm.new_cache();
        cache.set_limit(context);
        Ok(Self {
            model,
            tokenizer: Arc::new(tokenizer),
            template,
            hf,
            dir: dir.into(),
            img_context_id,
            stop_ids,
            tiles,
            cached_ids: Vec::new(),
            cached_images: Vec::new(),
            cache,
            context,
            features: FeatureCache::new(FEATURE_CACHE_BYTES),
            tile_cache: Arc::default(),
            tile_counts: RefCell::default(),
        })
    }

    /// Decoded attachments go into `cache` instead of the engine's own: its owner (the chat)
    /// fills it ahead of the engine when a picture is staged.
    pub fn with_tile_cache(mut self, cache: Arc<TileCache>) -> Self {
        self.tile_cache = cache;
        self
    }

    /// The cache the engine reads decoded attachments from (a JSONL reader fills it ahead).
    pub fn tile_cache(&self) -> &Arc<TileCache> {
        &self.tile_cache
    }

    pub fn system_message(&self) -> String {
        if self.hf.is_some() {
            // -hf: only what the chat template itself writes, or the user's
            return String::new();
        }
        self.model
            .cfg
            .system_message
            .clone()
            .unwrap_or_else(|| self.template.system_message.clone())
    }

    pub fn context_len(&self) -> usize {
        self.context
    }

    /// Positions held by the conversation's KV cache, and the positions its buffers have room
    /// for; neither exceeds [`Engine::context_len`].
    pub fn kv_cache_size(&self) -> (usize, usize) {
        (self.cache.len() as usize, self.cache.capacity() as usize)
    }

    /// Forgets the cached conversation.
    pub fn reset(&mut self) {
        self.cached_ids.clear();
        self.cached_images.clear();
        self.cache.truncate(0);
    }

    /// [`Engine::reset`], and forgets the vision features and decoded tiles kept for pictures
    /// seen before: the next turn starts as cold as the first of the process.
    pub fn reset_cold(&mut self) {
        self.reset();
        self.features.clear();
        self.tile_cache.clear();
    }

    /// Loads attachments, adds placeholders, builds the query and its ids (the whole history,
    /// whatever its length; see [`Engine::prepare_to_fit`]).
    ///
    /// Each turn's `<image>` placeholders take its attachments' tiles: one placeholder per image
    /// or frame, or a single placeholder for all of them (combined). History turns without
    /// attachments but with placeholders (a JSONL `history`, as the reference's `chat` takes
    /// it) are filled by the request's attachments first, and the question then gets no
    /// automatic prefix, as in `chat` when `history` is given.
    pub fn prepare(&self, input: &ChatInput) -> Result<Prepared, ChatError> {
        let new = self.load_new(input.attachments)?;
        let history = input
            .history
            .iter()
            .map(|t| self.load_all(&t.attachments))
            .collect::<Result<Vec<_>, _>>()?;
        self.assemble(input, history, new, 0)
    }

    /// [`Engine::prepare`] for a prompt that must leave room for `fit.max_new_tokens` in the
    /// context window. When it does not fit, it is refused with the numbers, or, with
    /// `fit.truncate_history`, the oldest whole turns (their pictures with them) are left out
    /// until it fits; `Prepared::dropped_turns` says how many. The system message and the new
    /// question are always kept.
    pub fn prepare_to_fit(&self, input: &ChatInput, fit: Fit) -> Result<Prepared, ChatError> {
        let context = self.context_len();
        let too_long = |prompt: usize| ChatError::TooLong {
            prompt,
            max_new: fit.max_new_tokens,
            context,
        };
        // A question longer in bytes than the whole window is measured before it is tokenized
        // (which takes seconds for megabytes); it stays whatever turns are left out.
        if input.question.len() > context {
            if let Some(min) = self.tokenizer.min_tokens(input.question) {
                if min.tokens + fit.max_new_tokens > context {
                    return Err(ChatError::TextTooLong {
                        bytes: min.bytes,
                        min_tokens: min.tokens,
                        max_token_bytes: min.max_token_bytes,
                        max_new: fit.max_new_tokens,
                        context,
                    });
                }
            }
        }
        if !fit.truncate_history || input.history.is_empty() {
            let p = self.prepare(input)?;
            if p.ids.len() + fit.max_new_tokens > context {
                return Err(too_long(p.ids.len()));
            }
            return Ok(p);
        }
        let new = self.load_new(input.attachments)?;
        // tile counts of every turn (cheap: no resizing), to find the cut before loading pictures
        let shapes: Vec<Vec<Media>> = input
            .history
            .iter()
            .map(|t| {
                t.attachments
                    .iter()
                    .map(|a| {
                        Ok(Media {
                            video: matches!(a, Attachment::Video { .. }),
                            tiles: self.placeholder_tiles(a)?,
                        })
                    })
                    .collect::<Result<Vec<_>, VisualError>>()
            })
            .collect::<Result<_, _>>()?;
        let new_media: Vec<Media> = new.iter().map(|(m, _)| m.clone()).collect();
        let turns: Vec<PastTurn> = input
            .history
            .iter()
            .zip(&shapes)
            .map(|(t, m)| PastTurn {
                question: &t.question,
                answer: &t.answer,
                media: m.clone(),
            })
            .collect();
        let system = self.system_of(input);
        let tokens = |drop: usize| -> Result<usize, ChatError> {
            let (e, _) = self.expand(&Conversation {
                system: &system,
                history: &turns[drop..],
                question: input.question,
                media: &new_media,
                combine_images: input.combine_images,
            })?;
            Ok(self.encode(&e.query)?.len())
        };
        let room = Room {
            context,
            max_new_tokens: fit.max_new_tokens,
        };
        let drop = match smallest_cut(droppable_turns(&turns), room, tokens)? {
            Cut::Drop(d) => d,
            Cut::TooLong { prompt, dropped } => {
                return Err(ChatError::TooLongAlone {
                    prompt,
                    max_new: fit.max_new_tokens,
                    context,
                    dropped,
                })
            }
        };
        let history = input.history[drop..]
            .iter()
            .map(|t| self.load_all(&t.attachments))
            .collect::<Result<Vec<_>, _>>()?;
        let kept = ChatInput {
            history: &input.history[drop..],
            ..*input
        };
        let p = self.assemble(&kept, history, new, drop)?;
        if !room.fits(p.ids.len()) {
            return Err(too_long(p.ids.len()));
        }
        Ok(p)
    }

    /// [`preprocess::placeholder_tiles`], remembered while the file stays the same.
    fn placeholder_tiles(&self, a: &Attachment) -> Result<Vec<usize>, VisualError> {
        let key = TileKey::of(a, &self.tiles);
        if let Some(hit) = key
            .as_ref()
            .and_then(|k| self.tile_counts.borrow().get(k).cloned())
        {
            return Ok(hit);
        }
        let tiles = preprocess::placeholder_tiles(a, &self.tiles)?;
        if let Some(k) = key {
            let mut counts = self.tile_counts.borrow_mut();
            if counts.len() >= TILE_COUNTS_KEPT {
                counts.clear();
            }
            counts.insert(k, tiles.clone());
        }
        Ok(tiles)
    }

    fn system_of(&self, input: &ChatInput) -> String {
        input
            .system
            .map(str::to_string)
            .unwrap_or_else(|| self.system_message())
    }

    /// The conversation's query: the remote-code template and placeholders, or for an -hf
    /// checkpoint its chat template and processor (with the order its media fill the prompt,
    /// as indices into the history's then the question's attachments).
    fn expand(&self, conv: &Conversation) -> Result<(Expanded, Option<Vec<usize>>), ChatError> {
        match &self.hf {
            None => Ok((
                expand(&self.template, conv, self.tiles.tokens_per_tile)?,
                None,
            )),
            Some(p) => {
                let e = crate::prompt::hf::expand(p, conv)?;
                Ok((
                    Expanded {
                        question: e.question,
                        query: e.query,
                        num_patches: e.num_patches,
                    },
                    Some(e.order),
                ))
            }
        }
    }

    fn encode(&self, query: &str) -> Result<Vec<i64>, ChatError> {
        Ok(self
            .tokenizer
            .encode(query)
            .map_err(|e| ChatError::Tokenizer(e.to_string()))?
            .into_iter()
            .map(|t| t as i64)
            .collect())
    }

    fn load_all(&self, attachments: &[Attachment]) -> Result<Vec<(Media, Arc<Visual>)>, ChatError> {
        attachments
            .iter()
            .map(|a| {
                let v = self.tile_cache.load(a, &self.tiles)?;
                let m = Media {
                    video: matches!(a, Attachment::Video { .. }),
                    tiles: v.placeholders.iter().map(Vec::len).collect(),
                };
                Ok((m, v))
            })
            .collect()
    }

    /// The new question's attachments in the order placeholders are added: images, then videos.
    fn load_new(&self, attachments: &[Attachment]) -> Result<Vec<(Media, Arc<Visual>)>, ChatError> {
        let (images, videos): (Vec<Attachment>, Vec<Attachment>) = attachments
            .iter()
            .cloned()
            .partition(|a| matches!(a, Attachment::Image { .. }));
        self.load_all(&[images, videos].concat())
    }

    /// The prepared request from loaded attachments: `history` holds those of `input.history`.
    fn assemble(
        &self,
        input: &ChatInput,
        history: Vec<Vec<(Media, Arc<Visual>)>>,
        new: Vec<(Media, Arc<Visual>)>,
        dropped_turns: usize,
    ) -> Result<Prepared, ChatError> {
        let mut visuals = Vec::new();
        let mut turns = Vec::with_capacity(history.len());
        for (t, loaded) in input.history.iter().zip(history) {
            let (media, vs): (Vec<Media>, Vec<Arc<Visual>>) = loaded.into_iter().unzip();
            visuals.extend(vs);
            turns.push(PastTurn {
                question: &t.question,
                answer: &t.answer,
                media,
            });
        }
        let (new_media, new_visuals): (Vec<Media>, Vec<Arc<Visual>>) = new.into_iter().unzip();
        visuals.extend(new_visuals);
        let system = self.system_of(input);
        let (e, order) = self.expand(&Conversation {
            system: &system,
            history: &turns,
            question: input.question,
            media: &new_media,
            combine_images: input.combine_images,
        })?;
        if let Some(order) = order {
            // -hf: the features fill the prompt in the order its media tokens come
            visuals = order.iter().map(|&i| visuals[i].clone()).collect();
        }
        let ids = self.encode(&e.query)?;
        Ok(Prepared {
            question: e.question,
            query: e.query,
            ids,
            num_patches: e.num_patches,
            visuals,
            dropped_turns,
        })
    }

    /// Features [tiles, 256, hidden] of the tiles of `prepared` (each conversation's tiles
    /// after its first `skip`), in order; tiles seen before come from the feature cache.
    /// `keys`: the tiles' content keys when known (all of them, before `skip`).
    fn image_features(
        &mut self,
        prepared: &[&Prepared],
        skip: usize,
        keys: Option<&[features::Key]>,
    ) -> Option<Tensor> {
        let tiles: Vec<&::image::RgbImage> = prepared
            .iter()
            .flat_map(|p| {
                p.visuals
                    .iter()
                    .flat_map(|v| v.placeholders.iter())
                    .flatten()
                    .skip(skip)
            })
            .collect();
        if tiles.is_empty() {
            return None;
        }
        let keys: Vec<features::Key> = match keys {
            Some(k) => k[skip..].to_vec(),
            None => tiles.iter().map(|t| features::key(t)).collect(),
        };
        let (model, size) = (&self.model, self.tiles.image_size as i64);
        let hf = self.tiles.hf;
        Some(self.features.features(&tiles, &keys, |todo| {
            let data = match &hf {
                None => preprocess::image::normalize_tiles(todo),
                Some(p) => preprocess::hf::normalize_tiles(todo, p),
            };
            model.extract_feature(&Tensor::from_slice(&data).view([
                todo.len() as i64,
                3,
                size,
                size,
            ]))
        }))
    }

    /// The feature cache's (hits, misses) in tiles since load.
    pub fn feature_cache_stats(&self) -> (usize, usize) {
        (self.features.hits, self.features.misses)
    }

    /// What of the conversation's KV cache `p` can keep ([`reuse::plan`]), with the
    /// fingerprints of `p`'s pictures.
    fn reuse_for(&self, p: &Prepared) -> (Vec<Vec<features::Key>>, Reuse) {
        let fingerprints = Self::image_fingerprints(p);
        let rope = &self.model.llm.rope;
        let r = reuse::plan(
            &Cached {
                ids: &self.cached_ids,
                images: &self.cached_images,
            },
            &p.ids,
            self.img_context_id,
            &fingerprints,
            self.tiles.tokens_per_tile,
            rope.dynamic_flavor().map(|_| rope.max_positions()),
        );
        (fingerprints, r)
    }

    /// One fingerprint per `<IMG_CONTEXT>` run: the content keys of its placeholder's tiles
    /// (sha256 of each tile, the feature cache's keys).
    fn image_fingerprints(p: &Prepared) -> Vec<Vec<features::Key>> {
        let mut tiles = p
            .visuals
            .iter()
            .flat_map(|v| v.placeholders.iter())
            .flatten();
        p.num_patches
            .iter()
            .map(|&n| tiles.by_ref().take(n).map(features::key).collect())
            .collect()
    }

    /// Runs one prepared question, reusing the cached conversation prefix.
    pub fn run(
        &mut self,
        p: &Prepared,
        params: &SamplingParams,
        on_token: &mut dyn FnMut(u32) -> Flow,
    ) -> Result<ChatOutput, ChatError> {
        params.validate().map_err(ChatError::Invalid)?;
        let context = self.context_len();
        if p.ids.len() + params.max_new_tokens > context {
            return Err(ChatError::TooLong {
                prompt: p.ids.len(),
                max_new: params.max_new_tokens,
                context,
            });
        }
        let _guard = tch::no_grad_guard();
        let (
            fingerprints,
            Reuse {
                positions: reuse,
                cached_tiles,
            },
        ) = self.reuse_for(p);
        self.cache.truncate(reuse as i64);
        self.cached_ids.truncate(reuse);
        let keys: Vec<features::Key> = fingerprints.iter().flatten().copied().collect();
        let image_embeds = self.image_features(&[p], cached_tiles, Some(&keys));
        let mut sampler = Sampler::new(params.clone());
        let result = generate(
            &self.model,
            &mut self.cache,
            &GenInput {
                rows: std::slice::from_ref(&p.ids),
                image_embeds: image_embeds.as_ref(),
                img_context_id: self.img_context_id,
                stop_ids: &self.stop_ids,
                pad_id: 0,
                keep_first_logits: true,
                vocab: self.tokenizer.vocab_size(),
            },
            std::slice::from_mut(&mut sampler),
            &mut |_, t| on_token(t),
        );
        let gen = match result {
            Ok(g) => g,
            Err(e) => {
                self.reset();
                return Err(e.into());
            }
        };
        let row = &gen.rows[0];
        // the cache now holds the prompt and every generated token but the last
        self.cached_ids = p.ids.clone();
        self.cached_ids.extend(
            row.tokens[..row.tokens.len().saturating_sub(1)]
                .iter()
                .map(|&t| t as i64),
        );
        self.cached_images = fingerprints;
        debug_assert_eq!(self.cached_ids.len() as i64, self.cache.len());
        Ok(ChatOutput {
            answer: self.answer_text(&row.tokens),
            tokens: row.tokens.clone(),
            finish: row.finish,
            prompt_tokens: p.ids.len(),
            gen,
        })
    }

    /// A KV cache of its own for a request of the scheduler, sized for the context window.
    pub(crate) fn new_cache(&self) -> KvCache {
        let mut cache = self.model.llm.new_cache();
        cache.set_limit(self.context);
        cache
    }

    /// The KV cache a scheduled request `p` starts from: the conversation's, cut to what `p`
    /// can keep of it, when that is at least half of it (the conversation is then lent to this
    /// request until [`Engine::keep_conversation`]), else a fresh one. With the fingerprints of `p`'s
    /// pictures and the features of the tiles not cached.
    pub(crate) fn cache_for(
        &mut self,
        p: &Prepared,
    ) -> (KvCache, Vec<Vec<features::Key>>, Option<Tensor>) {
        let (
            fingerprints,
            Reuse {
                positions: reuse,
                cached_tiles,
            },
        ) = self.reuse_for(p);
        let cache = if reuse::lends_conversation(reuse, self.cached_ids.len()) {
            let fresh = self.new_cache();
            let mut cache = std::mem::replace(&mut self.cache, fresh);
            self.cached_ids.clear();
            self.cached_images.clear();
            cache.truncate(reuse as i64);
            cache
        } else {
            self.new_cache()
        };
        let keys: Vec<features::Key> = fingerprints.iter().flatten().copied().collect();
        let image_embeds = self.image_features(&[p], cached_tiles, Some(&keys));
        (cache, fingerprints, image_embeds)
    }

    /// Makes a finished request's cache the conversation's: `ids` are the positions it holds,
    /// `images` the fingerprints of their pictures.
    pub(crate) fn keep_conversation(
        &mut self,
        cache: KvCache,
        ids: Vec<i64>,
        images: Vec<Vec<features::Key>>,
    ) {
        debug_assert_eq!(ids.len() as i64, cache.len());
        self.cache = cache;
        self.cached_ids = ids;
        self.cached_images = images;
    }

    /// A streamer for this model's answers (see [`AnswerStream`]).
    pub fn answer_stream(&self) -> AnswerStream {
        let s = AnswerStream::new(self.tokenizer.clone(), self.stop_ids.clone());
        // -hf: the answer as `batch_decode` gives it, not stripped
        if self.hf.is_some() {
            s.untrimmed()
        } else {
            s
        }
    }

    /// `batch_decode(ids, skip_special_tokens=True)[0].split(sep.strip())[0].strip()`.
    pub fn answer_text(&self, tokens: &[u32]) -> String {
        self.response_text(&self.tokenizer.decode(tokens, true))
    }

    /// Decoded text as the answer: `text.split(sep.strip())[0].strip()`.
    pub fn response_text(&self, text: &str) -> String {
        if self.hf.is_some() {
            // -hf: `batch_decode(..., skip_special_tokens=True)` as is
            return text.to_string();
        }
        self.template.response_text(text).to_string()
    }

    /// Runs several prepared questions together, left-padded, as `batch_chat`.
    pub fn run_batch(
        &mut self,
        prepared: &[&Prepared],
        params: &[SamplingParams],
        on_token: &mut dyn FnMut(usize, u32) -> Flow,
    ) -> Result<Vec<ChatOutput>, ChatError> {
        for (p, sp) in prepared.iter().zip(params) {
            sp.validate().map_err(ChatError::Invalid)?;
            if p.ids.len() + sp.max_new_tokens > self.context_len() {
                return Err(ChatError::TooLong {
                    prompt: p.ids.len(),
                    max_new: sp.max_new_tokens,
                    context: self.context_len(),
                });
            }
        }
        let _guard = tch::no_grad_guard();
        let image_embeds = self.image_features(prepared, 0, None);
        let rows: Vec<Vec<i64>> = prepared.iter().map(|p| p.ids.clone()).collect();
        let mut samplers: Vec<Sampler> = params.iter().cloned().map(Sampler::new).collect();
        let mut cache = self.model.llm.new_cache();
        let gen = generate(
            &self.model,
            &mut cache,
            &GenInput {
                rows: &rows,
                image_embeds: image_embeds.as_ref(),
                img_context_id: self.img_context_id,
                stop_ids: &self.stop_ids,
                pad_id: 0,
                keep_first_logits: false,
                vocab: self.tokenizer.vocab_size(),
            },
            &mut samplers,
            on_token,
        )?;
        let outs = gen
            .rows
            .iter()
            .zip(prepared)
            .map(|(r, p)| ChatOutput {
                answer: self.answer_text(&r.tokens),
                tokens: r.tokens.clone(),
                finish: r.finish,
                prompt_tokens: p.ids.len(),
                gen: GenOutput {
                    rows: Vec::new(),
                    first_logits: None,
                    prefill_tokens: gen.prefill_tokens,
                    prefill: gen.prefill,
                    decode: gen.decode,
                },
            })
            .collect();
        Ok(outs)
    }
}

/// -hf: the image token (`image_token_id`, which must be the tokenizer's image token) and the
/// stop ids (`generation_config.json`'s `eos_token_id`, else `text_config`'s).
fn hf_tokens(
    dir: &Path,
    model: &InternVL,
    tokenizer: &Tokenizer,
    p: &HfPrompt,
) -> Result<(i64, Vec<u32>), ChatError> {
    let invalid = |what: String| ChatError::Invalid(format!("{}: {what}", dir.display()));
    let id = model
        .cfg
        .image_token_id
        .expect("an -hf config has image_token_id");
    match tokenizer.token_to_id(&p.image_token) {
        Some(t) if i64::from(t) == id => {}
        found => {
            return Err(invalid(format!(
                "config.json: image_token_id {id} is not the tokenizer's {} ({found:?})",
                p.image_token
            )))
        }
    }
    for t in [&p.start_image_token, &p.end_image_token] {
        if tokenizer.token_to_id(t).is_none() {
            return Err(invalid(format!(
                "tokenizer has no {t} token (needed by the processor)"
            )));
        }
    }
    let per_tile = model.cfg.num_image_token();
    if p.image_seq_length != per_tile {
        return Err(invalid(format!(
            "processor_config.json: image_seq_length {} but the model gives {per_tile} tokens per tile",
            p.image_seq_length
        )));
    }
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        match v {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            v => v.as_u64().map(|x| x as u32).into_iter().collect(),
        }
    };
    let gen_path = dir.join("generation_config.json");
    let from_gen = if gen_path.is_file() {
        let text = crate::files::read_to_string(
            &gen_path,
            crate::files::MAX_METADATA_BYTES,
            "a model's metadata file",
        )
        .map_err(|e| invalid(format!("generation_config.json: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("generation_config.json: invalid JSON: {e}")))?;
        v.get("eos_token_id").map(ids).unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut stop = if from_gen.is_empty() {
        model
            .cfg
            .llm_config
            .eos_token_id
            .as_ref()
            .map(ids)
            .unwrap_or_default()
    } else {
        from_gen
    };
    if stop.is_empty() {
        return Err(invalid(
            "no eos_token_id in generation_config.json or text_config".into(),
        ));
    }
    stop.dedup();
    Ok((id, stop))
}
