//! Times InternViT's attention for one tile's shape (`[tiles, 16, 1025, 64]` bf16) through our
//! kernel (src/model/attention.rs) and libtorch's, interleaved, and prints each as a fraction of
//! the bf16 matmul throughput measured in the same run.
//!
//!     cargo run --release --example profile_attention -- [TILES] [RUNS]
use internvl_chat::model::attention;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tiles: i64 = args.get(1).map_or(1, |s| s.parse().expect("TILES"));
    let runs: usize = args.get(2).map_or(10, |s| s.parse().expect("RUNS"));
    let _guard = tch::no_grad_guard();
    let (h, n, d) = (16, 1025, 64);
    let qkv =
        Tensor::randn([tiles, n, 3, h, d], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let qkv = qkv.permute([2, 0, 3, 1, 4]);
    let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
    let scale = (d as f64).powf(-0.5);
    assert!(
        attention::applies(&q),
        "the kernel needs AVX512-BF16 and bf16 CPU tensors"
    );
    let ours = || attention::attention(&q, &k, &v, scale);
    let torch = || {
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, scale, false)
            .transpose(1, 2)
            .reshape([tiles, n, h * d])
    };
    let a = Tensor::randn([2048, 2048], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let (_, _, _) = (ours(), torch(), a.matmul(&a));
    let (mut t_ours, mut t_torch, mut t_mm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let _ = ours();
        t_ours.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = torch();
        t_torch.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = a.matmul(&a);
        t_mm.push(t.elapsed().as_secs_f64());
    }
    let flop = 4.0 * (tiles * h * n * n * d) as f64;
    let mm = 2.0 * 2048f64.powi(3) / median(t_mm) / 1e9;
    for (name, t) in [("ours", median(t_ours)), ("libtorch", median(t_torch))] {
        let gf = flop / t / 1e9;
        println!(
            "{name:9} {:7.2} ms  {gf:6.0} GFLOP/s  ({:.0}% of the {mm:.0} GFLOP/s bf16 matmul)",
            t * 1e3,
            100.0 * gf / mm
        );
    }
}
