//! JSONL batches: one request per line in, one result per line out, in the same order.
//! A bad line gives `{"id": ..., "error": "..."}` and the batch goes on.
use crate::engine::chat::ChatOutput;
use crate::engine::generate::GenOutput;
use crate::engine::protocol::{Attachment, Cancel, EngineEvent, Fault, GenerateRequest, Turn};
use crate::engine::scheduler::{Job, Scheduler};
use crate::files::MAX_JSONL_LINE_BYTES;
use crate::media::TimeRange;
use crate::prompt::thinking::{self, R1_SYSTEM_PROMPT};
use crate::sampling::{Overrides, SamplingParams};
use crossbeam_channel::{Receiver, TryRecvError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub max_tiles: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoSpec {
    pub path: PathBuf,
    #[serde(default)]
    pub segments: Option<usize>,
    /// `[START, END]` in seconds, checked as [`TimeRange`] says.
    #[serde(default)]
    pub bound: Option<TimeRange>,
    #[serde(default)]
    pub max_tiles: Option<usize>,
}

/// One request line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub id: Value,
    pub question: String,
    #[serde(default)]
    pub history: Vec<(String, String)>,
    #[serde(default)]
    pub system: Option<String>,
    /// Thinking mode: the model card's R1 system message (default: the command line's
    /// `--think`); not together with `system`.
    #[serde(default)]
    pub think: Option<bool>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    #[serde(default)]
    pub min_new_tokens: Option<usize>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub images: Vec<ImageSpec>,
    #[serde(default)]
    pub combine_images: bool,
    #[serde(default)]
    pub video: Option<VideoSpec>,
    /// Leave out the oldest `history` turns when the prompt would not fit (default: the
    /// command line's `--truncate-history`).
    #[serde(default)]
    pub truncate_history: Option<bool>,
}

impl Request {
    /// Request fields over `base` (the command line's settings).
    pub fn params(&self, base: &SamplingParams) -> Result<SamplingParams, String> {
        Overrides {
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
        }
        .apply(base)
    }

    /// Whether the request thinks and its system message, over the command line's (`system`
    /// or `think`, never both).
    pub fn system<'a>(
        &'a self,
        system: Option<&'a str>,
        think: bool,
    ) -> Result<(bool, Option<&'a str>), String> {
        let think =
            match (self.think, &self.system) {
                (Some(true), Some(_)) => return Err(
                    "think: cannot be combined with system (thinking has its own system message)"
                        .into(),
                ),
                (Some(t), _) => t,
                // a request's own system message replaces the command line's thinking one
                (None, Some(_)) => false,
                (None, None) => think,
            };
        if think {
            return Ok((true, Some(R1_SYSTEM_PROMPT)));
        }
        Ok((false, self.system.as_deref().or(system)))
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        let mut v: Vec<Attachment> = self
            .images
            .iter()
            .map(|i| Attachment::Image {
                path: i.path.clone(),
                max_tiles: i.max_tiles,
            })
            .collect();
        if let Some(vid) = &self.video {
            v.push(Attachment::Video {
                path: vid.path.clone(),
                segments: vid.segments.unwrap_or(crate::media::DEFAULT_SEGMENTS),
                bound: vid.bound,
                max_tiles: vid
                    .max_tiles
                    .unwrap_or(crate::media::DEFAULT_VIDEO_MAX_TILES),
            });
        }
        v
    }

    pub fn history(&self) -> Vec<Turn> {
        self.history
            .iter()
            .map(|(q, a)| Turn {
                question: q.clone(),
                attachments: Vec::new(),
                answer: a.clone(),
            })
            .collect()
    }
}

/// Parses one line; on failure the error carries whatever `id` could be read.
pub fn parse_line(line: &str) -> Result<Request, (Value, String)> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| (Value::Null, format!("invalid JSON: {e}")))?;
    let id = v.get("id").cloned().unwrap_or(Value::Null);
    if !v.is_object() {
        return Err((id, "a request must be a JSON object".into()));
    }
    // the error names the field: "max_new_tokens: invalid value: integer `-3`, expected usize"
    serde_path_to_error::deserialize::<_, Request>(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            (id, format!("invalid request: {inner}"))
        } else {
            (id, format!("invalid request: {path}: {inner}"))
        }
    })
}

/// A result line; a request that thought (or an answer with a think block) also gets its
/// `reasoning` and `content` apart.
fn result_json(
    id: &Value,
    out: &ChatOutput,
    dropped_turns: usize,
    elapsed: f64,
    think: bool,
) -> Value {
    let mut v = json!({
        "id": id,
        "response": out.answer,
        "generated_ids": out.tokens,
        "prompt_tokens": out.prompt_tokens,
        "dropped_turns": dropped_turns,
        "completion_tokens": out.tokens.len(),
        "finish_reason": out.finish,
        "timings": {
            "prefill_s": out.gen.prefill.as_secs_f64(),
            "decode_s": out.gen.decode.as_secs_f64(),
            "total_s": elapsed,
        },
    });
    let split = thinking::split(&out.answer);
    if think || split.reasoning.is_some() {
        v["reasoning"] = json!(split.reasoning);
        v["content"] = json!(split.content);
    }
    v
}

/// One line of the input, without its line ending.
enum Line {
    Text(String),
    /// Longer than the limit: its length in bytes; it was skipped, never held whole.
    TooLong(u64),
}

/// The next line of `input`, or `None` at its end. A line over `limit` bytes is read past
/// in pieces and reported by its length.
fn next_line(input: &mut dyn BufRead, limit: u64) -> std::io::Result<Option<Line>> {
    let mut buf = Vec::new();
    if (&mut *input).take(limit + 1).read_until(b'\n', &mut buf)? == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && buf.len() as u64 > limit {
        let mut bytes = buf.len() as u64;
        loop {
            let avail = input.fill_buf()?;
            if avail.is_empty() {
                break;
            }
            let (used, end) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            input.consume(used);
            bytes += used as u64 - u64::from(end);
            if end {
                break;
            }
        }
        return Ok(Some(Line::TooLong(bytes)));
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    String::from_utf8(buf)
        .map(|s| Some(Line::Text(s)))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
}

fn error_json(id: &Value, msg: &str) -> Value {
    json!({ "id": id, "error": msg })
}

/// A request of the batch in the scheduler: its place in the input, its line's id, whether it
/// thinks, its events, and when it started.
struct Live {
    seq: usize,
    id: Value,
    think: bool,
    events: Receiver<EngineEvent>,
    t0: Instant,
    dropped_turns: usize,
}

/// The request of a line, or the error line for it.
fn generate_request(
    line: &str,
    n: usize,
    seq: usize,
    base: &SamplingParams,
    system: Option<&str>,
    think: bool,
    truncate_history: bool,
) -> Result<(Value, bool, GenerateRequest), Value> {
    let req =
        parse_line(line).map_err(|(id, e)| error_json(&id, &format!("line {}: {e}", n + 1)))?;
    let params = req.params(base).map_err(|e| error_json(&req.id, &e))?;
    let (thinks, system) = req
        .system(system, think)
        .map_err(|e| error_json(&req.id, &e))?;
    let g = GenerateRequest {
        id: seq as u64,
        system: system.map(str::to_string),
        history: req.history(),
        question: req.question.clone(),
        attachments: req.attachments(),
        combine_images: req.combine_images,
        params,
        stop: Vec::new(),
        truncate_history: req.truncate_history.unwrap_or(truncate_history),
    };
    Ok((req.id, thinks, g))
}

/// Runs every request of `input` through the scheduler, up to `max_batch` decoding together
/// (a request joins as soon as another ends), and writes one line per request to `output`, in
/// input order, as soon as it and those before it are known. Each answer is the one the request
/// gets alone (`model.chat`). `system` and `think` are the command line's (`--think`: requests
/// think unless they say otherwise).
#[allow(clippy::too_many_arguments)]
pub fn run_batch(
    sched: &mut Scheduler,
    input: &mut (dyn BufRead + Send),
    output: &mut dyn Write,
    base: &SamplingParams,
    system: Option<&str>,
    think: bool,
    max_batch: usize,
    truncate_history: bool,
) -> anyhow::Result<(usize, usize)> {
    let max_batch = max_batch.max(1);
    sched.record_tokens = true;
    let (mut ok, mut failed) = (0usize, 0usize);
    // results by input place, written once every earlier one is
    let mut results: BTreeMap<usize, (Value, bool)> = BTreeMap::new();
    let mut written = 0usize;
    let mut live: Vec<Live> = Vec::new();
    // A reader thread runs ahead of the model by up to two batches, decoding and tiling their
    // attachments (into the engine's tile cache) while the model works.
    let tiles = sched.engine.tiles;
    let tile_cache = sched.engine.tile_cache().clone();
    let (tx, rx) = crossbeam_channel::bounded::<(usize, std::io::Result<Line>)>(2 * max_batch);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(move || {
            for n in 0.. {
                let line = match next_line(input, MAX_JSONL_LINE_BYTES) {
                    Ok(None) => break,
                    Ok(Some(l)) => Ok(l),
                    Err(e) => Err(e),
                };
                let failed = line.is_err();
                let ahead = match &line {
                    Ok(Line::Text(text)) => parse_line(text).map_or(vec![], |r| r.attachments()),
                    _ => vec![],
                };
                if tx.send((n, line)).is_err() || failed {
                    break;
                }
                // errors are left for the engine's own load to report
                for a in ahead {
                    let _ = tile_cache.load(&a, &tiles);
                }
            }
        });
        let mut seq = 0usize;
        let mut open = true;
        loop {
            // take lines while there is room: waiting for one only when nothing runs
            while open && sched.running() < max_batch {
                let next = if sched.running() == 0 {
                    rx.recv().ok()
                } else {
                    match rx.try_recv() {
                        Ok(l) => Some(l),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => None,
                    }
                };
                let Some((n, line)) = next else {
                    open = false;
                    break;
                };
                let at = seq;
                seq += 1;
                let line = match line.map_err(|e| anyhow::anyhow!("reading line {}: {e}", n + 1))? {
                    Line::Text(text) => text,
                    Line::TooLong(bytes) => {
                        let e = format!(
                            "line {}: {bytes} bytes, longer than the limit of \
                                 {MAX_JSONL_LINE_BYTES} bytes for a request line",
                            n + 1
                        );
                        results.insert(at, (error_json(&Value::Null, &e), false));
                        continue;
                    }
                };
                if line.trim().is_empty() {
                    results.insert(at, (Value::Null, false));
                    continue;
                }
                let (id, thinks, req) =
                    match generate_request(&line, n, at, base, system, think, truncate_history) {
                        Ok(r) => r,
                        Err(e) => {
                            results.insert(at, (e, false));
                            continue;
                        }
                    };
                let (reply, events) = crossbeam_channel::unbounded();
                let job = Job {
                    req,
                    reply,
                    cancel: Cancel::new(),
                };
                let t0 = Instant::now();
                match sched.start(&job) {
                    Ok(()) => live.push(Live {
                        seq: at,
                        id,
                        think: thinks,
                        events,
                        t0,
                        dropped_turns: 0,
                    }),
                    Err(e) => {
                        results.insert(at, (error_json(&id, &e.to_string()), false));
                    }
                }
            }
            if sched.running() > 0 {
                if let Err(e) = sched.step() {
                    sched.fail_all(&e.to_string(), Fault::Engine);
                }
            }
            // the requests that ended
            let mut i = 0;
            while i < live.len() {
                let mut ended = None;
                let events: Vec<EngineEvent> = live[i].events.try_iter().collect();
                for ev in events {
                    match ev {
                        EngineEvent::Started { dropped_turns, .. } => {
                            live[i].dropped_turns = dropped_turns
                        }
                        EngineEvent::Done { answer, stats, .. } => {
                            ended = Some(Ok((answer, stats)))
                        }
                        EngineEvent::Error { message, .. } => ended = Some(Err(message)),
                        _ => {}
                    }
                }
                let Some(end) = ended else {
                    i += 1;
                    continue;
                };
                let l = live.swap_remove(i);
                let v = match end {
                    Ok((answer, stats)) => {
                        let key = l.seq as u64;
                        let tokens = sched
                            .finished_tokens
                            .iter()
                            .position(|(id, _)| *id == key)
                            .map(|k| sched.finished_tokens.swap_remove(k).1)
                            .unwrap_or_default();
                        let elapsed = l.t0.elapsed();
                        let out = ChatOutput {
                            answer,
                            tokens,
                            finish: stats.finish,
                            prompt_tokens: stats.prompt_tokens,
                            gen: GenOutput {
                                rows: Vec::new(),
                                first_logits: None,
                                prefill_tokens: 0,
                                prefill: stats.ttft,
                                decode: elapsed.saturating_sub(stats.ttft),
                            },
                        };
                        let v = result_json(
                            &l.id,
                            &out,
                            l.dropped_turns,
                            elapsed.as_secs_f64(),
                            l.think,
                        );
                        (v, true)
                    }
                    Err(message) => (error_json(&l.id, &message), false),
                };
                results.insert(l.seq, v);
            }
            while let Some((v, good)) = results.remove(&written) {
                written += 1;
                if v.is_null() {
                    continue; // a blank line
                }
                writeln!(output, "{v}")?;
                output.flush()?;
                if good {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            if !open && sched.running() == 0 {
                return Ok(());
            }
        }
    })?;
    Ok((ok, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_over_the_limit_are_skipped_and_measured() {
        let text = format!("{{}}\r\n{}\nnext\n{}", "x".repeat(50), "y".repeat(11));
        let mut input = std::io::Cursor::new(text.into_bytes());
        let mut got = Vec::new();
        while let Some(line) = next_line(&mut input, 10).unwrap() {
            got.push(match line {
                Line::Text(t) => t,
                Line::TooLong(n) => format!("too long: {n}"),
            });
        }
        assert_eq!(got, ["{}", "too long: 50", "next", "too long: 11"]);
    }

    fn req(line: &str) -> Request {
        parse_line(line).unwrap()
    }

    #[test]
    fn think_chooses_the_thinking_system_message() {
        let r1 = Some(R1_SYSTEM_PROMPT);
        let q = r#"{"question": "q"}"#;
        assert_eq!(req(q).system(None, false), Ok((false, None)));
        assert_eq!(req(q).system(Some("cli"), false), Ok((false, Some("cli"))));
        assert_eq!(req(q).system(None, true), Ok((true, r1)), "--think");
        let think = r#"{"question": "q", "think": true}"#;
        assert_eq!(req(think).system(Some("cli"), false), Ok((true, r1)));
        let off = r#"{"question": "q", "think": false}"#;
        assert_eq!(req(off).system(None, true), Ok((false, None)));
        // a request's own system message replaces --think's
        let own = r#"{"question": "q", "system": "Be brief."}"#;
        assert_eq!(req(own).system(None, true), Ok((false, Some("Be brief."))));
        let both = r#"{"id": 3, "question": "q", "system": "Be brief.", "think": true}"#;
        assert_eq!(
            req(both).system(None, false),
            Err(
                "think: cannot be combined with system (thinking has its own system message)"
                    .into()
            )
        );
        let (id, e) = parse_line(r#"{"id": 4, "question": "q", "think": "yes"}"#).unwrap_err();
        assert_eq!(id, json!(4));
        assert!(
            e.starts_with("invalid request: think: invalid type: string"),
            "{e}"
        );
    }

    /// A video's bound is checked by `TimeRange`'s rule; the error names the line (see
    /// `generate_request`) and the field.
    #[test]
    fn video_bounds_are_checked_when_the_line_is_read() {
        let r = req(r#"{"question": "q", "video": {"path": "v.mp4", "bound": [1.5, 9]}}"#);
        assert_eq!(
            r.attachments()[0],
            Attachment::Video {
                path: "v.mp4".into(),
                segments: 8,
                bound: Some(TimeRange::new(1.5, 9.0).unwrap()),
                max_tiles: 1
            }
        );
        for (bound, want) in [
            ("[9, 1]", "video.bound: START 9 is not before END 1"),
            ("[2, 2]", "video.bound: START 2 is not before END 2"),
            (
                "[-1, 5]",
                "video.bound: START -1 is negative (seconds count from the start of the video)",
            ),
            ("[1]", "video.bound: invalid length 1"),
            ("[1, \"x\"]", "video.bound[1]: invalid type: string"),
        ] {
            let line = format!(
                r#"{{"id": 7, "question": "q", "video": {{"path": "v.mp4", "bound": {bound}}}}}"#
            );
            let (id, e) = parse_line(&line).unwrap_err();
            assert_eq!(id, json!(7));
            assert!(
                e.starts_with(&format!("invalid request: {want}")),
                "{bound}: {e}"
            );
        }
        let p = SamplingParams::default();
        let line = r#"{"id": 7, "question": "q", "video": {"path": "v.mp4", "bound": [9, 1]}}"#;
        let e = generate_request(line, 2, 0, &p, None, false, false).unwrap_err();
        assert_eq!(
            e,
            json!({"id": 7, "error": "line 3: invalid request: video.bound: START 9 is not before END 1"})
        );
    }
}
