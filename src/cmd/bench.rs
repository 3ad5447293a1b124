//! `internvl-chat bench`: load, time to first token, decode speed, memory, batch throughput.
use super::load::{FileDefaults, ModelToLoad};
use crate::cli::{BenchArgs, ModelArgs};
use anyhow::Result;
use std::process::ExitCode;

pub fn run(args: &ModelArgs, b: &BenchArgs) -> Result<ExitCode> {
    let model = ModelToLoad::new(args, FileDefaults::default())?;
    let cfg = crate::bench::BenchConfig {
        opts: model.opts,
        model: model.dir,
        image: crate::bench::default_image(b.image.as_deref()),
        tiles: b.tiles.clone(),
        new_tokens: b.new_tokens,
        runs: b.runs.max(1),
    };
    let v = crate::bench::run(&cfg)?;
    if b.json {
        println!("{v}");
    } else {
        print!("{}", crate::bench::table(&v));
        println!("{v}");
    }
    Ok(ExitCode::SUCCESS)
}
