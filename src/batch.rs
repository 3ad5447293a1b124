//! JSONL batches: one request per line in, one result per line out, in the same order.
//! A bad line gives `{"id": ..., "error": "..."}` and the batch goes on.
use crate::engine::chat::{ChatInput, ChatOutput, Engine, Fit, Prepared};
use crate::engine::generate::Flow;
use crate::engine::protocol::{Attachment, Turn};
use crate::files::MAX_JSONL_LINE_BYTES;
use crate::prompt::thinking::{self, R1_SYSTEM_PROMPT};
use crate::sampling::{Overrides, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};
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
    #[serde(default)]
    pub bound: Option<(f64, f64)>,
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
                segments: vid.segments.unwrap_or(8),
                bound: vid.bound,
                max_tiles: vid.max_tiles.unwrap_or(1),
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

/// Queued requests: id, prompt, settings, and whether it thinks.
type Pending = Vec<(Value, Prepared, SamplingParams, bool)>;
type Emit<'a> = dyn FnMut(Value, &mut dyn Write, bool) -> anyhow::Result<()> + 'a;

/// Runs the queued requests (together when more than one) and emits their results in order.
fn flush(
    engine: &mut Engine,
    pending: &mut Pending,
    output: &mut dyn Write,
    emit: &mut Emit,
) -> anyhow::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let t0 = Instant::now();
    let batch = std::mem::take(pending);
    let results: Vec<Result<ChatOutput, String>> = if batch.len() == 1 {
        let (_, p, sp, _) = &batch[0];
        vec![engine
            .run(p, sp, &mut |_| Flow::Continue)
            .map_err(|e| e.to_string())]
    } else {
        let prepared: Vec<&Prepared> = batch.iter().map(|b| &b.1).collect();
        let params: Vec<SamplingParams> = batch.iter().map(|b| b.2.clone()).collect();
        match engine.run_batch(&prepared, &params, &mut |_, _| Flow::Continue) {
            Ok(v) => v.into_iter().map(Ok).collect(),
            Err(e) => batch.iter().map(|_| Err(e.to_string())).collect(),
        }
    };
    let elapsed = t0.elapsed().as_secs_f64();
    for ((id, p, _, think), r) in batch.iter().zip(results) {
        match r {
            Ok(out) => emit(
                result_json(id, &out, p.dropped_turns, elapsed, *think),
                output,
                true,
            )?,
            Err(e) => emit(error_json(id, &e), output, false)?,
        }
    }
    Ok(())
}

/// Runs every request of `input`, writing one line per request to `output` as soon as it is
/// known. Requests are decoded `batch_size` at a time (left-padded together). `system` and
/// `think` are the command line's (`--think`: requests think unless they say otherwise).
#[allow(clippy::too_many_arguments)]
pub fn run_batch(
    engine: &mut Engine,
    input: &mut (dyn BufRead + Send),
    output: &mut dyn Write,
    base: &SamplingParams,
    system: Option<&str>,
    think: bool,
    batch_size: usize,
    truncate_history: bool,
) -> anyhow::Result<(usize, usize)> {
    let batch_size = batch_size.max(1);
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut pending: Pending = Vec::new();
    let mut emit = |v: Value, output: &mut dyn Write, good: bool| -> anyhow::Result<()> {
        writeln!(output, "{v}")?;
        output.flush()?;
        if good {
            ok += 1;
        } else {
            failed += 1;
        }
        Ok(())
    };
    // A reader thread runs ahead of the model by up to two batches, decoding and tiling their
    // attachments on other threads (into the shared cache) while the model works.
    let tiles = engine.tiles;
    let (tx, rx) = crossbeam_channel::bounded::<(usize, std::io::Result<Line>)>(2 * batch_size);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(move || {
            for n in 0.. {
                let line = match next_line(input, MAX_JSONL_LINE_BYTES) {
                    Ok(None) => break,
                    Ok(Some(l)) => Ok(l),
                    Err(e) => Err(e),
                };
                let failed = line.is_err();
                if let Ok(Line::Text(text)) = &line {
                    if let Ok(req) = parse_line(text) {
                        for a in req.attachments() {
                            crate::preprocess::prefetch(&a, &tiles);
                        }
                    }
                }
                if tx.send((n, line)).is_err() || failed {
                    break;
                }
            }
        });
        for (n, line) in rx {
            let line = match line.map_err(|e| anyhow::anyhow!("reading line {}: {e}", n + 1))? {
                Line::Text(text) => text,
                Line::TooLong(bytes) => {
                    flush(engine, &mut pending, output, &mut emit)?;
                    let e = format!(
                        "line {}: {bytes} bytes, longer than the limit of \
                         {MAX_JSONL_LINE_BYTES} bytes for a request line",
                        n + 1
                    );
                    emit(error_json(&Value::Null, &e), output, false)?;
                    continue;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            let req = match parse_line(&line) {
                Ok(r) => r,
                Err((id, e)) => {
                    flush(engine, &mut pending, output, &mut emit)?;
                    emit(
                        error_json(&id, &format!("line {}: {e}", n + 1)),
                        output,
                        false,
                    )?;
                    continue;
                }
            };
            let params = match req.params(base) {
                Ok(p) => p,
                Err(e) => {
                    flush(engine, &mut pending, output, &mut emit)?;
                    emit(error_json(&req.id, &e), output, false)?;
                    continue;
                }
            };
            let (thinks, system) = match req.system(system, think) {
                Ok(s) => s,
                Err(e) => {
                    flush(engine, &mut pending, output, &mut emit)?;
                    emit(error_json(&req.id, &e), output, false)?;
                    continue;
                }
            };
            let history = req.history();
            let attachments = req.attachments();
            let input = ChatInput {
                system,
                history: &history,
                question: &req.question,
                attachments: &attachments,
                combine_images: req.combine_images,
            };
            let fit = Fit {
                max_new_tokens: params.max_new_tokens,
                truncate_history: req.truncate_history.unwrap_or(truncate_history),
            };
            let prepared = engine.prepare_to_fit(&input, fit);
            match prepared {
                Ok(p) => {
                    pending.push((req.id.clone(), p, params, thinks));
                    if pending.len() >= batch_size {
                        flush(engine, &mut pending, output, &mut emit)?;
                    }
                }
                Err(e) => {
                    flush(engine, &mut pending, output, &mut emit)?;
                    emit(error_json(&req.id, &e.to_string()), output, false)?;
                }
            }
        }
        Ok(())
    })?;
    flush(engine, &mut pending, output, &mut emit)?;
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
}
