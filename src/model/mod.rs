//! `InternVLChatModel`: InternViT -> pixel shuffle -> mlp1 -> LLM, image features scattered into
//! the `<IMG_CONTEXT>` positions (reference: `modeling_internvl_chat.py`).
pub mod attention;
pub mod config;
pub mod gemv;
pub mod llm;
pub mod nn;
pub mod projector;
pub mod vision;
pub mod weights;

use config::{InternVLConfig, LlmArch};
use llm::{LayerPlaces, Llm};
use memmap2::Mmap;
use nn::Place;
pub use nn::Quant;
use projector::Mlp1;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vision::VisionModel;
use weights::{Weights, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: not a folder")]
    NotADir { path: PathBuf },
    #[error("{what}")]
    Torch { what: String },
    #[error("the prompt has {found} <IMG_CONTEXT> tokens but the images give {expected} ({tiles} tiles x {per_tile})")]
    ImageTokens {
        found: i64,
        expected: i64,
        tiles: i64,
        per_tile: i64,
    },
}

impl From<tch::TchError> for ModelError {
    fn from(e: tch::TchError) -> Self {
        // libtorch messages carry a C++ backtrace after the first line
        let s = e.to_string();
        ModelError::Torch {
            what: format!("libtorch: {}", s.lines().next().unwrap_or("")),
        }
    }
}

/// Where to run and in which precision.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub kind: Kind,
    /// Device of the vision model, mlp1, embeddings, final norm and head.
    pub first: Device,
    /// Device of each decoder layer (empty: all on `first`).
    pub layers: Vec<Device>,
    /// Which linear layers keep quantized weights, and how (`--load-8bit`, `--load-4bit`).
    pub quant: Quantize,
    /// The context window in tokens (`--context`); `None`: the config's
    /// ([`config::LlmConfig::context_window`]).
    pub context: Option<usize>,
}

/// `--load-8bit` / `--load-4bit`: the linear layers of the decoder layers; optionally the
/// output head too (in int8 for either format: llama.cpp's Q4_0 files keep it in Q8_0 as well,
/// since 4 bits there cost the logits most); optionally the vision model's. Embeddings, norms
/// and mlp1 stay in the model's dtype, and so does the head unless asked: bitsandbytes'
/// `load_in_8bit` / `load_in_4bit` leave it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantize {
    /// The decoder layers' format ([`Quant::None`]: not quantized).
    pub format: Quant,
    /// The output head too (in int8).
    pub head: bool,
    /// The vision model's linear layers too.
    pub vision: bool,
}

impl Quantize {
    pub const OFF: Quantize = Quantize {
        format: Quant::None,
        head: false,
        vision: false,
    };

    /// The decoder layers in `format`.
    pub fn llm(format: Quant) -> Self {
        Self {
            format,
            head: false,
            vision: false,
        }
    }

    /// The decoder layers in `format` and the output head in int8.
    pub fn with_head(format: Quant) -> Self {
        Self {
            format,
            head: true,
            vision: false,
        }
    }

    /// The decoder layers and the vision model in `format`, the output head in int8.
    pub fn all(format: Quant) -> Self {
        Self {
            format,
            head: true,
            vision: true,
        }
    }

    /// The vision model's format.
    pub fn vision_format(&self) -> Quant {
        if self.vision {
            self.format
        } else {
            Quant::None
        }
    }

    /// The output head's format.
    pub fn head_format(&self) -> Quant {
        if self.head && self.format != Quant::None {
            Quant::Int8
        } else {
            Quant::None
        }
    }

    /// As the flags say it: `none`, `8bit`, `8bit head`, `8bit all`, `4bit`, `4bit head`,
    /// `4bit all`.
    pub fn name(&self) -> &'static str {
        match (self.format, self.head, self.vision) {
            (Quant::None, ..) => "none",
            (Quant::Int8, false, false) => "8bit",
            (Quant::Int8, true, false) => "8bit head",
            (Quant::Int8, _, true) => "8bit all",
            (Quant::Q4, false, false) => "4bit",
            (Quant::Q4, true, false) => "4bit head",
            (Quant::Q4, _, true) => "4bit all",
        }
    }
}

impl LoadOptions {
    pub fn single(dev: Device, kind: Kind) -> Self {
        Self {
            kind,
            first: dev,
            layers: Vec::new(),
            quant: Quantize::OFF,
            context: None,
        }
    }
}

pub struct InternVL {
    pub cfg: InternVLConfig,
    pub vision: VisionModel,
    pub mlp1: Mlp1,
    pub llm: Llm,
    pub kind: Kind,
    pub dev: Device,
    /// keeps zero-copy weight tensors' memory alive
    _mmaps: Vec<Arc<Mmap>>,
}

impl InternVL {
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NotADir { path: dir.into() });
        }
        let cfg = InternVLConfig::load(dir)?;
        let mut w = Weights::open(dir)?;
        if cfg.layout == config::Layout::Hf {
            w.use_hf_names();
        }
        let model = Self::build(cfg, &mut w, opts);
        w.finish()?;
        Ok(Self {
            _mmaps: w.mmaps(),
            ..model
        })
    }

    /// Every tensor (name, shape) a checkpoint of `cfg` holds, in load order.
    pub fn expected_tensors(cfg: &InternVLConfig) -> Vec<(String, Vec<i64>)> {
        let mut w = match cfg.layout {
            config::Layout::Hf => Weights::recording_hf(),
            config::Layout::RemoteCode => Weights::recording(),
        };
        let _ = Self::build(
            cfg.clone(),
            &mut w,
            &LoadOptions::single(Device::Cpu, Kind::BFloat16),
        );
        w.recorded().to_vec()
    }

    fn build(cfg: InternVLConfig, w: &mut Weights, opts: &LoadOptions) -> Self {
        let first = Place::new(opts.first, opts.kind);
        let vision_place = Place {
            quant: opts.quant.vision_format(),
            ..first
        };
        let vision = VisionModel::load(w, vision_place, &cfg.vision_config, cfg.select_layer);
        let vit_hidden = cfg.vision_config.hidden_size as i64;
        let scale = (1.0 / cfg.downsample_ratio).round() as i64;
        let llm_hidden = cfg.llm_config.hidden_size as i64;
        let mlp1 = Mlp1::load(w, first, vit_hidden * scale * scale, llm_hidden);
        let places = LayerPlaces {
            first,
            layers: &opts.layers,
            quant: opts.quant.format,
            head: opts.quant.head_format(),
        };
        let llm = match cfg.llm_arch() {
            LlmArch::Qwen2 => llm::qwen2::load(w, &places, &cfg.llm_config, true, false),
            LlmArch::Llama => llm::qwen2::load(
                w,
                &places,
                &cfg.llm_config,
                cfg.llm_config.attention_bias,
                cfg.llm_config.attention_bias,
            ),
            LlmArch::Qwen3 => llm::qwen3::load(w, &places, &cfg.llm_config),
            LlmArch::Qwen3Moe => llm::qwen3_moe::load(w, &places, &cfg.llm_config),
            LlmArch::InternLM2 => llm::internlm2::load(w, &places, &cfg.llm_config),
        };
        Self {
            _mmaps: Vec::new(),
            cfg,
            vision,
            mlp1,
            llm,
            kind: opts.kind,
            dev: opts.first,
        }
    }

    /// `extract_feature`: pixel values [tiles, 3, 448, 448] -> [tiles, 256, llm_hidden].
    pub fn extract_feature(&self, pixel_values: &Tensor) -> Tensor {
        let xs = self
            .vision
            .forward(&pixel_values.to_device(self.dev).to_kind(self.kind));
        let xs = xs.narrow(1, 1, xs.size()[1] - 1);
        let (n, p, c) = xs.size3().expect("vit output is 3-d");
        let hw = (p as f64).sqrt() as i64;
        let xs = xs.reshape([n, hw, hw, c]);
        let xs =
            projector::pixel_shuffle(&xs, self.cfg.downsample_ratio, self.cfg.ps_version == "v2");
        let (n, _, _, c) = xs.size4().expect("pixel shuffle output is 4-d");
        self.mlp1.forward(&xs.reshape([n, -1, c]))
    }

    /// Embeddings of `ids` [b, n] with the image features [tiles, 256, hidden] written, in
    /// order, into the `<IMG_CONTEXT>` positions.
    pub fn embed_with_images(
        &self,
        ids: &Tensor,
        img_context_id: i64,
        image_embeds: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let embeds = self.llm.embed(ids);
        let (b, n, c) = embeds.size3().expect("embeddings are 3-d");
        let sel = ids
            .to_device(embeds.device())
            .eq(img_context_id)
            .view([b * n]);
        let found = sel.sum(Kind::Int64).int64_value(&[]);
        let Some(img) = image_embeds else {
            // every <IMG_CONTEXT> position must get a picture's features
            if found != 0 {
                return Err(ModelError::ImageTokens {
                    found,
                    expected: 0,
                    tiles: 0,
                    per_tile: 0,
                });
            }
            return Ok(embeds);
        };
        let (tiles, per_tile, _) = img.size3().expect("image features are 3-d");
        if found != tiles * per_tile {
            return Err(ModelError::ImageTokens {
                found,
                expected: tiles * per_tile,
                tiles,
                per_tile,
            });
        }
        let flat = embeds.view([b * n, c]);
        let src = img
            .reshape([-1, c])
            .to_device(flat.device())
            .to_kind(flat.kind());
        let flat = flat.masked_scatter(&sel.unsqueeze(1), &src);
        Ok(flat.view([b, n, c]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    /// The recorded tensor list of each tiny config is exactly what its checkpoint holds.
    #[test]
    fn expected_tensors_equal_the_checkpoints() {
        for name in crate::testutil::TINY_MODELS {
            let dir = fixture(&format!("models/{name}"));
            let cfg = InternVLConfig::load(&dir).unwrap();
            let mut expected = InternVL::expected_tensors(&cfg);
            expected.sort();
            let w = Weights::open(&dir).unwrap();
            let mut stored: Vec<(String, Vec<i64>)> = expected
                .iter()
                .filter_map(|(n, _)| w.shape_of(n).map(|s| (n.clone(), s.to_vec())))
                .collect();
            stored.sort();
            assert_eq!(stored, expected, "{name}");
        }
    }

    /// The -hf fixture's keys are exactly what its config asks for, by their native names.
    #[test]
    fn hf_expected_tensors_equal_the_checkpoint() {
        let dir = fixture("models/tiny-qwen2-hf");
        let cfg = InternVLConfig::load(&dir).unwrap();
        assert_eq!(cfg.layout, config::Layout::Hf);
        let mut expected = InternVL::expected_tensors(&cfg);
        expected.sort();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut stored: Vec<(String, Vec<i64>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.shape().iter().map(|&d| d as i64).collect()))
            .collect();
        stored.sort();
        // the fused qkv is asked for as its three parts
        assert_eq!(stored, expected);
        assert!(expected
            .iter()
            .any(|(n, _)| n == "vision_tower.encoder.layer.1.attention.v_proj.bias"));
    }

    /// A copy of the -hf fixture whose keys are renamed by `rename` (None: left out).
    fn hf_copy(tag: &str, rename: impl Fn(&str) -> Option<String>) -> std::path::PathBuf {
        let src = fixture("models/tiny-qwen2-hf");
        let tmp = std::env::temp_dir().join(format!("ivl-hf-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
        let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let views: Vec<(String, safetensors::tensor::TensorView)> = st
            .tensors()
            .into_iter()
            .filter_map(|(n, t)| rename(&n).map(|n| (n, t)))
            .collect();
        safetensors::serialize_to_file(views, None, &tmp.join("model.safetensors")).unwrap();
        tmp
    }

    /// Newer conversions' names (`model.vision_tower.*`, `model.language_model.*`, `lm_head.*`)
    /// load to the same model; a missing or stray key is named as the checkpoint spells it.
    #[test]
    fn hf_names_of_both_generations_load_and_errors_use_them() {
        let newer = |n: &str| {
            Some(if let Some(r) = n.strip_prefix("language_model.model.") {
                format!("model.language_model.{r}")
            } else if let Some(r) = n.strip_prefix("language_model.lm_head") {
                format!("lm_head{r}")
            } else {
                format!("model.{n}")
            })
        };
        let opts = LoadOptions::single(Device::Cpu, Kind::Float);
        let old = InternVL::load(&fixture("models/tiny-qwen2-hf"), &opts).unwrap();
        let dir = hf_copy("new", newer);
        let new = InternVL::load(&dir, &opts).unwrap();
        let px = Tensor::randn([1, 3, 448, 448], (Kind::Float, Device::Cpu));
        let _guard = tch::no_grad_guard();
        assert!(old.extract_feature(&px).equal(&new.extract_feature(&px)));
        assert!(old.llm.lm_head.weight.equal(&new.llm.lm_head.weight));
        std::fs::remove_dir_all(&dir).unwrap();
        // a key renamed: missing by its native name, the stray one unexpected
        let q = "vision_tower.encoder.layer.0.attention.q_proj.weight";
        let dir = hf_copy("wrong", |n| {
            Some(if n == q {
                "vision_tower.encoder.layer.0.attention.query.weight".into()
            } else {
                n.to_string()
            })
        });
        let e = InternVL::load(&dir, &opts).err().unwrap().to_string();
        assert!(e.contains(&format!("missing tensor {q}")), "{e}");
        assert!(
            e.contains("unexpected tensor vision_tower.encoder.layer.0.attention.query.weight"),
            "{e}"
        );
        assert!(
            !e.contains("attn.qkv") && !e.contains("vision_model."),
            "{e}"
        );
        // the newer generation's names in the message when the file uses them
        let dir2 = hf_copy("wrong-new", |n| {
            (n != "language_model.lm_head.weight").then(|| newer(n).unwrap())
        });
        let e = InternVL::load(&dir2, &opts).err().unwrap().to_string();
        assert!(e.contains("missing tensor lm_head.weight"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&dir2).unwrap();
    }

    /// On the CPU the vision model runs each layer a tile at a time: the features equal those
    /// of the whole batch at once (f32, within rounding of the products' blocking).
    #[test]
    fn vision_tile_by_tile_equals_the_batch() {
        let _guard = tch::no_grad_guard();
        for name in ["tiny-qwen2", "tiny-vit6b-qwen2"] {
            let m = InternVL::load(
                &fixture(&format!("models/{name}")),
                &LoadOptions::single(Device::Cpu, Kind::Float),
            )
            .unwrap();
            let px = crate::testutil::Rng::new(21).randn(&[3, 3, 448, 448]);
            let each = m.vision.forward(&px);
            let batch = m.vision.forward_batch(&px);
            assert_eq!(each.size(), batch.size());
            let diff = (&each - &batch).abs().max().double_value(&[]);
            assert!(diff <= 1e-5, "{name}: max |diff| {diff}");
            // and a second picture after the weights' pages went back to the kernel
            assert!(m.vision.forward(&px).equal(&each), "{name}");
        }
    }

    #[test]
    fn broken_checkpoints_name_the_problem() {
        let tmp = std::env::temp_dir().join(format!("ivl-broken-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let src = fixture("models/tiny-qwen2");
        std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
        let opts = LoadOptions::single(Device::Cpu, Kind::Float);
        // no weights at all
        let e = InternVL::load(&tmp, &opts).err().unwrap().to_string();
        assert!(e.contains("no model.safetensors"), "{e}");
        // truncated shard
        let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        std::fs::write(tmp.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
        let e = InternVL::load(&tmp, &opts).err().unwrap().to_string();
        assert!(e.contains("model.safetensors: truncated or corrupt"), "{e}");
        // a config whose layer count disagrees with the weights
        std::fs::write(tmp.join("model.safetensors"), &bytes).unwrap();
        let cfg = std::fs::read_to_string(src.join("config.json"))
            .unwrap()
            .replace(
                "\"num_hidden_layers\": 2,\n    \"num_key_value_heads\"",
                "\"num_hidden_layers\": 3,\n    \"num_key_value_heads\"",
            );
        std::fs::write(tmp.join("config.json"), cfg).unwrap();
        let e = InternVL::load(&tmp, &opts).err().unwrap().to_string();
        assert!(
            e.contains("missing tensor language_model.model.layers.2.self_attn.q_proj.weight"),
            "{e}"
        );
        // a wrong hidden size: shapes quoted
        let cfg = std::fs::read_to_string(src.join("config.json"))
            .unwrap()
            .replace(
                "\"intermediate_size\": 64,\n    \"max_position",
                "\"intermediate_size\": 65,\n    \"max_position",
            );
        std::fs::write(tmp.join("config.json"), cfg).unwrap();
        let e = InternVL::load(&tmp, &opts).err().unwrap().to_string();
        assert!(
            e.contains("mlp.gate_proj.weight has shape [64, 32], expected [65, 32]"),
            "{e}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
