//! The thread that owns the model. Commands in, events out; a failure inside a request (an
//! error or a panic in libtorch) becomes an `Error` event and the next request still works.
use super::chat::{ChatError, ChatInput, Engine, Fit};
use super::generate::Flow;
use super::protocol::{
    DoneStats, EngineCmd, EngineEvent, Fault, Finish, GenerateRequest, ModelInfo,
};
use super::EngineHandle;
use crate::model::LoadOptions;
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct WorkerConfig {
    pub dir: PathBuf,
    pub opts: LoadOptions,
    pub device_name: String,
    pub dtype_name: String,
}

/// Starts the worker; it loads the model and then serves commands until `Shutdown` or until
/// the command channel closes.
pub fn spawn(cfg: WorkerConfig) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (cmd_tx, cmd_rx) = unbounded();
    let (ev_tx, ev_rx) = unbounded();
    let cancel = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    let join = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(cfg, cmd_rx, ev_tx, c2))
        .expect("spawn engine thread");
    (
        EngineHandle {
            tx: cmd_tx,
            rx: ev_rx,
            cancel,
        },
        join,
    )
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.lines().next().unwrap_or("").to_string()
    } else {
        "unknown panic".into()
    }
}

fn run(
    cfg: WorkerConfig,
    rx: Receiver<EngineCmd>,
    tx: Sender<EngineEvent>,
    cancel: Arc<AtomicBool>,
) {
    let _ = tx.send(EngineEvent::Loading {
        progress: 0.0,
        what: format!("loading {}", cfg.dir.display()),
    });
    let loaded = catch_unwind(AssertUnwindSafe(|| Engine::load(&cfg.dir, &cfg.opts)));
    let mut engine = match loaded {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            let _ = tx.send(EngineEvent::LoadFailed(e.to_string()));
            return;
        }
        Err(p) => {
            let _ = tx.send(EngineEvent::LoadFailed(format!(
                "loading {} failed: {}",
                cfg.dir.display(),
                panic_message(&*p)
            )));
            return;
        }
    };
    let name = cfg
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| cfg.dir.display().to_string());
    let _ = tx.send(EngineEvent::Ready(ModelInfo {
        name,
        device: cfg.device_name.clone(),
        dtype: cfg.dtype_name.clone(),
        context_len: engine.context_len(),
        max_tiles: engine.tiles.max_tiles as usize,
    }));
    serve_requests(&mut engine, &rx, &tx, &cancel);
}

/// What the request loop needs of a model: the engine, or a stand-in in tests.
pub trait Backend {
    /// Answers one request, sending `Started`, `Token`s and `Done`; `Err` is the message of a
    /// failed request.
    fn generate(
        &mut self,
        req: &GenerateRequest,
        tx: &Sender<EngineEvent>,
        cancel: &AtomicBool,
    ) -> Result<(), ChatError>;
    /// Forgets the cached conversation.
    fn reset(&mut self);
}

impl Backend for Engine {
    fn generate(
        &mut self,
        req: &GenerateRequest,
        tx: &Sender<EngineEvent>,
        cancel: &AtomicBool,
    ) -> Result<(), ChatError> {
        serve(self, req, tx, cancel)
    }

    fn reset(&mut self) {
        Engine::reset(self)
    }
}

/// Serves commands until `Shutdown` or until the channel closes. A request that fails, with
/// an error or a panic (libtorch's errors surface as panics from tch), becomes an `Error`
/// event; after a panic the cached conversation is dropped, as it may be half-written, and the
/// next request starts afresh.
pub fn serve_requests(
    backend: &mut dyn Backend,
    rx: &Receiver<EngineCmd>,
    tx: &Sender<EngineEvent>,
    cancel: &AtomicBool,
) {
    while let Ok(cmd) = rx.recv() {
        match cmd {
            EngineCmd::Shutdown => break,
            EngineCmd::Reset => backend.reset(),
            EngineCmd::Generate(req) => {
                let id = req.id;
                cancel.store(false, Ordering::SeqCst);
                let r = catch_unwind(AssertUnwindSafe(|| backend.generate(&req, tx, cancel)));
                let failure = match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some((e.to_string(), fault_of(&e))),
                    Err(p) => {
                        backend.reset();
                        let message = format!("internal error: {}", panic_message(&*p));
                        Some((message, Fault::Engine))
                    }
                };
                if let Some((message, fault)) = failure {
                    let _ = tx.send(EngineEvent::Error { id, message, fault });
                }
            }
        }
    }
}

/// Whether a request failed because of what it asked for or because the engine did.
fn fault_of(e: &ChatError) -> Fault {
    match e {
        ChatError::Visual(_)
        | ChatError::Prompt(_)
        | ChatError::Invalid(_)
        | ChatError::TooLong { .. }
        | ChatError::TextTooLong { .. }
        | ChatError::TooLongAlone { .. } => Fault::Request,
        ChatError::Model(_) | ChatError::Template(_) | ChatError::Tokenizer(_) => Fault::Engine,
    }
}

fn serve(
    engine: &mut Engine,
    req: &GenerateRequest,
    tx: &Sender<EngineEvent>,
    cancel: &AtomicBool,
) -> Result<(), ChatError> {
    let t0 = Instant::now();
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
    let _ = tx.send(EngineEvent::Started {
        id: req.id,
        question: prepared.question.clone(),
        prompt_tokens: prepared.prompt_tokens(),
        dropped_turns: prepared.dropped_turns,
    });
    let mut first_token = None;
    let mut stream = engine.answer_stream().with_stop_strings(&req.stop);
    let send = |text: Option<String>| {
        if let Some(text) = text {
            let _ = tx.send(EngineEvent::Token { id: req.id, text });
        }
    };
    let out = engine.run(&prepared, &req.params, &mut |t| {
        first_token.get_or_insert_with(Instant::now);
        send(stream.push(t));
        if cancel.load(Ordering::SeqCst) || stream.before_stop().is_some() {
            Flow::Cancel
        } else {
            Flow::Continue
        }
    })?;
    send(stream.finish());
    // a stop string ends the answer, whatever else ended generation
    let (answer, finish) = match stream.before_stop() {
        Some(text) => (engine.response_text(text), Finish::Stop),
        None => (out.answer, out.finish),
    };
    let first = first_token.unwrap_or_else(Instant::now);
    let n = out.tokens.len();
    let decode_s = first.elapsed().as_secs_f64();
    let _ = tx.send(EngineEvent::Done {
        id: req.id,
        answer,
        stats: DoneStats {
            finish,
            prompt_tokens: out.prompt_tokens,
            completion_tokens: n,
            ttft: first - t0,
            tokens_per_s: if n > 1 && decode_s > 0.0 {
                (n - 1) as f64 / decode_s
            } else {
                0.0
            },
        },
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::protocol::{DoneStats, Finish};
    use crate::model::ModelError;
    use crate::sampling::SamplingParams;
    use std::time::Duration;
    use tch::{Device, Kind, Tensor};

    /// A stand-in model whose requests do real libtorch work: "panic" multiplies matrices of
    /// mismatched shapes through tch's panicking API, "torch" through its fallible one, anything
    /// else answers.
    #[derive(Default)]
    struct Faulty {
        resets: usize,
    }

    impl Backend for Faulty {
        fn generate(
            &mut self,
            req: &GenerateRequest,
            tx: &Sender<EngineEvent>,
            _cancel: &AtomicBool,
        ) -> Result<(), ChatError> {
            let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
            let b = Tensor::ones([4, 5], (Kind::Float, Device::Cpu));
            match req.question.as_str() {
                "panic" => {
                    let _ = a.matmul(&b);
                    unreachable!("the shapes cannot be multiplied");
                }
                "torch" => {
                    let _ = a.f_matmul(&b).map_err(ModelError::from)?;
                    unreachable!("the shapes cannot be multiplied");
                }
                q => {
                    let sum = a
                        .matmul(&a.transpose(0, 1))
                        .sum(Kind::Float)
                        .double_value(&[]);
                    let answer = format!("{q}: {sum}");
                    let _ = tx.send(EngineEvent::Done {
                        id: req.id,
                        answer,
                        stats: DoneStats {
                            finish: Finish::Stop,
                            prompt_tokens: 1,
                            completion_tokens: 1,
                            ttft: Duration::ZERO,
                            tokens_per_s: 0.0,
                        },
                    });
                    Ok(())
                }
            }
        }

        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn request(id: u64, question: &str) -> EngineCmd {
        EngineCmd::Generate(GenerateRequest {
            id,
            system: None,
            history: Vec::new(),
            question: question.into(),
            attachments: Vec::new(),
            combine_images: false,
            params: SamplingParams::greedy(4),
            stop: Vec::new(),
            truncate_history: false,
        })
    }

    #[test]
    fn a_libtorch_panic_or_error_is_an_error_event_and_the_next_request_works() {
        let (cmd_tx, cmd_rx) = unbounded();
        let (ev_tx, ev_rx) = unbounded();
        for (id, q) in [
            (1, "panic"),
            (2, "after the panic"),
            (3, "torch"),
            (4, "again"),
        ] {
            cmd_tx.send(request(id, q)).unwrap();
        }
        cmd_tx.send(EngineCmd::Shutdown).unwrap();
        let mut backend = Faulty::default();
        serve_requests(&mut backend, &cmd_rx, &ev_tx, &AtomicBool::new(false));
        drop(ev_tx);
        let events: Vec<EngineEvent> = ev_rx.iter().collect();
        assert_eq!(events.len(), 4, "{events:?}");
        let EngineEvent::Error {
            id: 1,
            message,
            fault: Fault::Engine,
        } = &events[0]
        else {
            panic!("{:?}", events[0]);
        };
        assert!(message.starts_with("internal error: "), "{message}");
        assert!(
            message.contains("size mismatch") || message.contains("cannot be multiplied"),
            "{message}"
        );
        assert!(!message.contains('\n'), "one line: {message:?}");
        assert!(
            matches!(&events[1], EngineEvent::Done { id: 2, answer, .. } if answer == "after the panic: 12")
        );
        let EngineEvent::Error {
            id: 3,
            message,
            fault: Fault::Engine,
        } = &events[2]
        else {
            panic!("{:?}", events[2]);
        };
        assert!(message.starts_with("libtorch: "), "{message}");
        assert!(!message.contains('\n'), "one line: {message:?}");
        assert!(
            matches!(&events[3], EngineEvent::Done { id: 4, answer, .. } if answer == "again: 12")
        );
        assert_eq!(
            backend.resets, 1,
            "the panic dropped the cached conversation"
        );
    }
}
