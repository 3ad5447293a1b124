//! Makes a random-weight checkpoint of a config's real size, for benchmarks:
//!
//!     cargo run --release --example random_checkpoint -- CONFIG.json OUT_DIR --tokenizer-from DIR [--layers N]
//!
//! `--layers N` keeps only the first N decoder layers (written into the copied config.json): a
//! model of real width whose full depth does not fit this machine, e.g. the 30B-A3B MoE.
//! The tensor list comes from the model's own loaders, so the result loads like a published
//! checkpoint (bf16 `model.safetensors`). Values are deterministic: matrices uniform in
//! ±1/sqrt(fan_in), norm weights 1, biases 0, layer scales 0.1.
use anyhow::{bail, Context, Result};
use internvl_chat::model::config::InternVLConfig;
use internvl_chat::model::InternVL;
use internvl_chat::sampling::Rng;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

fn bf16(x: f32) -> [u8; 2] {
    // round to nearest even on the upper 16 bits
    let b = x.to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    ((r >> 16) as u16).to_le_bytes()
}

fn fill(name: &str, shape: &[i64], rng: &mut Rng, out: &mut dyn Write) -> Result<()> {
    let n: i64 = shape.iter().product();
    let constant = if name.ends_with(".bias") {
        Some(0.0)
    } else if name.ends_with("ls1") || name.ends_with("ls2") {
        Some(0.1)
    } else if shape.len() == 1 {
        Some(1.0)
    } else {
        None
    };
    let fan_in = *shape.last().expect("tensors have a shape") as f32;
    let a = 1.0 / fan_in.sqrt();
    let mut buf = Vec::with_capacity(1 << 20);
    for _ in 0..n {
        let v = constant.unwrap_or_else(|| ((rng.next_f64() as f32) * 2.0 - 1.0) * a);
        buf.extend_from_slice(&bf16(v));
        if buf.len() >= 1 << 20 {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    out.write_all(&buf)?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut config, mut out, mut tok, mut layers) = (None, None, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tokenizer-from" => tok = it.next().map(PathBuf::from),
            "--layers" => {
                let n = it.next().context("--layers needs a number")?;
                layers = Some(
                    n.parse::<usize>()
                        .with_context(|| format!("--layers {n:?}"))?,
                );
            }
            _ if config.is_none() => config = Some(PathBuf::from(a)),
            _ if out.is_none() => out = Some(PathBuf::from(a)),
            _ => bail!("unexpected argument {a:?}"),
        }
    }
    let (Some(config), Some(out), Some(tok)) = (config, out, tok) else {
        bail!("usage: random_checkpoint CONFIG.json OUT_DIR --tokenizer-from DIR");
    };
    let mut cfg = InternVLConfig::load(&config)?;
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config)?)?;
    if let Some(n) = layers {
        json["llm_config"]["num_hidden_layers"] = n.into();
        cfg.llm_config.num_hidden_layers = n;
    }
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    for e in std::fs::read_dir(&tok).with_context(|| format!("{}: cannot read", tok.display()))? {
        let p = e?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if p.is_file() && name != "config.json" && !name.contains("safetensors") {
            std::fs::copy(&p, out.join(&name))?;
        }
    }
    let tensors = InternVL::expected_tensors(&cfg);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<i64>() as usize * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let path = out.join("model.safetensors");
    let mut f = BufWriter::new(std::fs::File::create(&path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    let mut rng = Rng::new(0x1b2c3d4e);
    for (name, shape) in &tensors {
        fill(name, shape, &mut rng, &mut f)?;
    }
    f.flush()?;
    println!(
        "{}: {} tensors, {:.2} GB",
        path.display(),
        tensors.len(),
        offset as f64 / 1e9
    );
    Ok(())
}
