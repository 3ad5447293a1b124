//! `internvl-chat serve`: an OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`,
//! streaming with server-sent events) in front of one engine worker.
//!
//! A thread per connection reads requests, checks them and turns OpenAI messages into the
//! engine's `GenerateRequest`, which it hands to the engine with a channel for its events and a
//! cancel switch of its own; the engine's scheduler decodes up to `--max-batch` requests
//! together, the rest waiting in arrival order. While a handler waits for its request's events
//! it watches its socket: when the client has gone (closed, or a write fails) it cancels the
//! request, waiting or running, and drops its events (which stops it too).
pub mod http;
pub mod images;
pub mod openai;

use crate::engine::protocol::with_placeholders;
use crate::engine::protocol::Cancel;
use crate::engine::protocol::{
    Attachment, EngineEvent, Fault, Finish, GenerateRequest, RequestId, Turn,
};
use crate::engine::EngineHandle;
use crate::openai_wire::{Delta, ModelList};
use crate::prompt::thinking::{ThinkStream, R1_SYSTEM_PROMPT};
use crate::sampling::SamplingParams;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use http::{Conn, ReadError, Request};
use images::TempPicture;
use openai::{ApiError, Envelope, Usage, UserMessage};
use serde_json::Value;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest request body (pictures come inline as data: URLs).
const MAX_BODY: usize = 64 << 20;
/// Connections served at once; more are turned away with 503 (once no idle one is left to close).
const MAX_CONNECTIONS: usize = 256;
/// Connections served at once for one client address, so that one client cannot take them all.
const MAX_PER_CLIENT: usize = 32;
/// How often a waiting handler looks whether its client is still there.
const POLL: Duration = Duration::from_millis(100);

pub struct ServeConfig {
    /// The model's name in `/v1/models`; requests naming another model get 404.
    pub model: String,
    /// Requests without `Authorization: Bearer KEY` get 401.
    pub api_key: Option<String>,
    pub allow_remote_images: bool,
    /// Sampling settings of the command line; a request's fields go over them.
    pub base: SamplingParams,
    /// The system message when a request has none (else the model's).
    pub system: Option<String>,
    /// Tiles per picture when a request does not say (else the model's).
    pub max_tiles: Option<usize>,
    pub context_len: usize,
    /// Time for a whole request, head and body, from its first byte.
    pub request_time: Duration,
}

struct Shared {
    cfg: ServeConfig,
    pictures: images::Pictures,
    engine: EngineHandle,
    next_id: AtomicU64,
    /// Start time: `created` of the model, and part of completion ids.
    started: u64,
    slots: Mutex<Slots>,
}

/// The connections being served, and those of them idle between requests.
#[derive(Default)]
struct Slots {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
    /// Kept-alive connections waiting for a next request, oldest wait first.
    idle: BTreeMap<u64, TcpStream>,
    next_idle: u64,
}

/// Why a connection is not taken.
enum Refusal {
    Client(IpAddr),
    Full,
}

impl Shared {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        // a panic elsewhere never leaves the counts half-updated
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a connection from `ip`; at the global cap the connection idle longest is closed
    /// to make room (its thread ends on its own and gives its slot back).
    fn admit(&self, ip: IpAddr) -> Result<(), Refusal> {
        let mut slots = self.slots();
        if slots.per_client.get(&ip).copied().unwrap_or(0) >= MAX_PER_CLIENT {
            return Err(Refusal::Client(ip));
        }
        if slots.total >= MAX_CONNECTIONS {
            let Some((_, idle)) = slots.idle.pop_first() else {
                return Err(Refusal::Full);
            };
            let _ = idle.shutdown(std::net::Shutdown::Both);
        }
        slots.total += 1;
        *slots.per_client.entry(ip).or_insert(0) += 1;
        Ok(())
    }

    fn release(&self, ip: IpAddr) {
        let mut slots = self.slots();
        slots.total = slots.total.saturating_sub(1);
        if let Some(n) = slots.per_client.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                slots.per_client.remove(&ip);
            }
        }
    }

    /// Marks `conn` idle (closable to make room) until the returned key is given to [`Shared::busy`].
    fn idle(&self, conn: &Conn) -> Option<u64> {
        let stream = conn.stream().try_clone().ok()?;
        let mut slots = self.slots();
        let key = slots.next_idle;
        slots.next_idle += 1;
        slots.idle.insert(key, stream);
        Some(key)
    }

    fn busy(&self, key: Option<u64>) {
        if let Some(key) = key {
            self.slots().idle.remove(&key);
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves `listener` until the process ends; the engine behind `handle` must be ready.
pub fn run(listener: TcpListener, handle: EngineHandle, cfg: ServeConfig) -> anyhow::Result<()> {
    let pictures = images::Pictures::new(cfg.allow_remote_images)
        .map_err(|e| anyhow::anyhow!("cannot make a folder for pictures: {e}"))?;
    tracing::debug!("pictures of requests go to {}", pictures.dir().display());
    stop_on_signals(pictures.dir().to_path_buf())?;
    let shared = Arc::new(Shared {
        cfg,
        pictures,
        engine: handle,
        next_id: AtomicU64::new(1),
        started: unix_now(),
        slots: Mutex::new(Slots::default()),
    });
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // out of file descriptors and the like: wait instead of spinning
                tracing::warn!("cannot accept a connection: {e}");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let shared = shared.clone();
        let Ok(ip) = stream.peer_addr().map(|a| a.ip()) else {
            continue;
        };
        if let Err(why) = shared.admit(ip) {
            turn_away(stream, why);
            continue;
        }
        let spawned = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                connection(&shared, stream);
                shared.release(ip);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// SIGINT, SIGTERM and SIGHUP end the server at once, without leaving pictures behind.
fn stop_on_signals(pictures: std::path::PathBuf) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| anyhow::anyhow!("cannot listen for signals: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = std::fs::remove_dir_all(&pictures);
                tracing::info!("stopping (signal {sig})");
                std::process::exit(0);
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the signal thread: {e}"))?;
    Ok(())
}

fn turn_away(stream: TcpStream, why: Refusal) {
    // the answer fits the socket's buffer: writing it never waits for the client
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if let Ok(mut conn) = Conn::new(stream) {
        let message = match why {
            Refusal::Client(ip) => {
                format!("more than {MAX_PER_CLIENT} connections from {ip}; try again later")
            }
            Refusal::Full => format!("more than {MAX_CONNECTIONS} connections; try again later"),
        };
        let _ = send_error(&mut conn, &ApiError::new(503, "overloaded", message), false);
    }
}

fn unauthorized() -> ApiError {
    ApiError::new(
        401,
        "invalid_api_key",
        "invalid or missing API key (send the header Authorization: Bearer KEY)",
    )
}

/// Requests of one connection, until it closes.
fn connection(shared: &Shared, stream: TcpStream) {
    let Ok(mut conn) = Conn::with_deadline(stream, shared.cfg.request_time) else {
        return;
    };
    loop {
        let idle = shared.idle(&conn);
        let more = conn.wait_for_request();
        shared.busy(idle);
        if !matches!(more, Ok(true)) {
            return;
        }
        let mut req = match conn.read_head() {
            Ok(Some(r)) => r,
            Ok(None) | Err(ReadError::Io(_)) => return,
            Err(e) => return refuse(&mut conn, &e),
        };
        // before the body: a client without the key cannot make the server read 64 MiB
        if let Some(key) = &shared.cfg.api_key {
            if !authorized(&req, key) {
                let _ = send_error(&mut conn, &unauthorized(), false);
                return;
            }
        }
        match conn.read_body(&mut req, MAX_BODY) {
            Ok(()) => {}
            Err(ReadError::Io(_)) => return,
            Err(e) => return refuse(&mut conn, &e),
        }
        let keep = req.keep_alive();
        if handle(shared, &mut conn, &req, keep).is_err() || !keep {
            return;
        }
    }
}

/// Answers a request that could not be read, and closes the connection.
fn refuse(conn: &mut Conn, e: &ReadError) {
    let err = match e {
        ReadError::TooLarge { .. } => ApiError::new(413, "request_too_large", e.to_string()),
        ReadError::LengthRequired => ApiError::new(411, "length_required", e.to_string()),
        ReadError::Timeout(_) => ApiError::new(408, "request_timeout", e.to_string()),
        _ => ApiError::invalid(e.to_string()),
    };
    let _ = send_error(conn, &err, false);
}

fn send_json(conn: &mut Conn, status: u16, v: &Value, keep: bool) -> io::Result<()> {
    conn.respond(status, "application/json", v.to_string().as_bytes(), keep)
}

fn send_error(conn: &mut Conn, e: &ApiError, keep: bool) -> io::Result<()> {
    send_json(conn, e.status, &e.json(), keep)
}

/// Compares without stopping at the first difference.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(req: &Request, key: &str) -> bool {
    let given = req.header("authorization").and_then(|h| {
        let (scheme, token) = h.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes()))
}

/// Routes one request. An `Err` closes the connection (the client has gone).
fn handle(shared: &Shared, conn: &mut Conn, req: &Request, keep: bool) -> io::Result<()> {
    let cfg = &shared.cfg;
    if let Some(key) = &cfg.api_key {
        if !authorized(req, key) {
            return send_error(conn, &unauthorized(), keep);
        }
    }
    let card = || openai::model_card(&cfg.model, shared.started, cfg.context_len);
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/models") => send_json(
            conn,
            200,
            &openai::wire(&ModelList {
                object: "list".into(),
                data: vec![card()],
            }),
            keep,
        ),
        ("GET", p) if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            if id == cfg.model {
                send_json(conn, 200, &openai::wire(&card()), keep)
            } else {
                send_error(conn, &unknown_model(id, &cfg.model), keep)
            }
        }
        ("POST", "/v1/chat/completions") => chat(shared, conn, req, keep),
        (m, p @ ("/v1/models" | "/v1/chat/completions")) => {
            let e = ApiError::new(405, "method_not_allowed", format!("{m} {p} is not allowed"));
            send_error(conn, &e, keep)
        }
        (m, p) => {
            let e = ApiError::new(404, "not_found", format!("unknown route: {m} {p}"));
            send_error(conn, &e, keep)
        }
    }
}

fn unknown_model(asked: &str, served: &str) -> ApiError {
    ApiError::new(
        404,
        "model_not_found",
        format!("the model {asked:?} does not exist; this server serves {served:?}"),
    )
}

/// The request's pictures as attachments (their files added to `files`).
fn attachments(
    shared: &Shared,
    m: &UserMessage,
    files: &mut Vec<TempPicture>,
) -> Result<Vec<Attachment>, ApiError> {
    let cfg = &shared.cfg;
    m.images
        .iter()
        .map(|i| {
            let a = shared.pictures.resolve(i, files)?;
            Ok(match a {
                Attachment::Image { path, max_tiles } => Attachment::Image {
                    path,
                    max_tiles: max_tiles.or(cfg.max_tiles),
                },
                video => video,
            })
        })
        .collect()
}

/// The engine request of a chat completion; its picture files go to `files`.
fn generate_request(
    shared: &Shared,
    id: RequestId,
    chat: openai::ChatRequest,
    files: &mut Vec<TempPicture>,
) -> Result<GenerateRequest, ApiError> {
    let mut history = Vec::with_capacity(chat.history.len());
    for (user, answer) in &chat.history {
        let atts = attachments(shared, user, files)?;
        let slots: Vec<(&Attachment, usize)> = atts.iter().map(|a| (a, 1)).collect();
        history.push(Turn {
            // placeholders as the chat keeps them in its history
            question: with_placeholders(&user.text, &slots, false),
            attachments: atts.clone(),
            answer: answer.clone(),
        });
    }
    let thinking = Some(R1_SYSTEM_PROMPT);
    let system = match (chat.think, chat.system) {
        (Some((true, field)), Some(s)) if s != R1_SYSTEM_PROMPT => {
            return Err(ApiError::invalid(format!(
                "{field}: thinking has its own system message; leave out the system message"
            )))
        }
        (Some((true, _)), _) => thinking.map(str::to_string),
        // declined: not the server's --think either
        (Some((false, _)), s) => s.or_else(|| {
            shared
                .cfg
                .system
                .clone()
                .filter(|s| Some(s.as_str()) != thinking)
        }),
        (None, s) => s.or_else(|| shared.cfg.system.clone()),
    };
    Ok(GenerateRequest {
        id,
        system,
        history,
        attachments: attachments(shared, &chat.question, files)?,
        question: chat.question.text,
        combine_images: false,
        params: chat.params,
        stop: chat.stop,
        // an over-long conversation is the client's to shorten: refused with the numbers
        truncate_history: false,
    })
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::Cancelled => "abort",
    }
}

fn engine_error(message: &str, fault: Fault) -> ApiError {
    match fault {
        Fault::Request => ApiError::invalid(message),
        Fault::Engine => ApiError::new(500, "engine_error", message),
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the client has gone")
}

/// The next event of request `id`, watching the client meanwhile: when it has gone, the
/// request is cancelled and `Err` returned. The socket is looked at every [`POLL`] whether or not
/// events keep coming (a fast model's tokens arrive more often than that, and a non-streamed
/// answer writes nothing until it is done).
fn next_event(conn: &Conn, events: &Events) -> io::Result<EngineEvent> {
    let Events {
        id, rx, last_look, ..
    } = events;
    let id = *id;
    loop {
        if last_look.get().elapsed() >= POLL {
            last_look.set(Instant::now());
            if conn.client_gone() {
                abandon(events);
                return Err(gone());
            }
        }
        match rx.recv_timeout(POLL.saturating_sub(last_look.get().elapsed())) {
            Ok(ev) => return Ok(ev),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Ok(EngineEvent::Error {
                    id,
                    message: "the engine has stopped".into(),
                    fault: Fault::Engine,
                })
            }
        }
    }
}

fn chat(shared: &Shared, conn: &mut Conn, req: &Request, keep: bool) -> io::Result<()> {
    let cfg = &shared.cfg;
    let parsed = match openai::parse_chat(&req.body, &cfg.base) {
        Ok(p) => p,
        Err(e) => return send_error(conn, &e, keep),
    };
    if let Some(m) = parsed.model.as_deref().filter(|m| *m != cfg.model) {
        return send_error(conn, &unknown_model(m, &cfg.model), keep);
    }
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let env = Envelope {
        id: format!("chatcmpl-{:x}-{id}", shared.started),
        created: unix_now(),
        model: cfg.model.clone(),
    };
    let (stream, include_usage) = (parsed.stream, parsed.include_usage);
    let mut files = Vec::new();
    let request = match generate_request(shared, id, parsed, &mut files) {
        Ok(r) => r,
        Err(e) => return send_error(conn, &e, keep),
    };
    let thinks = request.system.as_deref() == Some(R1_SYSTEM_PROMPT);
    // the engine names the private files of data: URLs; the client knows them by place
    let places: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.file.path().display().to_string(), f.at.clone()))
        .collect();
    let locate = |message: &str| {
        places
            .iter()
            .fold(message.to_string(), |m, (path, at)| m.replace(path, at))
    };
    // the pictures' files stay until the request is over
    let _files = files;
    let Some(submitted) = shared.engine.submit(request) else {
        let e = ApiError::new(503, "engine_unavailable", "the engine has stopped");
        return send_error(conn, &e, keep);
    };
    // errors found when the engine reads the request (an undecodable picture, a prompt too
    // long) come before it starts, as a plain error response
    let events = Events {
        id,
        name: &env.id,
        rx: &submitted.events,
        cancel: &submitted.cancel,
        last_look: Cell::new(Instant::now()),
    };
    match next_event(conn, &events)? {
        EngineEvent::Error { message, fault, .. } => {
            let message = locate(&message);
            tracing::info!("{}: refused: {message}", env.id);
            send_error(conn, &engine_error(&message, fault), keep)
        }
        _ if stream => stream_answer(conn, &events, &env, include_usage),
        first => whole_answer(conn, &events, &env, first, thinks, keep),
    }
}

fn log_done(env: &Envelope, finish: Finish, usage: Usage, streamed: bool) {
    tracing::info!(
        "{}: {} prompt + {} completion tokens, finish {}{}",
        env.id,
        usage.prompt_tokens,
        usage.completion_tokens,
        finish_reason(finish),
        if streamed { ", streamed" } else { "" }
    );
}

/// The request's id and name, its events and cancel switch, and when its client's socket was
/// last looked at.
struct Events<'a> {
    id: RequestId,
    name: &'a str,
    rx: &'a Receiver<EngineEvent>,
    cancel: &'a Cancel,
    last_look: Cell<Instant>,
}

/// How long a handler whose client has gone waits for the engine to confirm the cancel, for
/// the log.
const CANCEL_WAIT: Duration = Duration::from_secs(2);

/// The client has gone: cancels the request and logs how it ended, waiting a moment for the
/// engine to say (a request still waiting for room in the batch is dropped when its turn
/// comes).
fn abandon(events: &Events) {
    events.cancel.cancel();
    let name = events.name;
    let deadline = Instant::now() + CANCEL_WAIT;
    loop {
        match events.rx.recv_deadline(deadline) {
            Ok(EngineEvent::Done { stats, .. }) => {
                match stats.finish {
                    Finish::Cancelled => tracing::info!(
                        "{name}: cancelled: the client went away ({} tokens generated)",
                        stats.completion_tokens
                    ),
                    f => tracing::info!(
                        "{name}: ended ({}) as the client went away",
                        finish_reason(f)
                    ),
                }
                return;
            }
            Ok(EngineEvent::Error { message, .. }) => {
                tracing::info!("{name}: the client went away; the request failed: {message}");
                return;
            }
            Ok(_) => {}
            // its events were all read (the client left after the answer)
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                tracing::info!("{name}: cancelled while waiting: the client went away");
                return;
            }
        }
    }
}

fn whole_answer(
    conn: &mut Conn,
    events: &Events,
    env: &Envelope,
    first: EngineEvent,
    thinks: bool,
    keep: bool,
) -> io::Result<()> {
    let mut ev = first;
    loop {
        match ev {
            EngineEvent::Done { answer, stats, .. } => {
                let usage = Usage::new(stats.prompt_tokens, stats.completion_tokens);
                log_done(env, stats.finish, usage, false);
                let body = env.completion(&answer, thinks, finish_reason(stats.finish), usage);
                return send_json(conn, 200, &body, keep);
            }
            EngineEvent::Error { message, fault, .. } => {
                tracing::warn!("{}: failed: {message}", env.id);
                return send_error(conn, &engine_error(&message, fault), keep);
            }
            _ => ev = next_event(conn, events)?,
        }
    }
}

/// Writes one server-sent event; a failed write cancels the request.
fn sse(conn: &mut Conn, events: &Events, data: &str) -> io::Result<()> {
    let r = conn.chunk(format!("data: {data}\n\n").as_bytes());
    if r.is_err() {
        abandon(events);
    }
    r
}

fn stream_answer(
    conn: &mut Conn,
    events: &Events,
    env: &Envelope,
    include_usage: bool,
) -> io::Result<()> {
    if conn.start_chunked(200, "text/event-stream").is_err() {
        abandon(events);
        return Err(gone());
    }
    let role = env.chunk(
        Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
            ..Delta::default()
        },
        None,
    );
    sse(conn, events, &role.to_string())?;
    // a think block goes out as `reasoning_content`, the rest as `content`
    let mut split = ThinkStream::new();
    let send = |conn: &mut Conn, d: crate::prompt::thinking::Delta| -> io::Result<()> {
        if !d.reasoning.is_empty() {
            let delta = Delta {
                reasoning_content: Some(d.reasoning),
                ..Delta::default()
            };
            let chunk = env.chunk(delta, None);
            sse(conn, events, &chunk.to_string())?;
        }
        if !d.content.is_empty() {
            let delta = Delta {
                content: Some(d.content),
                ..Delta::default()
            };
            let chunk = env.chunk(delta, None);
            sse(conn, events, &chunk.to_string())?;
        }
        Ok(())
    };
    loop {
        match next_event(conn, events)? {
            EngineEvent::Token { text, .. } => send(conn, split.push(&text))?,
            EngineEvent::Done { stats, .. } => {
                send(conn, split.finish())?;
                let usage = Usage::new(stats.prompt_tokens, stats.completion_tokens);
                log_done(env, stats.finish, usage, true);
                let last = env.chunk(Delta::default(), Some(finish_reason(stats.finish)));
                sse(conn, events, &last.to_string())?;
                if include_usage {
                    sse(conn, events, &env.usage_chunk(usage).to_string())?;
                }
                break;
            }
            EngineEvent::Error { message, fault, .. } => {
                tracing::warn!("{}: failed while streaming: {message}", env.id);
                sse(
                    conn,
                    events,
                    &engine_error(&message, fault).json().to_string(),
                )?;
                break;
            }
            _ => {}
        }
    }
    sse(conn, events, "[DONE]")?;
    conn.end_chunked()
}
