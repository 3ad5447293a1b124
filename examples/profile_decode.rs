//! Decode only, for profilers: loads a checkpoint, prefills a short text prompt and decodes a
//! forced number of tokens, printing tokens/s. Unlike `internvl-chat bench`, nothing else (vision,
//! prefill of a picture, batches, roofline) lands in the profile.
//!
//! ```sh
//! cargo build --profile profiling --example profile_decode
//! perf record -e cpu-clock -g target/profiling/examples/profile_decode /tmp/bench-1b 256 \
//!     [THREADS] [int8|int8-head|q4|q4-head|bf16] [BATCH] [greedy|sampled]
//! ```
//!
//! `sampled`: the chat's default sampling instead of greedy (the same forced length), to measure
//! what the sampler costs a decoding step. `INTERNVL_KERNEL` picks the gemv kernel level.
use anyhow::{Context, Result};
use internvl_chat::bench::{forced, forced_sampled};
use internvl_chat::engine::chat::{ChatInput, Engine};
use internvl_chat::engine::generate::Flow;
use internvl_chat::model::{LoadOptions, Quant, Quantize};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().context(
        "usage: profile_decode MODEL_DIR [TOKENS] [THREADS] [int8|int8-head|q4|q4-head|bf16] [BATCH] \
                 [greedy|sampled]",
    )?);
    let n: usize = args.next().map_or(Ok(256), |s| s.parse())?;
    if let Some(t) = args.next() {
        tch::set_num_threads(t.parse()?);
    }
    let quant = match args.next().as_deref() {
        Some("int8") => Quantize::llm(Quant::Int8),
        Some("q4") => Quantize::llm(Quant::Q4),
        Some("int8-head") => Quantize::with_head(Quant::Int8),
        Some("q4-head") => Quantize::with_head(Quant::Q4),
        _ => Quantize::OFF,
    };
    let batch: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    let sampled = args.next().as_deref() == Some("sampled");
    let _g = tch::no_grad_guard();
    let opts = LoadOptions {
        quant,
        ..LoadOptions::single(Device::Cpu, Kind::BFloat16)
    };
    let t = Instant::now();
    let mut engine = Engine::load(&model, &opts)?;
    let load_s = t.elapsed().as_secs_f64();
    let p = engine.prepare(&ChatInput {
        system: None,
        history: &[],
        question: "Please describe the image in detail.",
        attachments: &[],
        combine_images: false,
    })?;
    let params = if sampled {
        forced_sampled(n)
    } else {
        forced(n)
    };
    let mut first = None;
    let tokens = if batch == 1 {
        let out = engine.run(&p, &params, &mut |_| {
            first.get_or_insert_with(Instant::now);
            Flow::Continue
        })?;
        out.tokens.len()
    } else {
        let refs = vec![&p; batch];
        let outs = engine.run_batch(&refs, &vec![params; batch], &mut |_, _| {
            first.get_or_insert_with(Instant::now);
            Flow::Continue
        })?;
        outs[0].tokens.len()
    };
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!(
        "{batch} x {tokens} tokens, {}, {}, load {load_s:.2} s, kernel {}, decode {:.2} steps/s, peak RSS {:.2} GiB",
        if sampled { "sampled" } else { "greedy" },
        opts.quant.name(),
        internvl_chat::model::gemv::level().name(),
        (tokens - 1) as f64 / secs,
        internvl_chat::bench::peak_rss_gib()
    );
    Ok(())
}
