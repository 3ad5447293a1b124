//! `internvl-chat plan`: what the model costs on each device, without loading weights.
use super::load::{kind_of, model_dir, quant_of};
use crate::cli::{ModelArgs, PlanArgs};
use crate::device_map::{self, Target};
use crate::hub;
use crate::model::config::InternVLConfig;
use crate::plan::Plan;
use anyhow::{bail, Result};
use std::process::ExitCode;

pub fn run(args: &ModelArgs, p: &PlanArgs) -> Result<ExitCode> {
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
