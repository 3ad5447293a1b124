//! The OpenAI chat-completions wire format, defined once for the two front ends that speak it:
//! `serve` reads requests and writes responses, `--remote` writes requests and reads responses.
//! Front-end level: only `serve` and `remote` import it; nothing below the engine protocol does.
//!
//! Only the shapes live here. What a request means (checks with precise messages, sampling
//! settings, pictures) is each front end's: `serve::openai`, `remote`.
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A chat-completions request. `top_k`, `repetition_penalty`, `min_tokens` and
/// `chat_template_kwargs` are vLLM's and LMDeploy's extensions; `reasoning` and
/// `reasoning_effort` OpenRouter's and OpenAI's ways to ask for thinking.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub options: RequestOptions,
}

/// Everything of a request but its model and messages (`serve` reads these apart from the
/// messages, which it checks by hand for precise errors). Unknown fields are ignored, as
/// OpenAI-compatible servers do.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// -1 or 0: no top-k (vLLM's and our conventions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// A string or an array of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// `true`/`false` or `{"enabled", "effort"}` (read by hand: several shapes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_kwargs: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message: `role` is `system`, `developer`, `user` or `assistant`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

impl Message {
    pub fn text(role: &str, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(Content::Text(text.into())),
        }
    }
}

/// A message's content: a string or an array of parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

/// A picture: a URL (`data:`, `file://`, `http(s)://`) with LMDeploy's tile limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dynamic_patch: Option<usize>,
}

/// Token counts of an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    #[serde(default)]
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A whole answer (`"object": "chat.completion"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Always null here (logprobs are refused).
    #[serde(default)]
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
}

/// The answer; its thinking apart as `reasoning_content` (vLLM's, LMDeploy's) when there is
/// some.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: String,
    pub content: Option<String>,
    /// Absent: the request did not think; null: it thought, and there was no thinking.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub reasoning_content: Option<Option<String>>,
}

/// A field that is there, null or not (serde reads a null `Option<Option<_>>` as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// One stream event (`"object": "chat.completion.chunk"`); the last one may carry only usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub delta: Delta,
    #[serde(default)]
    pub logprobs: Option<Value>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// What a chunk adds: the role (first chunk), text, or thinking (`reasoning_content`; vLLM's
/// newer servers call it `reasoning`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
}

/// An error response: `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub code: Option<Value>,
}

/// `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    #[serde(default)]
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// A served model; `max_model_len` is vLLM's (and this program's) context length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    #[serde(default)]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub owned_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `json` read as `T` and written back is `json` again.
    fn round_trip<T: serde::de::DeserializeOwned + Serialize + std::fmt::Debug>(json: Value) -> T {
        let t: T = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&t).unwrap(), json, "{t:?}");
        t
    }

    #[test]
    fn a_request_with_pictures_and_every_option() {
        // as the openai client sends it (its vision example), with the extensions we use
        let r: ChatCompletionRequest = round_trip(json!({
            "model": "InternVL3_5-1B",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "max_dynamic_patch": 6}},
                    {"type": "text", "text": "What is in this image?"}
                ]},
                {"role": "assistant", "content": "A harbour."},
                {"role": "user", "content": "And the boats?"}
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 64,
            "min_tokens": 2,
            "temperature": 0.0,
            "top_p": 0.9,
            "top_k": -1,
            "repetition_penalty": 1.05,
            "seed": 7,
            "stop": ["END"],
            "chat_template_kwargs": {"enable_thinking": true}
        }));
        assert_eq!(r.messages.len(), 4);
        let Some(Content::Parts(parts)) = &r.messages[1].content else {
            panic!("{:?}", r.messages[1]);
        };
        assert_eq!(
            parts[0],
            ContentPart::ImageUrl {
                image_url: ImageUrl {
                    url: "data:image/png;base64,iVBORw0KGgo=".into(),
                    max_dynamic_patch: Some(6),
                }
            }
        );
        assert_eq!(r.options.stop, Some(Stop::Many(vec!["END".into()])));
        assert_eq!(r.options.top_k, Some(-1));
        // a bare stop string and a null content are taken too
        let r: ChatCompletionRequest = round_trip(json!({
            "messages": [{"role": "assistant", "content": null}, {"role": "user", "content": "Hi"}],
            "stop": "\n\n"
        }));
        assert_eq!(r.options.stop, Some(Stop::One("\n\n".into())));
        assert_eq!(r.messages[0].content, None);
        // unknown fields (here OpenAI's `user`) are ignored
        let r: ChatCompletionRequest =
            serde_json::from_value(json!({"messages": [], "user": "u-1", "n": 1})).unwrap();
        assert_eq!(r.options.n, Some(1));
    }

    #[test]
    fn a_completion_with_and_without_thinking() {
        let c: ChatCompletion = round_trip(json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1733371200,
            "model": "InternVL3_5-1B",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Two cats.", "reasoning_content": "Look."},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        }));
        assert_eq!(c.usage, Some(Usage::new(12, 3)));
        let m = &c.choices[0].message;
        assert_eq!(m.reasoning_content, Some(Some("Look.".into())));
        // thought, nothing to show: null, kept apart from absent
        let c: ChatCompletion = round_trip(json!({
            "id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi.", "reasoning_content": null},
                         "logprobs": null, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        }));
        assert_eq!(c.choices[0].message.reasoning_content, Some(None));
        let c: ChatCompletion = round_trip(json!({
            "id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        }));
        assert_eq!(c.choices[0].message.reasoning_content, None);
    }

    #[test]
    fn stream_chunks_first_middle_last_and_usage() {
        let head = |choices: Value| {
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5,
                   "model": "m", "choices": choices})
        };
        let first: ChatCompletionChunk = round_trip(head(json!([
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}
        ])));
        assert_eq!(first.choices[0].delta.role.as_deref(), Some("assistant"));
        let thinking: ChatCompletionChunk = round_trip(head(json!([
            {"index": 0, "delta": {"reasoning_content": "Hm"}, "logprobs": null, "finish_reason": null}
        ])));
        assert_eq!(
            thinking.choices[0].delta.reasoning_content.as_deref(),
            Some("Hm")
        );
        let last: ChatCompletionChunk = round_trip(head(json!([
            {"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}
        ])));
        assert_eq!(last.choices[0].finish_reason.as_deref(), Some("length"));
        let mut usage = head(json!([]));
        usage["usage"] = json!({"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13});
        let u: ChatCompletionChunk = round_trip(usage);
        assert_eq!(u.usage, Some(Usage::new(9, 4)));
        // vLLM's newer servers: `reasoning`, and fields of their own that are not ours
        let vllm: ChatCompletionChunk = serde_json::from_value(json!({
            "id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": {"reasoning": "Hm"}, "logprobs": null,
                         "finish_reason": null, "stop_reason": null}]
        }))
        .unwrap();
        assert_eq!(vllm.choices[0].delta.reasoning.as_deref(), Some("Hm"));
    }

    #[test]
    fn errors_and_model_lists() {
        let e: ErrorBody = round_trip(json!({
            "error": {"message": "messages: missing", "type": "invalid_request_error", "code": "invalid_request"}
        }));
        assert_eq!(e.error.kind, "invalid_request_error");
        let l: ModelList = round_trip(json!({
            "object": "list",
            "data": [{"id": "InternVL3_5-1B", "object": "model", "created": 1, "owned_by": "internvl-chat", "max_model_len": 40960}]
        }));
        assert_eq!(l.data[0].max_model_len, Some(40960));
        // LMDeploy's list has no max_model_len
        let l: ModelList = serde_json::from_value(json!({
            "object": "list",
            "data": [{"id": "internvl", "object": "model", "created": 1, "owned_by": "lmdeploy", "root": "internvl", "permission": []}]
        }))
        .unwrap();
        assert_eq!(l.data[0].max_model_len, None);
    }
}
