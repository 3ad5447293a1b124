//! The one place a model is loaded from the command line: the checkpoint folder (local or from
//! the Hub), where its weights go (`--device`, `--device-map`), their precision, the context
//! window, the memory check; then the engine itself, or the worker thread that owns it.
use crate::cli::{DType, ModelArgs, QuantScope};
use crate::device_map::{self, Target};
use crate::engine::chat::Engine;
use crate::engine::worker::{self, WorkerConfig};
use crate::engine::EngineHandle;
use crate::hub;
use crate::model::config::InternVLConfig;
use crate::model::{LoadOptions, Quant, Quantize};
use crate::plan::Plan;
use anyhow::{bail, Context, Result};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

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

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::Bf16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
    }
}

/// The checkpoint folder: `--model` as a local path, else as a Hub repository id (resolved
/// through the Hugging Face cache, downloading what `need` asks for), else the default model.
pub fn model_dir(args: &ModelArgs, need: hub::Need) -> Result<PathBuf> {
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
pub fn load_options(args: &ModelArgs, dir: &Path) -> Result<LoadOptions> {
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
pub fn quant_of(load_8bit: Option<QuantScope>, load_4bit: Option<QuantScope>) -> Result<Quantize> {
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
        QuantScope::Head => Quantize::with_head(format),
        QuantScope::All => Quantize::all(format),
    })
}

/// Refuses, before anything is allocated, a model whose weights and KV cache do not fit the
/// memory available to the CPU and to each GPU (see `plan::gpu_memory`). The KV cache is
/// counted for `--context` when given, else for the window up to 8192 positions (the cache
/// grows as a conversation does; a longer one fails when it gets there, with the numbers).
fn check_fits(dir: &Path, opts: &LoadOptions) -> Result<()> {
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

/// Settings from `config.toml` that apply where the flags do not give them (the chat's).
#[derive(Debug, Clone, Copy, Default)]
pub struct FileDefaults {
    pub context: Option<usize>,
    pub load_8bit: Option<QuantScope>,
    pub load_4bit: Option<QuantScope>,
}

/// A model ready to load: its folder and where and how its weights go, checked to fit.
pub struct ModelToLoad {
    pub dir: PathBuf,
    pub opts: LoadOptions,
    dtype: DType,
}

impl ModelToLoad {
    /// Resolves `--model`, applies `--threads`, works out the load options (the flags over
    /// `file`'s settings) and checks that the model fits in memory; nothing is loaded yet.
    pub fn new(args: &ModelArgs, file: FileDefaults) -> Result<Self> {
        let dir = model_dir(args, hub::Need::Model)?;
        if let Some(n) = args.threads {
            tch::set_num_threads(n as i32);
        }
        let mut opts = load_options(args, &dir)?;
        if opts.context.is_none() {
            opts.context = file.context;
        }
        if args.load_8bit.is_none() && args.load_4bit.is_none() {
            opts.quant = quant_of(file.load_8bit, file.load_4bit)?;
        }
        check_fits(&dir, &opts)?;
        Ok(Self {
            dir,
            opts,
            dtype: args.dtype,
        })
    }

    /// The engine on this thread (batch, which runs the scheduler itself).
    pub fn engine(&self) -> Result<Engine> {
        Engine::load(&self.dir, &self.opts)
            .with_context(|| format!("loading {}", self.dir.display()))
    }

    /// The worker thread that loads the engine and answers requests, `max_batch` together
    /// (the chat, one-shot, serve).
    pub fn spawn_worker(self, max_batch: usize) -> (EngineHandle, std::thread::JoinHandle<()>) {
        self.spawn_worker_with(max_batch, Default::default())
    }

    /// [`Self::spawn_worker`] with the engine's tile cache given (shared with the caller, e.g.
    /// the chat's attachment probe).
    pub fn spawn_worker_with(
        self,
        max_batch: usize,
        tile_cache: std::sync::Arc<crate::preprocess::TileCache>,
    ) -> (EngineHandle, std::thread::JoinHandle<()>) {
        worker::spawn(WorkerConfig {
            device_name: format!("{:?}", self.opts.first).to_lowercase(),
            dir: self.dir,
            opts: self.opts,
            dtype_name: dtype_name(self.dtype).into(),
            max_batch,
            tile_cache,
        })
    }
}
