//! `internvl-chat serve`: load, listen, answer until killed.
use super::load::{FileDefaults, ModelToLoad};
use super::{sampling_from, system_from, wait_ready};
use crate::cli::{Cli, ServeArgs};
use crate::serve::ServeConfig;
use anyhow::{bail, Context, Result};
use std::process::ExitCode;

pub fn run(cli: &Cli, s: &ServeArgs) -> Result<ExitCode> {
    let base = sampling_from(&cli.gen)?;
    if s.api_key.as_deref() == Some("") {
        bail!("--api-key: the key must not be empty");
    }
    let model = ModelToLoad::new(&cli.model, FileDefaults::default())?;
    crate::logging::init_stderr(cli.model.verbose);
    // bind before the (slow) load, so a taken port is reported at once
    let listener = std::net::TcpListener::bind((s.host.as_str(), s.port))
        .with_context(|| format!("cannot listen on {}:{}", s.host, s.port))?;
    let addr = listener.local_addr()?;
    let (handle, _worker) = model.spawn_worker(s.max_batch);
    let info = wait_ready(&handle)?;
    let model = s.served_model_name.clone().unwrap_or(info.name);
    if !addr.ip().is_loopback() && s.api_key.is_none() {
        tracing::warn!(
            "listening on {addr} without --api-key: anyone who can reach it can use the model \
             and have it read pictures through file:// URLs"
        );
    }
    eprintln!("listening on http://{addr} (model {model:?})");
    crate::serve::run(
        listener,
        handle,
        ServeConfig {
            model,
            api_key: s.api_key.clone(),
            allow_remote_images: s.allow_remote_images,
            base,
            system: system_from(&cli.gen),
            max_tiles: cli.gen.max_tiles,
            context_len: info.context_len,
            request_time: std::time::Duration::from_secs(s.request_timeout),
        },
    )?;
    Ok(ExitCode::SUCCESS)
}
