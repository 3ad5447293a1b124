//! Where tests find `../shared/fixtures` (override with `INTERNVL_FIXTURES`).
//!
//! Missing fixtures are a loud failure, never a silent pass.
use std::path::PathBuf;

/// Where the fixtures should be: `$INTERNVL_FIXTURES`, else `../shared/fixtures` beside the
/// project root (not checked).
/// Every tiny checkpoint of the fixtures (`models/NAME`), in the remote-code layout.
pub const TINY_MODELS: [&str; 6] = [
    "tiny-qwen2",
    "tiny-internlm2",
    "tiny-vit6b-qwen2",
    "tiny-qwen3",
    "tiny-qwen3-moe",
    "tiny-qwen2-dyn",
];

pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("INTERNVL_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    }
}

/// The fixtures folder, asserted to exist.
pub fn fixtures() -> PathBuf {
    let dir = fixtures_dir();
    assert!(
        dir.join("README.md").is_file(),
        "fixtures not found at {} (set INTERNVL_FIXTURES or put shared/ beside the project)",
        dir.display()
    );
    dir
}

/// A fixture path below the fixtures folder, asserted to exist.
pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(p.exists(), "fixture missing: {}", p.display());
    p
}

/// Writes a video file (container from the extension) with one 16x16 MPEG-4 video stream and no
/// frames, as a recorder that stopped before its first frame leaves it.
pub fn write_video_without_frames(path: &std::path::Path) {
    use ffmpeg_next::{codec, encoder, format};
    ffmpeg_next::init().expect("ffmpeg init");
    let mpeg4 = encoder::find(codec::Id::MPEG4).expect("FFmpeg has the MPEG-4 encoder");
    let mut out = format::output(&path).expect("an output container for the extension");
    let mut enc = codec::context::Context::new_with_codec(mpeg4)
        .encoder()
        .video()
        .expect("a video encoder");
    enc.set_width(16);
    enc.set_height(16);
    enc.set_format(format::Pixel::YUV420P);
    enc.set_time_base((1, 25));
    let enc = enc.open_as(mpeg4).expect("the encoder opens");
    let mut st = out.add_stream(mpeg4).expect("a stream");
    st.set_parameters(&enc);
    st.set_avg_frame_rate((25, 1));
    out.write_header().expect("header written");
    out.write_trailer().expect("trailer written");
}

/// Test data from our own generator (the sampler's splitmix64): libtorch's global one is shared
/// by every test thread, so seeding it would not make a test's inputs repeatable.
pub struct Rng(crate::sampling::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(crate::sampling::Rng::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in (0, 1].
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal values (Box-Muller), f32.
    pub fn randn(&mut self, shape: &[i64]) -> tch::Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let (a, b) = (self.uniform(), self.uniform());
                ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
            })
            .collect();
        tch::Tensor::from_slice(&v).view(shape)
    }

    /// Integers in lo..hi as f32.
    pub fn randint(&mut self, lo: i64, hi: i64, shape: &[i64]) -> tch::Tensor {
        let n: i64 = shape.iter().product();
        let span = (hi - lo) as u64;
        let v: Vec<f32> = (0..n)
            .map(|_| (lo + (self.next_u64() % span) as i64) as f32)
            .collect();
        tch::Tensor::from_slice(&v).view(shape)
    }
}
