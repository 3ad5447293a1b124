//! `--remote URL`: the chat and one-shot answers from an OpenAI-compatible server (this
//! program's `serve`, LMDeploy's `api_server`, vLLM) instead of a local model.
//!
//! A worker thread speaks the engine protocol ([`EngineCmd`] in, [`EngineEvent`] out) over
//! HTTP, so the front ends do not know the difference. Each question is one streamed
//! `/v1/chat/completions` request carrying the whole conversation (the API keeps no state):
//! pictures go as base64 `data:` URLs, images first as the model card writes them. Videos are
//! not sent: the API has no portable way to give frames as InternVL's `Frame1: <image>` lines.
//! Cancelling stops reading and closes the connection, which stops a server that watches it.
pub mod sse;

use crate::engine::protocol::with_placeholders;
use crate::engine::protocol::{
    Attachment, DoneStats, EngineCmd, EngineEvent, Fault, Finish, GenerateRequest, ModelInfo,
    RequestId,
};
use crate::engine::scheduler::Job;
use crate::engine::worker::{serve_requests, Backend, Failed};
use crate::engine::EngineHandle;
use crate::openai_wire::{
    ChatCompletionChunk, ChatCompletionRequest, Content, ContentPart, ImageUrl, Message, ModelList,
    RequestOptions, Stop, StreamOptions,
};
use crate::prompt::thinking::{R1_SYSTEM_PROMPT, THINK_CLOSE, THINK_OPEN};
use base64::Engine as _;
use crossbeam_channel::{unbounded, Receiver, Select, Sender, TryRecvError};
use serde_json::{json, Value};
use std::io::{BufReader, Read};
use std::time::{Duration, Instant};

/// How often a waiting request looks at its cancel switch.
const POLL: Duration = Duration::from_millis(50);
/// Requests streamed at once: one, as the chat and one-shot ask (the loop takes more).
const STREAMS: usize = 1;
/// Largest error body read from the server.
const MAX_ERROR_BODY: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// `scheme://host[:port][/prefix]`, without a trailing `/v1`.
    base: String,
    api_key: Option<String>,
    model: Option<String>,
    /// Shown as the model's tile limit (the server decides).
    max_tiles: usize,
}

impl RemoteConfig {
    /// Checks `url` (`http(s)://host:port`, with or without `/v1`).
    pub fn new(
        url: &str,
        api_key: Option<String>,
        model: Option<String>,
        max_tiles: usize,
    ) -> Result<Self, String> {
        let u = url.trim().trim_end_matches('/');
        let rest = u
            .strip_prefix("http://")
            .or_else(|| u.strip_prefix("https://"));
        match rest {
            Some(r) if !r.is_empty() && !r.starts_with('/') => {}
            _ => {
                return Err(format!(
                    "--remote {url:?}: expected http://HOST:PORT or https://HOST:PORT"
                ))
            }
        }
        let base = u.strip_suffix("/v1").unwrap_or(u).to_string();
        Ok(Self {
            base,
            api_key: api_key.filter(|k| !k.is_empty()),
            model,
            max_tiles,
        })
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    /// `host:port`, for the status line.
    fn host(&self) -> &str {
        let rest = self.base.split_once("://").map_or(&*self.base, |x| x.1);
        rest.split('/').next().unwrap_or(rest)
    }
}

/// Starts the remote worker: it asks the server for its models, reports `Ready` (or
/// `LoadFailed`), then answers `Generate` commands until `Shutdown`.
pub fn spawn(cfg: RemoteConfig) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (cmd_tx, cmd_rx) = unbounded();
    let (ev_tx, ev_rx) = unbounded();
    let join = std::thread::Builder::new()
        .name("remote".into())
        .spawn(move || run(cfg, cmd_rx, ev_tx))
        .expect("spawn the remote worker thread");
    (
        EngineHandle {
            tx: cmd_tx,
            rx: ev_rx,
        },
        join,
    )
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn run(cfg: RemoteConfig, rx: Receiver<EngineCmd>, tx: Sender<EngineEvent>) {
    let _ = tx.send(EngineEvent::Loading {
        progress: 0.0,
        what: format!("connecting to {}", cfg.base),
    });
    let agent = agent();
    let (model, context_len) = match connect(&agent, &cfg) {
        Ok(m) => m,
        Err(e) => {
            let _ = tx.send(EngineEvent::LoadFailed(e));
            return;
        }
    };
    let _ = tx.send(EngineEvent::Ready(ModelInfo {
        name: model.clone(),
        device: "remote".into(),
        dtype: cfg.host().to_string(),
        context_len,
        max_tiles: cfg.max_tiles,
    }));
    let mut remote = Remote::new(agent, cfg, model);
    serve_requests(&mut remote, &rx, STREAMS);
}

/// The server's message from an error body (`{"error": {"message"}}`, LMDeploy's
/// `{"message"}`, FastAPI's `{"detail"}`), else its first line.
fn error_message(status: u16, body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let msg = [
        &v["error"]["message"],
        &v["error"],
        &v["message"],
        &v["detail"],
    ]
    .into_iter()
    .find_map(|m| m.as_str().map(str::to_string))
    .unwrap_or_else(|| body.lines().next().unwrap_or("").trim().to_string());
    if msg.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {msg}")
    }
}

fn read_error_body(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    let mut body = String::new();
    let _ = resp
        .body_mut()
        .with_config()
        .limit(MAX_ERROR_BODY)
        .lossy_utf8(true)
        .reader()
        .read_to_string(&mut body);
    body
}

fn with_key<B>(req: ureq::RequestBuilder<B>, cfg: &RemoteConfig) -> ureq::RequestBuilder<B> {
    match &cfg.api_key {
        Some(k) => req.header("Authorization", format!("Bearer {k}")),
        None => req,
    }
}

/// The model to ask (`--remote-model`, else the first listed) and its context length when the
/// server says (vLLM's and this program's `max_model_len`).
fn connect(agent: &ureq::Agent, cfg: &RemoteConfig) -> Result<(String, usize), String> {
    let url = cfg.endpoint("models");
    let mut resp = with_key(agent.get(&url), cfg)
        .call()
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = read_error_body(&mut resp);
    if status != 200 {
        return Err(format!("{url}: {}", error_message(status, &body)));
    }
    let list: ModelList =
        serde_json::from_str(&body).map_err(|e| format!("{url}: not an OpenAI model list: {e}"))?;
    let ids: Vec<&str> = list.data.iter().map(|m| m.id.as_str()).collect();
    let pick = match &cfg.model {
        Some(want) => list.data.iter().find(|m| &m.id == want).ok_or_else(|| {
            format!(
                "{url}: no model {want:?} (the server has {})",
                ids.join(", ")
            )
        })?,
        None => list
            .data
            .first()
            .ok_or_else(|| format!("{url}: the server lists no models"))?,
    };
    let id = pick.id.clone();
    let context = pick.max_model_len.map_or(usize::MAX, |n| n as usize);
    Ok((id, context))
}

/// A picture file as a `data:` URL.
pub fn data_url(path: &std::path::Path) -> Result<String, String> {
    let bytes = crate::files::read(path, crate::files::MAX_PICTURE_BYTES, "a picture")
        .map_err(|e| format!("{}: cannot read the picture: {e}", path.display()))?;
    let format = image::guess_format(&bytes)
        .map_err(|_| format!("{}: not a picture this program can send", path.display()))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    Ok(format!("data:{};base64,{b64}", format.to_mime_type()))
}

/// One picture placeholder per image, as the engine counts them.
fn slots(atts: &[Attachment]) -> Vec<(&Attachment, usize)> {
    atts.iter().map(|a| (a, 1)).collect()
}

/// A user message: the pictures as `image_url` parts (with LMDeploy's `max_dynamic_patch` for
/// a tile limit), then the text.
fn user_message(text: &str, atts: &[Attachment]) -> Result<Message, String> {
    if atts.is_empty() {
        return Ok(Message::text("user", text));
    }
    let mut parts = Vec::new();
    for a in atts {
        let Attachment::Image { path, max_tiles } = a else {
            return Err(format!(
                "{}: remote mode sends pictures only; videos are not supported",
                a.path().display()
            ));
        };
        parts.push(ContentPart::ImageUrl {
            image_url: ImageUrl {
                url: data_url(path)?,
                max_dynamic_patch: *max_tiles,
            },
        });
    }
    parts.push(ContentPart::Text { text: text.into() });
    Ok(Message {
        role: "user".into(),
        content: Some(Content::Parts(parts)),
    })
}

/// A history question without the placeholders the program put in front of it (the server
/// adds its own for the pictures).
fn typed_question<'a>(question: &'a str, atts: &[Attachment]) -> &'a str {
    [false, true]
        .into_iter()
        .find_map(|combine| {
            let prefix = with_placeholders("", &slots(atts), combine);
            question.strip_prefix(prefix.as_str())
        })
        .unwrap_or(question)
}

/// The chat-completions body of a request: the conversation and every sampling setting (so
/// the server's defaults do not matter); `top_k`, `repetition_penalty` and `min_tokens` are
/// the extensions vLLM and LMDeploy accept.
pub fn request_body(model: &str, req: &GenerateRequest) -> Result<Value, String> {
    let images = req
        .attachments
        .iter()
        .filter(|a| matches!(a, Attachment::Image { .. }))
        .count();
    if req.combine_images && images > 1 {
        return Err("remote mode cannot combine pictures into one <image>; send them apart".into());
    }
    let mut messages = Vec::new();
    if let Some(s) = &req.system {
        messages.push(Message::text("system", s.as_str()));
    }
    for t in &req.history {
        messages.push(user_message(
            typed_question(&t.question, &t.attachments),
            &t.attachments,
        )?);
        messages.push(Message::text("assistant", t.answer.as_str()));
    }
    messages.push(user_message(&req.question, &req.attachments)?);
    let p = &req.params;
    let body = ChatCompletionRequest {
        model: Some(model.into()),
        messages,
        options: RequestOptions {
            stream: Some(true),
            stream_options: Some(StreamOptions {
                include_usage: true,
            }),
            max_tokens: Some(p.max_new_tokens),
            temperature: Some(if p.is_greedy() { 0.0 } else { p.temperature }),
            top_p: Some(p.top_p),
            top_k: Some(if p.top_k == 0 { -1 } else { p.top_k as i64 }),
            repetition_penalty: Some(p.repetition_penalty),
            seed: Some(p.seed),
            min_tokens: (p.min_new_tokens > 0).then_some(p.min_new_tokens),
            stop: (!req.stop.is_empty()).then(|| Stop::Many(req.stop.clone())),
            // the system message makes InternVL3.5 think; templates that switch thinking
            // (Qwen3's on vLLM and LMDeploy, this program's serve) read this, others ignore it
            chat_template_kwargs: (req.system.as_deref() == Some(R1_SYSTEM_PROMPT))
                .then(|| json!({"enable_thinking": true})),
            ..RequestOptions::default()
        },
    };
    serde_json::to_value(&body).map_err(|e| format!("cannot write the request: {e}"))
}

/// A server's thinking (`reasoning_content`, or vLLM's newer `reasoning`) put back into the
/// answer in the shape the model writes it, `<think>\n…\n</think>\n\n` before the content, so
/// that front ends show remote and local thinking alike. The newlines around the thinking
/// are the wrapper's: the server's own are dropped (trailing ones wait until more thinking
/// shows they are inside it).
#[derive(Debug, Default)]
struct Rewrap {
    state: WrapState,
    /// Whitespace at the end of the thinking so far.
    held: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum WrapState {
    #[default]
    Before,
    Thinking,
    After,
}

impl Rewrap {
    /// The answer text for a piece of thinking.
    fn reasoning(&mut self, piece: &str) -> String {
        let piece = match self.state {
            WrapState::Before => piece.trim_start(),
            WrapState::Thinking => piece,
            // thinking after the answer began: text like any other
            WrapState::After => return piece.to_string(),
        };
        if piece.is_empty() {
            return String::new();
        }
        let text = std::mem::take(&mut self.held) + piece;
        let body = text.trim_end();
        self.held = text[body.len()..].to_string();
        if self.state == WrapState::Before {
            self.state = WrapState::Thinking;
            format!("{THINK_OPEN}\n{body}")
        } else {
            body.to_string()
        }
    }

    /// The answer text for a piece of content.
    fn content(&mut self, piece: &str) -> String {
        self.close() + piece
    }

    /// Ends the think block, if one is open.
    fn close(&mut self) -> String {
        if self.state != WrapState::Thinking {
            return String::new();
        }
        self.state = WrapState::After;
        self.held.clear();
        format!("\n{THINK_CLOSE}\n\n")
    }
}

/// What the HTTP thread hands the worker.
enum Reply {
    Started,
    Refused { status: u16, message: String },
    Data(String),
    End,
    Failed(String),
}

/// Sends the request and reads its stream on a thread of its own, so that the worker can
/// stop waiting at once when cancelled; the thread ends (closing the connection) at its next
/// read.
fn post(agent: ureq::Agent, cfg: &RemoteConfig, body: String) -> Receiver<Reply> {
    let (tx, rx) = unbounded();
    let url = cfg.endpoint("chat/completions");
    let req = with_key(agent.post(&url), cfg)
        .header("Content-Type", "application/json")
        .header("Accept", "text/event-stream");
    let spawned = std::thread::Builder::new()
        .name("remote-stream".into())
        .spawn(move || {
            let mut resp = match req.send(body) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Reply::Failed(format!("cannot reach {url}: {e}")));
                    return;
                }
            };
            let status = resp.status().as_u16();
            if status != 200 {
                let message = error_message(status, &read_error_body(&mut resp));
                let _ = tx.send(Reply::Refused { status, message });
                return;
            }
            if tx.send(Reply::Started).is_err() {
                return;
            }
            let mut events = sse::SseReader::new(BufReader::new(resp.into_body().into_reader()));
            loop {
                let reply = match events.next_data() {
                    Ok(Some(d)) => Reply::Data(d),
                    Ok(None) => Reply::End,
                    Err(e) => Reply::Failed(format!("{url}: the stream broke: {e}")),
                };
                let last = !matches!(reply, Reply::Data(_));
                if tx.send(reply).is_err() || last {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        let (tx, rx) = unbounded();
        let _ = tx.send(Reply::Failed(format!("cannot start a thread: {e}")));
        return rx;
    }
    rx
}

/// The answer so far.
struct Answer {
    id: RequestId,
    text: String,
    pieces: usize,
    finish: Option<Finish>,
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
    t0: Instant,
    first_token: Option<Instant>,
    thinking: Rewrap,
    /// The request's events are no longer read (a send failed): it stops.
    gone: bool,
}

impl Answer {
    /// An answer to request `id`, nothing received yet, timed from now.
    fn new(id: RequestId) -> Self {
        Self {
            id,
            text: String::new(),
            pieces: 0,
            finish: None,
            prompt_tokens: None,
            completion_tokens: None,
            t0: Instant::now(),
            first_token: None,
            thinking: Rewrap::default(),
            gone: false,
        }
    }

    /// Adds `text` to the answer and sends it on.
    fn emit(&mut self, text: String, tx: &Sender<EngineEvent>) {
        if text.is_empty() {
            return;
        }
        self.first_token.get_or_insert_with(Instant::now);
        self.text.push_str(&text);
        self.gone |= tx.send(EngineEvent::Token { id: self.id, text }).is_err();
    }

    /// The end of the answer (closing a think block the server left open).
    fn done(mut self, finish: Finish, tx: &Sender<EngineEvent>) -> EngineEvent {
        let close = self.thinking.close();
        self.emit(close, tx);
        let n = self.completion_tokens.unwrap_or(self.pieces);
        let first = self.first_token.unwrap_or_else(Instant::now);
        let decode_s = first.elapsed().as_secs_f64();
        EngineEvent::Done {
            id: self.id,
            answer: self.text.trim().to_string(),
            stats: DoneStats {
                finish,
                prompt_tokens: self.prompt_tokens.unwrap_or(0),
                completion_tokens: n,
                ttft: first - self.t0,
                tokens_per_s: DoneStats::decode_rate(n, decode_s),
            },
        }
    }
}

type Failure = (String, Fault);

/// The remote back end of the request loop ([`serve_requests`], the local model's loop, with
/// its panic guard): each running request is one HTTP stream read on a thread of its own.
pub struct Remote {
    agent: ureq::Agent,
    cfg: RemoteConfig,
    model: String,
    streams: Vec<Stream>,
    /// Tests: a streamed text piece equal to this panics while it is taken in, to show that
    /// a panic in the remote path reaches its request.
    #[cfg(test)]
    panic_on: Option<&'static str>,
}

/// A request being answered.
struct Stream {
    job: Job,
    /// The question with its placeholders, as `Started` reports it.
    question: String,
    answer: Answer,
    replies: Receiver<Reply>,
}

/// Where a stream is after a reply.
enum Next {
    More,
    End(Finish),
}

impl Remote {
    pub fn new(agent: ureq::Agent, cfg: RemoteConfig, model: String) -> Self {
        Self {
            agent,
            cfg,
            model,
            streams: Vec::new(),
            #[cfg(test)]
            panic_on: None,
        }
    }
}

impl Stream {
    /// Takes in what the stream sent so far; false once the request ended (its last event
    /// sent). `panic_on`: see [`Remote`]'s, `None` outside tests.
    fn advance(&mut self, panic_on: Option<&str>) -> bool {
        let s = self;
        let tx = &s.job.reply.clone();
        loop {
            if s.job.cancel.is_cancelled() || s.answer.gone {
                // dropping `replies` ends the HTTP thread and its connection
                let answer = std::mem::replace(&mut s.answer, Answer::new(s.job.req.id));
                let _ = tx.send(answer.done(Finish::Cancelled, tx));
                return false;
            }
            let reply = match s.replies.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => Reply::End,
            };
            match s.take(reply, panic_on) {
                Ok(Next::More) => {}
                Ok(Next::End(finish)) => {
                    let answer = std::mem::replace(&mut s.answer, Answer::new(s.job.req.id));
                    let _ = tx.send(answer.done(finish, tx));
                    return false;
                }
                Err((message, fault)) => {
                    let id = s.job.req.id;
                    let _ = tx.send(EngineEvent::Error { id, message, fault });
                    return false;
                }
            }
        }
    }

    /// One reply of the HTTP thread.
    fn take(&mut self, reply: Reply, panic_on: Option<&str>) -> Result<Next, Failure> {
        let s = self;
        let tx = &s.job.reply;
        match reply {
            Reply::Started => {
                let _ = tx.send(EngineEvent::Started {
                    id: s.job.req.id,
                    question: s.question.clone(),
                    // known once the server reports usage at the end
                    prompt_tokens: 0,
                    dropped_turns: 0,
                });
                Ok(Next::More)
            }
            Reply::Refused { status, message } => {
                let fault = if (400..500).contains(&status) {
                    Fault::Request
                } else {
                    Fault::Engine
                };
                Err((message, fault))
            }
            Reply::Failed(e) => Err((e, Fault::Engine)),
            Reply::End => match s.answer.finish {
                Some(finish) => Ok(Next::End(finish)),
                None => Err((
                    "the server closed the stream before the answer ended".into(),
                    Fault::Engine,
                )),
            },
            Reply::Data(d) if d.trim() == "[DONE]" => {
                Ok(Next::End(s.answer.finish.unwrap_or(Finish::Stop)))
            }
            Reply::Data(d) => {
                if let Some(p) = panic_on.filter(|p| d.contains(p)) {
                    panic!("injected: {p}");
                }
                chunk(&d, &mut s.answer, tx)?;
                Ok(Next::More)
            }
        }
    }
}

impl Backend for Remote {
    fn start(&mut self, job: &Job) -> Result<(), Failed> {
        let req = &job.req;
        let body = request_body(&self.model, req).map_err(|message| Failed {
            message,
            fault: Fault::Request,
        })?;
        let question =
            with_placeholders(&req.question, &slots(&req.attachments), req.combine_images);
        let replies = post(self.agent.clone(), &self.cfg, body.to_string());
        self.streams.push(Stream {
            job: Job {
                req: req.clone(),
                reply: job.reply.clone(),
                cancel: job.cancel.clone(),
            },
            question,
            answer: Answer::new(req.id),
            replies,
        });
        Ok(())
    }

    /// Waits up to [`POLL`] for any stream to send something (so that cancelling is seen that
    /// soon), then takes in what came.
    fn step(&mut self) -> Result<(), Failed> {
        if self.streams.is_empty() {
            return Ok(());
        }
        let mut ready = Select::new();
        for s in &self.streams {
            ready.recv(&s.replies);
        }
        let _ = ready.ready_timeout(POLL);
        drop(ready);
        #[cfg(test)]
        let panic_on = self.panic_on;
        #[cfg(not(test))]
        let panic_on = None;
        // retain_mut keeps the streams not yet taken in (and the one taken in) when a panic
        // unwinds through it, so that the loop's guard can end them with an error
        self.streams.retain_mut(|s| s.advance(panic_on));
        Ok(())
    }

    fn running(&self) -> usize {
        self.streams.len()
    }

    fn truncate(&mut self, n: usize) {
        self.streams.truncate(n);
    }

    fn fail_all(&mut self, message: &str, fault: Fault) {
        for s in self.streams.drain(..) {
            let _ = s.job.reply.send(EngineEvent::Error {
                id: s.job.req.id,
                message: message.into(),
                fault,
            });
        }
    }

    // the server keeps no conversation: nothing to forget
    fn reset(&mut self) {}
}

/// Takes in one stream chunk: text, finish reason, usage, or an error.
fn chunk(data: &str, answer: &mut Answer, tx: &Sender<EngineEvent>) -> Result<(), Failure> {
    let not_json = |e: serde_json::Error| {
        (
            format!("the server sent a chunk that is not JSON ({e}): {data:.80}"),
            Fault::Engine,
        )
    };
    let v: Value = serde_json::from_str(data).map_err(not_json)?;
    if !v["error"].is_null() {
        return Err((error_message(500, data), Fault::Engine));
    }
    let c: ChatCompletionChunk = serde_json::from_value(v).map_err(|e| {
        (
            format!(
                "the server sent a chunk that is not a chat.completion.chunk ({e}): {data:.80}"
            ),
            Fault::Engine,
        )
    })?;
    if let Some(choice) = c.choices.first() {
        let delta = &choice.delta;
        if let Some(r) = [&delta.reasoning_content, &delta.reasoning]
            .into_iter()
            .flatten()
            .find(|t| !t.is_empty())
        {
            let text = answer.thinking.reasoning(r);
            answer.emit(text, tx);
            answer.pieces += 1;
        }
        if let Some(c) = delta.content.as_deref().filter(|t| !t.is_empty()) {
            let text = answer.thinking.content(c);
            answer.emit(text, tx);
            answer.pieces += 1;
        }
        if let Some(reason) = &choice.finish_reason {
            answer.finish = Some(if reason == "length" {
                Finish::Length
            } else {
                Finish::Stop
            });
        }
    }
    if let Some(u) = c.usage {
        answer.prompt_tokens = Some(u.prompt_tokens);
        answer.completion_tokens = Some(u.completion_tokens);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::protocol::{Cancel, Turn};
    use crate::sampling::SamplingParams;
    use crate::testutil::fixture;

    fn request(history: Vec<Turn>, question: &str, atts: Vec<Attachment>) -> GenerateRequest {
        GenerateRequest {
            id: 1,
            system: Some("Be brief.".into()),
            history,
            question: question.into(),
            attachments: atts,
            combine_images: false,
            params: SamplingParams::greedy(8),
            stop: vec!["END".into()],
            truncate_history: false,
        }
    }

    fn image(name: &str, max_tiles: Option<usize>) -> Attachment {
        Attachment::Image {
            path: fixture(&format!("media/images/{name}")),
            max_tiles,
        }
    }

    #[test]
    fn urls_are_checked_and_normalised() {
        let c = RemoteConfig::new("http://127.0.0.1:8000/v1/", None, None, 12).unwrap();
        assert_eq!(c.endpoint("models"), "http://127.0.0.1:8000/v1/models");
        assert_eq!(c.host(), "127.0.0.1:8000");
        let c = RemoteConfig::new("https://h.example/api", Some(String::new()), None, 12).unwrap();
        assert_eq!(
            c.endpoint("chat/completions"),
            "https://h.example/api/v1/chat/completions"
        );
        assert_eq!(c.api_key, None, "an empty key is no key");
        for bad in ["127.0.0.1:8000", "ftp://h", "http://", "http:///x"] {
            let e = RemoteConfig::new(bad, None, None, 12).unwrap_err();
            assert!(e.contains("expected http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_conversation_becomes_openai_messages() {
        let jpg = image("image1.jpg", Some(2));
        let png = image("alpaca.png", None);
        let history = vec![Turn {
            question: "Image-1: <image>\nImage-2: <image>\nWhat differs?".into(),
            attachments: vec![jpg.clone(), png.clone()],
            answer: "The colours.".into(),
        }];
        let body = request_body("m", &request(history, "And now?", vec![png])).unwrap();
        let m = &body["messages"];
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        let first = &m[1]["content"];
        let url = first[0]["image_url"]["url"].as_str().unwrap();
        assert!(url.starts_with("data:image/jpeg;base64,/9j/"), "{url:.40}");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&url["data:image/jpeg;base64,".len()..])
            .unwrap();
        assert_eq!(
            bytes,
            std::fs::read(fixture("media/images/image1.jpg")).unwrap()
        );
        assert_eq!(first[0]["image_url"]["max_dynamic_patch"], 2);
        assert!(first[1]["image_url"]["url"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,"));
        assert!(first[1]["image_url"].get("max_dynamic_patch").is_none());
        assert_eq!(
            first[2],
            json!({"type": "text", "text": "What differs?"}),
            "the placeholders the program added are left to the server"
        );
        assert_eq!(
            m[2],
            json!({"role": "assistant", "content": "The colours."})
        );
        assert_eq!(
            m[3]["content"][1],
            json!({"type": "text", "text": "And now?"})
        );
        assert_eq!(m.as_array().unwrap().len(), 4);
        assert_eq!(body["temperature"], 0.0, "greedy");
        assert_eq!(body["repetition_penalty"], 1.0);
        assert_eq!(
            (body["max_tokens"].clone(), body["seed"].clone()),
            (json!(8), json!(0))
        );
        assert_eq!(body["top_k"], 50);
        assert_eq!(body["stop"], json!(["END"]));
        assert_eq!(body["stream"], true);
        assert!(body.get("min_tokens").is_none());
    }

    #[test]
    fn videos_and_combined_pictures_are_refused() {
        let video = Attachment::Video {
            path: "/v.mp4".into(),
            segments: 8,
            bound: None,
            max_tiles: 1,
        };
        let e = request_body("m", &request(vec![], "What happens?", vec![video])).unwrap_err();
        assert_eq!(
            e,
            "/v.mp4: remote mode sends pictures only; videos are not supported"
        );
        let mut r = request(
            vec![],
            "?",
            vec![image("image1.jpg", None), image("image2.jpg", None)],
        );
        r.combine_images = true;
        assert!(request_body("m", &r)
            .unwrap_err()
            .contains("cannot combine"));
        let missing = Attachment::Image {
            path: crate::testutil::fixtures().join("media/images/none.jpg"),
            max_tiles: None,
        };
        let e = user_message("x", &[missing]).unwrap_err();
        assert!(e.contains("none.jpg: cannot read the picture"), "{e}");
    }

    #[test]
    fn thinking_asks_the_server_and_its_reasoning_comes_back_wrapped() {
        let mut r = request(vec![], "How many?", vec![]);
        assert!(request_body("m", &r)
            .unwrap()
            .get("chat_template_kwargs")
            .is_none());
        r.system = Some(R1_SYSTEM_PROMPT.into());
        let body = request_body("m", &r).unwrap();
        assert_eq!(
            body["chat_template_kwargs"],
            json!({"enable_thinking": true})
        );
        assert_eq!(body["messages"][0]["content"], R1_SYSTEM_PROMPT);
        // streamed reasoning_content (vLLM's newer `reasoning` too), then content
        let (tx, rx) = unbounded();
        let mut answer = Answer::new(7);
        for delta in [
            json!({"role": "assistant", "content": ""}),
            json!({"reasoning_content": "\n"}),
            json!({"reasoning_content": "Two shapes.\n"}),
            json!({"reasoning": "Both cats.\n\n"}),
            json!({"content": "Two cats."}),
        ] {
            let data = json!({"choices": [{"delta": delta, "finish_reason": null}]});
            chunk(&data.to_string(), &mut answer, &tx).unwrap();
        }
        let done = answer.done(Finish::Stop, &tx);
        let tokens: Vec<String> = rx
            .try_iter()
            .filter_map(|e| match e {
                EngineEvent::Token { text, .. } => Some(text),
                _ => None,
            })
            .collect();
        let local = "<think>\nTwo shapes.\nBoth cats.\n</think>\n\nTwo cats.";
        assert_eq!(tokens.concat(), local, "{tokens:?}");
        let EngineEvent::Done { answer, .. } = done else {
            panic!("{done:?}")
        };
        assert_eq!(answer, local);
        // a stream that ends while thinking closes the block
        let mut w = Rewrap::default();
        let text = w.reasoning("hm") + &w.close();
        assert_eq!(text, "<think>\nhm\n</think>\n\n");
        assert_eq!(w.content("ok"), "ok");
        // no thinking: content passes as it is
        let mut w = Rewrap::default();
        assert_eq!(w.content(" ok"), " ok");
        assert_eq!(w.close(), "");
    }

    #[test]
    fn server_errors_read_in_every_common_shape() {
        let cases = [
            (
                r#"{"error":{"message":"bad key","type":"x"}}"#,
                "HTTP 401: bad key",
            ),
            (
                r#"{"message":"model not found","object":"error"}"#,
                "HTTP 401: model not found",
            ),
            (
                r#"{"detail":"Not authenticated"}"#,
                "HTTP 401: Not authenticated",
            ),
            ("plain text\nmore", "HTTP 401: plain text"),
            ("", "HTTP 401"),
        ];
        for (body, want) in cases {
            assert_eq!(error_message(401, body), want);
        }
    }

    /// A one-connection-at-a-time server on loopback that streams each request's answer: the
    /// text "boom" when the question asks for it, else "hi". Ends after `n` requests.
    fn streaming_server(n: usize) -> (String, std::thread::JoinHandle<()>) {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            for conn in listener.incoming().take(n) {
                let mut conn = conn.unwrap();
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let body = String::from_utf8(body).unwrap();
                let text = if body.contains("boom") { "boom" } else { "hi" };
                let chunk =
                    json!({"choices": [{"delta": {"content": text}, "finish_reason": null}]});
                let end = json!({"choices": [{"delta": {}, "finish_reason": "stop"}]});
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n\
                     data: {chunk}\n\ndata: {end}\n\ndata: [DONE]\n\n"
                );
            }
        });
        (url, t)
    }

    #[test]
    fn a_panic_in_the_remote_path_is_an_error_event_and_the_next_request_works() {
        let (url, server) = streaming_server(2);
        let cfg = RemoteConfig::new(&url, None, None, 12).unwrap();
        let mut remote = Remote::new(agent(), cfg, "m".into());
        remote.panic_on = Some("boom");
        let (cmd_tx, cmd_rx) = unbounded();
        let mut replies = Vec::new();
        for (id, q) in [(1, "boom"), (2, "fine")] {
            let (reply, events) = unbounded();
            let req = request(Vec::new(), q, Vec::new());
            let req = GenerateRequest { id, ..req };
            cmd_tx
                .send(EngineCmd::Generate {
                    req,
                    reply,
                    cancel: Cancel::new(),
                })
                .unwrap();
            replies.push(events);
        }
        cmd_tx.send(EngineCmd::Shutdown).unwrap();
        serve_requests(&mut remote, &cmd_rx, STREAMS);
        server.join().unwrap();
        let first: Vec<EngineEvent> = replies[0].try_iter().collect();
        let errors: Vec<&EngineEvent> = first
            .iter()
            .filter(|e| matches!(e, EngineEvent::Error { .. }))
            .collect();
        assert_eq!(errors.len(), 1, "one error: {first:?}");
        assert!(
            matches!(
                first.last(),
                Some(EngineEvent::Error { id: 1, message, fault: Fault::Engine })
                    if message == "internal error: injected: boom"
            ),
            "{first:?}"
        );
        assert!(
            !first.iter().any(|e| matches!(e, EngineEvent::Done { .. })),
            "{first:?}"
        );
        let second: Vec<EngineEvent> = replies[1].try_iter().collect();
        assert!(
            matches!(
                second.last(),
                Some(EngineEvent::Done { id: 2, answer, stats }) if answer == "hi"
                    && stats.finish == Finish::Stop
            ),
            "{second:?}"
        );
    }
}
