//! Messages between the UI (or any front end) and the engine worker thread.
//! Nothing here depends on libtorch, so front ends can use it freely.
use crate::sampling::SamplingParams;
use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub type RequestId = u64;

pub use crate::media::Attachment;

/// The question with placeholders for its attachments when it has none of its own: images first
/// (`<image>\n` for one image or combined images, `Image-1: <image>\n…` for several), then a
/// video's `Frame1: <image>\n…`, as the model card writes them. `visuals` pairs each
/// attachment with the placeholders it fills (1 for an image, its frames for a video). Front
/// ends that keep a conversation (the chat, the server, a remote worker) add them alike.
pub fn with_placeholders(
    question: &str,
    visuals: &[(&Attachment, usize)],
    combine: bool,
) -> String {
    if question.contains("<image>") || visuals.is_empty() {
        return question.to_string();
    }
    let n_images = visuals
        .iter()
        .filter(|(a, _)| matches!(a, Attachment::Image { .. }))
        .count();
    let mut prefix = String::new();
    if n_images == 1 || (combine && n_images > 1) {
        prefix.push_str("<image>\n");
    } else if n_images > 1 {
        prefix.push_str(&crate::prompt::image_list_prefix(n_images));
    }
    for (a, frames) in visuals {
        if matches!(a, Attachment::Video { .. }) {
            prefix.push_str(&crate::prompt::video_prefix(*frames));
        }
    }
    prefix + question
}

/// One finished exchange of a conversation. `question` is the text as sent to the model,
/// including the `<image>` placeholders the program added for `attachments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub question: String,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    pub answer: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub id: RequestId,
    /// Overrides the template's system message.
    pub system: Option<String>,
    pub history: Vec<Turn>,
    /// The new question as typed; placeholders for `attachments` are added when it has none.
    pub question: String,
    pub attachments: Vec<Attachment>,
    /// Several images as one `<image>` (tiles concatenated) instead of `Image-1: <image>` lines.
    pub combine_images: bool,
    pub params: SamplingParams,
    /// Generation ends once the answer contains one of these; the answer ends before it.
    #[serde(default)]
    pub stop: Vec<String>,
    /// When the prompt would not fit the context window, leave out the oldest turns instead of
    /// refusing it.
    #[serde(default)]
    pub truncate_history: bool,
}

/// A request's own stop switch: the front end keeps a clone and sets it; the engine ends that
/// request (and no other) at its next step, with its partial answer in a `Done` whose finish is
/// `Finish::Cancelled`. Dropping the request's event receiver stops it too.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

// a command is made and moved once per request: boxing the request would buy nothing
#[allow(clippy::large_enum_variant)]
pub enum EngineCmd {
    /// A request with its own event channel (`Started`, `Token`s, then `Done` or `Error`) and
    /// its own cancel switch.
    Generate {
        req: GenerateRequest,
        reply: Sender<EngineEvent>,
        cancel: Cancel,
    },
    /// Forget the conversation's KV cache (image features stay cached by content).
    Reset,
    Shutdown,
}

/// What the model is, once loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub device: String,
    pub dtype: String,
    pub context_len: usize,
    pub max_tiles: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
}

/// Whose fault a failed request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// It cannot be answered as given: an unreadable attachment, a prompt longer than the
    /// context, invalid settings.
    Request,
    /// The engine failed (or is gone).
    Engine,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DoneStats {
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Request received to first token.
    pub ttft: Duration,
    /// Decode speed after the first token.
    pub tokens_per_s: f64,
}

impl DoneStats {
    /// Decode speed of `n` generated tokens, `decode_s` seconds having passed since the first:
    /// the tokens after the first over that time (0 when there are none, or no time).
    pub fn decode_rate(n: usize, decode_s: f64) -> f64 {
        if n > 1 && decode_s > 0.0 {
            (n - 1) as f64 / decode_s
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Loading progress in 0..=1.
    Loading {
        progress: f32,
        what: String,
    },
    Ready(ModelInfo),
    /// The model could not be loaded; the worker has stopped.
    LoadFailed(String),
    /// The request was accepted: the question as sent (with placeholders) and its cost.
    Started {
        id: RequestId,
        question: String,
        prompt_tokens: usize,
        /// Oldest turns left out of the prompt to fit the context window.
        dropped_turns: usize,
    },
    /// Newly decoded text (never a partial UTF-8 character).
    Token {
        id: RequestId,
        text: String,
    },
    /// Generation ended; `answer` is the whole answer as the reference post-processes it.
    Done {
        id: RequestId,
        answer: String,
        stats: DoneStats,
    },
    /// The request failed; the engine is ready for the next one.
    Error {
        id: RequestId,
        message: String,
        fault: Fault,
    },
}
