//! What each command does, between the parsed flags (`cli`) and the engine: one file per
//! command, and [`load`], the one place a model is loaded.
pub mod batch;
pub mod bench;
pub mod chat;
pub mod load;
pub mod one_shot;
pub mod plan;
pub mod serve;

use crate::cli::{Cli, Command, GenArgs};
use crate::engine::protocol::{Attachment, EngineEvent, ModelInfo};
use crate::engine::EngineHandle;
use crate::model::config::InternVLConfig;
use crate::preprocess::TileConfig;
use crate::sampling::{Overrides, SamplingParams};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Read};
use std::process::ExitCode;

pub fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Some(Command::Plan(p)) => plan::run(&cli.model, p),
        Some(Command::Bench(b)) => bench::run(&cli.model, b),
        Some(Command::Serve(s)) => serve::run(&cli, s),
        Some(Command::Batch(b)) => batch::run(&cli, b),
        None => {
            let prompt = match &cli.prompt {
                Some(p) => Some(p.clone()),
                None if !std::io::stdin().is_terminal() => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading the prompt from stdin")?;
                    Some(s.trim_end_matches('\n').to_string())
                }
                None => None,
            };
            match prompt {
                Some(p) => one_shot::run(&cli, &p),
                None => chat::run(&cli),
            }
        }
    }
}

/// The sampling flags given.
fn sampling_overrides(args: &GenArgs) -> Overrides {
    Overrides {
        do_sample: args.greedy.then_some(false),
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
    }
}

/// Sampling settings: the web demo's defaults, then the flags.
pub fn sampling_from(args: &GenArgs) -> Result<SamplingParams> {
    sampling_overrides(args)
        .apply(&SamplingParams::default())
        .map_err(|e| anyhow::anyhow!(e))
}

/// The system message the flags ask for: `--think`'s, `--system`, or none (the model's).
pub fn system_from(args: &GenArgs) -> Option<String> {
    if args.think {
        Some(crate::prompt::thinking::R1_SYSTEM_PROMPT.to_string())
    } else {
        args.system.clone()
    }
}

/// `--image`s, then `--video` (clap has checked their values).
fn attachments_from(cli: &Cli) -> Vec<Attachment> {
    let mut attachments: Vec<Attachment> =
        cli.images.iter().cloned().map(Attachment::from).collect();
    if let Some(v) = &cli.video {
        attachments.push(Attachment::Video {
            path: v.clone(),
            segments: cli.segments,
            bound: cli.video_bound,
            max_tiles: cli.video_max_tiles,
        });
    }
    attachments
}

/// Waits for the worker's model: its description, or why it could not be had.
fn wait_ready(handle: &EngineHandle) -> Result<ModelInfo> {
    loop {
        match handle.rx.recv() {
            Ok(EngineEvent::Ready(info)) => return Ok(info),
            Ok(EngineEvent::LoadFailed(e)) => bail!(e),
            Ok(_) => {}
            Err(_) => bail!("the engine stopped before it was ready"),
        }
    }
}

/// The worker for `--remote`; `--model`, when given too, tells how pictures are tiled.
fn remote_worker(
    cli: &Cli,
    url: &str,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>, TileConfig)> {
    let mut tiles = match &cli.model.model {
        Some(dir) => InternVLConfig::load(dir)?.tile_config_in(dir)?,
        // what a picture costs when the model is on a server: InternVL 2.5's tiling
        None => TileConfig::internvl_2_5(),
    };
    if let Some(t) = cli.gen.max_tiles {
        tiles.max_tiles = t as u32;
    }
    let cfg = crate::remote::RemoteConfig::new(
        url,
        cli.api_key.clone(),
        cli.remote_model.clone(),
        tiles.max_tiles as usize,
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let (handle, join) = crate::remote::spawn(cfg);
    Ok((handle, join, tiles))
}

/// An error as one line: its chain of contexts joined by ": ", a cause its parent already
/// quotes left out, libtorch's C++ backtraces cut.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for c in e.chain() {
        let s = c.to_string();
        let s = s.lines().next().unwrap_or("");
        if msg.contains(s) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(s);
    }
    msg
}
