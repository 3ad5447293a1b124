//! Which device each part of the model lives on, and what that costs.
//!
//! `auto` reproduces the model card's `split_model`: the first GPU counts as half a GPU (it also
//! holds the vision model), layers are spread in order, and the vision model, `mlp1`, the token
//! embeddings, the final norm, the output head and the last decoder layer sit on GPU 0.
use crate::model::config::{InternVLConfig, LlmArch};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A placement target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Cpu,
    Gpu(usize),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Target::Cpu => write!(f, "cpu"),
            Target::Gpu(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Device of the shared modules (vision, mlp1, embeddings, norm, head) and of each layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMap {
    pub first: Target,
    pub layers: Vec<Target>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    #[error("device map {spec:?}: {what}")]
    Invalid { spec: String, what: String },
    #[error("device map gives {given} layers ({counts}) but the model has {expected}")]
    Count {
        given: usize,
        expected: usize,
        counts: String,
    },
    #[error("device map uses cuda:{gpu} but only {available} GPU(s) are available")]
    NoSuchGpu { gpu: usize, available: usize },
}

/// The model card's `split_model` layer counts for `gpus` GPUs (the raw list, which may add up
/// to more than `num_layers`: later entries then name no layer).
pub fn split_model_counts(num_layers: usize, gpus: usize) -> Vec<usize> {
    let per = (num_layers as f64 / (gpus as f64 - 0.5)).ceil() as usize;
    let mut counts = vec![per; gpus];
    counts[0] = (per as f64 * 0.5).ceil() as usize;
    counts
}

/// `split_model` as a device per layer.
pub fn split_model(num_layers: usize, gpus: usize) -> DeviceMap {
    let mut layers = Vec::with_capacity(num_layers);
    for (gpu, &n) in split_model_counts(num_layers, gpus).iter().enumerate() {
        for _ in 0..n {
            if layers.len() < num_layers {
                layers.push(Target::Gpu(gpu));
            }
        }
    }
    // layers the counts did not reach stay with the last GPU (does not happen for sane sizes)
    while layers.len() < num_layers {
        layers.push(Target::Gpu(gpus - 1));
    }
    if let Some(last) = layers.last_mut() {
        *last = Target::Gpu(0);
    }
    DeviceMap {
        first: Target::Gpu(0),
        layers,
    }
}

fn parse_target(s: &str, spec: &str) -> Result<Target, MapError> {
    let s = s.trim();
    let bad = || MapError::Invalid {
        spec: spec.into(),
        what: format!("{s:?} is not a device (cpu, N or cuda:N)"),
    };
    if s == "cpu" {
        return Ok(Target::Cpu);
    }
    let n = s.strip_prefix("cuda:").unwrap_or(s);
    n.parse::<usize>().map(Target::Gpu).map_err(|_| bad())
}

/// Parses `auto`, `cpu`, a list of layer counts per device (`0:12,1:12`, `cpu:4`), or the model
/// card's JSON `device_map` object (module prefix -> device index or "cpu").
pub fn parse(spec: &str, num_layers: usize, gpus: usize) -> Result<DeviceMap, MapError> {
    let spec_t = spec.trim();
    let map = match spec_t {
        "auto" => {
            if gpus == 0 {
                DeviceMap {
                    first: Target::Cpu,
                    layers: vec![Target::Cpu; num_layers],
                }
            } else {
                split_model(num_layers, gpus)
            }
        }
        "cpu" => DeviceMap {
            first: Target::Cpu,
            layers: vec![Target::Cpu; num_layers],
        },
        s if s.starts_with('{') => parse_json(s, num_layers)?,
        s => parse_counts(s, num_layers)?,
    };
    for t in std::iter::once(&map.first).chain(&map.layers) {
        if let Target::Gpu(g) = t {
            if *g >= gpus {
                return Err(MapError::NoSuchGpu {
                    gpu: *g,
                    available: gpus,
                });
            }
        }
    }
    Ok(map)
}

fn parse_counts(spec: &str, num_layers: usize) -> Result<DeviceMap, MapError> {
    let mut layers = Vec::new();
    let mut counts = Vec::new();
    let mut first = None;
    for part in spec.split(',') {
        let (dev, n) = part.rsplit_once(':').ok_or_else(|| MapError::Invalid {
            spec: spec.into(),
            what: format!("{part:?} is not DEVICE:LAYERS"),
        })?;
        let t = parse_target(dev, spec)?;
        let n: usize = n.trim().parse().map_err(|_| MapError::Invalid {
            spec: spec.into(),
            what: format!("{n:?} is not a layer count"),
        })?;
        first.get_or_insert(t);
        counts.push(format!("{t}: {n}"));
        layers.extend(std::iter::repeat_n(t, n));
    }
    if layers.len() != num_layers {
        return Err(MapError::Count {
            given: layers.len(),
            expected: num_layers,
            counts: counts.join(", "),
        });
    }
    Ok(DeviceMap {
        first: first.unwrap_or(Target::Cpu),
        layers,
    })
}

fn parse_json(spec: &str, num_layers: usize) -> Result<DeviceMap, MapError> {
    let v: Map<String, Value> = serde_json::from_str(spec).map_err(|e| MapError::Invalid {
        spec: spec.into(),
        what: e.to_string(),
    })?;
    let target = |v: &Value| -> Result<Target, MapError> {
        match v {
            Value::Number(n) => {
                n.as_u64()
                    .map(|n| Target::Gpu(n as usize))
                    .ok_or_else(|| MapError::Invalid {
                        spec: spec.into(),
                        what: format!("{n} is not a device index"),
                    })
            }
            Value::String(s) => parse_target(s, spec),
            other => Err(MapError::Invalid {
                spec: spec.into(),
                what: format!("{other} is not a device"),
            }),
        }
    };
    let mut layers: Vec<Option<Target>> = vec![None; num_layers];
    let mut first = None;
    for (k, dv) in &v {
        let t = target(dv)?;
        if let Some(i) = k.strip_prefix("language_model.model.layers.") {
            let i: usize = i.parse().map_err(|_| MapError::Invalid {
                spec: spec.into(),
                what: format!("{k:?}: bad layer index"),
            })?;
            if i < num_layers {
                layers[i] = Some(t);
            }
        } else if k == "vision_model" {
            first = Some(t);
        }
    }
    let missing: Vec<String> = layers
        .iter()
        .enumerate()
        .filter(|(_, t)| t.is_none())
        .map(|(i, _)| i.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(MapError::Invalid {
            spec: spec.into(),
            what: format!("no device for layers {}", missing.join(", ")),
        });
    }
    Ok(DeviceMap {
        first: first.unwrap_or(Target::Gpu(0)),
        layers: layers.into_iter().map(|t| t.expect("checked")).collect(),
    })
}

impl DeviceMap {
    /// The model card's `device_map` dict: module prefix -> device index ("cpu" for CPU).
    pub fn to_json(&self, arch: LlmArch) -> Value {
        let dev = |t: Target| match t {
            Target::Cpu => Value::from("cpu"),
            Target::Gpu(i) => Value::from(i),
        };
        let mut m = Map::new();
        for (i, t) in self.layers.iter().enumerate() {
            m.insert(format!("language_model.model.layers.{i}"), dev(*t));
        }
        let shared: &[&str] = match arch {
            LlmArch::InternLM2 => &[
                "vision_model",
                "mlp1",
                "language_model.model.tok_embeddings",
                "language_model.output",
                "language_model.model.norm",
            ],
            _ => &[
                "vision_model",
                "mlp1",
                "language_model.model.embed_tokens",
                "language_model.lm_head",
                "language_model.model.norm",
                "language_model.model.rotary_emb",
            ],
        };
        for k in shared {
            m.insert((*k).into(), dev(self.first));
        }
        Value::Object(m)
    }

    /// Layers per device, in device order.
    pub fn counts(&self) -> BTreeMap<Target, usize> {
        let mut c = BTreeMap::new();
        for t in &self.layers {
            *c.entry(*t).or_default() += 1;
        }
        c
    }
}

/// Parameter counts of the parts of a model, from its config alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamCounts {
    pub vision: u64,
    pub mlp1: u64,
    pub embed: u64,
    /// One decoder layer.
    pub layer: u64,
    /// Of `layer`: what one token's decoding step reads (a mixture-of-experts layer reads its
    /// router and `num_experts_per_tok` experts); equal to `layer` for dense models.
    pub active_layer: u64,
    pub layers: usize,
    pub norm: u64,
    pub head: u64,
    /// Of `layer`: elements of the linear weight matrices, and their rows.
    pub layer_matrix: (u64, u64),
    /// Of `vision`: the same for all its layers.
    pub vision_matrix: (u64, u64),
    /// `layer_matrix`'s and `vision_matrix`'s groups of 32 inputs (a partial one at the end of
    /// a row counts): what `--load-4bit` stores one scale for.
    pub layer_q4_groups: u64,
    pub vision_q4_groups: u64,
}

impl ParamCounts {
    pub fn of(cfg: &InternVLConfig) -> Self {
        let v = &cfg.vision_config;
        let (d, i) = (v.hidden_size as u64, v.intermediate_size as u64);
        let g = (cfg.image_size() / v.patch_size) as u64;
        let p = v.patch_size as u64;
        let norm = if v.norm_type == "layer_norm" {
            2 * d
        } else {
            d
        };
        let qkv_bias = if v.qkv_bias { 3 * d } else { 0 };
        let qk_norm = if v.qk_normalization { 2 * d } else { 0 };
        let vit_layer =
            2 * norm + 3 * d * d + qkv_bias + d * d + d + qk_norm + d * i + i + i * d + d + 2 * d;
        let vision = d
            + d * v.num_channels as u64 * p * p
            + d
            + (g * g + 1) * d
            + vit_layer * v.num_hidden_layers as u64;
        let scale = (1.0 / cfg.downsample_ratio).round() as u64;
        let l = &cfg.llm_config;
        let h = l.hidden_size as u64;
        let dv = d * scale * scale;
        let mlp1 = 2 * dv + dv * h + h + h * h + h;
        let hd = l.head_dim() as u64;
        let (nh, nkv) = (l.num_attention_heads as u64, l.num_kv_heads() as u64);
        let attn = match cfg.llm_arch() {
            LlmArch::Qwen2 => h * nh * hd + nh * hd + 2 * (h * nkv * hd + nkv * hd) + nh * hd * h,
            // no biases; q_norm and k_norm over head_dim
            LlmArch::Qwen3 | LlmArch::Qwen3Moe => {
                h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 2 * hd
            }
            LlmArch::Llama => {
                let b = if l.attention_bias { 1 } else { 0 };
                h * nh * hd + 2 * h * nkv * hd + nh * hd * h + b * (nh * hd + 2 * nkv * hd + h)
            }
            LlmArch::InternLM2 => {
                let b = if l.bias { 1 } else { 0 };
                let out = nkv * (nh / nkv + 2) * hd;
                h * out + nh * hd * h + b * (out + h)
            }
        };
        let inter = l.intermediate_size as u64;
        let dense_mlp = 3 * h * inter;
        // a mixture-of-experts layer: the router and every expert; a token reads top_k experts
        let (experts, top_k, mi) = (
            l.num_experts as u64,
            l.num_experts_per_tok as u64,
            l.moe_intermediate_size as u64,
        );
        let sparse_mlp = experts * h + experts * 3 * h * mi;
        let n_layers = l.num_hidden_layers as u64;
        let sparse = (0..l.num_hidden_layers)
            .filter(|&i| cfg.llm_config.is_sparse_layer(i))
            .count() as u64;
        // per layer, averaged over the layers (every published MoE config is sparse throughout)
        let mean = |sparse_v: u64, dense_v: u64| {
            (sparse * sparse_v + (n_layers - sparse) * dense_v).div_ceil(n_layers.max(1))
        };
        let layer = attn + 2 * h + mean(sparse_mlp, dense_mlp);
        let active_layer = attn + 2 * h + mean(experts * h + top_k * 3 * h * mi, dense_mlp);
        // the linear weight matrices and their output rows (what --load-8bit stores as int8
        // with one scale per row; a MoE router stays in the model's dtype)
        let (mlp_matrix, mlp_rows) = (
            mean(experts * 3 * h * mi, dense_mlp),
            mean(experts * (2 * mi + h), 2 * inter + h),
        );
        let (attn_matrix, attn_rows) = match cfg.llm_arch() {
            LlmArch::Qwen2 | LlmArch::Llama | LlmArch::Qwen3 | LlmArch::Qwen3Moe => (
                2 * h * nh * hd + 2 * h * nkv * hd,
                nh * hd + 2 * nkv * hd + h,
            ),
            LlmArch::InternLM2 => {
                let out = nkv * (nh / nkv + 2) * hd;
                (h * out + nh * hd * h, out + h)
            }
        };
        // 4-bit groups: a matrix of `rows` outputs over `inputs` has rows * ceil(inputs / 32)
        let c = |inputs: u64| inputs.div_ceil(crate::model::gemv::Q4_GROUP as u64);
        let mlp_groups = mean(
            experts * (2 * mi * c(h) + h * c(mi)),
            2 * inter * c(h) + h * c(inter),
        );
        let attn_groups = match cfg.llm_arch() {
            LlmArch::Qwen2 | LlmArch::Llama | LlmArch::Qwen3 | LlmArch::Qwen3Moe => {
                (nh * hd + 2 * nkv * hd) * c(h) + h * c(nh * hd)
            }
            LlmArch::InternLM2 => nkv * (nh / nkv + 2) * hd * c(h) + h * c(nh * hd),
        };
        let vocab = l.vocab_size as u64;
        Self {
            vision,
            mlp1,
            embed: vocab * h,
            layer,
            layers: l.num_hidden_layers,
            norm: h,
            head: if l.tie_word_embeddings { 0 } else { vocab * h },
            layer_matrix: (attn_matrix + mlp_matrix, attn_rows + mlp_rows),
            active_layer,
            vision_matrix: (
                (4 * d * d + 2 * d * i) * v.num_hidden_layers as u64,
                (5 * d + i) * v.num_hidden_layers as u64,
            ),
            layer_q4_groups: attn_groups + mlp_groups,
            vision_q4_groups: ((4 * d + i) * c(d) + d * c(i)) * v.num_hidden_layers as u64,
        }
    }

    /// Parameters one token's decoding reads, the vision model aside: embeddings (one row, but
    /// counted whole as published "active" figures do), every layer's active part, the head.
    pub fn active_total(&self) -> u64 {
        self.embed + self.active_layer * self.layers as u64 + self.norm + self.head
    }

    pub fn total(&self) -> u64 {
        self.vision
            + self.mlp1
            + self.embed
            + self.layer * self.layers as u64
            + self.norm
            + self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    /// The model card's split_model worked by hand: (layers, gpus) -> layers per GPU after the
    /// last layer moves to GPU 0.
    #[test]
    fn split_model_tables() {
        let per_gpu = |n, g| -> Vec<usize> {
            let m = split_model(n, g);
            (0..g)
                .map(|i| m.layers.iter().filter(|t| **t == Target::Gpu(i)).count())
                .collect()
        };
        // 24 layers (1B/2B): ceil(24/1.5)=16 -> [8,16]; last layer to 0 -> [9,15]
        assert_eq!(per_gpu(24, 1), vec![24]);
        assert_eq!(per_gpu(24, 2), vec![9, 15]);
        // 4 GPUs: ceil(24/3.5)=7 -> [4,7,7,7] = 25 > 24: layers 0-3,4-10,11-17,18-23; 23 -> 0
        assert_eq!(per_gpu(24, 4), vec![5, 7, 7, 5]);
        // 8 GPUs: ceil(24/7.5)=4 -> [2,4,4,4,4,4,2(of 4),0]
        assert_eq!(per_gpu(24, 8), vec![3, 4, 4, 4, 4, 4, 1, 0]);
        // 80 layers (78B) on 8 GPUs: ceil(80/7.5)=11 -> [6,11*7] = 83: last GPU gets 8, then -1
        assert_eq!(per_gpu(80, 8), vec![7, 11, 11, 11, 11, 11, 11, 7]);
        assert_eq!(
            split_model_counts(80, 8),
            vec![6, 11, 11, 11, 11, 11, 11, 11]
        );
        let m = split_model(48, 2);
        assert_eq!(m.layers[47], Target::Gpu(0));
        assert_eq!(m.first, Target::Gpu(0));
    }

    #[test]
    fn every_config_on_1_2_4_8_gpus_matches_split_model() {
        for e in std::fs::read_dir(fixture("configs")).unwrap() {
            let cfg = InternVLConfig::load(&e.unwrap().path()).unwrap();
            let n = cfg.llm_config.num_hidden_layers;
            for g in [1, 2, 4, 8] {
                let m = parse("auto", n, g).unwrap();
                // rebuild the dict as split_model writes it and compare layer by layer
                let counts = split_model_counts(n, g);
                let mut expect = Vec::new();
                for (gpu, c) in counts.iter().enumerate() {
                    expect.extend(std::iter::repeat_n(Target::Gpu(gpu), *c));
                }
                expect.truncate(n);
                expect[n - 1] = Target::Gpu(0);
                assert_eq!(m.layers, expect, "{n} layers on {g} GPUs");
                let j = m.to_json(cfg.llm_arch());
                assert_eq!(j[format!("language_model.model.layers.{}", n - 1)], 0);
                assert_eq!(j["vision_model"], 0);
                assert_eq!(j["mlp1"], 0);
            }
        }
    }

    #[test]
    fn explicit_maps_and_their_errors() {
        let m = parse("0:12,1:12", 24, 2).unwrap();
        assert_eq!(
            m.counts().into_iter().collect::<Vec<_>>(),
            vec![(Target::Gpu(0), 12), (Target::Gpu(1), 12)]
        );
        let m = parse("cpu:2", 2, 0).unwrap();
        assert_eq!(m.layers, vec![Target::Cpu; 2]);
        assert_eq!(
            parse("0:12,1:10", 24, 2).unwrap_err().to_string(),
            "device map gives 22 layers (cuda:0: 12, cuda:1: 10) but the model has 24"
        );
        assert_eq!(
            parse("0:12,3:12", 24, 2).unwrap_err(),
            MapError::NoSuchGpu {
                gpu: 3,
                available: 2
            }
        );
        assert!(parse("0-12", 24, 2)
            .unwrap_err()
            .to_string()
            .contains("not DEVICE:LAYERS"));
        let json = r#"{"vision_model": 0, "language_model.model.layers.0": 1, "language_model.model.layers.1": "cpu"}"#;
        let m = parse(json, 2, 2).unwrap();
        assert_eq!(m.layers, vec![Target::Gpu(1), Target::Cpu]);
        assert!(parse(r#"{"vision_model": 0}"#, 2, 1)
            .unwrap_err()
            .to_string()
            .contains("no device for layers 0, 1"));
        assert_eq!(parse("auto", 3, 0).unwrap().layers, vec![Target::Cpu; 3]);
    }

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        // InternVL2_5-1B: 0.94 B parameters (BENCH.md); InternViT-300M: 0.30 B
        let c = ParamCounts::of(
            &InternVLConfig::load(&fixture("configs/InternVL2_5-1B.config.json")).unwrap(),
        );
        assert!(
            (c.total() as f64 / 1e9 - 0.94).abs() < 0.01,
            "{}",
            c.total()
        );
        assert!((c.vision as f64 / 1e9 - 0.30).abs() < 0.01, "{}", c.vision);
        // InternVL2_5-8B: 8.1 B
        let c = ParamCounts::of(
            &InternVLConfig::load(&fixture("configs/InternVL2_5-8B.config.json")).unwrap(),
        );
        assert!((c.total() as f64 / 1e9 - 8.08).abs() < 0.1, "{}", c.total());
        // InternVL3.5, against the model cards' tables (vision / language / total, billions;
        // the 30B-A3B's LLM activates 3.35 B per token)
        let llm = |c: &ParamCounts| c.embed + c.layer * c.layers as u64 + c.norm + c.head;
        let b = |n: u64| n as f64 / 1e9;
        for (name, vision, language, total) in [
            ("InternVL3_5-1B", 0.30, 0.75, 1.06),
            ("InternVL3_5-30B-A3B", 0.30, 30.53, 30.85),
            ("InternVL3_5-241B-A28B", 5.54, 235.09, 240.70),
        ] {
            let cfg =
                InternVLConfig::load(&fixture(&format!("configs/{name}.config.json"))).unwrap();
            let c = ParamCounts::of(&cfg);
            assert!(
                (b(c.vision) - vision).abs() < 0.01,
                "{name} vision {}",
                b(c.vision)
            );
            assert!(
                (b(llm(&c)) - language).abs() < 0.01,
                "{name} llm {}",
                b(llm(&c))
            );
            assert!(
                (b(c.total()) - total).abs() < 0.02,
                "{name} total {}",
                b(c.total())
            );
        }
        let c = ParamCounts::of(
            &InternVLConfig::load(&fixture("configs/InternVL3_5-30B-A3B.config.json")).unwrap(),
        );
        let active = c.active_total();
        eprintln!("30B-A3B active LLM parameters: {}", b(active));
        assert!((b(active) - 3.35).abs() < 0.02, "{}", b(active));
        // tiny checkpoints: counts equal the tensors in the files (dense, MoE, tied)
        for model in ["tiny-qwen3", "tiny-qwen3-moe"] {
            let dir = fixture(&format!("models/{model}"));
            let c = ParamCounts::of(&InternVLConfig::load(&dir).unwrap());
            let w = crate::model::weights::Weights::open(&dir).unwrap();
            let n: u64 =
                crate::model::InternVL::expected_tensors(&InternVLConfig::load(&dir).unwrap())
                    .iter()
                    .filter(|(name, _)| w.contains(name))
                    .map(|(_, s)| s.iter().product::<i64>() as u64)
                    .sum();
            assert_eq!(c.total(), n, "{model}");
        }
        // tiny checkpoint: count equals the tensors in the file
        let dir = fixture("models/tiny-qwen2");
        let c = ParamCounts::of(&InternVLConfig::load(&dir).unwrap());
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let n: u64 = meta
            .tensors()
            .values()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(c.total(), n);
    }
}
