//! `internvl-chat batch`: a JSONL file of requests, one result line each, in the same order.
use super::load::{FileDefaults, ModelToLoad};
use super::sampling_from;
use crate::cli::{BatchArgs, Cli};
use crate::engine::scheduler::Scheduler;
use anyhow::{Context, Result};
use std::io::Write;
use std::process::ExitCode;

pub fn run(cli: &Cli, b: &BatchArgs) -> Result<ExitCode> {
    let params = sampling_from(&cli.gen)?;
    let mut engine = ModelToLoad::new(&cli.model, FileDefaults::default())?.engine()?;
    if let Some(t) = cli.gen.max_tiles {
        engine.tiles.max_tiles = t as u32;
    }
    let mut sched = Scheduler::new(engine);
    let mut input: Box<dyn std::io::BufRead + Send> = if b.input == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(&b.input)
            .with_context(|| format!("{}: cannot open batch input", b.input))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut output: Box<dyn Write> = if b.output == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        let f = std::fs::File::create(&b.output)
            .with_context(|| format!("{}: cannot create batch output", b.output))?;
        Box::new(std::io::BufWriter::new(f))
    };
    let (_, failed) = crate::batch::run_batch(
        &mut sched,
        &mut input,
        &mut output,
        &params,
        cli.gen.system.as_deref(),
        cli.gen.think,
        b.max_batch,
        cli.gen.truncate_history,
    )?;
    output.flush()?;
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
