//! The worker side: everything that touches the model.
pub mod chat;
pub mod features;
pub mod fit;
pub mod generate;
pub mod protocol;
pub mod reuse;
pub mod stream;
pub mod worker;

pub mod scheduler;

use crossbeam_channel::{unbounded, Receiver, Sender};
use protocol::{Cancel, EngineCmd, EngineEvent, GenerateRequest};

/// A front end's connection to the worker thread that owns the model.
pub struct EngineHandle {
    pub tx: Sender<EngineCmd>,
    /// The engine's own events: `Loading`, `Ready`, `LoadFailed`. A request's events go to the
    /// channel given with it (see [`EngineHandle::submit`]).
    pub rx: Receiver<EngineEvent>,
}

/// A request handed to the engine: its events, and its cancel switch.
pub struct Submitted {
    pub events: Receiver<EngineEvent>,
    pub cancel: Cancel,
}

impl EngineHandle {
    /// Sends `req` with an event channel and a cancel switch of its own; `None` when the
    /// worker has stopped.
    pub fn submit(&self, req: GenerateRequest) -> Option<Submitted> {
        let (reply, events) = unbounded();
        let cancel = Cancel::new();
        self.tx
            .send(EngineCmd::Generate {
                req,
                reply,
                cancel: cancel.clone(),
            })
            .ok()?;
        Some(Submitted { events, cancel })
    }
}
