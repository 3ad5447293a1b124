//! JSONL batches: one request per line in, one result per line out, in the same order.
//! A bad line gives `{"id": ..., "error": "..."}` and the batch goes on.
use crate::engine::chat::{ChatInput, ChatOutput, Engine, Fit, Prepared};
use crate::engine::generate::Flow;
use crate::engine::protocol::{Attachment, Turn};
use crate::sampling::{Overrides, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, Write};
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

fn result_json(id: &Value, out: &ChatOutput, dropped_turns: usize, elapsed: f64) -> Value {
    json!({
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
    })
}

fn error_json(id: &Value, msg: &str) -> Value {
    json!({ "id": id, "error": msg })
}

type Pending = Vec<(Value, Prepared, SamplingParams)>;
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
        let (_, p, sp) = &batch[0];
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
    for ((id, p, _), r) in batch.iter().zip(results) {
        match r {
            Ok(out) => emit(
                result_json(id, &out, p.dropped_turns, elapsed),
                output,
                true,
            )?,
            Err(e) => emit(error_json(id, &e), output, false)?,
        }
    }
    Ok(())
}

/// Runs every request of `input`, writing one line per request to `output` as soon as it is
/// known. Requests are decoded `batch_size` at a time (left-padded together).
pub fn run_batch(
    engine: &mut Engine,
    input: &mut (dyn BufRead + Send),
    output: &mut dyn Write,
    base: &SamplingParams,
    system: Option<&str>,
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
    let (tx, rx) = crossbeam_channel::bounded::<(usize, std::io::Result<String>)>(2 * batch_size);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(move || {
            for (n, line) in input.lines().enumerate() {
                if let Ok(Ok(req)) = line.as_deref().map(parse_line) {
                    for a in req.attachments() {
                        crate::preprocess::prefetch(&a, &tiles);
                    }
                }
                if tx.send((n, line)).is_err() {
                    break;
                }
            }
        });
        for (n, line) in rx {
            let line = line.map_err(|e| anyhow::anyhow!("reading line {}: {e}", n + 1))?;
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
            let history = req.history();
            let attachments = req.attachments();
            let input = ChatInput {
                system: req.system.as_deref().or(system),
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
                    pending.push((req.id.clone(), p, params));
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
