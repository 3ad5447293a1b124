//! Prefill with 4-bit weights: dequantize the weight to bf16 and run libtorch's GEMM, or run
//! gemv's 4-bit kernel 8 rows at a time? Times both on the 1B decoder's shapes for a few row
//! counts (what `Linear::forward` chose: dequantize above 8 rows).
//!
//! ```sh
//! cargo run --release --example q4_prefill [THREADS]
//! ```
use internvl_chat::model::gemv;
use internvl_chat::model::nn::{quantize_q4, Linear};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() {
    if let Some(t) = std::env::args().nth(1) {
        tch::set_num_threads(t.parse().expect("THREADS is a number"));
    }
    let _g = tch::no_grad_guard();
    for (n, k) in [(4864i64, 896i64), (896, 4864)] {
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.02;
        let t = Instant::now();
        let (q, s) = quantize_q4(&w);
        println!(
            "{n}x{k}: quantized in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let lin = Linear::q4(q, s, None, k);
        for rows in [9i64, 16, 64, 311] {
            let x = Tensor::randn([1, rows, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let time = |f: &dyn Fn() -> Tensor| {
                let _ = f();
                let t = Instant::now();
                for _ in 0..5 {
                    let _ = f();
                }
                t.elapsed().as_secs_f64() / 5.0 * 1e3
            };
            let dense = time(&|| lin.forward(&x));
            let kernel = time(&|| {
                let parts: Vec<Tensor> = (0..rows)
                    .step_by(8)
                    .map(|r| {
                        let xs = x.narrow(1, r, 8.min(rows - r));
                        gemv::linear(&xs, &lin.weight, lin.scale.as_ref(), None)
                    })
                    .collect();
                Tensor::cat(&parts, 1)
            });
            println!(
                "{n}x{k} rows {rows:>3}: dequantize + GEMM {dense:>7.2} ms, kernel 8 rows at a time {kernel:>7.2} ms"
            );
        }
    }
}
