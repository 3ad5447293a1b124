//! One answer on stdout (`--prompt`, or a prompt on a non-terminal stdin): the question goes
//! to the engine worker, local or `--remote`, as the chat's do, and its tokens are printed as
//! they come.
use super::load::{FileDefaults, ModelToLoad};
use super::{attachments_from, remote_worker, sampling_from, system_from, wait_ready};
use crate::cli::Cli;
use crate::engine::protocol::{Attachment, EngineCmd, EngineEvent, GenerateRequest};
use crate::engine::EngineHandle;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

pub fn run(cli: &Cli, prompt: &str) -> Result<ExitCode> {
    let params = sampling_from(&cli.gen)?;
    let mut attachments = attachments_from(cli);
    // check attachments before the (slow) model load or the connection
    for a in &mut attachments {
        let p = a.path();
        crate::files::regular(p)
            .with_context(|| format!("{}: cannot read attachment", p.display()))?;
        if let Attachment::Image { max_tiles, .. } = a {
            *max_tiles = max_tiles.or(cli.gen.max_tiles);
        }
    }
    let (handle, join, local) = match &cli.remote {
        Some(url) => {
            let (handle, join, _) = remote_worker(cli, url)?;
            (handle, join, None)
        }
        None => {
            let model = ModelToLoad::new(&cli.model, FileDefaults::default())?;
            let dir = model.dir.clone();
            let (handle, join) = model.spawn_worker(1);
            (handle, join, Some(dir))
        }
    };
    let result = answer(
        &handle,
        local.as_deref(),
        GenerateRequest {
            id: 1,
            // with --think the answer is printed as the model writes it, its <think> block
            // included; the thinking system message also asks a server for thinking (see remote)
            system: system_from(&cli.gen),
            history: Vec::new(),
            question: prompt.to_string(),
            attachments,
            combine_images: cli.combine_images,
            params,
            stop: Vec::new(),
            truncate_history: cli.gen.truncate_history,
        },
    );
    let _ = handle.tx.send(EngineCmd::Shutdown);
    let _ = join.join();
    result
}

/// Waits for the worker, sends `req` and prints its tokens; `local`: the model folder being
/// loaded, named when loading fails.
fn answer(handle: &EngineHandle, local: Option<&Path>, req: GenerateRequest) -> Result<ExitCode> {
    let ready = wait_ready(handle);
    if let (Err(e), Some(dir)) = (&ready, local) {
        let msg = e.to_string();
        if !msg.starts_with("loading ") {
            bail!("loading {}: {msg}", dir.display());
        }
    }
    ready?;
    let Some(submitted) = handle.submit(req) else {
        bail!("the engine stopped");
    };
    let mut out = std::io::stdout().lock();
    loop {
        match submitted.events.recv() {
            Ok(EngineEvent::Token { text, .. }) => {
                if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                    // ends the request (a server stops generating when its stream closes)
                    submitted.cancel.cancel();
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        return Ok(ExitCode::SUCCESS);
                    }
                    return Err(e).context("writing the answer to stdout");
                }
            }
            Ok(EngineEvent::Done { .. }) => {
                writeln!(out)?;
                return Ok(ExitCode::SUCCESS);
            }
            Ok(EngineEvent::Error { message, .. }) => bail!(message),
            Ok(_) => {}
            Err(_) => bail!("the engine stopped"),
        }
    }
}
