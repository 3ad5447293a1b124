//! `Qwen2ForCausalLM` (transformers 4.47 `modeling_qwen2.py`) and `LlamaForCausalLM`, which is
//! the same graph without q/k/v biases: checkpoint keys onto [`super::Llm`]. The Qwen3 and
//! Qwen3-MoE loaders reuse [`load_with`] (same key names, their own attention norms and MLPs).
use super::rope::{DynamicFlavor, Rope};
use super::{Attention, DecoderLayer, Dims, Ffn, LayerPlaces, Llm, Mlp, Qkv};
use crate::model::config::LlmConfig;
use crate::model::nn::{Linear, Place, RmsNorm};
use crate::model::weights::Weights;

/// `qkv_bias`: true for Qwen2, `attention_bias` for Llama.
pub fn load(
    w: &mut Weights,
    places: &LayerPlaces,
    cfg: &LlmConfig,
    qkv_bias: bool,
    o_bias: bool,
) -> Llm {
    let attn = AttnKind {
        qkv_bias,
        o_bias,
        qk_norm: false,
    };
    load_with(w, places, cfg, attn, &mut |w, p, l, _| {
        dense_mlp(w, p, l, cfg)
    })
}

/// The attention variant of a Qwen-style decoder layer.
#[derive(Clone, Copy)]
pub(crate) struct AttnKind {
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// Qwen3's `self_attn.q_norm` / `self_attn.k_norm` over `head_dim`.
    pub qk_norm: bool,
}

/// The SwiGLU MLP of layer prefix `l` (`mlp.{gate,up,down}_proj`), of `intermediate_size`.
pub(crate) fn dense_mlp(w: &mut Weights, p: Place, l: &str, cfg: &LlmConfig) -> Ffn {
    Ffn::Dense(Mlp::load(
        w,
        p,
        l,
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        &Dims::of(cfg),
    ))
}

/// A Qwen-layout decoder (`language_model.model.*`, `language_model.lm_head`) whose layer `i`
/// (key prefix `l`) gets its feed-forward block from `ffn(w, place, l, i)`.
pub(crate) fn load_with(
    w: &mut Weights,
    places: &LayerPlaces,
    cfg: &LlmConfig,
    kind: AttnKind,
    ffn: &mut dyn FnMut(&mut Weights, Place, &str, usize) -> Ffn,
) -> Llm {
    let d = Dims::of(cfg);
    let pre = "language_model.model";
    let first = places.first;
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| {
            let p = places.layer(i);
            let l = format!("{pre}.layers.{i}");
            let head_norm = |w: &mut Weights, n: &str| {
                RmsNorm::load(
                    w,
                    p,
                    &format!("{l}.self_attn.{n}.weight"),
                    d.head_dim,
                    cfg.rms_norm_eps,
                )
            };
            let attn = Attention {
                qkv: Qkv::Stacked(Linear::load_stacked(
                    w,
                    p,
                    &[
                        (&format!("{l}.self_attn.q_proj"), d.heads * d.head_dim),
                        (&format!("{l}.self_attn.k_proj"), d.kv_heads * d.head_dim),
                        (&format!("{l}.self_attn.v_proj"), d.kv_heads * d.head_dim),
                    ],
                    d.hidden,
                    kind.qkv_bias,
                )),
                o: Linear::load(
                    w,
                    p,
                    &format!("{l}.self_attn.o_proj"),
                    d.heads * d.head_dim,
                    d.hidden,
                    kind.o_bias,
                ),
                qk_norm: kind
                    .qk_norm
                    .then(|| [head_norm(w, "q_norm"), head_norm(w, "k_norm")]),
                num_heads: d.heads,
                num_kv_heads: d.kv_heads,
                head_dim: d.head_dim,
            };
            let mlp = ffn(w, p, &l, i);
            DecoderLayer::with_norms(
                w,
                p,
                [
                    &format!("{l}.input_layernorm.weight"),
                    &format!("{l}.post_attention_layernorm.weight"),
                ],
                cfg,
                attn,
                mlp,
            )
        })
        .collect();
    let embed_tokens = first.get(
        w,
        &format!("{pre}.embed_tokens.weight"),
        &[d.vocab, d.hidden],
    );
    let tied = cfg.tie_word_embeddings && !w.contains("language_model.lm_head.weight");
    let lm_head = places.load_head(
        w,
        "language_model.lm_head",
        tied.then_some(&embed_tokens),
        d.hidden,
        d.vocab,
    );
    Llm {
        embed_tokens,
        layers,
        norm: RmsNorm::load(
            w,
            first,
            &format!("{pre}.norm.weight"),
            d.hidden,
            cfg.rms_norm_eps,
        ),
        lm_head,
        rope: Rope::new(
            d.head_dim as usize,
            cfg.rope_theta,
            cfg.max_position_embeddings,
            cfg.dynamic_rope_factor().map(|f| (f, DynamicFlavor::Hf)),
        ),
        kind: first.kind,
        hidden: d.hidden,
        vocab: d.vocab,
    }
}
