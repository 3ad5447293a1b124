//! The decoder-only LLMs InternVL pairs with: Qwen2 (and Llama, the same without q/k/v bias),
//! Qwen3 (per-head q/k RMSNorm), Qwen3-MoE (Qwen3 attention, mixture-of-experts MLPs) and
//! InternLM2 (fused `wqkv`). One implementation; the per-family files only map checkpoint keys
//! onto it.
pub mod internlm2;
pub mod kv_cache;
pub mod native;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;
pub mod rope;

use super::attention;
use super::config::LlmConfig;
use super::nn::{Linear, Place, RmsNorm};
use super::weights::Weights;
use kv_cache::KvCache;
use rope::Rope;
use tch::{Device, Kind, Tensor};

/// How q, k and v come out of the hidden states.
pub enum Qkv {
    /// Qwen2/Llama: `q_proj`, `k_proj` and `v_proj` stacked into one linear layer whose output
    /// is `[q | k | v]` (one GEMV per token instead of three).
    Stacked(Linear),
    /// InternLM2: one `wqkv` whose output is laid out per key-value group as
    /// `[q_0 .. q_{g-1}, k, v]` for each of the `num_kv_heads` groups.
    Fused(Linear),
}

pub struct Attention {
    pub qkv: Qkv,
    pub o: Linear,
    /// Qwen3: `q_norm` and `k_norm`, RMSNorms over `head_dim` applied to each head's query and
    /// key before the rotary embedding.
    pub qk_norm: Option<[RmsNorm; 2]>,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
}

impl Attention {
    /// q [b, heads, q, d], k and v [b, kv_heads, q, d], with Qwen3's per-head norms applied.
    fn project(&self, xs: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (q, k, v) = self.project_raw(xs);
        match &self.qk_norm {
            // over the last (head_dim) axis, as `q_norm(q.view(*, heads, head_dim))` is
            Some([qn, kn]) => (qn.forward(&q), kn.forward(&k), v),
            None => (q, k, v),
        }
    }

    fn project_raw(&self, xs: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, q_len, _) = xs.size3().expect("decoder activations are 3-d");
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        match &self.qkv {
            Qkv::Stacked(qkv) => {
                let t = qkv.forward(xs);
                let part = |start, heads| {
                    t.narrow(-1, start * d, heads * d)
                        .view([b, q_len, heads, d])
                        .transpose(1, 2)
                };
                (part(0, h), part(h, kvh), part(h + kvh, kvh))
            }
            Qkv::Fused(wqkv) => {
                let groups = h / kvh;
                let t = wqkv.forward(xs).view([b, q_len, kvh, groups + 2, d]);
                let q = t.narrow(3, 0, groups).reshape([b, q_len, h, d]);
                let k = t.select(3, groups);
                let v = t.select(3, groups + 1);
                (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            }
        }
    }
}

/// The SwiGLU MLP, `down(silu(gate(x)) * up(x))`, with `gate` and `up` stacked into one linear
/// layer whose output is `[gate | up]`.
impl Attention {
    /// Attention of q [b, heads, q, d] over k, v [b, kv_heads, kv, d] with an optional boolean
    /// mask [1 or b, 1, q, kv]; [b, heads, q, d].
    ///
    /// Grouped-query attention as plain attention per key-value head: the `groups` query heads
    /// that share a key-value head are stacked along the query axis (head h uses key-value head
    /// h / groups, as `repeat_kv` has it), the mask repeated to match. libtorch's CPU SDPA with
    /// `enable_gqa` falls back to its math path (~10x slower for one query); this shape runs
    /// its flash kernel, without copying k and v.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, h, q_len, d) = q.size4().expect("queries are 4-d");
        let groups = self.num_heads / self.num_kv_heads;
        let kvh = self.num_kv_heads;
        let q = q.reshape([b, kvh, groups * q_len, d]);
        let mask = mask.map(|m| {
            if groups == 1 || q_len == 1 {
                m.shallow_clone()
            } else {
                let m = if m.dim() == 2 {
                    m.view([1, 1, q_len, -1])
                } else {
                    m.shallow_clone()
                };
                m.repeat([1, 1, groups, 1])
            }
        });
        let o =
            Tensor::scaled_dot_product_attention(&q, k, v, mask.as_ref(), 0.0, false, None, false);
        o.view([b, h, q_len, d])
    }
}

pub struct Mlp {
    pub gate_up: Linear,
    pub down: Linear,
    pub inter: i64,
}

impl Mlp {
    /// The MLP of layer `layer` (a key prefix) from its gate, up and down projections' names.
    pub(crate) fn load(
        w: &mut Weights,
        p: Place,
        layer: &str,
        [gate, up, down]: [&str; 3],
        d: &Dims,
    ) -> Self {
        Self {
            gate_up: Linear::load_stacked(
                w,
                p,
                &[
                    (&format!("{layer}.{gate}"), d.inter),
                    (&format!("{layer}.{up}"), d.inter),
                ],
                d.hidden,
                false,
            ),
            down: Linear::load(w, p, &format!("{layer}.{down}"), d.inter, d.hidden, false),
            inter: d.inter,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let t = self.gate_up.forward(xs);
        let gate = t.narrow(-1, 0, self.inter);
        let up = t.narrow(-1, self.inter, self.inter);
        self.down.forward(&(gate.silu() * up))
    }
}

/// Qwen3-MoE's `Qwen3MoeSparseMoeBlock`: a router (`gate`, no bias) whose softmax (in f32) picks
/// the `top_k` experts of each token, their weights renormalised to sum to one when
/// `norm_topk_prob`, cast to the activations' dtype; each chosen expert's SwiGLU output, times
/// its weight, is added into the token's output, experts in ascending order as the reference's
/// `index_add_` loop does. Only the chosen experts run, so decoding reads `top_k` experts'
/// weights per token, not all of them.
pub struct SparseMoe {
    pub gate: Linear,
    pub experts: Vec<Mlp>,
    pub top_k: i64,
    pub norm_topk_prob: bool,
}

impl SparseMoe {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let hidden = *size.last().expect("moe input has a last dim");
        let flat = xs.reshape([-1, hidden]);
        let probs = self.gate.forward(&flat).softmax(-1, Kind::Float);
        let (weights, chosen) = probs.topk(self.top_k, -1, true, true);
        let weights = if self.norm_topk_prob {
            &weights / weights.sum_dim_intlist(-1, true, Kind::Float)
        } else {
            weights
        };
        let weights = weights.to_kind(xs.kind()).view([-1]);
        // the routing decides which weights are read: it has to be known on the host
        let chosen: Vec<i64> =
            Vec::try_from(chosen.to_device(Device::Cpu).view([-1])).expect("expert ids are int64");
        let out = if flat.size()[0] == 1 {
            self.forward_one(&flat, &weights, &chosen)
        } else {
            self.forward_routed(&flat, &weights, &chosen)
        };
        out.view(size.as_slice())
    }

    /// The reference's loop: for each expert in ascending order, its tokens gathered, its
    /// output times their weights scatter-added into theirs.
    fn forward_routed(&self, flat: &Tensor, weights: &Tensor, chosen: &[i64]) -> Tensor {
        let k = self.top_k as usize;
        let mut out = flat.zeros_like();
        let dev = flat.device();
        for (e, expert) in self.experts.iter().enumerate() {
            // (token, slot) pairs routed to expert e; a token picks an expert at most once
            let slots: Vec<i64> = (0..chosen.len())
                .filter(|&i| chosen[i] == e as i64)
                .map(|i| i as i64)
                .collect();
            if slots.is_empty() {
                continue;
            }
            let slots_t = Tensor::from_slice(&slots).to_device(dev);
            let tokens_t =
                Tensor::from_slice(&slots.iter().map(|&i| i / k as i64).collect::<Vec<_>>())
                    .to_device(dev);
            let ys = expert.forward(&flat.index_select(0, &tokens_t))
                * weights.index_select(0, &slots_t).unsqueeze(-1);
            let _ = out.index_add_(0, &tokens_t, &ys);
        }
        out
    }
}

impl SparseMoe {
    /// One token (a decoding step): the chosen experts on the row itself, each output times its
    /// weight (a value of the activations' dtype, as the reference's cast weights are) added in
    /// ascending expert order, so the result is bit for bit the gather/scatter path's, without
    /// its index tensors, gathers and scatter-adds.
    fn forward_one(&self, row: &Tensor, weights: &Tensor, chosen: &[i64]) -> Tensor {
        let weights: Vec<f64> = Vec::try_from(weights.to_device(Device::Cpu).to_kind(Kind::Double))
            .expect("routing weights convert to f64");
        let mut order: Vec<(i64, f64)> = chosen.iter().copied().zip(weights).collect();
        order.sort_by_key(|&(e, _)| e);
        let mut out: Option<Tensor> = None;
        for (e, w) in order {
            let y = self.experts[e as usize].forward(row) * w;
            out = Some(match out {
                None => y,
                Some(acc) => acc + y,
            });
        }
        out.expect("top_k >= 1 experts")
    }
}

/// A decoder layer's feed-forward block.
pub enum Ffn {
    Dense(Mlp),
    Moe(SparseMoe),
}

impl Ffn {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Ffn::Dense(m) => m.forward(xs),
            Ffn::Moe(m) => m.forward(xs),
        }
    }
}

pub struct DecoderLayer {
    pub dev: Device,
    pub input_norm: RmsNorm,
    pub post_attn_norm: RmsNorm,
    pub attn: Attention,
    pub mlp: Ffn,
}

fn linear_tensors(l: &Linear) -> impl Iterator<Item = &Tensor> {
    std::iter::once(&l.weight).chain(l.bias.iter().chain(l.scale.iter()))
}

fn bytes_of<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> u64 {
    ts.into_iter()
        .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum()
}

impl DecoderLayer {
    fn attn_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.input_norm.weight, &self.post_attn_norm.weight];
        if let Some([qn, kn]) = &self.attn.qk_norm {
            v.extend([&qn.weight, &kn.weight]);
        }
        let qkv = match &self.attn.qkv {
            Qkv::Stacked(l) | Qkv::Fused(l) => l,
        };
        v.extend(linear_tensors(qkv).chain(linear_tensors(&self.attn.o)));
        v
    }

    /// Every weight of the layer (every expert of a mixture-of-experts layer).
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut v = self.attn_tensors();
        match &self.mlp {
            Ffn::Dense(m) => v.extend(linear_tensors(&m.gate_up).chain(linear_tensors(&m.down))),
            Ffn::Moe(moe) => {
                v.extend(linear_tensors(&moe.gate));
                for m in &moe.experts {
                    v.extend(linear_tensors(&m.gate_up).chain(linear_tensors(&m.down)));
                }
            }
        }
        v
    }

    /// Bytes of weights one decoding step of one token reads in this layer: everything but
    /// the experts the router did not choose (`top_k` of them are read).
    pub fn bytes_read_per_token(&self) -> u64 {
        match &self.mlp {
            Ffn::Dense(_) => bytes_of(self.tensors()),
            Ffn::Moe(moe) => {
                let expert = moe.experts.first().map_or(0, |m| {
                    bytes_of(linear_tensors(&m.gate_up).chain(linear_tensors(&m.down)))
                });
                bytes_of(self.attn_tensors())
                    + bytes_of(linear_tensors(&moe.gate))
                    + expert * moe.top_k as u64
            }
        }
    }
}

/// Which keys may be attended to, for one forward pass.
pub enum Mask {
    /// Every query sees every cached key and the keys before it (a single sequence).
    Causal,
    /// [b, 1, q, kv] booleans, true where attending is allowed (left-padded batches).
    Explicit(Tensor),
}

pub struct Llm {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub rope: Rope,
    pub kind: Kind,
    pub hidden: i64,
    pub vocab: i64,
}

impl Llm {
    /// Bytes of weights one decoding step of one token reads: every layer's (the routed experts
    /// only, in a mixture of experts) and the output head's; embeddings are gathered, not read.
    pub fn bytes_read_per_token(&self) -> u64 {
        self.layers
            .iter()
            .map(DecoderLayer::bytes_read_per_token)
            .sum::<u64>()
            + bytes_of(linear_tensors(&self.lm_head))
    }

    /// Token ids [b, n] -> embeddings [b, n, hidden] on the embedding's device.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(
            &self.embed_tokens,
            &ids.to_device(self.embed_tokens.device()),
            -1,
            false,
            false,
        )
    }

    /// For the decoding steps of `rows` sequences (or a prompt of `rows` new positions):
    /// libtorch on one thread while the matrix-vector products use gemv's threads, where gemv
    /// takes them (bf16 on the CPU, at most [`super::gemv::MAX_ROWS`] rows); `None` elsewhere.
    pub fn decoding_threads(&self, rows: usize) -> Option<super::gemv::TorchSingleThreaded> {
        (rows <= super::gemv::MAX_ROWS
            && self.kind == Kind::BFloat16
            && self.embed_tokens.device() == Device::Cpu
            && self.layers.iter().all(|l| l.dev == Device::Cpu))
        .then(super::gemv::TorchSingleThreaded::new)
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Runs the decoder over `embeds` [b, q, hidden] at `positions` [b, q], appending to `cache`;
    /// returns the final-normed hidden states [b, q, hidden].
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        cache: &mut KvCache,
        mask: &Mask,
    ) -> Tensor {
        self.run_layers(embeds, positions, cache, mask, true)
    }

    /// [`Llm::forward`] for a prompt: always libtorch's layers, even for a single new position
    /// (the last prompt token after a reused KV prefix), so a prompt's first logits do not depend
    /// on how much of it was cached; the native step is for generated tokens.
    pub fn prefill(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        cache: &mut KvCache,
        mask: &Mask,
    ) -> Tensor {
        // a prompt of a few new positions (a short follow-up question) multiplies on gemv's
        // threads, as a decoding step does, and its libtorch ops are as small: with libtorch on
        // two threads too, libgomp's threads spun after each parallel region (the MLP's
        // activation) on the cores gemv's needed, and 7 new positions took 0.14 s instead of 0.05
        let rows = embeds.size().iter().rev().skip(1).product::<i64>();
        let _threads = self.decoding_threads(rows as usize);
        self.run_layers(embeds, positions, cache, mask, false)
    }

    fn run_layers(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        cache: &mut KvCache,
        mask: &Mask,
        native: bool,
    ) -> Tensor {
        let q_len = embeds.size()[1];
        let past = cache.len();
        let kv_len = past + q_len;
        let mut xs = embeds.shallow_clone();
        let seq_len = match self.rope.dynamic_flavor() {
            // transformers: `max(position_ids) + 1`; InternLM2's remote code: the key length
            Some(rope::DynamicFlavor::Hf) => positions.max().int64_value(&[]) + 1,
            _ => kv_len,
        };
        let base = self.rope.base_for(&mut cache.rope, seq_len);
        if native && q_len == 1 && self.native_decodes(embeds.size()[0] as usize) {
            return self.native_step(embeds, positions, cache, mask, base);
        }
        let mut rope_dev: Option<(Device, Tensor, Tensor, Option<Tensor>)> = None;
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            if rope_dev.as_ref().map(|r| r.0) != Some(layer.dev) {
                let (cos, sin) = self.rope.cos_sin(positions, base, self.kind, layer.dev);
                let m = match mask {
                    Mask::Causal if q_len == 1 => None,
                    Mask::Causal => Some(causal_mask(q_len, past, layer.dev)),
                    Mask::Explicit(m) => Some(m.to_device(layer.dev)),
                };
                rope_dev = Some((layer.dev, cos, sin, m));
            }
            let (_, cos, sin, m) = rope_dev.as_ref().expect("set above");
            xs = xs.to_device(layer.dev);
            let h = layer.input_norm.forward(&xs);
            let a = &layer.attn;
            let (q, k, v) = a.project(&h);
            let q = rope::apply(&q, cos, sin);
            let k = rope::apply(&k, cos, sin);
            let (k, v) = lc.append(&k, &v);
            let o =
                if matches!(mask, Mask::Causal) && (q_len > 1 || !native) && attention::applies(&q)
                {
                    // a prompt in bf16 on the CPU: our kernel sees only the keys each query may
                    // (libtorch's flash kernel computed every score under a dense mask). Every
                    // prompt, even one new position after a reused prefix: a query's bits do not
                    // depend on the queries beside it, so a prompt's first logits do not depend on
                    // how much of it was cached. (A decoding step's one query keeps libtorch's:
                    // the kernel would repack the whole cache for it.)
                    let scale = (a.head_dim as f64).powf(-0.5);
                    attention::attention_with(&q, &k, &v, scale, Some(past as usize))
                } else {
                    let o = a.attend(&q, &k, &v, m.as_ref());
                    let (b, _, _, _) = o.size4().expect("attention output is 4-d");
                    o.transpose(1, 2)
                        .reshape([b, q_len, a.num_heads * a.head_dim])
                };
            xs += a.o.forward(&o);
            let h = layer.post_attn_norm.forward(&xs);
            xs = &xs + layer.mlp.forward(&h);
        }
        self.norm.forward(&xs.to_device(self.norm.weight.device()))
    }

    /// Logits (f32) of the last position of each row: [b, vocab].
    pub fn last_logits(&self, hidden: &Tensor) -> Tensor {
        let q = hidden.size()[1];
        self.lm_head
            .forward(&hidden.narrow(1, q - 1, 1).squeeze_dim(1))
            .to_kind(Kind::Float)
    }
}

impl Llm {
    /// One decoding step of `tokens.len()` sequences of different lengths, each with its own
    /// KV cache (`caches[i]` for `tokens[i]`, at position `caches[i].len()`): the linear layers
    /// run over all rows' tokens at once, attention per row over its own cache, the rope per
    /// row with its own (dynamic) base. Each cache grows by one position; returns the logits
    /// (f32) [n, vocab]. A row gets what [`Llm::forward`] gives it alone, up to the rounding of
    /// products over n rows instead of one.
    pub fn decode_rows(&self, caches: &mut [&mut KvCache], tokens: &[i64]) -> Tensor {
        let n = tokens.len() as i64;
        assert_eq!(caches.len(), tokens.len(), "one cache per row");
        if self.native_decodes(tokens.len()) {
            return self.last_logits(&self.native_rows(caches, tokens));
        }
        let positions: Vec<i64> = caches.iter().map(|c| c.len()).collect();
        // the reference's sequence length for the dynamic base: the key length, which for one
        // new token is also `max(position_ids) + 1`
        let bases: Vec<f64> = caches
            .iter_mut()
            .zip(&positions)
            .map(|(c, &p)| self.rope.base_for(&mut c.rope, p + 1))
            .collect();
        let mut xs = self.embed(&Tensor::from_slice(tokens).view([n, 1]));
        let mut rope_dev: Option<(Device, Tensor, Tensor)> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if rope_dev.as_ref().map(|r| r.0) != Some(layer.dev) {
                let (cos, sin) = if bases.iter().all(|&b| b == bases[0]) {
                    let pos = Tensor::from_slice(&positions).view([n, 1]);
                    self.rope.cos_sin(&pos, bases[0], self.kind, layer.dev)
                } else {
                    let (cos, sin): (Vec<Tensor>, Vec<Tensor>) = positions
                        .iter()
                        .zip(&bases)
                        .map(|(&p, &b)| {
                            let pos = Tensor::from_slice(&[p]).view([1, 1]);
                            self.rope.cos_sin(&pos, b, self.kind, layer.dev)
                        })
                        .unzip();
                    (Tensor::cat(&cos, 0), Tensor::cat(&sin, 0))
                };
                rope_dev = Some((layer.dev, cos, sin));
            }
            let (_, cos, sin) = rope_dev.as_ref().expect("set above");
            xs = xs.to_device(layer.dev);
            let h = layer.input_norm.forward(&xs);
            let a = &layer.attn;
            let (q, k, v) = a.project(&h);
            let q = rope::apply(&q, cos, sin);
            let k = rope::apply(&k, cos, sin);
            let outs: Vec<Tensor> = caches
                .iter_mut()
                .enumerate()
                .map(|(r, c)| {
                    let r = r as i64;
                    let (kr, vr) = c.layers[i].append(&k.narrow(0, r, 1), &v.narrow(0, r, 1));
                    a.attend(&q.narrow(0, r, 1), &kr, &vr, None)
                })
                .collect();
            let o = Tensor::cat(&outs, 0)
                .transpose(1, 2)
                .reshape([n, 1, a.num_heads * a.head_dim]);
            xs += a.o.forward(&o);
            let h = layer.post_attn_norm.forward(&xs);
            xs = &xs + layer.mlp.forward(&h);
        }
        let hidden = self.norm.forward(&xs.to_device(self.norm.weight.device()));
        self.last_logits(&hidden)
    }
}

/// [q, past + q] booleans: query i (absolute position past + i) sees keys 0..=past + i.
pub(crate) fn causal_mask(q_len: i64, past: i64, dev: Device) -> Tensor {
    let rows = Tensor::arange(q_len, (Kind::Int64, dev)).unsqueeze(1) + past;
    let cols = Tensor::arange(past + q_len, (Kind::Int64, dev)).unsqueeze(0);
    cols.le_tensor(&rows)
}

/// Attention mask for a left-padded batch: `valid` [b, kv] (true for real tokens), `q_len`
/// newest positions queried. Pad queries may see themselves so no softmax row is empty.
pub fn padded_mask(valid: &Tensor, q_len: i64) -> Tensor {
    let kv = valid.size()[1];
    let dev = valid.device();
    let causal = causal_mask(q_len, kv - q_len, dev).unsqueeze(0);
    let keys = valid.unsqueeze(1);
    let own = Tensor::arange(kv, (Kind::Int64, dev))
        .unsqueeze(0)
        .eq_tensor(&(Tensor::arange(q_len, (Kind::Int64, dev)).unsqueeze(1) + (kv - q_len)))
        .unsqueeze(0);
    (causal.logical_and(&keys)).logical_or(&own).unsqueeze(1)
}

/// Common shapes for the loaders.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub hidden: i64,
    pub inter: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub vocab: i64,
}

impl Dims {
    pub fn of(cfg: &LlmConfig) -> Self {
        Self {
            hidden: cfg.hidden_size as i64,
            inter: cfg.intermediate_size as i64,
            heads: cfg.num_attention_heads as i64,
            kv_heads: cfg.num_kv_heads() as i64,
            head_dim: cfg.head_dim() as i64,
            vocab: cfg.vocab_size as i64,
        }
    }
}

/// Places each decoder layer on its device; the rest (embeddings, norm, head) on `first`.
pub struct LayerPlaces<'a> {
    pub first: Place,
    pub layers: &'a [Device],
    /// How the decoder layers' linear weights are kept.
    pub quant: super::nn::Quant,
    /// How the output head's weight is kept.
    pub head: super::nn::Quant,
}

impl LayerPlaces<'_> {
    /// The output head's place: `first`, in the head's format, its weight in our memory.
    pub fn head(&self) -> Place {
        Place {
            quant: self.head,
            owned: true,
            ..self.first
        }
    }

    /// The output head: `name`'s weight [vocab, hidden], or a copy of the tied `embed_tokens`
    /// (quantized when the head is; the embeddings stay as they are for the lookup).
    pub(crate) fn load_head(
        &self,
        w: &mut Weights,
        name: &str,
        tied: Option<&Tensor>,
        hidden: i64,
        vocab: i64,
    ) -> Linear {
        match tied {
            // a copy in our memory (the embeddings stay mapped for the lookup)
            Some(embed) if self.head == super::nn::Quant::None => {
                Linear::dense(w.own(embed.shallow_clone()), None)
            }
            Some(embed) => Linear::quantized(embed, self.head()),
            None => Linear::load(w, self.head(), name, hidden, vocab, false),
        }
    }

    /// Layer `i`'s place, its dense CPU weights in our memory ([`Place::owned`]).
    pub fn layer(&self, i: usize) -> Place {
        Place {
            dev: self.layers.get(i).copied().unwrap_or(self.first.dev),
            kind: self.first.kind,
            quant: self.quant,
            owned: true,
        }
    }
}

impl DecoderLayer {
    /// A layer on `p.dev` with its two RMSNorms loaded by name.
    pub(crate) fn with_norms(
        w: &mut Weights,
        p: Place,
        names: [&str; 2],
        cfg: &LlmConfig,
        attn: Attention,
        mlp: Ffn,
    ) -> Self {
        let dim = cfg.hidden_size as i64;
        Self {
            dev: p.dev,
            input_norm: RmsNorm::load(w, p, names[0], dim, cfg.rms_norm_eps),
            post_attn_norm: RmsNorm::load(w, p, names[1], dim, cfg.rms_norm_eps),
            attn,
            mlp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grouped-query attention stacked per key-value head equals the reference's `repeat_kv`
    /// then softmax(q k^T / sqrt(d) + mask) v, with a causal mask over past keys, a batch mask,
    /// and one query.
    #[test]
    fn grouped_attention_equals_repeat_kv() {
        tch::manual_seed(6);
        let (b, kvh, groups, d) = (2i64, 2i64, 3i64, 8i64);
        let a = Attention {
            qkv: Qkv::Fused(Linear::dense(
                Tensor::zeros([1, 1], (Kind::Float, Device::Cpu)),
                None,
            )),
            o: Linear::dense(Tensor::zeros([1, 1], (Kind::Float, Device::Cpu)), None),
            qk_norm: None,
            num_heads: kvh * groups,
            num_kv_heads: kvh,
            head_dim: d,
        };
        let reference = |q: &Tensor, k: &Tensor, v: &Tensor, m: &Tensor| {
            let k = k.repeat_interleave_self_int(groups, 1, None);
            let v = v.repeat_interleave_self_int(groups, 1, None);
            let scores = q.matmul(&k.transpose(-1, -2)) / (d as f64).sqrt();
            let scores = scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY);
            scores.softmax(-1, Kind::Float).matmul(&v)
        };
        let f = (Kind::Float, Device::Cpu);
        for (q_len, past) in [(4i64, 2i64), (1, 5)] {
            let kv = q_len + past;
            let q = Tensor::randn([b, kvh * groups, q_len, d], f);
            let k = Tensor::randn([b, kvh, kv, d], f);
            let v = Tensor::randn([b, kvh, kv, d], f);
            let causal = causal_mask(q_len, past, Device::Cpu);
            let valid = Tensor::ones([b, kv], (Kind::Bool, Device::Cpu));
            let _ = valid.get(0).narrow(0, 0, 1).fill_(0);
            for m in [
                causal.shallow_clone(),
                causal.view([1, 1, q_len, kv]),
                padded_mask(&valid, q_len),
            ] {
                let got = a.attend(&q, &k, &v, Some(&m));
                let want = reference(&q, &k, &v, &m);
                let diff = (got - want).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "q_len {q_len}: {diff}");
            }
        }
    }

    /// A decoding step's single-token expert path gives bit for bit what the gather/scatter
    /// path gives for that token (in bf16 and f32), and that path what transformers'
    /// `Qwen3MoeSparseMoeBlock` computes, written out here with dense per-expert products.
    #[test]
    fn moe_single_token_path_is_the_reference_loop() {
        tch::manual_seed(9);
        let (hidden, inter, n_exp) = (16i64, 12i64, 8usize);
        for kind in [Kind::Float, Kind::BFloat16] {
            let f = (kind, Device::Cpu);
            let lin = |o, i| Linear::dense(Tensor::randn([o, i], f) * 0.3, None);
            let moe = SparseMoe {
                gate: lin(n_exp as i64, hidden),
                experts: (0..n_exp)
                    .map(|_| Mlp {
                        gate_up: lin(2 * inter, hidden),
                        down: lin(hidden, inter),
                        inter,
                    })
                    .collect(),
                top_k: 2,
                norm_topk_prob: true,
            };
            let xs = Tensor::randn([1, 5, hidden], f);
            let batched = moe.forward(&xs);
            for t in 0..5 {
                let row = xs.narrow(1, t, 1);
                let one = moe.forward(&row);
                // the same token through the gather/scatter loop: bit for bit
                let flat = row.view([1, hidden]);
                let p = moe.gate.forward(&flat).softmax(-1, Kind::Float);
                let (rw, rc) = p.topk(2, -1, true, true);
                let rw = (&rw / rw.sum_dim_intlist(-1, true, Kind::Float)).to_kind(kind);
                let rc: Vec<i64> = Vec::try_from(rc.view([-1])).unwrap();
                let routed = moe.forward_routed(&flat, &rw.view([-1]), &rc);
                assert!(one.view([1, hidden]).equal(&routed), "{kind:?} token {t}");
                // and with the other tokens (other GEMM shapes): rounding apart only
                let tol = if kind == Kind::Float { 1e-5 } else { 0.05 };
                let d = (&one - batched.narrow(1, t, 1))
                    .to_kind(Kind::Float)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(d <= tol, "{kind:?} token {t}: {d}");
                // the reference written out: its two experts in ascending order, each output
                // times its (cast) weight, summed from zero
                let mut pairs: Vec<(i64, i64)> = rc.iter().copied().zip(0..).collect();
                pairs.sort();
                let mut want = flat.zeros_like();
                for (e, s) in pairs {
                    want += moe.experts[e as usize].forward(&flat) * rw.get(0).get(s);
                }
                let d = (one.view([1, hidden]).to_kind(Kind::Float) - want.to_kind(Kind::Float))
                    .abs()
                    .max()
                    .double_value(&[]);
                assert_eq!(d, 0.0, "{kind:?} token {t}");
            }
        }
    }

    #[test]
    fn causal_mask_with_past_keys() {
        let m = causal_mask(2, 3, Device::Cpu);
        let got: Vec<bool> = Vec::try_from(m.flatten(0, -1)).unwrap();
        #[rustfmt::skip]
        assert_eq!(got, vec![
            true, true, true, true, false,
            true, true, true, true, true,
        ]);
    }

    #[test]
    fn padded_mask_hides_left_padding_and_keeps_pad_rows_finite() {
        let valid = Tensor::from_slice(&[false, true, true, true, true, true]).view([2, 3]);
        let m = padded_mask(&valid, 3);
        assert_eq!(m.size(), [2, 1, 3, 3]);
        let got: Vec<bool> = Vec::try_from(m.flatten(0, -1)).unwrap();
        #[rustfmt::skip]
        assert_eq!(got, vec![
            true, false, false,   // pad query sees only itself
            false, true, false,
            false, true, true,
            true, false, false,
            true, true, false,
            true, true, true,
        ]);
    }
}
