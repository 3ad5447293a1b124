//! `config.json` of an `internvl_chat` checkpoint (reference: `configuration_internvl_chat.py`,
//! `configuration_intern_vit.py`, and the LLM configs it embeds).
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not found (is this an InternVL checkpoint folder?)")]
    Missing { path: PathBuf },
    #[error("{path}: invalid config.json: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: model_type is {found:?}, expected \"internvl_chat\" (is this an InternVL checkpoint folder?)")]
    ModelType { path: PathBuf, found: String },
    #[error("{path}: unsupported LLM architecture {found:?}; supported: {}", SUPPORTED_LLMS.join(", "))]
    Architecture { path: PathBuf, found: String },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

pub const SUPPORTED_LLMS: &[&str] = &[
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "InternLM2ForCausalLM",
    "LlamaForCausalLM",
];

/// The LLM families we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmArch {
    Qwen2,
    /// InternVL3.5's dense decoders: Qwen2 without q/k/v bias, with per-head `q_norm`/`k_norm`.
    Qwen3,
    /// InternVL3.5-30B-A3B / 241B-A28B: Qwen3 attention, mixture-of-experts MLPs.
    Qwen3Moe,
    InternLM2,
    Llama,
}

fn default_select_layer() -> i64 {
    -1
}
fn default_downsample() -> f64 {
    0.5
}
fn default_ps_version() -> String {
    "v1".into()
}
fn default_true() -> bool {
    true
}
fn default_min_patch() -> usize {
    1
}
fn default_max_patch() -> usize {
    12
}

/// How a checkpoint folder is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// OpenGVLab's `internvl_chat` remote code (`model_type` `internvl_chat`): the model card's
    /// `chat()`, conversation templates and preprocessing.
    #[default]
    RemoteCode,
    /// transformers' own `InternVLForConditionalGeneration` (`model_type` `internvl`, the `-hf`
    /// repositories): the checkpoint's chat template, `InternVLProcessor` and its image and
    /// video processors.
    Hf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InternVLConfig {
    #[serde(default)]
    pub model_type: String,
    /// Which layout the folder has (from `model_type` / `architectures`, never the folder name).
    #[serde(skip)]
    pub layout: Layout,
    /// -hf: `image_token_id`, the id of the token image features replace.
    #[serde(skip)]
    pub image_token_id: Option<i64>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default = "default_select_layer")]
    pub select_layer: i64,
    #[serde(default = "default_downsample")]
    pub downsample_ratio: f64,
    #[serde(default = "default_ps_version")]
    pub ps_version: String,
    #[serde(default)]
    pub force_image_size: Option<usize>,
    #[serde(default)]
    pub dynamic_image_size: bool,
    #[serde(default = "default_true")]
    pub use_thumbnail: bool,
    #[serde(default = "default_min_patch")]
    pub min_dynamic_patch: usize,
    #[serde(default = "default_max_patch")]
    pub max_dynamic_patch: usize,
    #[serde(default)]
    pub system_message: Option<String>,
    pub vision_config: VisionConfig,
    pub llm_config: LlmConfig,
}

fn default_norm_type() -> String {
    "rms_norm".into()
}
fn default_vit_eps() -> f64 {
    1e-6
}
fn default_channels() -> usize {
    3
}
fn default_one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub patch_size: usize,
    pub image_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_norm_type")]
    pub norm_type: String,
    #[serde(default)]
    pub qk_normalization: bool,
    #[serde(default)]
    pub qkv_bias: bool,
    #[serde(default = "default_vit_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_one")]
    pub initializer_factor: f64,
    /// -hf: q, k and v are separate projections (`attention.{q,k,v}_proj`).
    #[serde(skip)]
    pub split_qkv: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(default)]
    pub r#type: Option<String>,
    /// newer transformers name `type` this way (some configs carry both)
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    32768
}
fn default_sparse_step() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
pub struct LlmConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// InternLM2: bias on wqkv/wo.
    #[serde(default)]
    pub bias: bool,
    /// Llama: bias on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Qwen3-MoE: experts per sparse layer (0 or absent: a dense model).
    #[serde(default)]
    pub num_experts: usize,
    /// Qwen3-MoE: experts each token is routed to.
    #[serde(default)]
    pub num_experts_per_tok: usize,
    /// Qwen3-MoE: the intermediate size of each expert's MLP.
    #[serde(default)]
    pub moe_intermediate_size: usize,
    /// Qwen3-MoE: renormalise the top-k routing weights to sum to 1.
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Qwen3-MoE: every `decoder_sparse_step`-th layer is sparse (`(i + 1) % step == 0`).
    #[serde(default = "default_sparse_step")]
    pub decoder_sparse_step: usize,
    /// Qwen3-MoE: layers that keep a dense MLP whatever the step.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

impl LlmConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// Dynamic NTK rope scaling factor, when `rope_scaling.type == "dynamic"`.
    pub fn dynamic_rope_factor(&self) -> Option<f64> {
        let s = self.rope_scaling.as_ref()?;
        let t = s.r#type.as_deref().or(s.rope_type.as_deref());
        (t == Some("dynamic")).then(|| s.factor.unwrap_or(1.0))
    }

    /// The context window the model allows: `max_position_embeddings`, times the rope scaling
    /// factor where the rope scales dynamically (the reference then runs past the trained
    /// length with a grown rope base).
    pub fn context_window(&self) -> usize {
        let max = self.max_position_embeddings;
        match self.dynamic_rope_factor() {
            Some(f) if f > 1.0 => (max as f64 * f).floor() as usize,
            _ => max,
        }
    }

    /// Whether decoder layer `i` has a mixture-of-experts MLP (transformers'
    /// `Qwen3MoeDecoderLayer`: not in `mlp_only_layers`, experts present, and
    /// `(i + 1) % decoder_sparse_step == 0`).
    pub fn is_sparse_layer(&self, i: usize) -> bool {
        self.num_experts > 0
            && !self.mlp_only_layers.contains(&i)
            && self.decoder_sparse_step > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

impl InternVLConfig {
    /// Reads and validates `DIR/config.json` (or a config file given directly).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let path = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        if !path.exists() {
            return Err(ConfigError::Missing { path });
        }
        let text = crate::files::read_to_string(
            &path,
            crate::files::MAX_METADATA_BYTES,
            "a model's metadata file",
        )
        .map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        // model_type first, so another model's config gets the clearer message
        let raw: serde_json::Value =
            serde_json::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.into(),
                source,
            })?;
        let model_type = raw
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let hf_arch = raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x.as_str() == Some("InternVLForConditionalGeneration"))
            });
        if model_type == "internvl" || (model_type.is_empty() && hf_arch) {
            let cfg = hf::to_internvl(&raw, path)?;
            return Self::validate(cfg, path);
        }
        if model_type != "internvl_chat" {
            return Err(ConfigError::ModelType {
                path: path.into(),
                found: model_type,
            });
        }
        let cfg: Self = serde_json::from_value(raw).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        Self::validate(cfg, path)
    }

    fn validate(cfg: Self, path: &Path) -> Result<Self, ConfigError> {
        let arch = cfg.llm_arch_at(path)?;
        let invalid = |what: String| ConfigError::Invalid {
            path: path.into(),
            what,
        };
        let l = &cfg.llm_config;
        if arch == LlmArch::Qwen3Moe
            && (l.num_experts == 0
                || l.num_experts_per_tok == 0
                || l.num_experts_per_tok > l.num_experts
                || l.moe_intermediate_size == 0)
        {
            return Err(invalid(format!(
                "llm_config: a Qwen3-MoE decoder needs num_experts > 0, num_experts_per_tok in 1..=num_experts and moe_intermediate_size > 0 (got {}, {}, {})",
                l.num_experts, l.num_experts_per_tok, l.moe_intermediate_size
            )));
        }
        let v = &cfg.vision_config;
        if v.patch_size == 0 || !cfg.image_size().is_multiple_of(v.patch_size) {
            return Err(invalid(format!(
                "image size {} is not a multiple of patch size {}",
                cfg.image_size(),
                v.patch_size
            )));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(invalid(format!(
                "vision hidden_size {} not divisible by {} heads",
                v.hidden_size, v.num_attention_heads
            )));
        }
        let l = &cfg.llm_config;
        if l.num_attention_heads == 0
            || l.num_kv_heads() == 0
            || !l.num_attention_heads.is_multiple_of(l.num_kv_heads())
        {
            return Err(invalid(format!(
                "llm num_attention_heads {} not a multiple of num_key_value_heads {}",
                l.num_attention_heads,
                l.num_kv_heads()
            )));
        }
        if !(cfg.ps_version == "v1" || cfg.ps_version == "v2") {
            return Err(invalid(format!(
                "ps_version {:?} unknown (v1 or v2)",
                cfg.ps_version
            )));
        }
        let grid = cfg.image_size() / v.patch_size;
        let scaled = grid as f64 * cfg.downsample_ratio;
        if cfg.downsample_ratio <= 0.0 || scaled.fract() != 0.0 {
            return Err(invalid(format!(
                "downsample_ratio {} does not divide the {grid}x{grid} patch grid",
                cfg.downsample_ratio
            )));
        }
        let nl = v.num_hidden_layers as i64;
        if cfg.select_layer >= nl || cfg.select_layer < -nl - 1 {
            return Err(invalid(format!(
                "select_layer {} out of range for {} vision layers",
                cfg.select_layer, nl
            )));
        }
        Ok(cfg)
    }

    fn llm_arch_at(&self, path: &Path) -> Result<LlmArch, ConfigError> {
        let arch = self
            .llm_config
            .architectures
            .first()
            .cloned()
            .unwrap_or_default();
        match arch.as_str() {
            "Qwen2ForCausalLM" => Ok(LlmArch::Qwen2),
            "Qwen3ForCausalLM" => Ok(LlmArch::Qwen3),
            "Qwen3MoeForCausalLM" => Ok(LlmArch::Qwen3Moe),
            "InternLM2ForCausalLM" => Ok(LlmArch::InternLM2),
            "LlamaForCausalLM" => Ok(LlmArch::Llama),
            _ => Err(ConfigError::Architecture {
                path: path.into(),
                found: arch,
            }),
        }
    }

    pub fn llm_arch(&self) -> LlmArch {
        self.llm_arch_at(Path::new("config.json"))
            .expect("architecture validated in parse")
    }

    /// Tile size in pixels (`force_image_size` or the ViT's `image_size`).
    pub fn image_size(&self) -> usize {
        self.force_image_size
            .unwrap_or(self.vision_config.image_size)
    }

    /// LLM tokens per 448px tile: `(image_size // patch_size) ** 2 * downsample_ratio ** 2`.
    pub fn num_image_token(&self) -> usize {
        let grid = self.image_size() / self.vision_config.patch_size;
        ((grid * grid) as f64 * self.downsample_ratio * self.downsample_ratio) as usize
    }

    /// Tiling settings for the preprocessor.
    pub fn tile_config(&self) -> crate::preprocess::TileConfig {
        crate::preprocess::TileConfig {
            image_size: self.image_size() as u32,
            min_tiles: self.min_dynamic_patch as u32,
            max_tiles: if self.dynamic_image_size {
                self.max_dynamic_patch as u32
            } else {
                1
            },
            use_thumbnail: self.use_thumbnail,
            tokens_per_tile: self.num_image_token(),
            hf: None,
        }
    }

    /// [`InternVLConfig::tile_config`] of the checkpoint in `dir`: for an -hf one, its image
    /// and video processors' settings (`preprocessor_config.json`, ...).
    pub fn tile_config_in(
        &self,
        dir: &Path,
    ) -> Result<crate::preprocess::TileConfig, crate::preprocess::hf::HfConfigError> {
        match self.layout {
            Layout::RemoteCode => Ok(self.tile_config()),
            Layout::Hf => crate::preprocess::hf::tile_config(dir, self.tile_config()),
        }
    }

    pub fn template_name(&self) -> &str {
        self.template.as_deref().unwrap_or("internvl2_5")
    }
}

/// transformers' `InternVLConfig` (`model_type` `internvl`) in our terms.
mod hf {
    use super::*;
    use serde_json::Value;

    fn invalid(path: &Path, what: String) -> ConfigError {
        ConfigError::Invalid {
            path: path.into(),
            what,
        }
    }

    /// `image_size` / `patch_size`: an int or `[height, width]`; only squares are supported.
    fn square(v: &Value, field: &str, path: &Path) -> Result<usize, ConfigError> {
        let bad = |what: String| invalid(path, format!("vision_config.{field}: {what}"));
        match v {
            Value::Number(n) => n
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(n.to_string())),
            Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0]
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("{v}"))),
            Value::Null => Err(bad("missing".into())),
            _ => Err(bad(format!(
                "{v} is not square (only square sizes are supported)"
            ))),
        }
    }

    fn str_field<'a>(v: &'a Value, field: &str, default: &'a str) -> &'a str {
        v.get(field).and_then(Value::as_str).unwrap_or(default)
    }

    /// Maps `text_config` and `vision_config` onto the remote-code structs; every setting our
    /// implementation does not compute (another activation, feature strategy, pooling) is
    /// refused by name.
    pub fn to_internvl(raw: &Value, path: &Path) -> Result<InternVLConfig, ConfigError> {
        let need = |field: &str| {
            raw.get(field).filter(|v| v.is_object()).ok_or_else(|| {
                invalid(
                    path,
                    format!("{field} missing (an -hf InternVL config has one)"),
                )
            })
        };
        let text = need("text_config")?;
        let vision = need("vision_config")?;
        let parse_err = |field: &str, e: serde_json::Error| invalid(path, format!("{field}: {e}"));
        let mut llm: LlmConfig =
            serde_json::from_value(text.clone()).map_err(|e| parse_err("text_config", e))?;
        if llm.architectures.is_empty() {
            let arch = match str_field(text, "model_type", "") {
                "qwen2" => "Qwen2ForCausalLM",
                "qwen3" => "Qwen3ForCausalLM",
                "qwen3_moe" => "Qwen3MoeForCausalLM",
                "llama" => "LlamaForCausalLM",
                other => {
                    return Err(ConfigError::Architecture {
                        path: path.into(),
                        found: format!("text_config.model_type {other}"),
                    })
                }
            };
            llm.architectures = vec![arch.into()];
        }
        let act = str_field(vision, "hidden_act", "gelu");
        if act != "gelu" {
            return Err(invalid(
                path,
                format!("vision_config.hidden_act {act:?} is not supported (gelu)"),
            ));
        }
        for (field, want) in [
            ("projector_hidden_act", "gelu"),
            ("vision_feature_select_strategy", "default"),
        ] {
            let got = str_field(raw, field, want);
            if got != want {
                return Err(invalid(
                    path,
                    format!("{field} {got:?} is not supported ({want:?})"),
                ));
            }
        }
        for (field, want) in [
            ("use_mean_pooling", true),
            ("use_absolute_position_embeddings", true),
            ("use_mask_token", false),
        ] {
            let got = vision.get(field).and_then(Value::as_bool).unwrap_or(want);
            if got != want {
                return Err(invalid(
                    path,
                    format!("vision_config.{field} {got} is not supported ({want})"),
                ));
            }
        }
        let norm_type = str_field(vision, "norm_type", "layer_norm");
        if norm_type != "layer_norm" && norm_type != "rms_norm" {
            return Err(invalid(
                path,
                format!("vision_config.norm_type {norm_type:?} unknown (layer_norm or rms_norm)"),
            ));
        }
        let usize_field = |v: &Value, field: &str, what: &str| {
            v.get(field)
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .ok_or_else(|| invalid(path, format!("{what}.{field} missing or not a number")))
        };
        let vision_config = VisionConfig {
            hidden_size: usize_field(vision, "hidden_size", "vision_config")?,
            intermediate_size: usize_field(vision, "intermediate_size", "vision_config")?,
            num_attention_heads: usize_field(vision, "num_attention_heads", "vision_config")?,
            num_hidden_layers: usize_field(vision, "num_hidden_layers", "vision_config")?,
            patch_size: square(
                vision.get("patch_size").unwrap_or(&Value::Null),
                "patch_size",
                path,
            )?,
            image_size: square(
                vision.get("image_size").unwrap_or(&Value::Null),
                "image_size",
                path,
            )?,
            num_channels: vision
                .get("num_channels")
                .and_then(Value::as_u64)
                .unwrap_or(3) as usize,
            norm_type: norm_type.into(),
            qk_normalization: vision
                .get("use_qk_norm")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: vision
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            layer_norm_eps: vision
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            initializer_factor: 1.0,
            split_qkv: true,
        };
        let select_layer = match raw.get("vision_feature_layer") {
            None => -1,
            Some(v) => v.as_i64().ok_or_else(|| {
                invalid(
                    path,
                    format!("vision_feature_layer {v} is not supported (a single layer index)"),
                )
            })?,
        };
        let downsample_ratio = match raw.get("downsample_ratio") {
            None => 0.5,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| invalid(path, format!("downsample_ratio {v} is not a number")))?,
        };
        let image_token_id = raw
            .get("image_token_id")
            .and_then(Value::as_i64)
            .ok_or_else(|| invalid(path, "image_token_id missing or not a number".into()))?;
        let cfg = InternVLConfig {
            model_type: "internvl".into(),
            layout: Layout::Hf,
            image_token_id: Some(image_token_id),
            template: None,
            select_layer,
            downsample_ratio,
            // transformers' `pixel_shuffle` is the remote code's v2 (with the final transpose)
            ps_version: "v2".into(),
            force_image_size: None,
            // tiling is the processor's (preprocessor_config.json), not the model config's
            dynamic_image_size: true,
            use_thumbnail: true,
            min_dynamic_patch: 1,
            max_dynamic_patch: 12,
            system_message: None,
            vision_config,
            llm_config: llm,
        };
        if let Some(n) = raw.get("image_seq_length").and_then(Value::as_u64) {
            let grid = cfg.vision_config.image_size / cfg.vision_config.patch_size.max(1);
            let want = ((grid * grid) as f64 * downsample_ratio * downsample_ratio) as u64;
            if n != want {
                return Err(invalid(path, format!("image_seq_length {n} disagrees with the vision config, which gives {want} tokens per tile")));
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    #[test]
    fn every_fixture_config_parses() {
        for name in ["tiny-qwen2", "tiny-internlm2", "tiny-vit6b-qwen2"] {
            let cfg = InternVLConfig::load(&fixture(&format!("models/{name}"))).unwrap();
            assert_eq!(cfg.num_image_token(), 256, "{name}");
            assert_eq!(cfg.template_name(), "internvl2_5");
        }
        let dir = fixture("configs");
        let mut archs = std::collections::BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let cfg = InternVLConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(cfg.num_image_token(), 256);
            *archs.entry(format!("{:?}", cfg.llm_arch())).or_insert(0) += 1;
        }
        // InternVL2/2.5 (Qwen2, InternLM2), InternVL3 (Qwen2.5), InternVL3.5 (Qwen3, Qwen3-MoE)
        assert_eq!(
            archs.into_iter().collect::<Vec<_>>(),
            [
                ("InternLM2".to_string(), 5),
                ("Qwen2".to_string(), 8),
                ("Qwen3".to_string(), 6),
                ("Qwen3Moe".to_string(), 2)
            ]
        );
    }

    /// InternVL3 scales its rope dynamically (window = 2 x max positions), InternVL3.5 does not;
    /// the MoE layers are all sparse in the published configs.
    #[test]
    fn context_windows_and_sparse_layers() {
        let load = |n: &str| InternVLConfig::load(&fixture(n)).unwrap().llm_config;
        let c = load("configs/InternVL3-2B.config.json");
        assert_eq!(c.dynamic_rope_factor(), Some(2.0));
        assert_eq!(c.context_window(), 2 * c.max_position_embeddings);
        let c = load("configs/InternVL3_5-8B.config.json");
        assert_eq!(c.context_window(), 40960);
        let c = load("configs/InternVL3_5-30B-A3B.config.json");
        assert_eq!((c.num_experts, c.num_experts_per_tok), (128, 8));
        assert!((0..c.num_hidden_layers).all(|i| c.is_sparse_layer(i)));
        let c = load("models/tiny-qwen2-dyn");
        assert_eq!((c.max_position_embeddings, c.context_window()), (256, 512));
        let mut c = load("models/tiny-qwen3-moe");
        assert!(c.is_sparse_layer(0) && c.is_sparse_layer(1));
        c.decoder_sparse_step = 2;
        assert!(!c.is_sparse_layer(0) && c.is_sparse_layer(1));
        c.mlp_only_layers = vec![1];
        assert!(!c.is_sparse_layer(1));
        assert!(!load("models/tiny-qwen3").is_sparse_layer(0));
    }

    /// A config.json that is a FIFO or a directory is refused at once, naming what it is.
    #[test]
    fn a_config_that_is_not_a_regular_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("ivl-cfg-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("config.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = InternVLConfig::load(&dir).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("FIFO"), "{e}");
        std::fs::remove_file(&fifo).unwrap();
        std::fs::create_dir(&fifo).unwrap();
        let e = InternVLConfig::load(&dir).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The -hf layout is read from config.json (`model_type` `internvl`): text_config and
    /// vision_config map onto the remote-code structs; unsupported settings are refused by name.
    #[test]
    fn hf_configs_map_and_refuse_what_is_not_computed() {
        let dir = fixture("models/tiny-qwen2-hf");
        let c = InternVLConfig::load(&dir).unwrap();
        let r = InternVLConfig::load(&fixture("models/tiny-qwen2")).unwrap();
        assert_eq!(c.layout, Layout::Hf);
        assert_eq!(r.layout, Layout::RemoteCode);
        assert_eq!(c.image_token_id, Some(151667));
        assert_eq!(c.llm_arch(), LlmArch::Qwen2);
        assert_eq!((c.select_layer, c.ps_version.as_str()), (-1, "v2"));
        assert_eq!(c.num_image_token(), r.num_image_token());
        let (v, rv) = (&c.vision_config, &r.vision_config);
        assert_eq!(
            (
                v.hidden_size,
                v.num_hidden_layers,
                v.patch_size,
                v.image_size
            ),
            (
                rv.hidden_size,
                rv.num_hidden_layers,
                rv.patch_size,
                rv.image_size
            )
        );
        assert_eq!(
            (v.qkv_bias, v.qk_normalization, &v.norm_type),
            (true, false, &rv.norm_type)
        );
        assert!(v.split_qkv && !rv.split_qkv);
        assert_eq!(c.llm_config.hidden_size, r.llm_config.hidden_size);
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let p = Path::new("/m/config.json");
        // the layout comes from the architectures when model_type is absent
        let no_type = text.replace("\"model_type\": \"internvl\",", "");
        assert_eq!(
            InternVLConfig::parse(&no_type, p).unwrap().layout,
            Layout::Hf
        );
        for (from, to, says) in [
            (
                "\"projector_hidden_act\": \"gelu\"",
                "\"projector_hidden_act\": \"relu\"",
                "projector_hidden_act \"relu\" is not supported",
            ),
            (
                "\"vision_feature_select_strategy\": \"default\"",
                "\"vision_feature_select_strategy\": \"full\"",
                "vision_feature_select_strategy \"full\" is not supported",
            ),
            (
                "\"vision_feature_layer\": -1",
                "\"vision_feature_layer\": [-1, -2]",
                "vision_feature_layer [-1,-2] is not supported",
            ),
            (
                "\"vision_feature_layer\": -1",
                "\"vision_feature_layer\": 5",
                "select_layer 5 out of range",
            ),
            (
                "\"use_mean_pooling\": true",
                "\"use_mean_pooling\": false",
                "vision_config.use_mean_pooling false is not supported",
            ),
            ("\"image_token_id\": 151667,", "", "image_token_id missing"),
            (
                "\"image_seq_length\": 256",
                "\"image_seq_length\": 64",
                "image_seq_length 64 disagrees",
            ),
            ("\"text_config\"", "\"txt_config\"", "text_config missing"),
        ] {
            assert!(text.contains(from), "{from}");
            let e = InternVLConfig::parse(&text.replacen(from, to, 1), p)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("/m/config.json: ") && e.contains(says), "{e}");
        }
        let e = InternVLConfig::parse(&text.replace("\"Qwen2ForCausalLM\"", "\"GPT2\""), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"GPT2\""), "{e}");
    }

    #[test]
    fn a_moe_config_without_experts_is_refused() {
        let text = std::fs::read_to_string(fixture("models/tiny-qwen3-moe/config.json"))
            .unwrap()
            .replace("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9");
        let e = InternVLConfig::parse(&text, Path::new("/m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/m/config.json: llm_config: a Qwen3-MoE decoder needs"),
            "{e}"
        );
        assert!(e.contains("(got 8, 9, 12)"), "{e}");
    }

    #[test]
    fn archs_and_rope() {
        let q = InternVLConfig::load(&fixture("models/tiny-qwen2")).unwrap();
        assert_eq!(q.llm_arch(), LlmArch::Qwen2);
        assert_eq!(q.llm_config.dynamic_rope_factor(), None);
        let i = InternVLConfig::load(&fixture("models/tiny-internlm2")).unwrap();
        assert_eq!(i.llm_arch(), LlmArch::InternLM2);
        assert_eq!(i.llm_config.dynamic_rope_factor(), Some(2.0));
        assert_eq!(i.llm_config.head_dim(), 8);
    }

    #[test]
    fn wrong_model_type_and_arch_are_named() {
        let p = Path::new("/x/config.json");
        let e = InternVLConfig::parse(r#"{"model_type":"llava"}"#, p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/x/config.json: model_type is \"llava\", expected \"internvl_chat\" (is this an InternVL checkpoint folder?)"
        );
        let text = std::fs::read_to_string(fixture("models/tiny-qwen2/config.json"))
            .unwrap()
            .replace("Qwen2ForCausalLM", "MambaForCausalLM");
        let e = InternVLConfig::parse(&text, p).unwrap_err().to_string();
        assert!(
            e.contains("\"MambaForCausalLM\"") && e.contains("InternLM2ForCausalLM"),
            "{e}"
        );
        let e = InternVLConfig::parse("{", p).unwrap_err().to_string();
        assert!(e.starts_with("/x/config.json: invalid config.json"), "{e}");
    }
}
