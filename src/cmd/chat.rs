//! The full-screen chat: the model loads on the worker thread while the UI is already up
//! (or, with `--remote`, the worker connects to the server).
use super::load::{FileDefaults, ModelToLoad};
use super::{attachments_from, error_line, remote_worker, sampling_overrides};
use crate::app::{self, AppOptions, Overrides};
use crate::cli::Cli;
use crate::engine::protocol::{Attachment, EngineCmd};
use crate::model::config::InternVLConfig;
use anyhow::Result;
use std::process::ExitCode;

fn graphics_mode(g: crate::cli::Graphics) -> crate::app::graphics::GraphicsMode {
    use crate::app::graphics::GraphicsMode;
    use crate::cli::Graphics;
    match g {
        Graphics::Auto => GraphicsMode::Auto,
        Graphics::Kitty => GraphicsMode::Kitty,
        Graphics::Sixel => GraphicsMode::Sixel,
        Graphics::Iterm2 => GraphicsMode::Iterm2,
        Graphics::Halfblocks => GraphicsMode::Halfblocks,
    }
}

pub fn run(cli: &Cli) -> Result<ExitCode> {
    let attachments = attachments_from(cli);
    // one cache for the attachment probe and the engine: a staged picture is tiled once
    let tile_cache = std::sync::Arc::new(crate::preprocess::TileCache::default());
    let (handle, join, tiles) = match &cli.remote {
        Some(url) => {
            let worker = remote_worker(cli, url)?;
            crate::logging::init(cli.model.verbose);
            worker
        }
        None => {
            // config.toml's context and weight precision where the flags do not give them (a
            // broken file is reported by the chat itself once it starts)
            let file = app::config::default_path()
                .ok()
                .and_then(|p| app::config::load(&p).ok())
                .map(|f| FileDefaults {
                    context: f.context,
                    load_8bit: f.load_8bit,
                    load_4bit: f.load_4bit,
                })
                .unwrap_or_default();
            let model = ModelToLoad::new(&cli.model, file)?;
            let mut tiles = InternVLConfig::load(&model.dir)?.tile_config_in(&model.dir)?;
            if let Some(t) = cli.gen.max_tiles {
                tiles.max_tiles = t as u32;
            }
            crate::logging::init(cli.model.verbose);
            // the chat sends one request at a time
            let (handle, join) = model.spawn_worker_with(1, tile_cache.clone());
            (handle, join, tiles)
        }
    };
    let remote = cli.remote.is_some();
    let probe: app::Probe = std::sync::Arc::new(move |a: &Attachment| {
        if remote && a.is_video() {
            return Err("remote mode sends pictures only; videos are not supported".into());
        }
        crate::preprocess::probe(a, &tiles, &tile_cache).map_err(|e| e.to_string())
    });
    let g = &cli.gen;
    let mut options = AppOptions::new(probe);
    options.overrides = Overrides {
        system: g.system.clone(),
        think: g.think,
        max_tiles: g.max_tiles,
        sampling: sampling_overrides(g),
        combine_images: cli.combine_images,
        graphics: cli.graphics.map(graphics_mode),
        truncate_history: g.truncate_history,
    };
    options.attachments = attachments;
    options.resume = cli.session.clone();
    let tx = handle.tx.clone();
    // the chat cancels its running request when it ends
    let result = app::run(handle, options);
    let _ = tx.send(EngineCmd::Shutdown);
    drop(tx);
    // The chat is saved and the terminal restored by now. A worker inside a step it cannot
    // leave (a long prefill of a big model) is waited for 200 ms at most: the chat ends within a second
    // whatever the model is doing, as when its terminal goes away.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    while !join.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if !join.is_finished() {
        use std::io::Write;
        // (a terminal that went away makes restoring it fail: that error is still reported)
        let code = match &result {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("internvl-chat: error: {}", error_line(e));
                1
            }
        };
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // exit without running libtorch's exit-time destructors under the busy worker's feet
        // SAFETY: _exit ends the process at once; our output is flushed, the session saved.
        unsafe { libc::_exit(code) };
    }
    let _ = join.join();
    result.map(|_| ExitCode::SUCCESS)
}
