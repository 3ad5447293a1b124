//! Time to first token only, for profilers: loads a checkpoint, then answers the bench's
//! question about one picture N times from cold (no cached features or tiles), one token each,
//! printing each first token's time. Unlike `internvl-chat bench`, no decoding, follow-ups or
//! batches land in the profile.
//!
//! ```sh
//! cargo build --profile profiling --example profile_ttft
//! perf record -e cpu-clock -g target/profiling/examples/profile_ttft /tmp/bench-1b 10 [MAX_TILES] [IMAGE]
//! ```
use anyhow::{Context, Result};
use internvl_chat::bench::{default_image, forced};
use internvl_chat::engine::chat::{ChatInput, Engine};
use internvl_chat::engine::generate::Flow;
use internvl_chat::media::Attachment;
use internvl_chat::model::LoadOptions;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(
        args.next()
            .context("usage: profile_ttft MODEL_DIR [RUNS] [MAX_TILES] [IMAGE]")?,
    );
    let runs: usize = args.next().map_or(Ok(10), |s| s.parse::<usize>())?.max(1);
    let tiles: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    let image = default_image(args.next().map(PathBuf::from).as_deref());
    let _g = tch::no_grad_guard();
    let mut engine = Engine::load(&model, &LoadOptions::single(Device::Cpu, Kind::BFloat16))?;
    let atts = vec![Attachment::Image {
        path: image,
        max_tiles: Some(tiles),
    }];
    let mut times = Vec::new();
    // the first turn warms up (pages the weights in, lets libtorch pick its kernels), untimed
    for run in 0..=runs {
        engine.reset_cold();
        let t0 = Instant::now();
        let p = engine.prepare(&ChatInput {
            system: None,
            history: &[],
            question: "Please describe the image in detail.",
            attachments: &atts,
            combine_images: false,
        })?;
        let mut first = None;
        engine.run(&p, &forced(1), &mut |_| {
            first.get_or_insert_with(Instant::now);
            Flow::Continue
        })?;
        let t = first.unwrap_or_else(Instant::now) - t0;
        if run > 0 {
            times.push(t.as_secs_f64());
        }
    }
    let s: Vec<String> = times.iter().map(|t| format!("{t:.3}")).collect();
    times.sort_by(f64::total_cmp);
    println!(
        "ttft s: {} (median {:.3})",
        s.join(" "),
        times[times.len() / 2]
    );
    Ok(())
}
