//! The worker side: everything that touches the model.
pub mod chat;
pub mod features;
pub mod generate;
pub mod protocol;
pub mod stream;
pub mod worker;

use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A front end's connection to the worker thread that owns the model.
pub struct EngineHandle {
    pub tx: Sender<protocol::EngineCmd>,
    pub rx: Receiver<protocol::EngineEvent>,
    /// Set to true to stop the current generation (the worker clears it when a request starts);
    /// the partial answer comes back in a `Done` with `Finish::Cancelled`.
    pub cancel: Arc<AtomicBool>,
}
