//! The one engine serves requests one at a time, first come first served. The dispatcher owns
//! the engine handle, sends each request its events, and cancels a request whose client went
//! away: the running one through the engine's cancel flag, a waiting one by dropping it.
use super::images::TempPicture;
use crate::engine::protocol::{EngineCmd, EngineEvent, Fault, Finish, GenerateRequest, RequestId};
use crate::engine::EngineHandle;
use crossbeam_channel::{select, unbounded, Receiver, Sender};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

/// A request waiting for, or being served by, the engine.
pub struct Job {
    pub req: GenerateRequest,
    /// The completion's name, for the log.
    pub name: String,
    /// The request's events go here.
    pub events: Sender<EngineEvent>,
    /// Pictures written for the request; deleted when it is over.
    pub _files: Vec<TempPicture>,
}

pub enum Msg {
    Submit(Box<Job>),
    /// The client of this request has gone.
    Cancel(RequestId),
}

/// Starts the dispatcher; it stops when every sender of its messages is gone.
pub fn spawn(handle: EngineHandle) -> (Sender<Msg>, std::thread::JoinHandle<()>) {
    let (tx, rx) = unbounded();
    let join = std::thread::Builder::new()
        .name("dispatcher".into())
        .spawn(move || run(handle, rx))
        .expect("spawn the dispatcher thread");
    (tx, join)
}

struct Current {
    job: Job,
    cancelled: bool,
}

fn run(handle: EngineHandle, rx: Receiver<Msg>) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut current: Option<Current> = None;
    let mut engine_rx = handle.rx.clone();
    let mut engine_gone = false;
    loop {
        if current.is_none() {
            if let Some(job) = queue.pop_front() {
                if handle.tx.send(EngineCmd::Generate(job.req.clone())).is_ok() {
                    current = Some(Current {
                        job,
                        cancelled: false,
                    });
                } else {
                    engine_gone = true;
                    fail(&job);
                }
            }
        }
        if engine_gone {
            if let Some(c) = current.take() {
                fail(&c.job);
            }
            queue.drain(..).for_each(|j| fail(&j));
        }
        select! {
            recv(rx) -> msg => match msg {
                Ok(Msg::Submit(job)) if engine_gone => fail(&job),
                Ok(Msg::Submit(job)) => queue.push_back(*job),
                Ok(Msg::Cancel(id)) => match &mut current {
                    Some(c) if c.job.req.id == id => {
                        c.cancelled = true;
                        handle.cancel.store(true, Ordering::SeqCst);
                    }
                    _ => {
                        if let Some(i) = queue.iter().position(|j| j.req.id == id) {
                            let job = queue.remove(i).expect("position is in the queue");
                            tracing::info!("{}: cancelled while waiting: the client went away", job.name);
                        }
                    }
                },
                Err(_) => break,
            },
            recv(engine_rx) -> ev => match ev {
                Ok(ev) => {
                    if let Some(c) = &mut current {
                        if route(c, ev, &handle) {
                            current = None;
                        }
                    }
                }
                Err(_) => {
                    engine_gone = true;
                    engine_rx = crossbeam_channel::never();
                }
            },
        }
    }
    if let Some(c) = &current {
        handle.cancel.store(true, Ordering::SeqCst);
        tracing::info!("{}: cancelled: the server is stopping", c.job.name);
    }
    let _ = handle.tx.send(EngineCmd::Shutdown);
}

/// Hands an event of the running request to its client; true when the request is over.
fn route(c: &mut Current, ev: EngineEvent, handle: &EngineHandle) -> bool {
    let id = c.job.req.id;
    let (mine, last) = match &ev {
        EngineEvent::Started { id: e, .. } => (*e == id, false),
        EngineEvent::Token { id: e, .. } => (*e == id, false),
        EngineEvent::Done { id: e, .. } | EngineEvent::Error { id: e, .. } => (*e == id, true),
        EngineEvent::Loading { .. } | EngineEvent::Ready(_) | EngineEvent::LoadFailed(_) => {
            (false, false)
        }
    };
    if !mine {
        return false;
    }
    match &ev {
        // the worker clears the flag when it starts a request: a cancel that came earlier
        // is made again
        EngineEvent::Started { .. } if c.cancelled => handle.cancel.store(true, Ordering::SeqCst),
        EngineEvent::Done { stats, .. } if stats.finish == Finish::Cancelled => tracing::info!(
            "{}: cancelled: the client went away ({} tokens generated)",
            c.job.name,
            stats.completion_tokens
        ),
        _ => {}
    }
    if c.job.events.send(ev).is_err() && !c.cancelled {
        // the handler has given up on its client
        c.cancelled = true;
        handle.cancel.store(true, Ordering::SeqCst);
    }
    last
}

fn fail(job: &Job) {
    let _ = job.events.send(EngineEvent::Error {
        id: job.req.id,
        message: "the engine has stopped".into(),
        fault: Fault::Engine,
    });
}
