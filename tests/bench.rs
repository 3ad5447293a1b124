//! `internvl-chat bench` on a tiny fixture model: the figures it adds for decoding (the chat's
//! default sampling, fractions of the bandwidth bound) and the kernel level it reports, forced
//! through `INTERNVL_KERNEL`.
use internvl_chat::model::gemv::Level;
use internvl_chat::testutil::fixture;
use serde_json::Value;
use std::process::Command;

fn bench(kernel: &str) -> Value {
    bench_with(kernel, "1")
}

fn bench_with(kernel: &str, native: &str) -> Value {
    let model = fixture("models/tiny-qwen2");
    let out = Command::new(env!("CARGO_BIN_EXE_internvl-chat"))
        .env("INTERNVL_KERNEL", kernel)
        .env("INTERNVL_NATIVE", native)
        .args(["bench", "--model"])
        .arg(&model)
        .args(["--device", "cpu", "--threads", "2"])
        .args([
            "--tiles",
            "1",
            "--new-tokens",
            "12",
            "--runs",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number: {v}"))
}

#[test]
fn bench_reports_sampled_decode_fractions_and_the_forced_kernel() {
    let forced = if Level::detected() >= Level::Avx2 {
        "avx2"
    } else {
        "torch"
    };
    let v = bench(forced);
    assert_eq!(v["kernel"], forced);
    assert!(v["kernel_note"].is_null(), "{v}");
    // the native decoding step runs on our kernels (bf16 on the CPU)
    let step = if forced == "torch" {
        "libtorch"
    } else {
        "native"
    };
    assert_eq!(v["decode_step"], step, "{v}");
    let (greedy, sampled) = (f(&v, "decode_tok_s"), f(&v, "decode_sampled_tok_s"));
    assert!(greedy > 0.0 && sampled > 0.0, "{v}");
    assert!((f(&v, "decode_sampled_ratio") - sampled / greedy).abs() < 1e-9);
    assert!(f(&v, "batch8_decode_tok_s") > 0.0);
    let r = &v["roofline"];
    let bound = f(r, "decode_bound_tok_s");
    assert!(bound > 0.0 && bound.is_finite());
    for (fraction, tok_s) in [
        ("decode_fraction", greedy),
        ("decode_sampled_fraction", sampled),
        ("batch8_decode_fraction", f(&v, "batch8_decode_tok_s") / 8.0),
    ] {
        assert!((f(r, fraction) - tok_s / bound).abs() < 1e-9, "{fraction}");
    }
    assert!((f(&v["shapes"][0], "decode_fraction") - greedy / bound).abs() < 1e-9);
    // the first token's arithmetic (counted from the config) at the matmul roofline, over its
    // time: the tiles the picture became count
    let s0 = &v["shapes"][0];
    assert!(f(s0, "tiles") >= 1.0, "{s0}");
    let want = f(s0, "first_token_gflop") / f(r, "bf16_gflop_s") / f(s0, "ttft_s");
    assert!(
        want > 0.0 && (f(s0, "ttft_matmul_fraction") - want).abs() < 1e-9,
        "{s0}"
    );
}

/// A level nobody has heard of: the CPU's best, and the reason in the output.
#[test]
fn bench_falls_back_from_an_unknown_kernel() {
    let v = bench("sse9");
    assert_eq!(v["kernel"], Level::detected().name());
    let note = v["kernel_note"].as_str().unwrap();
    assert!(note.contains("\"sse9\" is not one of"), "{note}");
}

/// `INTERNVL_NATIVE=0` turns the native decoding step off (libtorch's layer loop, the same
/// products), so one machine measures what it gains.
#[test]
fn bench_reports_the_libtorch_decoding_step_when_native_is_off() {
    let v = bench_with("avx2", "0");
    assert_eq!(v["decode_step"], "libtorch", "{v}");
    assert!(f(&v, "decode_tok_s") > 0.0);
}
