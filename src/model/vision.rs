//! InternViT (reference: `modeling_intern_vit.py`): both the 300M variant (LayerNorm, qkv bias)
//! and the 6B variant (RMSNorm, qk-normalisation, no qkv bias), eager attention.
use super::config::VisionConfig;
use super::nn::{LayerNorm, Linear, Norm, Place, RmsNorm};
use super::weights::{MappedPages, Weights};
use tch::{Kind, Tensor};

fn load_norm(w: &mut Weights, p: Place, cfg: &VisionConfig, name: &str, dim: i64) -> Norm {
    if cfg.norm_type == "layer_norm" {
        Norm::Layer(LayerNorm::load(w, p, name, dim, cfg.layer_norm_eps))
    } else {
        Norm::Rms(RmsNorm::load(
            w,
            p,
            &format!("{name}.weight"),
            dim,
            cfg.layer_norm_eps,
        ))
    }
}

/// `InternVisionEmbeddings`: patch conv, class token, position embedding.
struct Embeddings {
    class_embedding: Tensor,
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    patch_size: i64,
    grid: i64,
    /// The embeddings' mapped weights.
    pages: MappedPages,
}

impl Embeddings {
    fn load(w: &mut Weights, p: Place, cfg: &VisionConfig) -> Self {
        let d = cfg.hidden_size as i64;
        let ps = cfg.patch_size as i64;
        let grid = (cfg.image_size / cfg.patch_size) as i64;
        let pre = "vision_model.embeddings";
        Self {
            class_embedding: p.get(w, &format!("{pre}.class_embedding"), &[1, 1, d]),
            patch_weight: p.get(
                w,
                &format!("{pre}.patch_embedding.weight"),
                &[d, cfg.num_channels as i64, ps, ps],
            ),
            patch_bias: p.get(w, &format!("{pre}.patch_embedding.bias"), &[d]),
            position_embedding: p.get(
                w,
                &format!("{pre}.position_embedding"),
                &[1, grid * grid + 1, d],
            ),
            patch_size: ps,
            grid,
            pages: w.pages_with_prefix(&format!("{pre}.")),
        }
    }

    fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let kind = self.patch_weight.kind();
        let xs = pixel_values.to_kind(kind).conv2d(
            &self.patch_weight,
            Some(&self.patch_bias),
            [self.patch_size, self.patch_size],
            [0, 0],
            [1, 1],
            1,
        );
        let (b_sz, _, h, w) = xs.size4().expect("conv output is 4-d");
        let xs = xs.flatten(2, -1).transpose(1, 2);
        let cls = self.class_embedding.expand([b_sz, 1, -1], false);
        let xs = Tensor::cat(&[cls, xs], 1);
        let d = self.position_embedding.size()[2];
        // _get_pos_embed: bicubic interpolation in f32 of the patch grid's embeddings
        let pos = self
            .position_embedding
            .narrow(1, 1, self.grid * self.grid)
            .to_kind(Kind::Float)
            .reshape([1, self.grid, self.grid, d])
            .permute([0, 3, 1, 2])
            .upsample_bicubic2d([h, w], false, None, None)
            .reshape([1, d, h * w])
            .permute([0, 2, 1])
            .to_kind(kind);
        let pos = Tensor::cat(&[self.position_embedding.narrow(1, 0, 1), pos], 1);
        xs + pos.to_kind(kind)
    }
}

struct Attention {
    qkv: Linear,
    proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: i64,
}

impl Attention {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, n, c) = xs.size3().expect("vit activations are 3-d");
        let hd = c / self.num_heads;
        let qkv = self
            .qkv
            .forward(xs)
            .reshape([b, n, 3, self.num_heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (mut q, mut k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            // the 6B variant normalises q and k over all heads at once
            let norm = |t: &Tensor, nm: &RmsNorm| {
                nm.forward(&t.transpose(1, 2).flatten(-2, -1))
                    .view([b, n, self.num_heads, hd])
                    .transpose(1, 2)
            };
            q = norm(&q, qn);
            k = norm(&k, kn);
        }
        let scale = (hd as f64).powf(-0.5);
        let xs = if super::attention::applies_full(&q) {
            // bf16 on a CPU without AMX: our kernel (see attention.rs), computing what
            // libtorch's flash kernel computes in a third of the time
            super::attention::attention(&q, &k, &v, scale)
        } else {
            // libtorch's fused attention: the reference's eager softmax(q*scale @ k^T) @ v,
            // within the golden tolerance (f32 logits stay within 1e-5)
            Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                scale,
                false,
            )
            .transpose(1, 2)
            .reshape([b, n, c])
        };
        self.proj.forward(&xs)
    }
}

struct Layer {
    norm1: Norm,
    norm2: Norm,
    attn: Attention,
    fc1: Linear,
    fc2: Linear,
    ls1: Tensor,
    ls2: Tensor,
    /// This layer's mapped weights.
    pages: MappedPages,
}

impl Layer {
    fn load(w: &mut Weights, p: Place, cfg: &VisionConfig, i: usize) -> Self {
        let d = cfg.hidden_size as i64;
        let pre = format!("vision_model.encoder.layers.{i}");
        let qk = cfg.qk_normalization;
        let qkn = |w: &mut Weights, nm: &str| {
            qk.then(|| {
                RmsNorm::load(
                    w,
                    p,
                    &format!("{pre}.attn.{nm}.weight"),
                    d,
                    cfg.layer_norm_eps,
                )
            })
        };
        let q_norm = qkn(w, "q_norm");
        let k_norm = qkn(w, "k_norm");
        Self {
            norm1: load_norm(w, p, cfg, &format!("{pre}.norm1"), d),
            norm2: load_norm(w, p, cfg, &format!("{pre}.norm2"), d),
            attn: Attention {
                qkv: if cfg.split_qkv {
                    // -hf: separate projections, stacked into the fused one
                    let names = ["q_proj", "k_proj", "v_proj"].map(|n| format!("{pre}.attn.{n}"));
                    let parts = names.each_ref().map(|n| (n.as_str(), d));
                    Linear::load_stacked(w, p, &parts, d, cfg.qkv_bias)
                } else {
                    Linear::load(w, p, &format!("{pre}.attn.qkv"), d, 3 * d, cfg.qkv_bias)
                },
                proj: Linear::load(w, p, &format!("{pre}.attn.proj"), d, d, true),
                q_norm,
                k_norm,
                num_heads: cfg.num_attention_heads as i64,
            },
            fc1: Linear::load(
                w,
                p,
                &format!("{pre}.mlp.fc1"),
                d,
                cfg.intermediate_size as i64,
                true,
            ),
            fc2: Linear::load(
                w,
                p,
                &format!("{pre}.mlp.fc2"),
                cfg.intermediate_size as i64,
                d,
                true,
            ),
            ls1: p.get(w, &format!("{pre}.ls1"), &[d]),
            ls2: p.get(w, &format!("{pre}.ls2"), &[d]),
            pages: w.pages_with_prefix(&format!("{pre}.")),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        let xs = xs + self.attn.forward(&self.norm1.forward(xs).to_kind(kind)) * &self.ls1;
        let h = self.norm2.forward(&xs).to_kind(kind);
        let h = self.fc2.forward(&self.fc1.forward(&h).gelu("none"));
        xs + h * &self.ls2
    }
}

/// `InternVisionModel` up to the layer `select_layer` picks.
pub struct VisionModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl VisionModel {
    /// Loads the layers `select_layer` needs.
    pub fn load(w: &mut Weights, p: Place, cfg: &VisionConfig, select_layer: i64) -> Self {
        let n = cfg.num_hidden_layers as i64;
        // hidden_states[k] is the output after k layers; index -1 is after all n layers
        let used = if select_layer < 0 {
            n + 1 + select_layer
        } else {
            select_layer
        };
        let layers = (0..used as usize)
            .map(|i| Layer::load(w, p, cfg, i))
            .collect();
        for i in used..n {
            // layers after the selected one are never run: accept their keys without loading
            w.skip_prefix(&format!("vision_model.encoder.layers.{i}."));
        }
        Self {
            embeddings: Embeddings::load(w, p, cfg),
            layers,
        }
    }

    /// [tiles, 3, H, W] -> [tiles, 1 + patches, hidden] at the selected layer.
    ///
    /// On the CPU each layer runs on one tile at a time (tiles never attend to each other, and
    /// each row of a product is computed alike whatever the batch): a tile's activations (8 MB
    /// for its MLP in bf16) are reused from the allocator's heap, where 7 tiles' (59 MB) were
    /// mapped fresh and zeroed by the kernel for every layer, about 8% of a 7-tile picture's
    /// time. After its last tile a layer's mapped weights are given back to the kernel
    /// ([`MappedPages::release`]): decoding never reads them, and resident they counted in the
    /// process's memory (0.6 GB for InternViT-300M in bf16) until the next picture; they stay
    /// in the page cache, so the next picture maps them again without reading the disk.
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        if pixel_values.device() != tch::Device::Cpu {
            return self.forward_batch(pixel_values);
        }
        let tiles = pixel_values.size()[0];
        let mut xs: Vec<Tensor> = (0..tiles)
            .map(|t| self.embeddings.forward(&pixel_values.narrow(0, t, 1)))
            .collect();
        for l in &self.layers {
            xs = xs.iter().map(|x| l.forward(x)).collect();
            l.pages.release();
        }
        self.embeddings.pages.release();
        Tensor::cat(&xs, 0)
    }

    pub(crate) fn forward_batch(&self, pixel_values: &Tensor) -> Tensor {
        let mut xs = self.embeddings.forward(pixel_values);
        for l in &self.layers {
            xs = l.forward(&xs);
        }
        xs
    }
}
