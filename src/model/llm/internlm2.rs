//! `InternLM2ForCausalLM` (the remote-code `modeling_internlm2.py` shipped with InternVL):
//! checkpoint keys onto [`super::Llm`], with the fused `wqkv` and InternLM2's dynamic NTK rope.
use super::rope::{DynamicFlavor, Rope};
use super::{Attention, DecoderLayer, Dims, Ffn, LayerPlaces, Llm, Mlp, Qkv};
use crate::model::config::LlmConfig;
use crate::model::nn::{Linear, RmsNorm};
use crate::model::weights::Weights;

pub fn load(w: &mut Weights, places: &LayerPlaces, cfg: &LlmConfig) -> Llm {
    let d = Dims::of(cfg);
    let pre = "language_model.model";
    let first = places.first;
    let groups = d.heads / d.kv_heads;
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| {
            let p = places.layer(i);
            let l = format!("{pre}.layers.{i}");
            let lin = |w: &mut Weights, n: &str, din, dout, bias| {
                Linear::load(w, p, &format!("{l}.{n}"), din, dout, bias)
            };
            let attn = Attention {
                qkv: Qkv::Fused(lin(
                    w,
                    "attention.wqkv",
                    d.hidden,
                    d.kv_heads * (groups + 2) * d.head_dim,
                    cfg.bias,
                )),
                o: lin(w, "attention.wo", d.heads * d.head_dim, d.hidden, cfg.bias),
                qk_norm: None,
                num_heads: d.heads,
                num_kv_heads: d.kv_heads,
                head_dim: d.head_dim,
            };
            let mlp = Ffn::Dense(Mlp::load(
                w,
                p,
                &l,
                ["feed_forward.w1", "feed_forward.w3", "feed_forward.w2"],
                &d,
            ));
            DecoderLayer::with_norms(
                w,
                p,
                [
                    &format!("{l}.attention_norm.weight"),
                    &format!("{l}.ffn_norm.weight"),
                ],
                cfg,
                attn,
                mlp,
            )
        })
        .collect();
    Llm {
        embed_tokens: first.get(
            w,
            &format!("{pre}.tok_embeddings.weight"),
            &[d.vocab, d.hidden],
        ),
        layers,
        norm: RmsNorm::load(
            w,
            first,
            &format!("{pre}.norm.weight"),
            d.hidden,
            cfg.rms_norm_eps,
        ),
        lm_head: places.load_head(w, "language_model.output", None, d.hidden, d.vocab),
        rope: Rope::new(
            d.head_dim as usize,
            cfg.rope_theta,
            cfg.max_position_embeddings,
            cfg.dynamic_rope_factor()
                .map(|f| (f, DynamicFlavor::InternLM2)),
        ),
        kind: first.kind,
        hidden: d.hidden,
        vocab: d.vocab,
    }
}
