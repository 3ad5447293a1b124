//! `Qwen3MoeForCausalLM` (transformers 4.55 `modeling_qwen3_moe.py`), the decoder of
//! InternVL3.5-30B-A3B and -241B-A28B: Qwen3 attention, and in every sparse layer (see
//! [`LlmConfig::is_sparse_layer`]) a router `mlp.gate` [num_experts, hidden] over
//! `mlp.experts.N.{gate,up,down}_proj` of `moe_intermediate_size`; other layers keep a dense
//! `mlp.{gate,up,down}_proj` of `intermediate_size`.
use super::qwen2::{dense_mlp, load_with};
use super::qwen3::ATTENTION;
use super::{Dims, Ffn, LayerPlaces, Llm, Mlp, SparseMoe};
use crate::model::config::LlmConfig;
use crate::model::nn::Linear;
use crate::model::weights::Weights;

pub fn load(w: &mut Weights, places: &LayerPlaces, cfg: &LlmConfig) -> Llm {
    let experts = cfg.num_experts as i64;
    let expert_dims = Dims {
        inter: cfg.moe_intermediate_size as i64,
        ..Dims::of(cfg)
    };
    let hidden = cfg.hidden_size as i64;
    load_with(w, places, cfg, ATTENTION, &mut |w, p, l, i| {
        if !cfg.is_sparse_layer(i) {
            return dense_mlp(w, p, l, cfg);
        }
        // the router stays in the model's dtype (also with --load-8bit): it is tiny, and an
        // int8 router could choose other experts than the model's own weights do
        let router = crate::model::nn::Place {
            quant: crate::model::nn::Quant::None,
            ..p
        };
        Ffn::Moe(SparseMoe {
            gate: Linear::load(w, router, &format!("{l}.mlp.gate"), hidden, experts, false),
            experts: (0..cfg.num_experts)
                .map(|e| {
                    Mlp::load(
                        w,
                        p,
                        &format!("{l}.mlp.experts.{e}"),
                        ["gate_proj", "up_proj", "down_proj"],
                        &expert_dims,
                    )
                })
                .collect(),
            top_k: cfg.num_experts_per_tok as i64,
            norm_topk_prob: cfg.norm_topk_prob,
        })
    })
}
