//! The thread that owns the model. Commands in; each request's events out on its own channel,
//! the engine's (loading, ready) on the handle's. Requests run together through the
//! [`Scheduler`], up to `max_batch` at a time, the rest waiting in arrival order. A failure inside
//! a request (an error or a panic in libtorch) becomes an `Error` event and the next request
//! still works.
use super::chat::{ChatError, Engine};
use super::protocol::{EngineCmd, EngineEvent, Fault, ModelInfo};
use super::scheduler::{Job, Scheduler};
use super::EngineHandle;
use crate::model::LoadOptions;
use crossbeam_channel::{unbounded, Receiver, Sender, TryRecvError};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// Requests decoded together when the command line does not say (`--max-batch`).
pub const DEFAULT_MAX_BATCH: usize = 8;

pub struct WorkerConfig {
    pub dir: PathBuf,
    pub opts: LoadOptions,
    pub device_name: String,
    pub dtype_name: String,
    /// Most requests decoded together.
    pub max_batch: usize,
    /// Where the engine keeps decoded attachments (the chat shares it with its probe).
    pub tile_cache: std::sync::Arc<crate::preprocess::TileCache>,
}

/// Starts the worker; it loads the model and then serves commands until `Shutdown` or until
/// the command channel closes.
pub fn spawn(cfg: WorkerConfig) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (cmd_tx, cmd_rx) = unbounded();
    let (ev_tx, ev_rx) = unbounded();
    let join = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || run(cfg, cmd_rx, ev_tx))
        .expect("spawn engine thread");
    (
        EngineHandle {
            tx: cmd_tx,
            rx: ev_rx,
        },
        join,
    )
}

/// The first line of a panic's message.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.lines().next().unwrap_or("").to_string()
    } else {
        "unknown panic".into()
    }
}

fn run(cfg: WorkerConfig, rx: Receiver<EngineCmd>, tx: Sender<EngineEvent>) {
    let _ = tx.send(EngineEvent::Loading {
        progress: 0.0,
        what: format!("loading {}", cfg.dir.display()),
    });
    let loaded = catch_unwind(AssertUnwindSafe(|| {
        Engine::load(&cfg.dir, &cfg.opts).map(|e| e.with_tile_cache(cfg.tile_cache.clone()))
    }));
    let engine = match loaded {
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
    let mut scheduler = Scheduler::new(engine);
    serve_requests(&mut scheduler, &rx, cfg.max_batch);
}

/// A request that failed: one line, and whose fault it was.
#[derive(Debug, Clone, PartialEq)]
pub struct Failed {
    pub message: String,
    pub fault: Fault,
}

impl From<ChatError> for Failed {
    fn from(e: ChatError) -> Self {
        Self {
            message: e.to_string(),
            fault: fault_of(&e),
        }
    }
}

/// What the request loop needs of a back end: the local model's scheduler, the remote server
/// (`remote::Remote`), or a stand-in in tests. [`serve_requests`] guards every call: a panic
/// becomes an `Error` event for the requests it touched and the loop goes on.
pub trait Backend {
    /// Takes a request into the running batch, sending `Started` (and, when it ends at once,
    /// its `Done`); `Err` is the message of a failed request, which then holds no row.
    fn start(&mut self, job: &Job) -> Result<(), Failed>;
    /// One step of the running requests (a decoding step; for the remote back end, what the
    /// server sent since the last one, waiting a little for it). It sends their events and
    /// drops the requests that end.
    fn step(&mut self) -> Result<(), Failed>;
    /// Requests running.
    fn running(&self) -> usize;
    /// Drops the running requests after the first `n` (those of a start that failed).
    fn truncate(&mut self, n: usize);
    /// Ends every running request with an `Error` event.
    fn fail_all(&mut self, message: &str, fault: Fault);
    /// Forgets the cached conversation.
    fn reset(&mut self);
}

impl Backend for Scheduler {
    fn start(&mut self, job: &Job) -> Result<(), Failed> {
        Ok(Scheduler::start(self, job)?)
    }

    fn step(&mut self) -> Result<(), Failed> {
        Ok(Scheduler::step(self)?)
    }

    fn running(&self) -> usize {
        Scheduler::running(self)
    }

    fn truncate(&mut self, n: usize) {
        Scheduler::truncate(self, n)
    }

    fn fail_all(&mut self, message: &str, fault: Fault) {
        Scheduler::fail_all(self, message, fault)
    }

    fn reset(&mut self) {
        Scheduler::reset(self)
    }
}

/// A command taken in: false for `Shutdown`.
fn take(cmd: EngineCmd, backend: &mut dyn Backend, waiting: &mut VecDeque<Job>) -> bool {
    match cmd {
        EngineCmd::Shutdown => return false,
        EngineCmd::Reset => backend.reset(),
        EngineCmd::Generate { req, reply, cancel } => waiting.push_back(Job { req, reply, cancel }),
    }
    true
}

/// The failure of a request as its message and fault; after a panic (libtorch's errors
/// surface as panics from tch) the cached conversation is dropped, as it may be half-written.
fn failure(
    r: std::thread::Result<Result<(), Failed>>,
    backend: &mut dyn Backend,
) -> Option<(String, Fault)> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some((e.message, e.fault)),
        Err(p) => {
            backend.reset();
            Some((
                format!("internal error: {}", panic_message(&*p)),
                Fault::Engine,
            ))
        }
    }
}

/// Serves commands until `Shutdown` or the channel's end, then answers the requests that came
/// before it and returns (a front end that stops cancels its requests first); commands after a
/// `Shutdown` are not read. Between decoding steps it takes the commands that came, starts waiting requests
/// while fewer than `max_batch` run (a request cancelled while it waited ends without running),
/// and runs one step. A request that fails to start gets an `Error` event; a step that fails
/// ends every running request with one.
pub fn serve_requests(backend: &mut dyn Backend, rx: &Receiver<EngineCmd>, max_batch: usize) {
    let max_batch = max_batch.max(1);
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    loop {
        if backend.running() == 0 && waiting.is_empty() {
            // nothing to do: wait for a command
            if !open {
                break;
            }
            match rx.recv() {
                Ok(cmd) => open = take(cmd, backend, &mut waiting),
                Err(_) => break,
            }
        }
        while open {
            match rx.try_recv() {
                Ok(cmd) => open = take(cmd, backend, &mut waiting),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        while backend.running() < max_batch {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            if job.cancel.is_cancelled() {
                // cancelled before it started: nothing was generated
                let _ = job.reply.send(EngineEvent::Done {
                    id: job.req.id,
                    answer: String::new(),
                    stats: super::protocol::DoneStats {
                        finish: super::protocol::Finish::Cancelled,
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        ttft: std::time::Duration::ZERO,
                        tokens_per_s: 0.0,
                    },
                });
                continue;
            }
            let before = backend.running();
            let r = catch_unwind(AssertUnwindSafe(|| backend.start(&job)));
            if let Some((message, fault)) = failure(r, backend) {
                backend.truncate(before);
                let id = job.req.id;
                let _ = job.reply.send(EngineEvent::Error { id, message, fault });
            }
        }
        if backend.running() > 0 {
            let r = catch_unwind(AssertUnwindSafe(|| backend.step()));
            if let Some((message, fault)) = failure(r, backend) {
                backend.fail_all(&message, fault);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::protocol::{Cancel, DoneStats, Finish, GenerateRequest};
    use crate::model::ModelError;
    use crate::sampling::SamplingParams;
    use std::time::Duration;
    use tch::{Device, Kind, Tensor};

    fn done(id: u64, answer: String, finish: Finish) -> EngineEvent {
        EngineEvent::Done {
            id,
            answer,
            stats: DoneStats {
                finish,
                prompt_tokens: 1,
                completion_tokens: 1,
                ttft: Duration::ZERO,
                tokens_per_s: 0.0,
            },
        }
    }

    /// A stand-in model whose requests do real libtorch work: "panic" multiplies matrices of
    /// mismatched shapes through tch's panicking API, "torch" through its fallible one, anything
    /// else answers at once.
    #[derive(Default)]
    struct Faulty {
        resets: usize,
    }

    impl Backend for Faulty {
        fn start(&mut self, job: &Job) -> Result<(), Failed> {
            let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
            let b = Tensor::ones([4, 5], (Kind::Float, Device::Cpu));
            match job.req.question.as_str() {
                "panic" => {
                    let _ = a.matmul(&b);
                    unreachable!("the shapes cannot be multiplied");
                }
                "torch" => {
                    let _ = a
                        .f_matmul(&b)
                        .map_err(|e| ChatError::from(ModelError::from(e)))?;
                    unreachable!("the shapes cannot be multiplied");
                }
                q => {
                    let sum = a
                        .matmul(&a.transpose(0, 1))
                        .sum(Kind::Float)
                        .double_value(&[]);
                    let _ = job
                        .reply
                        .send(done(job.req.id, format!("{q}: {sum}"), Finish::Stop));
                    Ok(())
                }
            }
        }

        fn step(&mut self) -> Result<(), Failed> {
            Ok(())
        }

        fn running(&self) -> usize {
            0
        }

        fn truncate(&mut self, _: usize) {}

        fn fail_all(&mut self, _: &str, _: Fault) {}

        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn request(id: u64, question: &str) -> GenerateRequest {
        GenerateRequest {
            id,
            system: None,
            history: Vec::new(),
            question: question.into(),
            attachments: Vec::new(),
            combine_images: false,
            params: SamplingParams::greedy(4),
            stop: Vec::new(),
            truncate_history: false,
        }
    }

    /// Sends a request with its own channel and switch.
    fn submit(tx: &Sender<EngineCmd>, id: u64, question: &str) -> (Receiver<EngineEvent>, Cancel) {
        let (reply, events) = unbounded();
        let cancel = Cancel::new();
        let req = request(id, question);
        tx.send(EngineCmd::Generate {
            req,
            reply,
            cancel: cancel.clone(),
        })
        .unwrap();
        (events, cancel)
    }

    #[test]
    fn a_libtorch_panic_or_error_is_an_error_event_and_the_next_request_works() {
        let (cmd_tx, cmd_rx) = unbounded();
        let replies: Vec<_> = [
            (1, "panic"),
            (2, "after the panic"),
            (3, "torch"),
            (4, "again"),
        ]
        .into_iter()
        .map(|(id, q)| submit(&cmd_tx, id, q).0)
        .collect();
        cmd_tx.send(EngineCmd::Shutdown).unwrap();
        let mut backend = Faulty::default();
        serve_requests(&mut backend, &cmd_rx, 8);
        let events: Vec<Vec<EngineEvent>> =
            replies.iter().map(|r| r.try_iter().collect()).collect();
        assert!(events.iter().all(|e| e.len() == 1), "{events:?}");
        let EngineEvent::Error {
            id: 1,
            message,
            fault: Fault::Engine,
        } = &events[0][0]
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
            matches!(&events[1][0], EngineEvent::Done { id: 2, answer, .. } if answer == "after the panic: 12")
        );
        let EngineEvent::Error {
            id: 3,
            message,
            fault: Fault::Engine,
        } = &events[2][0]
        else {
            panic!("{:?}", events[2]);
        };
        assert!(message.starts_with("libtorch: "), "{message}");
        assert!(!message.contains('\n'), "one line: {message:?}");
        assert!(
            matches!(&events[3][0], EngineEvent::Done { id: 4, answer, .. } if answer == "again: 12")
        );
        assert_eq!(
            backend.resets, 1,
            "the panic dropped the cached conversation"
        );
    }

    /// A stand-in that answers request "N" with N tokens, one per step, and records how many
    /// requests ran at each step.
    #[derive(Default)]
    struct Counting {
        rows: Vec<(Job, usize)>,
        widths: Vec<usize>,
        started: Vec<u64>,
    }

    impl Backend for Counting {
        fn start(&mut self, job: &Job) -> Result<(), Failed> {
            self.started.push(job.req.id);
            let n = job.req.question.parse().unwrap();
            let job = Job {
                req: job.req.clone(),
                reply: job.reply.clone(),
                cancel: job.cancel.clone(),
            };
            self.rows.push((job, n));
            Ok(())
        }

        fn step(&mut self) -> Result<(), Failed> {
            self.widths.push(self.rows.len());
            for (job, left) in &mut self.rows {
                let text = "x".to_string();
                let _ = job.reply.send(EngineEvent::Token {
                    id: job.req.id,
                    text,
                });
                *left -= 1;
            }
            self.rows.retain(|(job, left)| {
                let cancelled = job.cancel.is_cancelled();
                if *left == 0 || cancelled {
                    let finish = if cancelled {
                        Finish::Cancelled
                    } else {
                        Finish::Length
                    };
                    let _ = job.reply.send(done(job.req.id, String::new(), finish));
                }
                *left > 0 && !cancelled
            });
            Ok(())
        }

        fn running(&self) -> usize {
            self.rows.len()
        }

        fn truncate(&mut self, n: usize) {
            self.rows.truncate(n);
        }

        fn fail_all(&mut self, message: &str, fault: Fault) {
            for (job, _) in self.rows.drain(..) {
                let _ = job.reply.send(EngineEvent::Error {
                    id: job.req.id,
                    message: message.into(),
                    fault,
                });
            }
        }

        fn reset(&mut self) {}
    }

    #[test]
    fn at_most_max_batch_requests_run_and_the_rest_wait_in_order() {
        let (cmd_tx, cmd_rx) = unbounded();
        let lens = [3usize, 1, 2, 2, 1];
        let replies: Vec<_> = lens
            .iter()
            .enumerate()
            .map(|(i, n)| submit(&cmd_tx, i as u64 + 1, &n.to_string()))
            .collect();
        // cancelled while it waits: it never starts
        let (late, late_cancel) = submit(&cmd_tx, 9, "5");
        late_cancel.cancel();
        drop(cmd_tx);
        let mut backend = Counting::default();
        serve_requests(&mut backend, &cmd_rx, 2);
        assert_eq!(backend.started, [1, 2, 3, 4, 5], "arrival order");
        assert!(
            backend.widths.iter().all(|&w| w <= 2),
            "{:?}",
            backend.widths
        );
        // 3 and 1 start; 1 ends after a step, 3 joins; ...
        assert_eq!(backend.widths, [2, 2, 2, 2, 1]);
        for ((events, _), n) in replies.iter().zip(lens) {
            let evs: Vec<EngineEvent> = events.try_iter().collect();
            assert_eq!(evs.len(), n + 1, "{evs:?}");
            assert!(matches!(
                evs[n],
                EngineEvent::Done {
                    stats: DoneStats {
                        finish: Finish::Length,
                        ..
                    },
                    ..
                }
            ));
        }
        let evs: Vec<EngineEvent> = late.try_iter().collect();
        assert!(
            matches!(
                &evs[..],
                [EngineEvent::Done {
                    id: 9,
                    stats: DoneStats {
                        finish: Finish::Cancelled,
                        completion_tokens: 0,
                        ..
                    },
                    ..
                }]
            ),
            "{evs:?}"
        );
    }

    #[test]
    fn shutdown_answers_what_came_before_it_and_takes_nothing_after() {
        let (cmd_tx, cmd_rx) = unbounded();
        let (events, cancel) = submit(&cmd_tx, 1, "1000000");
        let t = std::thread::spawn(move || {
            let mut backend = Counting::default();
            serve_requests(&mut backend, &cmd_rx, 8);
        });
        // the request is running once its first token came
        assert!(matches!(
            events.recv_timeout(Duration::from_secs(10)),
            Ok(EngineEvent::Token { .. })
        ));
        cmd_tx.send(EngineCmd::Shutdown).unwrap();
        let (after, _) = submit(&cmd_tx, 2, "1");
        cancel.cancel();
        t.join().unwrap();
        let last = events.try_iter().last();
        assert!(
            matches!(
                &last,
                Some(EngineEvent::Done {
                    id: 1,
                    stats: DoneStats {
                        finish: Finish::Cancelled,
                        ..
                    },
                    ..
                })
            ),
            "{last:?}"
        );
        assert_eq!(after.try_iter().count(), 0, "never started");
    }
}
