//! What each command does, between the parsed flags and the engine.
use crate::batch;
use crate::cli::{BenchArgs, Cli, Command, DType, GenArgs, ModelArgs, PlanArgs, ServeArgs};
use crate::device_map::{self, Target};
use crate::engine::chat::{ChatInput, Engine, Fit};
use crate::engine::generate::Flow;
use crate::engine::protocol::{Attachment, EngineCmd, EngineEvent, GenerateRequest, ModelInfo};
use crate::engine::EngineHandle;
use crate::hub;
use crate::model::config::InternVLConfig;
use crate::model::{LoadOptions, Quant, Quantize};
use crate::plan::Plan;
use crate::preprocess::TileConfig;
use crate::sampling::{Overrides, SamplingParams};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use tch::{Device, Kind};

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

/// `cpu`, `cuda`, `cuda:N`, `auto`.
pub fn parse_device(s: &str) -> Result<Device> {
    let cuda = |i: usize| -> Result<Device> {
        let n = tch::Cuda::device_count() as usize;
        if i >= n {
            bail!("--device cuda:{i}: {n} CUDA device(s) visible");
        }
        Ok(Device::Cuda(i))
    };
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => bail!("--device {s:?}: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

pub fn kind_of(d: DType) -> Kind {
    match d {
        DType::Bf16 => Kind::BFloat16,
        DType::F16 => Kind::Half,
        DType::F32 => Kind::Float,
    }
}

/// The checkpoint folder: `--model` as a local path, else as a Hub repository id (resolved
/// through the Hugging Face cache, downloading what `need` asks for), else the default model.
fn model_dir(args: &ModelArgs, need: hub::Need) -> Result<PathBuf> {
    let given = match &args.model {
        Some(p) if p.exists() => return Ok(p.clone()),
        Some(p) => p.to_string_lossy().into_owned(),
        None => hub::DEFAULT_MODEL.to_string(),
    };
    let Some(spec) = hub::RepoSpec::parse(&given) else {
        bail!("{given}: no such checkpoint folder (nor a Hub repository id ORG/NAME[@REVISION])");
    };
    let opts = hub::HubOptions::from_env(args.offline, std::io::stderr().is_terminal());
    hub::resolve(&spec, need, &opts)
}

fn torch_device(t: Target) -> Device {
    match t {
        Target::Cpu => Device::Cpu,
        Target::Gpu(i) => Device::Cuda(i),
    }
}

/// Where everything goes, from --device and --device-map.
pub fn load_options(args: &ModelArgs, dir: &std::path::Path) -> Result<LoadOptions> {
    let kind = kind_of(args.dtype);
    let quant = quant_of(args.load_8bit, args.load_4bit)?;
    let Some(spec) = &args.device_map else {
        return Ok(LoadOptions {
            quant,
            context: args.context,
            ..LoadOptions::single(parse_device(&args.device)?, kind)
        });
    };
    let cfg = InternVLConfig::load(dir)?;
    let gpus = tch::Cuda::device_count() as usize;
    let map = device_map::parse(spec, cfg.llm_config.num_hidden_layers, gpus)?;
    Ok(LoadOptions {
        kind,
        first: torch_device(map.first),
        layers: map.layers.into_iter().map(torch_device).collect(),
        quant,
        context: args.context,
    })
}

/// The weights `--load-8bit` and `--load-4bit` ask for (at most one of them).
pub fn quant_of(
    load_8bit: Option<crate::cli::QuantScope>,
    load_4bit: Option<crate::cli::QuantScope>,
) -> Result<Quantize> {
    use crate::cli::QuantScope;
    let (format, scope) = match (load_8bit, load_4bit) {
        (None, None) => return Ok(Quantize::OFF),
        (Some(s), None) => (Quant::Int8, s),
        (None, Some(s)) => (Quant::Q4, s),
        (Some(_), Some(_)) => {
            bail!(
                "--load-8bit and --load-4bit cannot be used together: choose one weight precision"
            )
        }
    };
    Ok(match scope {
        QuantScope::Llm => Quantize::llm(format),
        QuantScope::All => Quantize::all(format),
    })
}

/// Refuses, before anything is allocated, a model whose weights and KV cache do not fit the
/// memory available to the CPU and to each GPU (see `plan::gpu_memory`). The KV cache is
/// counted for `--context` when given, else for the window up to 8192 positions (the cache
/// grows as a conversation does; a longer one fails when it gets there, with the numbers).
fn check_fits(dir: &std::path::Path, opts: &LoadOptions) -> Result<()> {
    let cfg = InternVLConfig::load(dir)?;
    let target = |d: Device| match d {
        Device::Cuda(i) => Target::Gpu(i),
        _ => Target::Cpu,
    };
    let n = cfg.llm_config.num_hidden_layers;
    let map = device_map::DeviceMap {
        first: target(opts.first),
        layers: (0..n)
            .map(|i| target(opts.layers.get(i).copied().unwrap_or(opts.first)))
            .collect(),
    };
    let context = opts
        .context
        .unwrap_or_else(|| cfg.llm_config.context_window().min(8192));
    let plan = Plan::new(
        &cfg,
        &map,
        opts.kind.elt_size_in_bytes() as u64,
        context,
        opts.quant,
    );
    let ram = crate::plan::available_ram();
    plan.check(&|t| match t {
        Target::Cpu => ram,
        Target::Gpu(i) => crate::plan::gpu_memory(i),
    })
    .map_err(|e| anyhow::anyhow!("{}: {e} (see `internvl-chat plan`)", dir.display()))
}

pub fn load_engine(args: &ModelArgs) -> Result<(Engine, Device)> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n as i32);
    }
    let dir = model_dir(args, hub::Need::Model)?;
    let opts = load_options(args, &dir)?;
    check_fits(&dir, &opts)?;
    let dev = opts.first;
    let engine = Engine::load(&dir, &opts).with_context(|| format!("loading {}", dir.display()))?;
    Ok((engine, dev))
}

fn plan(args: &ModelArgs, p: &PlanArgs) -> Result<ExitCode> {
    let path = model_dir(args, hub::Need::Config)?;
    let cfg = InternVLConfig::load(&path)?;
    let gpus = p.gpus.unwrap_or_else(|| tch::Cuda::device_count() as usize);
    let spec = args.device_map.clone().unwrap_or_else(|| "auto".into());
    let map = device_map::parse(&spec, cfg.llm_config.num_hidden_layers, gpus)?;
    let bytes = kind_of(args.dtype).elt_size_in_bytes() as u64;
    let context = args
        .context
        .unwrap_or_else(|| cfg.llm_config.context_window().min(8192));
    let plan = Plan::new(
        &cfg,
        &map,
        bytes,
        context,
        quant_of(args.load_8bit, args.load_4bit)?,
    );
    let gpu_mem = p.gpu_memory.map(|g| (g * (1u64 << 30) as f64) as u64);
    if gpus > 0 && gpu_mem.is_none() && p.gpus.is_some() && tch::Cuda::device_count() == 0 {
        bail!("--gpus {gpus} without GPUs present needs --gpu-memory GIB");
    }
    let ram = crate::plan::available_ram();
    let fits = plan.check(&|t| match t {
        Target::Cpu => ram,
        Target::Gpu(i) => gpu_mem.or_else(|| crate::plan::gpu_memory(i)),
    });
    if p.json {
        let mut j = plan.json(map.to_json(cfg.llm_arch()));
        j["fits"] = serde_json::Value::from(fits.is_ok());
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print!("{}", plan.table());
    }
    match fits {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => bail!(e),
    }
}

fn bench(args: &ModelArgs, b: &BenchArgs) -> Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n as i32);
    }
    let dir = model_dir(args, hub::Need::Model)?;
    let cfg = crate::bench::BenchConfig {
        opts: load_options(args, &dir)?,
        model: dir,
        image: crate::bench::default_image(b.image.as_deref()),
        tiles: b.tiles.clone(),
        new_tokens: b.new_tokens,
        runs: b.runs.max(1),
    };
    let v = crate::bench::run(&cfg)?;
    if b.json {
        println!("{v}");
    } else {
        print!("{}", crate::bench::table(&v));
        println!("{v}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `PATH` or `PATH:MAX_TILES`.
fn image_attachment(spec: &str) -> Result<Attachment> {
    if let Some((p, n)) = spec.rsplit_once(':') {
        if let Ok(n) = n.parse::<usize>() {
            return Ok(Attachment::Image {
                path: p.into(),
                max_tiles: Some(n),
            });
        }
    }
    Ok(Attachment::Image {
        path: spec.into(),
        max_tiles: None,
    })
}

fn parse_bound(s: &str) -> Result<(f64, f64)> {
    let parse = || -> Option<(f64, f64)> {
        let (a, b) = s.split_once(',')?;
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
    };
    match parse() {
        Some((a, b)) if a.is_finite() && b.is_finite() && a <= b => Ok((a, b)),
        _ => bail!("--video-bound {s:?}: expected START,END in seconds with START <= END"),
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Some(Command::Plan(p)) => plan(&cli.model, p),
        Some(Command::Bench(b)) => bench(&cli.model, b),
        Some(Command::Serve(s)) => serve(&cli, s),
        Some(Command::Batch(b)) => {
            let params = sampling_from(&cli.gen)?;
            let (mut engine, _) = load_engine(&cli.model)?;
            if let Some(t) = cli.gen.max_tiles {
                engine.tiles.max_tiles = t as u32;
            }
            let mut sched = crate::engine::scheduler::Scheduler::new(engine);
            let mut input: Box<dyn std::io::BufRead + Send> = if b.input == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin()))
            } else {
                let f = std::fs::File::open(&b.input)
                    .with_context(|| format!("{}: cannot open batch input", b.input))?;
                Box::new(std::io::BufReader::new(f))
            };
            let mut output: Box<dyn Write> = if b.output == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                let f = std::fs::File::create(&b.output)
                    .with_context(|| format!("{}: cannot create batch output", b.output))?;
                Box::new(std::io::BufWriter::new(f))
            };
            let (_, failed) = batch::run_batch(
                &mut sched,
                &mut input,
                &mut output,
                &params,
                cli.gen.system.as_deref(),
                cli.gen.think,
                b.max_batch,
                cli.gen.truncate_history,
            )?;
            output.flush()?;
            Ok(if failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
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
            match (prompt, &cli.remote) {
                (Some(p), Some(url)) => remote_one_shot(&cli, url, &p),
                (Some(p), None) => one_shot(&cli, &p),
                (None, _) => tui(&cli),
            }
        }
    }
}

fn attachments_from(cli: &Cli) -> Result<Vec<Attachment>> {
    let mut attachments = cli
        .images
        .iter()
        .map(|s| image_attachment(s))
        .collect::<Result<Vec<_>>>()?;
    if let Some(v) = &cli.video {
        attachments.push(Attachment::Video {
            path: v.clone(),
            segments: cli.segments,
            bound: cli.video_bound.as_deref().map(parse_bound).transpose()?,
            max_tiles: cli.video_max_tiles,
        });
    }
    Ok(attachments)
}

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

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::Bf16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
    }
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

/// `internvl-chat serve`: load, listen, answer until killed.
fn serve(cli: &Cli, s: &ServeArgs) -> Result<ExitCode> {
    use crate::engine::worker::{self, WorkerConfig};
    use crate::serve::ServeConfig;
    let base = sampling_from(&cli.gen)?;
    if s.api_key.as_deref() == Some("") {
        bail!("--api-key: the key must not be empty");
    }
    let dir = model_dir(&cli.model, hub::Need::Model)?;
    if let Some(n) = cli.model.threads {
        tch::set_num_threads(n as i32);
    }
    let opts = load_options(&cli.model, &dir)?;
    check_fits(&dir, &opts)?;
    crate::logging::init_stderr(cli.model.verbose);
    // bind before the (slow) load, so a taken port is reported at once
    let listener = std::net::TcpListener::bind((s.host.as_str(), s.port))
        .with_context(|| format!("cannot listen on {}:{}", s.host, s.port))?;
    let addr = listener.local_addr()?;
    let (handle, _worker) = worker::spawn(WorkerConfig {
        device_name: format!("{:?}", opts.first).to_lowercase(),
        dir,
        opts,
        dtype_name: dtype_name(cli.model.dtype).into(),
        max_batch: s.max_batch,
        tile_cache: Default::default(),
    });
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

/// Tiling of InternVL 2.5 checkpoints (448-pixel tiles, up to 12 and a thumbnail, 256 tokens
/// each), for showing what a picture costs when the model is on a server.
fn internvl_2_5_tiles() -> TileConfig {
    TileConfig {
        image_size: 448,
        min_tiles: 1,
        max_tiles: 12,
        use_thumbnail: true,
        tokens_per_tile: 256,
        hf: None,
    }
}

/// The worker for `--remote`; `--model`, when given too, tells how pictures are tiled.
fn remote_worker(
    cli: &Cli,
    url: &str,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>, TileConfig)> {
    let mut tiles = match &cli.model.model {
        Some(dir) => InternVLConfig::load(dir)?.tile_config_in(dir)?,
        None => internvl_2_5_tiles(),
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

/// The full-screen chat: the model loads on the worker thread while the UI is already up
/// (or, with `--remote`, the worker connects to the server).
fn tui(cli: &Cli) -> Result<ExitCode> {
    use crate::app::{self, AppOptions, AttachmentInfo, Overrides};
    use crate::engine::worker::{self, WorkerConfig};
    let attachments = attachments_from(cli)?;
    // one cache for the attachment probe and the engine: a staged picture is tiled once
    let tile_cache = std::sync::Arc::new(crate::preprocess::TileCache::default());
    let (handle, join, tiles) = match &cli.remote {
        Some(url) => {
            let worker = remote_worker(cli, url)?;
            crate::logging::init(cli.model.verbose);
            worker
        }
        None => {
            let dir = model_dir(&cli.model, hub::Need::Model)?;
            let cfg = InternVLConfig::load(&dir)?;
            if let Some(n) = cli.model.threads {
                tch::set_num_threads(n as i32);
            }
            let mut opts = load_options(&cli.model, &dir)?;
            // config.toml's context and weight precision where the flags do not give them (a
            // broken file is reported by the chat itself once it starts)
            let file = app::config::default_path()
                .ok()
                .and_then(|p| app::config::load(&p).ok());
            if let Some(file) = file {
                if opts.context.is_none() {
                    opts.context = file.context;
                }
                if cli.model.load_8bit.is_none() && cli.model.load_4bit.is_none() {
                    opts.quant = quant_of(file.load_8bit, file.load_4bit)?;
                }
            }
            check_fits(&dir, &opts)?;
            let device_name = format!("{:?}", opts.first).to_lowercase();
            crate::logging::init(cli.model.verbose);
            let mut tiles = cfg.tile_config_in(&dir)?;
            if let Some(t) = cli.gen.max_tiles {
                tiles.max_tiles = t as u32;
            }
            let (handle, join) = worker::spawn(WorkerConfig {
                dir,
                opts,
                device_name,
                dtype_name: dtype_name(cli.model.dtype).into(),
                // the chat sends one request at a time
                max_batch: 1,
                tile_cache: tile_cache.clone(),
            });
            (handle, join, tiles)
        }
    };
    let remote = cli.remote.is_some();
    let probe: app::Probe = std::sync::Arc::new(move |a: &Attachment| {
        if remote && matches!(a, Attachment::Video { .. }) {
            return Err("remote mode sends pictures only; videos are not supported".into());
        }
        let p = crate::preprocess::probe(a, &tiles, &tile_cache).map_err(|e| e.to_string())?;
        let path = a.path();
        Ok(AttachmentInfo {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
            bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
            grid: p.grid,
            tiles: p.tiles,
            tokens: p.tokens,
            preview: p.preview,
            frames: p.frames,
        })
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

fn one_shot(cli: &Cli, prompt: &str) -> Result<ExitCode> {
    let params = sampling_from(&cli.gen)?;
    let attachments = attachments_from(cli)?;
    // check attachments before the (slow) model load
    for a in &attachments {
        let p = a.path();
        crate::files::regular(p)
            .with_context(|| format!("{}: cannot read attachment", p.display()))?;
    }
    let (mut engine, _) = load_engine(&cli.model)?;
    if let Some(t) = cli.gen.max_tiles {
        engine.tiles.max_tiles = t as u32;
    }
    // with --think the answer is printed as the model writes it, its <think> block included
    let system = system_from(&cli.gen);
    let input = ChatInput {
        system: system.as_deref(),
        history: &[],
        question: prompt,
        attachments: &attachments,
        combine_images: cli.combine_images,
    };
    let fit = Fit {
        max_new_tokens: params.max_new_tokens,
        truncate_history: cli.gen.truncate_history,
    };
    let prepared = engine.prepare_to_fit(&input, fit)?;
    let mut stream = engine.answer_stream();
    let mut out = std::io::stdout().lock();
    let mut sink = |text: Option<String>| -> std::io::Result<()> {
        if let Some(text) = text {
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        Ok(())
    };
    let mut write_err = None;
    engine.run(&prepared, &params, &mut |t| {
        if let Err(e) = sink(stream.push(t)) {
            write_err = Some(e);
            return Flow::Cancel;
        }
        Flow::Continue
    })?;
    if write_err.is_none() {
        write_err = sink(stream.finish()).err();
    }
    if let Some(e) = write_err {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(ExitCode::SUCCESS);
        }
        return Err(e).context("writing the answer to stdout");
    }
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// `--remote` with a prompt: the answer streamed to stdout, as the local one-shot prints it.
fn remote_one_shot(cli: &Cli, url: &str, prompt: &str) -> Result<ExitCode> {
    let params = sampling_from(&cli.gen)?;
    let mut attachments = attachments_from(cli)?;
    for a in &mut attachments {
        let p = a.path();
        crate::files::regular(p)
            .with_context(|| format!("{}: cannot read attachment", p.display()))?;
        if let Attachment::Image { max_tiles, .. } = a {
            *max_tiles = max_tiles.or(cli.gen.max_tiles);
        }
    }
    let (handle, join, _) = remote_worker(cli, url)?;
    let result = remote_answer(
        &handle,
        GenerateRequest {
            id: 1,
            // the thinking system message also asks the server for thinking (see remote)
            system: system_from(&cli.gen),
            history: Vec::new(),
            question: prompt.to_string(),
            attachments,
            combine_images: cli.combine_images,
            params,
            stop: Vec::new(),
            truncate_history: false,
        },
    );
    let _ = handle.tx.send(EngineCmd::Shutdown);
    let _ = join.join();
    result
}

fn remote_answer(handle: &EngineHandle, req: GenerateRequest) -> Result<ExitCode> {
    wait_ready(handle)?;
    let Some(submitted) = handle.submit(req) else {
        bail!("the remote worker stopped");
    };
    let mut out = std::io::stdout().lock();
    loop {
        match submitted.events.recv() {
            Ok(EngineEvent::Token { text, .. }) => {
                if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                    // closes the stream: the server stops generating
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
            Err(_) => bail!("the remote worker stopped"),
        }
    }
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
