//! The OpenAI chat-completions format: a request body in, checked and mapped onto the same
//! sampling settings the JSONL batch mode builds (the server's flags first, then the request's
//! fields); completions, stream chunks and errors out. The shapes on the wire are
//! [`crate::openai_wire`]'s, shared with `--remote`.
pub use crate::openai_wire::Usage;
use crate::openai_wire::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, ErrorBody,
    ErrorDetail, ModelCard, RequestOptions,
};
use crate::sampling::{Overrides, SamplingParams, MAX_NEW_TOKENS_LIMIT};
use serde_json::Value;

/// An error response: `{"error": {"message", "type", "code"}}` with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub code: &'static str,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        let kind = if status >= 500 {
            "server_error"
        } else {
            "invalid_request_error"
        };
        Self {
            status,
            message: message.into(),
            kind,
            code,
        }
    }

    /// 400: the request cannot be answered as given.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", message)
    }

    pub fn json(&self) -> Value {
        wire(&ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.into(),
                code: Some(self.code.into()),
            },
        })
    }
}

/// A picture in a message, as given.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRef {
    pub url: String,
    /// LMDeploy's `image_url.max_dynamic_patch`: at most this many tiles.
    pub max_tiles: Option<usize>,
    /// Where it is in the request, for error messages (`messages[1].content[0]`).
    pub at: String,
}

/// A user message: its text parts joined by newlines, and its pictures in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserMessage {
    pub text: String,
    pub images: Vec<ImageRef>,
}

/// A checked chat-completions request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
    pub system: Option<String>,
    /// Earlier exchanges: a user message and the assistant's answer.
    pub history: Vec<(UserMessage, String)>,
    pub question: UserMessage,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Thinking asked for or declined, and the field that said so (for error messages);
    /// `None`: not said.
    pub think: Option<(bool, &'static str)>,
}

/// Parses and checks a request body over `base` (the server's sampling flags).
pub fn parse_chat(body: &[u8], base: &SamplingParams) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "invalid_json", format!("invalid JSON body: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    // `stop` first by hand, for a precise message (the wire type takes any string array)
    let stop = stop_strings(obj.get("stop"))?;
    // types of the other fields; the error names the field
    let fields: RequestOptions = serde_path_to_error::deserialize(&v).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(format!("{path}: {}", e.into_inner()))
    })?;
    unsupported(&fields)?;
    let (system, history, question) = messages(obj.get("messages"))?;
    let params = sampling(&fields, base)?;
    let think = thinking(obj)?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()).filter(|m| !m.is_empty()),
        Some(_) => return Err(ApiError::invalid("model: expected a string")),
    };
    Ok(ChatRequest {
        model,
        stream: fields.stream.unwrap_or(false),
        include_usage: fields.stream_options.unwrap_or_default().include_usage,
        system,
        history,
        question,
        params,
        stop,
        think,
    })
}

/// Whether the request asks for thinking, in any of the ways peers take it: `"reasoning":
/// true` or an object (OpenRouter's `{"enabled": ..., "effort": ...}`), `"reasoning_effort"`
/// (OpenAI's; any value but "none" or "minimal" thinks) and vLLM's and LMDeploy's
/// `"chat_template_kwargs": {"enable_thinking": ...}`. One that says yes wins.
fn thinking(
    obj: &serde_json::Map<String, Value>,
) -> Result<Option<(bool, &'static str)>, ApiError> {
    let effort = |v: &Value, at: &str| match v {
        Value::String(e) => Ok(!matches!(e.as_str(), "none" | "minimal")),
        _ => Err(ApiError::invalid(format!(
            "{at}: expected a string such as \"low\", \"medium\", \"high\" or \"none\""
        ))),
    };
    let flag = |v: &Value, at: &str| {
        v.as_bool()
            .ok_or_else(|| ApiError::invalid(format!("{at}: expected true or false")))
    };
    let mut said: Vec<(bool, &'static str)> = Vec::new();
    match obj.get("reasoning") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => said.push((*b, "reasoning")),
        Some(Value::Object(o)) => {
            let enabled = match o.get("enabled") {
                None | Some(Value::Null) => true,
                Some(v) => flag(v, "reasoning.enabled")?,
            };
            let effort = match o.get("effort") {
                None | Some(Value::Null) => true,
                Some(v) => effort(v, "reasoning.effort")?,
            };
            said.push((enabled && effort, "reasoning"));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "reasoning: expected true, false or an object such as {\"enabled\": true}",
            ))
        }
    }
    match obj.get("reasoning_effort") {
        None | Some(Value::Null) => {}
        Some(v) => said.push((effort(v, "reasoning_effort")?, "reasoning_effort")),
    }
    match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => match o.get("enable_thinking") {
            None | Some(Value::Null) => {}
            Some(v) => said.push((
                flag(v, "chat_template_kwargs.enable_thinking")?,
                "chat_template_kwargs.enable_thinking",
            )),
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "chat_template_kwargs: expected an object",
            ))
        }
    }
    Ok(said.iter().find(|(on, _)| *on).or(said.first()).copied())
}

/// Features this server does not have are refused rather than silently ignored.
fn unsupported(f: &RequestOptions) -> Result<(), ApiError> {
    let refuse = |what: &str| Err(ApiError::invalid(format!("{what} is not supported")));
    if f.n.is_some_and(|n| n != 1) {
        return refuse("n other than 1");
    }
    if f.logprobs == Some(true) {
        return refuse("logprobs");
    }
    if f.presence_penalty.is_some_and(|p| p != 0.0) {
        return refuse("presence_penalty (use repetition_penalty)");
    }
    if f.frequency_penalty.is_some_and(|p| p != 0.0) {
        return refuse("frequency_penalty (use repetition_penalty)");
    }
    if f.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return refuse("tools");
    }
    Ok(())
}

/// The request's sampling fields over `base`, as batch mode maps its own.
fn sampling(f: &RequestOptions, base: &SamplingParams) -> Result<SamplingParams, ApiError> {
    let max = f.max_tokens.or(f.max_completion_tokens);
    let name = if f.max_tokens.is_some() {
        "max_tokens"
    } else {
        "max_completion_tokens"
    };
    match max {
        Some(0) => return Err(ApiError::invalid(format!("{name} must be at least 1"))),
        Some(n) if n > MAX_NEW_TOKENS_LIMIT => {
            return Err(ApiError::invalid(format!(
                "{name} {n} is larger than {MAX_NEW_TOKENS_LIMIT}"
            )))
        }
        _ => {}
    }
    let effective_max = max.unwrap_or(base.max_new_tokens);
    if let Some(min) = f.min_tokens.filter(|&m| m > effective_max) {
        return Err(ApiError::invalid(format!(
            "min_tokens ({min}) exceeds max_tokens ({effective_max})"
        )));
    }
    let top_k = match f.top_k {
        Some(-1 | 0) => Some(0),
        Some(k) if k < 0 => {
            return Err(ApiError::invalid(format!(
                "top_k must be -1, 0 (no top-k) or positive, got {k}"
            )))
        }
        k => k.map(|k| k as usize),
    };
    Overrides {
        do_sample: None,
        temperature: f.temperature,
        top_p: f.top_p,
        top_k,
        repetition_penalty: f.repetition_penalty,
        seed: f.seed,
        max_new_tokens: max,
        min_new_tokens: f.min_tokens,
    }
    .apply(base)
    .map_err(ApiError::invalid)
}

fn stop_strings(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid("stop: expected a string or an array of non-empty strings");
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if !s.is_empty() => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| match s.as_str() {
                Some(s) if !s.is_empty() => Ok(s.to_string()),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

type Conversation = (Option<String>, Vec<(UserMessage, String)>, UserMessage);

/// System messages first, then user and assistant messages in turn, ending with a user's.
fn messages(v: Option<&Value>) -> Result<Conversation, ApiError> {
    let list = match v {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::invalid("messages: must not be empty")),
        Some(_) => return Err(ApiError::invalid("messages: expected an array of messages")),
        None => return Err(ApiError::invalid("messages: missing")),
    };
    let mut system: Option<String> = None;
    let mut history = Vec::new();
    let mut user: Option<UserMessage> = None;
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Some(obj) = m.as_object() else {
            return Err(ApiError::invalid(format!("{at}: expected an object")));
        };
        let role = match obj.get("role") {
            Some(Value::String(r)) => r.as_str(),
            Some(_) => return Err(ApiError::invalid(format!("{at}.role: expected a string"))),
            None => return Err(ApiError::invalid(format!("{at}.role: missing"))),
        };
        let content = content(obj.get("content"), &at)?;
        let conversation_started = user.is_some() || !history.is_empty();
        match role {
            "system" | "developer" => {
                if conversation_started {
                    return Err(ApiError::invalid(format!(
                        "{at}: system messages must come before the conversation"
                    )));
                }
                let text = text_only(content, &at)?;
                system = Some(match system {
                    Some(s) => format!("{s}\n{text}"),
                    None => text,
                });
            }
            "user" => {
                if user.is_some() {
                    return Err(ApiError::invalid(format!(
                        "{at}: a user message must follow an assistant message, not another user message"
                    )));
                }
                user = Some(content);
            }
            "assistant" => {
                let Some(question) = user.take() else {
                    return Err(ApiError::invalid(format!(
                        "{at}: an assistant message must follow a user message"
                    )));
                };
                history.push((question, text_only(content, &at)?));
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "{at}.role: {other:?} is not supported (system, user and assistant are)"
                )))
            }
        }
    }
    match user {
        Some(question) => Ok((system, history, question)),
        None => Err(ApiError::invalid(
            "messages: the last message must be a user message",
        )),
    }
}

fn text_only(m: UserMessage, at: &str) -> Result<String, ApiError> {
    match m.images.first() {
        Some(_) => Err(ApiError::invalid(format!(
            "{at}: only user messages may contain images"
        ))),
        None => Ok(m.text),
    }
}

/// A string, an array of `text` and `image_url` parts, or null (empty).
fn content(v: Option<&Value>, at: &str) -> Result<UserMessage, ApiError> {
    let parts = match v {
        None | Some(Value::Null) => return Ok(UserMessage::default()),
        Some(Value::String(s)) => {
            return Ok(UserMessage {
                text: s.clone(),
                images: Vec::new(),
            })
        }
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "{at}.content: expected a string or an array of parts"
            )))
        }
    };
    let mut texts = Vec::new();
    let mut images = Vec::new();
    for (j, p) in parts.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        let kind = p.get("type").and_then(Value::as_str);
        match kind {
            Some("text") => match p.get("text") {
                Some(Value::String(t)) => texts.push(t.clone()),
                _ => return Err(ApiError::invalid(format!("{at}.text: expected a string"))),
            },
            Some("image_url") => images.push(image_ref(p.get("image_url"), &at)?),
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "{at}.type: {other:?} is not supported (text and image_url are)"
                )))
            }
            None => {
                return Err(ApiError::invalid(format!(
                    "{at}: expected an object with a \"type\""
                )))
            }
        }
    }
    Ok(UserMessage {
        text: texts.join("\n"),
        images,
    })
}

/// `{"url": ..., "max_dynamic_patch": N}` (a bare URL string is taken too).
fn image_ref(v: Option<&Value>, at: &str) -> Result<ImageRef, ApiError> {
    let at_url = format!("{at}.image_url");
    let (url, max_tiles) = match v {
        Some(Value::String(u)) => (u.clone(), None),
        Some(Value::Object(o)) => {
            let url = match o.get("url") {
                Some(Value::String(u)) => u.clone(),
                _ => {
                    return Err(ApiError::invalid(format!(
                        "{at_url}.url: expected a string"
                    )))
                }
            };
            let max_tiles = match o.get("max_dynamic_patch") {
                None | Some(Value::Null) => None,
                Some(n) => match n.as_u64() {
                    Some(n) if n >= 1 => Some(n as usize),
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "{at_url}.max_dynamic_patch: expected an integer >= 1, got {n}"
                        )))
                    }
                },
            };
            (url, max_tiles)
        }
        _ => {
            return Err(ApiError::invalid(format!(
                "{at_url}: expected an object with a url"
            )))
        }
    };
    Ok(ImageRef {
        url,
        max_tiles,
        at: at.to_string(),
    })
}

/// A wire type as JSON (they hold nothing that cannot be).
pub fn wire<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// What every response object of one completion shares.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Envelope {
    /// The whole answer; when the request thought (or the answer has a think block anyway)
    /// its thinking goes apart as `reasoning_content`, as vLLM and LMDeploy give it.
    pub fn completion(&self, answer: &str, thinks: bool, finish: &str, usage: Usage) -> Value {
        let split = crate::prompt::thinking::split(answer);
        let message = if thinks || split.reasoning.is_some() {
            AssistantMessage {
                role: "assistant".into(),
                content: Some(split.content.to_string()),
                reasoning_content: Some(split.reasoning.map(str::to_string)),
            }
        } else {
            AssistantMessage {
                role: "assistant".into(),
                content: Some(answer.into()),
                reasoning_content: None,
            }
        };
        wire(&ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![Choice {
                index: 0,
                message,
                logprobs: None,
                finish_reason: Some(finish.into()),
            }],
            usage: Some(usage),
        })
    }

    /// A stream chunk with `delta`, and the finish reason on the last one.
    pub fn chunk(&self, delta: Delta, finish: Option<&str>) -> Value {
        wire(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason: finish.map(str::to_string),
            }],
            usage: None,
        })
    }

    /// The chunk after the last one when the client asked for usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        wire(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: Vec::new(),
            usage: Some(usage),
        })
    }
}

/// The `/v1/models` entry of the served model.
pub fn model_card(id: &str, created: u64, max_model_len: usize) -> ModelCard {
    ModelCard {
        id: id.into(),
        object: "model".into(),
        created,
        owned_by: "internvl-chat".into(),
        max_model_len: Some(max_model_len as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<ChatRequest, ApiError> {
        parse_chat(body.to_string().as_bytes(), &SamplingParams::default())
    }

    fn error(body: Value) -> String {
        let e = parse(body).unwrap_err();
        assert_eq!(e.status, 400);
        e.message
    }

    #[test]
    fn a_conversation_with_pictures() {
        let r = parse(json!({
            "model": "m",
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    {"type": "text", "text": "Shortly."},
                ]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "file:///a.jpg", "max_dynamic_patch": 2}},
                ]},
            ],
            "user": "ignored",
        }))
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("m"));
        assert!(r.stream && r.include_usage);
        assert_eq!(r.system.as_deref(), Some("Be brief."));
        assert_eq!(r.history.len(), 1);
        assert_eq!(r.history[0].0.text, "What is this?\nShortly.");
        assert_eq!(r.history[0].0.images[0].at, "messages[1].content[1]");
        assert_eq!(r.history[0].1, "A cat.");
        assert_eq!(r.question.text, "");
        assert_eq!(
            r.question.images,
            vec![ImageRef {
                url: "file:///a.jpg".into(),
                max_tiles: Some(2),
                at: "messages[3].content[0]".into()
            }]
        );
    }

    #[test]
    fn sampling_fields_map_as_the_batch_mode_maps_its_own() {
        let r = parse(json!({
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 7, "temperature": 0, "seed": 5, "top_k": -1, "stop": "x",
        }))
        .unwrap();
        let batch = Overrides {
            temperature: Some(0.0),
            seed: Some(5),
            top_k: Some(0),
            max_new_tokens: Some(7),
            ..Default::default()
        }
        .apply(&SamplingParams::default())
        .unwrap();
        assert_eq!(r.params, batch);
        assert!(r.params.is_greedy());
        assert_eq!(r.params.repetition_penalty, 1.0, "greedy as model.chat's");
        assert_eq!(r.stop, ["x"]);
        assert!(!r.stream);
        let r = parse(json!({"messages": [{"role": "user", "content": "Hi"}]})).unwrap();
        assert_eq!(r.params, SamplingParams::default(), "the server's defaults");
    }

    #[test]
    fn malformed_requests_are_named() {
        let user = json!([{"role": "user", "content": "Hi"}]);
        let with = |k: &str, v: Value| {
            let mut b = json!({"messages": user});
            b[k] = v;
            b
        };
        let e = parse_chat(b"{not json", &SamplingParams::default()).unwrap_err();
        assert_eq!((e.status, e.code), (400, "invalid_json"));
        assert!(
            e.message.starts_with("invalid JSON body: "),
            "{}",
            e.message
        );
        let cases = [
            (json!([1]), "the request body must be a JSON object"),
            (json!({}), "messages: missing"),
            (json!({"messages": "Hi"}), "messages: expected an array"),
            (json!({"messages": []}), "messages: must not be empty"),
            (
                with("max_tokens", json!(-3)),
                "max_tokens: invalid value: integer `-3`",
            ),
            (
                with("max_tokens", json!(0)),
                "max_tokens must be at least 1",
            ),
            (
                with("temperature", json!("hot")),
                "temperature: invalid type: string",
            ),
            (
                with("temperature", json!(-1)),
                "temperature must be >= 0, got -1",
            ),
            (
                with("top_p", json!(1.5)),
                "top_p must be in (0, 1], got 1.5",
            ),
            (with("seed", json!(-1)), "seed: invalid value: integer `-1`"),
            (with("stream", json!("yes")), "stream: invalid type: string"),
            (
                with("stop", json!([""])),
                "stop: expected a string or an array",
            ),
            (with("n", json!(2)), "n other than 1 is not supported"),
            (
                json!({"messages": user, "max_tokens": 4, "min_tokens": 5}),
                "min_tokens (5) exceeds max_tokens (4)",
            ),
            (
                json!({"messages": [{"role": "assistant", "content": "Hi"}]}),
                "messages[0]: an assistant message must follow a user message",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
                "messages[1]: a user message must follow an assistant message",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
                "the last message must be a user message",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "a"}]}),
                "messages[0].role: \"tool\" is not supported",
            ),
            (
                json!({"messages": [{"content": "a"}]}),
                "messages[0].role: missing",
            ),
            (
                json!({"messages": [{"role": "user", "content": 3}]}),
                "messages[0].content: expected a string or an array of parts",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "messages[0].content[0].type: \"input_audio\" is not supported",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 1}}]}]}),
                "messages[0].content[0].image_url.url: expected a string",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "max_dynamic_patch": 0}}]}]}),
                "max_dynamic_patch: expected an integer >= 1, got 0",
            ),
            (
                json!({"messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": [{"type": "image_url", "image_url": "data:,"}]},
                    {"role": "user", "content": "b"}]}),
                "messages[1]: only user messages may contain images",
            ),
        ];
        for (body, want) in cases {
            let got = error(body.clone());
            assert!(got.contains(want), "{body}: {got:?} should say {want:?}");
        }
    }

    #[test]
    fn thinking_is_asked_in_every_way_peers_ask_it() {
        let think = |extra: Value| {
            let mut b = json!({"messages": [{"role": "user", "content": "Hi"}]});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            parse(b).map(|r| r.think)
        };
        let cases = [
            (json!({}), None),
            (json!({"reasoning": true}), Some((true, "reasoning"))),
            (json!({"reasoning": false}), Some((false, "reasoning"))),
            (json!({"reasoning": {}}), Some((true, "reasoning"))),
            (
                json!({"reasoning": {"enabled": false}}),
                Some((false, "reasoning")),
            ),
            (
                json!({"reasoning": {"effort": "none"}}),
                Some((false, "reasoning")),
            ),
            (json!({"reasoning": null}), None),
            (
                json!({"reasoning_effort": "high"}),
                Some((true, "reasoning_effort")),
            ),
            (
                json!({"reasoning_effort": "low"}),
                Some((true, "reasoning_effort")),
            ),
            (
                json!({"reasoning_effort": "minimal"}),
                Some((false, "reasoning_effort")),
            ),
            (
                json!({"reasoning_effort": "none"}),
                Some((false, "reasoning_effort")),
            ),
            (
                json!({"chat_template_kwargs": {"enable_thinking": true}}),
                Some((true, "chat_template_kwargs.enable_thinking")),
            ),
            (json!({"chat_template_kwargs": {"other": 1}}), None),
            (
                json!({"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": true}}),
                Some((true, "chat_template_kwargs.enable_thinking")),
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(think(extra.clone()).unwrap(), want, "{extra}");
        }
        for (extra, message) in [
            (
                json!({"reasoning": "yes"}),
                "reasoning: expected true, false or an object",
            ),
            (
                json!({"reasoning": {"enabled": 1}}),
                "reasoning.enabled: expected true or false",
            ),
            (
                json!({"reasoning_effort": 3}),
                "reasoning_effort: expected a string",
            ),
            (
                json!({"chat_template_kwargs": {"enable_thinking": "on"}}),
                "chat_template_kwargs.enable_thinking: expected true or false",
            ),
            (
                json!({"chat_template_kwargs": []}),
                "chat_template_kwargs: expected an object",
            ),
        ] {
            let e = think(extra.clone()).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.starts_with(message), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn a_completion_gives_the_thinking_apart() {
        let env = Envelope {
            id: "c".into(),
            created: 0,
            model: "m".into(),
        };
        let usage = Usage::new(1, 2);
        let m = |answer: &str, thinks: bool| {
            env.completion(answer, thinks, "stop", usage)["choices"][0]["message"].clone()
        };
        assert_eq!(
            m("<think>\nLook.\n</think>\n\nTwo cats.", false),
            json!({"role": "assistant", "content": "Two cats.", "reasoning_content": "Look."})
        );
        assert_eq!(
            m("Two cats.", true),
            json!({"role": "assistant", "content": "Two cats.", "reasoning_content": null})
        );
        assert_eq!(
            m("Two cats.", false),
            json!({"role": "assistant", "content": "Two cats."})
        );
    }

    #[test]
    fn error_bodies_have_message_type_and_code() {
        let e = ApiError::invalid("messages: missing");
        assert_eq!(
            e.json(),
            json!({"error": {"message": "messages: missing", "type": "invalid_request_error", "code": "invalid_request"}})
        );
        assert_eq!(ApiError::new(500, "engine_error", "x").kind, "server_error");
    }
}
