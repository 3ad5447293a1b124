//! `internvl-chat bench`: the figures of BENCH.md, measured on this machine next to its own
//! roofline (memory read bandwidth and bf16 matmul throughput, measured in the same run). Each
//! decode figure is also given as a fraction of the bandwidth bound: the weights it reads per
//! step over the measured read bandwidth.
use crate::engine::chat::{ChatInput, Engine};
use crate::engine::generate::Flow;
use crate::engine::protocol::{Attachment, Turn};
use crate::model::config::InternVLConfig;
use crate::model::{gemv, LoadOptions};
use crate::preprocess;
use crate::sampling::SamplingParams;
use anyhow::Result;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub struct BenchConfig {
    pub model: PathBuf,
    pub image: PathBuf,
    pub tiles: Vec<usize>,
    pub new_tokens: usize,
    pub runs: usize,
    pub opts: LoadOptions,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Peak resident set size of this process (VmHWM), in GiB.
pub fn peak_rss_gib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / (1024.0 * 1024.0))
        .unwrap_or(0.0)
}

/// (memory read GB/s over a 512 MB tensor, bf16 GFLOP/s of a 2048^3 matmul), medians of 3.
pub fn roofline(dev: Device) -> (f64, f64) {
    let _g = tch::no_grad_guard();
    let big = Tensor::ones([128 << 20], (Kind::Float, dev));
    let mut bw = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let _ = big.sum(Kind::Float).double_value(&[]);
        bw.push(512.0 * 1.048576e6 / t.elapsed().as_secs_f64() / 1e9);
    }
    drop(big);
    let a = Tensor::randn([2048, 2048], (Kind::BFloat16, dev));
    let b = Tensor::randn([2048, 2048], (Kind::BFloat16, dev));
    let _ = a.matmul(&b);
    let mut fl = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let c = a.matmul(&b);
        let _ = c.double_value(&[0, 0]);
        fl.push(2.0 * 2048f64.powi(3) / t.elapsed().as_secs_f64() / 1e9);
    }
    (median(bw), median(fl))
}

/// Greedy decoding of exactly `n` new tokens.
pub fn forced(n: usize) -> SamplingParams {
    SamplingParams {
        min_new_tokens: n,
        ..SamplingParams::greedy(n)
    }
}

/// The chat's default sampling (temperature, top-k, top-p, repetition penalty), for exactly `n`
/// new tokens.
pub fn forced_sampled(n: usize) -> SamplingParams {
    SamplingParams {
        min_new_tokens: n,
        max_new_tokens: n,
        ..SamplingParams::default()
    }
}

struct TurnTimes {
    ttft: f64,
    decode_tok_s: f64,
    prefill_tok_s: f64,
    prompt_tokens: usize,
}

/// One question: time to first token (preprocessing included) and decode speed.
fn timed_turn(
    engine: &mut Engine,
    history: &[Turn],
    q: &str,
    atts: &[Attachment],
    params: &SamplingParams,
) -> Result<(TurnTimes, String)> {
    let t0 = Instant::now();
    let p = engine.prepare(&ChatInput {
        system: None,
        history,
        question: q,
        attachments: atts,
        combine_images: false,
    })?;
    let mut first = None;
    let out = engine.run(&p, params, &mut |_| {
        first.get_or_insert_with(Instant::now);
        Flow::Continue
    })?;
    let first = first.unwrap_or_else(Instant::now);
    let decode = first.elapsed().as_secs_f64();
    Ok((
        TurnTimes {
            ttft: (first - t0).as_secs_f64(),
            decode_tok_s: (out.tokens.len().saturating_sub(1)) as f64 / decode.max(1e-9),
            prefill_tok_s: out.gen.prefill_tokens as f64 / out.gen.prefill.as_secs_f64().max(1e-9),
            prompt_tokens: p.prompt_tokens(),
        },
        p.question,
    ))
}

pub fn run(cfg: &BenchConfig) -> Result<Value> {
    let t = Instant::now();
    let mut engine = Engine::load(&cfg.model, &cfg.opts)?;
    let load_s = t.elapsed().as_secs_f64();
    let question = "Please describe the image in detail.";
    if let Some(&tiles) = cfg.tiles.first() {
        // one untimed turn first, as the reference harness (scripts/reference-ttft.py) and
        // llama.cpp (which warms up by default) do: the first pass pages the weights in and
        // has libtorch build its kernels for these shapes
        let atts = vec![Attachment::Image {
            path: cfg.image.clone(),
            max_tiles: Some(tiles),
        }];
        timed_turn(&mut engine, &[], question, &atts, &forced(2))?;
    }
    let mut shapes = Vec::new();
    let mut headline = json!({});
    for &tiles in &cfg.tiles {
        let atts = vec![Attachment::Image {
            path: cfg.image.clone(),
            max_tiles: Some(tiles),
        }];
        let (mut ttft, mut dec, mut pre, mut follow) = (vec![], vec![], vec![], vec![]);
        let mut sampled = vec![];
        let mut prompt_tokens = 0;
        let greedy = forced(cfg.new_tokens);
        for _ in 0..cfg.runs {
            // cold: no features or tiles from the previous run (a follow-up reuses its own)
            engine.reset_cold();
            let (t1, q1) = timed_turn(&mut engine, &[], question, &atts, &greedy)?;
            let history = vec![Turn {
                question: q1,
                attachments: atts.clone(),
                answer: "A picture.".into(),
            }];
            let (t2, _) = timed_turn(
                &mut engine,
                &history,
                "What colours dominate?",
                &[],
                &greedy,
            )?;
            if shapes.is_empty() {
                // the same question with the chat's default sampling, in the same run as the
                // greedy one it is compared with
                let s = forced_sampled(cfg.new_tokens);
                let (t3, _) = timed_turn(&mut engine, &[], question, &atts, &s)?;
                sampled.push(t3.decode_tok_s);
            }
            ttft.push(t1.ttft);
            dec.push(t1.decode_tok_s);
            pre.push(t1.prefill_tok_s);
            follow.push(t2.ttft);
            prompt_tokens = t1.prompt_tokens;
        }
        // the tiles the picture becomes (what the prompt's placeholders count)
        let image_tiles: usize = atts
            .iter()
            .map(|a| preprocess::placeholder_tiles(a, &engine.tiles).map_or(0, |t| t.iter().sum()))
            .sum();
        let mut shape = json!({
            "max_tiles": tiles,
            "prompt_tokens": prompt_tokens,
            "tiles": image_tiles,
            "first_token_gflop": first_token_flops(&engine.model.cfg, image_tiles, prompt_tokens) / 1e9,
            "ttft_s": median(ttft),
            "prefill_tok_s": median(pre),
            "decode_tok_s": median(dec),
            "followup_ttft_s": median(follow),
        });
        if shapes.is_empty() {
            shape["decode_sampled_tok_s"] = json!(median(sampled));
            headline = shape.clone();
        }
        shapes.push(shape);
    }
    // 8 requests one by one, then as one batch
    let atts = vec![Attachment::Image {
        path: cfg.image.clone(),
        max_tiles: Some(1),
    }];
    let prepared: Vec<_> = (0..8)
        .map(|i| {
            engine.prepare(&ChatInput {
                system: None,
                history: &[],
                question: &format!("{question} ({i})"),
                attachments: &atts,
                combine_images: false,
            })
        })
        .collect::<Result<_, _>>()?;
    // both ways start cold, then reuse the picture's features for the other seven alike
    engine.reset_cold();
    let t = Instant::now();
    for p in &prepared {
        engine.reset();
        engine.run(p, &forced(cfg.new_tokens), &mut |_| Flow::Continue)?;
    }
    let single8_s = t.elapsed().as_secs_f64();
    let refs: Vec<_> = prepared.iter().collect();
    engine.reset_cold();
    let t = Instant::now();
    let outs = engine.run_batch(&refs, &vec![forced(cfg.new_tokens); 8], &mut |_, _| {
        Flow::Continue
    })?;
    let batch8_s = t.elapsed().as_secs_f64();
    let (batch8_prefill_s, batch8_decode_s) = outs.first().map_or((0.0, 0.0), |o| {
        (o.gen.prefill.as_secs_f64(), o.gen.decode.as_secs_f64())
    });
    // the workload's peak, before the roofline's own 512 MB probe
    let peak_rss = peak_rss_gib();
    let (read_gb_s, bf16_gflop_s) = roofline(cfg.opts.first);
    let weights_gb = engine.model.llm.bytes_read_per_token() as f64 / 1e9;
    let decode_bound = read_gb_s / weights_gb.max(1e-9);
    // every decode step reads the weights once, whatever the number of rows
    let fraction = |steps_s: f64| steps_s / decode_bound;
    for s in &mut shapes {
        s["decode_fraction"] = json!(fraction(s["decode_tok_s"].as_f64().unwrap_or(0.0)));
        // the first token's arithmetic at the matmul roofline, over the time it took
        let gflop = s["first_token_gflop"].as_f64().unwrap_or(0.0);
        let ttft = s["ttft_s"].as_f64().unwrap_or(0.0);
        s["ttft_matmul_fraction"] = json!(gflop / bf16_gflop_s.max(1e-9) / ttft.max(1e-9));
    }
    let greedy = headline["decode_tok_s"].as_f64().unwrap_or(0.0);
    let sampled = headline["decode_sampled_tok_s"].as_f64().unwrap_or(0.0);
    // the batch's first token comes from its prefill
    let batch8_steps_s = cfg.new_tokens.saturating_sub(1) as f64 / batch8_decode_s.max(1e-9);
    Ok(json!({
        "model": cfg.model.display().to_string(),
        "dtype": format!("{:?}", cfg.opts.kind),
        "quantized": cfg.opts.quant.name(),
        "threads": tch::get_num_threads(),
        "kernel": kernel(&cfg.opts),
        "kernel_note": gemv::level_note(),
        // our own layer loop, or libtorch's (`INTERNVL_NATIVE=0`, f32, GPUs)
        "decode_step": if engine.model.llm.native_decodes(1) { "native" } else { "libtorch" },
        "load_s": load_s,
        "ttft_s": headline["ttft_s"],
        "prefill_tok_s": headline["prefill_tok_s"],
        "decode_tok_s": headline["decode_tok_s"],
        "decode_sampled_tok_s": sampled,
        "decode_sampled_ratio": sampled / greedy.max(1e-9),
        "followup_ttft_s": headline["followup_ttft_s"],
        "shapes": shapes,
        "single8_s": single8_s,
        "batch8_s": batch8_s,
        "batch8_prefill_s": batch8_prefill_s,
        "batch8_decode_s": batch8_decode_s,
        "batch8_decode_tok_s": 8.0 * batch8_steps_s,
        "peak_rss_gib": peak_rss,
        "roofline": {
            "read_gb_s": read_gb_s,
            "bf16_gflop_s": bf16_gflop_s,
            "llm_weights_gb_per_token": weights_gb,
            "decode_bound_tok_s": decode_bound,
            "decode_fraction": fraction(greedy),
            "decode_sampled_fraction": fraction(sampled),
            "batch8_decode_fraction": fraction(batch8_steps_s),
        },
    }))
}

/// Floating-point operations from a picture of `tiles` tiles and a prompt of `prompt` tokens
/// to the first token (a multiply-add counts 2): the vision layers' products and attention,
/// mlp1, the decoder's products (the routed experts only, for a mixture) and causal attention
/// over the prompt, and the head for the last token. Norms, activations and the like are left
/// out: they are a small part, and bound by memory, not arithmetic.
pub fn first_token_flops(cfg: &InternVLConfig, tiles: usize, prompt: usize) -> f64 {
    let v = &cfg.vision_config;
    let grid = v.image_size / v.patch_size;
    let t = (grid * grid + 1) as f64;
    let d = v.hidden_size as f64;
    let n = v.num_hidden_layers as i64;
    let layers = if cfg.select_layer < 0 {
        n + 1 + cfg.select_layer
    } else {
        cfg.select_layer
    } as f64;
    let vit_layer =
        2.0 * t * (4.0 * d * d + 2.0 * d * v.intermediate_size as f64) + 4.0 * t * t * d;
    let scale = (1.0 / cfg.downsample_ratio).round();
    let (h, l) = (cfg.llm_config.hidden_size as f64, &cfg.llm_config);
    let shuffled = d * scale * scale;
    let per_tile = (grid * grid) as f64 / (scale * scale);
    let mlp1 = 2.0 * per_tile * (shuffled * h + h * h);
    let (heads, kvh, hd) = (
        l.num_attention_heads as f64,
        l.num_kv_heads() as f64,
        l.head_dim() as f64,
    );
    let p = prompt as f64;
    let attn_proj = 2.0 * heads * hd * h + 2.0 * kvh * hd * h;
    let ffn = if l.num_experts > 0 {
        3.0 * h * l.moe_intermediate_size as f64 * l.num_experts_per_tok as f64
            + h * l.num_experts as f64
    } else {
        3.0 * h * l.intermediate_size as f64
    };
    // causal: the i-th query meets i + 1 keys, in q k^T and in the product with v
    let causal = 4.0 * heads * hd * p * (p + 1.0) / 2.0;
    let llm = l.num_hidden_layers as f64 * (2.0 * p * (attn_proj + ffn) + causal);
    let head = 2.0 * h * l.vocab_size as f64;
    tiles as f64 * (layers * vit_layer + mlp1) + llm + head
}

/// The kernels the decoder's products ran with: ours at the process's level for bf16 on the
/// CPU (`gemv::applies`), libtorch's elsewhere.
fn kernel(opts: &LoadOptions) -> &'static str {
    let cpu = opts.first == Device::Cpu && opts.layers.iter().all(|&d| d == Device::Cpu);
    if cpu && opts.kind == Kind::BFloat16 {
        gemv::level().name()
    } else {
        "torch"
    }
}

pub fn table(v: &Value) -> String {
    let mut s = format!(
        "model {}  dtype {}  quantized {}  threads {}  kernel {}{}  decode step {}\nload {:.2} s   peak RSS {:.2} GiB\n\n",
        v["model"].as_str().unwrap_or(""),
        v["dtype"].as_str().unwrap_or(""),
        v["quantized"].as_str().unwrap_or(""),
        v["threads"],
        v["kernel"].as_str().unwrap_or(""),
        v["kernel_note"]
            .as_str()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        v["decode_step"].as_str().unwrap_or(""),
        v["load_s"].as_f64().unwrap_or(0.0),
        v["peak_rss_gib"].as_f64().unwrap_or(0.0)
    );
    s.push_str(&format!(
        "{:>9} {:>8} {:>9} {:>9} {:>13} {:>12} {:>8} {:>14}\n",
        "max_tiles",
        "prompt",
        "TTFT s",
        "of bound",
        "prefill tok/s",
        "decode tok/s",
        "of bound",
        "follow-up s"
    ));
    for sh in v["shapes"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{:>9} {:>8} {:>9.3} {:>8.0}% {:>13.1} {:>12.2} {:>7.0}% {:>14.3}\n",
            sh["max_tiles"],
            sh["prompt_tokens"],
            sh["ttft_s"].as_f64().unwrap_or(0.0),
            100.0 * sh["ttft_matmul_fraction"].as_f64().unwrap_or(0.0),
            sh["prefill_tok_s"].as_f64().unwrap_or(0.0),
            sh["decode_tok_s"].as_f64().unwrap_or(0.0),
            100.0 * sh["decode_fraction"].as_f64().unwrap_or(0.0),
            sh["followup_ttft_s"].as_f64().unwrap_or(0.0)
        ));
    }
    let r = &v["roofline"];
    s.push_str(&format!(
        "\ndecode with the chat's default sampling: {:.2} tok/s ({:.0}% of bound), {:.3}x greedy\n",
        v["decode_sampled_tok_s"].as_f64().unwrap_or(0.0),
        100.0 * r["decode_sampled_fraction"].as_f64().unwrap_or(0.0),
        v["decode_sampled_ratio"].as_f64().unwrap_or(0.0)
    ));
    s.push_str(&format!(
        "8 requests: one by one {:.2} s, batched {:.2} s ({:.2}x; prefill {:.2} s, decode {:.2} s, {:.1} tok/s, {:.0}% of bound)\nroofline: read {:.1} GB/s, bf16 matmul {:.0} GFLOP/s (TTFT's bound: its arithmetic at that speed); {:.3} GB of weights a step, decode bound {:.1} steps/s ({:.0}% reached greedy)\n",
        v["single8_s"].as_f64().unwrap_or(0.0),
        v["batch8_s"].as_f64().unwrap_or(0.0),
        v["single8_s"].as_f64().unwrap_or(0.0) / v["batch8_s"].as_f64().unwrap_or(0.0).max(1e-9),
        v["batch8_prefill_s"].as_f64().unwrap_or(0.0),
        v["batch8_decode_s"].as_f64().unwrap_or(0.0),
        v["batch8_decode_tok_s"].as_f64().unwrap_or(0.0),
        100.0 * r["batch8_decode_fraction"].as_f64().unwrap_or(0.0),
        r["read_gb_s"].as_f64().unwrap_or(0.0),
        r["bf16_gflop_s"].as_f64().unwrap_or(0.0),
        r["llm_weights_gb_per_token"].as_f64().unwrap_or(0.0),
        r["decode_bound_tok_s"].as_f64().unwrap_or(0.0),
        100.0 * r["decode_fraction"].as_f64().unwrap_or(0.0)
    ));
    s
}

/// The default benchmark image: fixtures' image1.jpg when present.
pub fn default_image(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate::testutil::fixtures_dir().join("media/images/image1.jpg"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// InternVL2_5-1B's first token after one tile and BENCH.md's 311-token prompt, counted by
    /// hand from its config: 24 InternViT layers of 1025 tokens (products 2 * 1025 * 12.58 M,
    /// attention 4 * 1025^2 * 1024), mlp1 over 256 tokens, 24 decoder layers over 311 tokens
    /// (products 2 * 311 * 14.91 M, causal attention 4 * 14 * 64 * 311 * 312 / 2) and the head.
    #[test]
    fn first_token_flops_of_the_1b_model() {
        let path = crate::testutil::fixture("configs/InternVL2_5-1B.config.json");
        let cfg = InternVLConfig::parse(&std::fs::read_to_string(&path).unwrap(), &path).unwrap();
        let vision = 24.0 * (2.0 * 1025.0 * 12_582_912.0 + 4.0 * 1025.0 * 1025.0 * 1024.0);
        let mlp1 = 2.0 * 256.0 * (4096.0 * 896.0 + 896.0 * 896.0);
        let llm = 24.0 * (2.0 * 311.0 * 14_909_440.0 + 4.0 * 14.0 * 64.0 * 311.0 * 312.0 / 2.0);
        let head = 2.0 * 896.0 * 151_674.0;
        let want = vision + mlp1 + llm + head;
        assert_eq!(first_token_flops(&cfg, 1, 311), want);
        // about 0.95 TFLOP: at 410 GFLOP/s, 2.3 s
        assert!((0.94e12..0.96e12).contains(&want), "{want}");
        // 7 tiles: the vision part seven times
        let seven = first_token_flops(&cfg, 7, 311) - want;
        assert_eq!(seven, 6.0 * (vision + mlp1));
    }
}
