//! `internvl-chat plan`: what a model costs on each device, computed from its config alone.
use crate::device_map::{DeviceMap, ParamCounts, Target};
use crate::model::config::InternVLConfig;
use crate::model::{Quant, Quantize};
use serde_json::json;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceCost {
    pub layers: usize,
    pub params: u64,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
}

impl DeviceCost {
    pub fn total(&self) -> u64 {
        self.weight_bytes + self.kv_bytes
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub params: ParamCounts,
    pub devices: BTreeMap<Target, DeviceCost>,
    pub context: usize,
    pub dtype_bytes: u64,
}

/// KV cache bytes of one layer at `context` positions (keys and values).
pub fn kv_bytes_per_layer(cfg: &InternVLConfig, context: usize, dtype_bytes: u64) -> u64 {
    let l = &cfg.llm_config;
    2 * context as u64 * l.num_kv_heads() as u64 * l.head_dim() as u64 * dtype_bytes
}

/// Bytes of `params` parameters of which `matrix` = (elements, rows) are kept as `format`
/// says, the rest in the dtype: int8 with a scale per row in the dtype, or 4-bit in `groups`
/// groups of 32 (16 bytes and a bf16 scale each).
fn weight_bytes(
    params: u64,
    matrix: (u64, u64),
    groups: u64,
    format: Quant,
    dtype_bytes: u64,
) -> u64 {
    match format {
        Quant::None => params * dtype_bytes,
        Quant::Int8 => (params - matrix.0 + matrix.1) * dtype_bytes + matrix.0,
        Quant::Q4 => {
            (params - matrix.0) * dtype_bytes
                + groups * (crate::model::gemv::Q4_GROUP_BYTES as u64 + 2)
        }
    }
}

/// Bytes of the output head (`params` of its own: 0 when tied to the embeddings): in the dtype,
/// or an int8 copy [vocab, hidden] with a scale per row (quantized, whether tied or not).
fn head_bytes(cfg: &InternVLConfig, params: u64, quant: Quantize, dtype_bytes: u64) -> u64 {
    let l = &cfg.llm_config;
    let (rows, hidden) = (l.vocab_size as u64, l.hidden_size as u64);
    match quant.head_format() {
        Quant::None => params * dtype_bytes,
        format => weight_bytes(rows * hidden, (rows * hidden, rows), 0, format, dtype_bytes),
    }
}

impl Plan {
    pub fn new(
        cfg: &InternVLConfig,
        map: &DeviceMap,
        dtype_bytes: u64,
        context: usize,
        quant: Quantize,
    ) -> Self {
        let params = ParamCounts::of(cfg);
        let mut devices: BTreeMap<Target, DeviceCost> = BTreeMap::new();
        let shared = params.vision + params.mlp1 + params.embed + params.norm + params.head;
        let first = devices.entry(map.first).or_default();
        first.params += shared;
        first.weight_bytes = weight_bytes(
            params.vision,
            params.vision_matrix,
            params.vision_q4_groups,
            quant.vision_format(),
            dtype_bytes,
        ) + (shared - params.vision - params.head) * dtype_bytes
            + head_bytes(cfg, params.head, quant, dtype_bytes);
        let kv = kv_bytes_per_layer(cfg, context, dtype_bytes);
        let layer_bytes = weight_bytes(
            params.layer,
            params.layer_matrix,
            params.layer_q4_groups,
            quant.format,
            dtype_bytes,
        );
        for t in &map.layers {
            let d = devices.entry(*t).or_default();
            d.layers += 1;
            d.params += params.layer;
            d.weight_bytes += layer_bytes;
            d.kv_bytes += kv;
        }
        Self {
            params,
            devices,
            context,
            dtype_bytes,
        }
    }

    /// Devices whose need exceeds `capacity(target)` bytes, as one message quoting the numbers.
    pub fn check(&self, capacity: &dyn Fn(Target) -> Option<u64>) -> Result<(), String> {
        let over: Vec<String> = self
            .devices
            .iter()
            .filter_map(|(t, c)| {
                let cap = capacity(*t)?;
                (c.total() > cap).then(|| {
                    format!(
                        "{t} needs {} (weights {} + KV cache {}) but has {}",
                        gib(c.total()),
                        gib(c.weight_bytes),
                        gib(c.kv_bytes),
                        gib(cap)
                    )
                })
            })
            .collect();
        if over.is_empty() {
            Ok(())
        } else {
            Err(format!("the model does not fit: {}", over.join("; ")))
        }
    }

    pub fn table(&self) -> String {
        let p = &self.params;
        let mut s = String::new();
        s.push_str(&format!("{:<28}{:>16}\n", "module", "parameters"));
        let rows = [
            ("vision_model", p.vision),
            ("mlp1", p.mlp1),
            ("embeddings", p.embed),
            (
                &*format!("decoder layers ({} x {})", p.layers, count(p.layer)),
                p.layer * p.layers as u64,
            ),
            ("norm", p.norm),
            ("output head", p.head),
            ("total", p.total()),
        ];
        for (name, n) in rows {
            s.push_str(&format!("{name:<28}{:>16}\n", count(n)));
        }
        if p.active_layer != p.layer {
            // a mixture of experts: all experts are held, a token reads its top-k
            s.push_str(&format!(
                "{:<28}{:>16}\n",
                "read per token (experts)",
                count(p.active_total())
            ));
        }
        s.push_str(&format!(
            "\n{:<10}{:>8}{:>14}{:>20}{:>14}\n",
            "device",
            "layers",
            "weights",
            format!("KV @ {} tok", self.context),
            "total"
        ));
        for (t, c) in &self.devices {
            s.push_str(&format!(
                "{:<10}{:>8}{:>14}{:>20}{:>14}\n",
                t.to_string(),
                c.layers,
                gib(c.weight_bytes),
                gib(c.kv_bytes),
                gib(c.total())
            ));
        }
        s
    }

    pub fn json(&self, device_map: serde_json::Value) -> serde_json::Value {
        let devices: serde_json::Map<String, serde_json::Value> = self
            .devices
            .iter()
            .map(|(t, c)| {
                (
                    t.to_string(),
                    json!({"layers": c.layers, "params": c.params, "weight_bytes": c.weight_bytes,
                           "kv_bytes": c.kv_bytes, "total_bytes": c.total()}),
                )
            })
            .collect();
        json!({
            "device_map": device_map,
            "parameters": {
                "vision_model": self.params.vision, "mlp1": self.params.mlp1,
                "embeddings": self.params.embed, "layer": self.params.layer,
                "layers": self.params.layers, "norm": self.params.norm,
                "output": self.params.head, "total": self.params.total(),
                "active_layer": self.params.active_layer,
                "active_per_token": self.params.active_total(),
            },
            "context": self.context,
            "devices": devices,
        })
    }
}

pub fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn count(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.1} M", n as f64 / 1e6)
    } else {
        n.to_string()
    }
}

/// Memory the model may use on the CPU, in bytes: `$INTERNVL_RAM_GIB` when set (containers whose
/// limit /proc does not show), else MemAvailable from /proc/meminfo.
pub fn available_ram() -> Option<u64> {
    if let Some(g) = std::env::var("INTERNVL_RAM_GIB")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        return Some((g * (1u64 << 30) as f64) as u64);
    }
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Memory the model may use on CUDA device `i`, in bytes: `$INTERNVL_GPU_MEMORY_GIB` when set
/// (one figure for every GPU, or one per GPU separated by commas), else the free memory the
/// CUDA driver reports; `None` when unknown (then nothing is checked).
pub fn gpu_memory(i: usize) -> Option<u64> {
    match std::env::var("INTERNVL_GPU_MEMORY_GIB") {
        Ok(spec) => gpu_memory_from(&spec, i),
        Err(_) => cuda::free_memory(i),
    }
}

/// GPU `i`'s figure of an `INTERNVL_GPU_MEMORY_GIB` value, in bytes.
fn gpu_memory_from(spec: &str, i: usize) -> Option<u64> {
    let figures: Vec<&str> = spec.split(',').map(str::trim).collect();
    let figure = if figures.len() == 1 {
        figures[0]
    } else {
        figures.get(i)?
    };
    let gib: f64 = figure
        .parse()
        .ok()
        .filter(|g: &f64| g.is_finite() && *g >= 0.0)?;
    Some((gib * (1u64 << 30) as f64) as u64)
}

/// The CUDA driver API, opened at run time.
mod cuda {
    use libloading::{Library, Symbol};
    use std::ffi::c_void;

    type CuResult = i32;

    /// Free memory of device `ordinal` as `cuMemGetInfo` reports it in the device's primary
    /// context (the one libtorch uses); `None` without a driver or on any error.
    pub fn free_memory(ordinal: usize) -> Option<u64> {
        let ordinal = i32::try_from(ordinal).ok()?;
        // SAFETY: the symbols are the CUDA driver API's, called with the signatures of cuda.h
        // (CUdevice is an int, CUcontext a pointer, sizes are size_t); the library outlives them.
        unsafe {
            let lib = Library::new("libcuda.so.1").ok()?;
            let init: Symbol<unsafe extern "C" fn(u32) -> CuResult> = lib.get(b"cuInit\0").ok()?;
            let device_get: Symbol<unsafe extern "C" fn(*mut i32, i32) -> CuResult> =
                lib.get(b"cuDeviceGet\0").ok()?;
            let retain: Symbol<unsafe extern "C" fn(*mut *mut c_void, i32) -> CuResult> =
                lib.get(b"cuDevicePrimaryCtxRetain\0").ok()?;
            let release: Symbol<unsafe extern "C" fn(i32) -> CuResult> =
                lib.get(b"cuDevicePrimaryCtxRelease_v2\0").ok()?;
            let push: Symbol<unsafe extern "C" fn(*mut c_void) -> CuResult> =
                lib.get(b"cuCtxPushCurrent_v2\0").ok()?;
            let pop: Symbol<unsafe extern "C" fn(*mut *mut c_void) -> CuResult> =
                lib.get(b"cuCtxPopCurrent_v2\0").ok()?;
            let mem_get_info: Symbol<unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult> =
                lib.get(b"cuMemGetInfo_v2\0").ok()?;
            if init(0) != 0 {
                return None;
            }
            let mut device = 0;
            if device_get(&mut device, ordinal) != 0 {
                return None;
            }
            let mut ctx = std::ptr::null_mut();
            if retain(&mut ctx, device) != 0 {
                return None;
            }
            let (mut free, mut total) = (0usize, 0usize);
            let ok = push(ctx) == 0 && {
                let got = mem_get_info(&mut free, &mut total) == 0;
                let mut popped = std::ptr::null_mut();
                pop(&mut popped);
                got
            };
            release(device);
            ok.then_some(free as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_map::parse;
    use crate::testutil::fixture;

    #[test]
    fn seventy_eight_b_on_eight_gpus() {
        let cfg = InternVLConfig::load(&fixture("configs/InternVL2_5-78B.config.json")).unwrap();
        let map = parse("auto", cfg.llm_config.num_hidden_layers, 8).unwrap();
        let plan = Plan::new(&cfg, &map, 2, 8192, Quantize::OFF);
        let total: u64 = plan.devices.values().map(|d| d.weight_bytes).sum();
        assert_eq!(total, plan.params.total() * 2);
        assert!(
            (plan.params.total() as f64 / 1e9 - 78.4).abs() < 1.0,
            "{}",
            plan.params.total()
        );
        assert_eq!(plan.devices[&Target::Gpu(0)].layers, 7);
        // 80 GiB cards hold it; 24 GiB cards do not, and the message quotes the numbers
        assert!(plan.check(&|_| Some(80 << 30)).is_ok());
        let e = plan.check(&|_| Some(24 << 30)).unwrap_err();
        assert!(e.starts_with("the model does not fit: cuda:0 needs"), "{e}");
        assert!(e.contains("but has 24.00 GiB"), "{e}");
        // KV: 2 x 8192 x 8 heads x 128 x 2 bytes = 32 MiB per layer
        assert_eq!(kv_bytes_per_layer(&cfg, 8192, 2), 32 << 20);
        let j = plan.json(map.to_json(cfg.llm_arch()));
        assert_eq!(j["device_map"]["language_model.model.layers.79"], 0);
        assert_eq!(j["devices"]["cuda:7"]["layers"], 7);
    }

    /// With --load-8bit / --load-4bit the plan's weight bytes equal what the checkpoint's
    /// tensors cost once the 2-d weights of the decoder layers (and of the vision layers) are
    /// int8 with a bf16 scale per row, or 4-bit with 16 bytes and a bf16 scale per group of 32
    /// inputs (a partial last group counting whole): counted from the safetensors headers,
    /// independently of ParamCounts. tiny-qwen3 (hidden 16) and tiny-qwen2-dyn (hidden 8) have
    /// rows shorter than a group.
    #[test]
    fn quantized_weight_bytes_match_the_checkpoint() {
        for model in [
            "tiny-qwen2",
            "tiny-internlm2",
            "tiny-vit6b-qwen2",
            "tiny-qwen3",
            "tiny-qwen2-dyn",
        ] {
            let dir = fixture(&format!("models/{model}"));
            let cfg = InternVLConfig::load(&dir).unwrap();
            let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
            for f in std::fs::read_dir(&dir).unwrap() {
                let p = f.unwrap().path();
                if p.extension().is_some_and(|e| e == "safetensors") {
                    let bytes = std::fs::read(&p).unwrap();
                    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
                    for (name, t) in meta.tensors() {
                        shapes.push((name, t.shape.clone()));
                    }
                }
            }
            let map = parse("cpu", cfg.llm_config.num_hidden_layers, 0).unwrap();
            let mut all = vec![Quantize::OFF];
            for f in [Quant::Int8, Quant::Q4] {
                all.extend([Quantize::llm(f), Quantize::with_head(f), Quantize::all(f)]);
            }
            for quant in all {
                let head = |name: &str| {
                    name == "language_model.lm_head.weight"
                        || name == "language_model.output.weight"
                };
                let quantized = |name: &str, dims: usize| {
                    dims == 2
                        && name.ends_with(".weight")
                        && quant.format != Quant::None
                        && (name.starts_with("language_model.model.layers.")
                            || quant.vision && name.starts_with("vision_model.encoder.layers."))
                };
                // the head is int8 in either format; a tied one is a quantized copy of the
                // embeddings
                let tied = !shapes.iter().any(|(n, _)| head(n));
                let l = &cfg.llm_config;
                let head_copy = if quant.head && quant.format != Quant::None && tied {
                    (l.vocab_size * l.hidden_size + 2 * l.vocab_size) as u64
                } else {
                    0
                };
                let want: u64 = shapes
                    .iter()
                    .map(|(name, shape)| {
                        let n: usize = shape.iter().product();
                        let bytes = match quant.format {
                            Quant::Int8 | Quant::Q4 if quant.head && head(name) => n + 2 * shape[0],
                            _ if !quantized(name, shape.len()) => 2 * n,
                            Quant::Q4 => shape[0] * shape[1].div_ceil(32) * 18,
                            _ => n + 2 * shape[0],
                        };
                        bytes as u64
                    })
                    .sum::<u64>()
                    + head_copy;
                let plan = Plan::new(&cfg, &map, 2, 16, quant);
                let got: u64 = plan.devices.values().map(|d| d.weight_bytes).sum();
                assert_eq!(got, want, "{model} {quant:?}");
            }
        }
    }

    /// What `check_fits` decides before loading onto GPUs, with the memory figures
    /// `INTERNVL_GPU_MEMORY_GIB` gives in place of the CUDA driver's.
    #[test]
    fn each_gpu_is_checked_against_its_own_memory() {
        assert_eq!(gpu_memory_from("80", 5), Some(80 << 30));
        assert_eq!(gpu_memory_from(" 24, 4.5 ", 1), Some(9 << 29));
        assert_eq!(
            gpu_memory_from("24,4", 2),
            None,
            "no figure for a third GPU"
        );
        assert_eq!(gpu_memory_from("lots", 0), None);
        assert_eq!(gpu_memory_from("-1", 0), None);
        let cfg = InternVLConfig::load(&fixture("configs/InternVL2_5-8B.config.json")).unwrap();
        let map = parse("0:16,1:16", cfg.llm_config.num_hidden_layers, 2).unwrap();
        let plan = Plan::new(&cfg, &map, 2, 8192, Quantize::OFF);
        let with = |spec: &'static str| {
            move |t: Target| match t {
                Target::Gpu(i) => gpu_memory_from(spec, i),
                Target::Cpu => None,
            }
        };
        assert!(plan.check(&with("24")).is_ok());
        let e = plan.check(&with("24,4")).unwrap_err();
        assert!(
            e.starts_with("the model does not fit: cuda:1 needs "),
            "{e}"
        );
        assert!(e.ends_with("but has 4.00 GiB"), "{e}");
        assert!(!e.contains("cuda:0"), "{e}");
        let e = plan.check(&with("2")).unwrap_err();
        assert!(
            e.contains("cuda:0 needs") && e.contains("; cuda:1 needs"),
            "{e}"
        );
    }

    #[test]
    fn table_lists_modules_and_devices() {
        let cfg = InternVLConfig::load(&fixture("configs/InternVL2_5-1B.config.json")).unwrap();
        let map = parse("cpu", 24, 0).unwrap();
        let t = Plan::new(&cfg, &map, 2, 4096, Quantize::OFF).table();
        assert!(t.contains("decoder layers (24 x "), "{t}");
        assert!(
            t.lines().any(|l| l.starts_with("cpu") && l.contains("24")),
            "{t}"
        );
    }
}
