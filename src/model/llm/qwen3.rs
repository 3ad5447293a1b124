//! `Qwen3ForCausalLM` (transformers 4.55 `modeling_qwen3.py`), the decoder of the dense
//! InternVL3.5 models: Qwen2's layout without q/k/v bias, an explicit `head_dim` (the q/k/v
//! widths need not equal `hidden_size`), and `self_attn.q_norm` / `self_attn.k_norm`, RMSNorms
//! over `head_dim` applied to every head's query and key before the rotary embedding.
//! Embeddings tied or not as the config and the checkpoint say.
use super::qwen2::{dense_mlp, load_with, AttnKind};
use super::{LayerPlaces, Llm};
use crate::model::config::LlmConfig;
use crate::model::weights::Weights;

/// The attention of every Qwen3 decoder layer (dense or mixture-of-experts).
pub(crate) const ATTENTION: AttnKind = AttnKind {
    qkv_bias: false,
    o_bias: false,
    qk_norm: true,
};

pub fn load(w: &mut Weights, places: &LayerPlaces, cfg: &LlmConfig) -> Llm {
    load_with(w, places, cfg, ATTENTION, &mut |w, p, l, _| {
        dense_mlp(w, p, l, cfg)
    })
}
