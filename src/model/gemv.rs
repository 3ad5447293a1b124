//! Matrix-vector products for decoding on the CPU: `y = x W^T (+ b)` for a few rows of `x`
//! against a bf16 weight, the shape of every linear layer while tokens are generated; int8
//! weights (`int8.rs`: LLM.int8()) and 4-bit ones (`q4.rs`: Q4_0 x Q8_0) multiply quantized
//! inputs in integers.
//!
//! Why our own: for one row, libtorch's bf16 `linear` goes through oneDNN's brgemm matmul, which
//! repacks the whole weight into a scratch buffer on every call (`copy_b_chunk_in_buffer`), so
//! every weight is read twice and written once per token; the output head runs at a fifth of the
//! machine's read bandwidth. Decoding is bound by reading the weights once, which is all this
//! does: each output is a dot product of one weight row with each input row, accumulated in f32
//! (bf16 products are exact in f32), the bias added in f32, rounded once to bf16, as libtorch's
//! bf16 GEMM does. Only the order of the f32 additions differs from oneDNN's.
//!
//! Weight rows are split across a small thread pool sized like libtorch's (`--threads`).
//!
//! Kernel levels, chosen at run time from what the CPU has: AVX512-BF16 pair dot products (bf16
//! weights), AVX-512F, AVX2 + FMA (most laptops), else libtorch's `linear`. All of them
//! accumulate exact products in f32 and round once to bf16; only the order of the f32 additions
//! differs. `INTERNVL_KERNEL` forces a lower level (tests and `bench` run each one on one
//! machine).
use half::bf16;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// `$f::<R>(args)` for `R` = `$rows` (1..=[`MAX_ROWS`], larger as 8): the kernels take their
/// number of input rows as a const parameter, so that each row's accumulators live in
/// registers.
macro_rules! for_rows {
    ($rows:expr, $f:ident($($arg:expr),*)) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            _ => $f::<8>($($arg),*),
        }
    };
}

mod int8;
mod q4;
pub use int8::THRESHOLD as INT8_THRESHOLD;

/// Most input rows one call takes (decoding a batch of up to 8 conversations).
pub const MAX_ROWS: usize = 8;

/// How far ahead of what they read the kernels that stream weights ask for the cache line
/// ([`prefetch`]). Without it this machine's decode read its weights at 17-24 GB/s, where
/// libtorch's sum reads 26-30 GB/s: asking 4 to 16 KB ahead lifted a 1B decode by 20 to 45%
/// at every kernel level and precision (bf16 23 -> 30 tok/s, 8-bit 47 -> 61, 4-bit 66 -> 86;
/// forced AVX2 more, its smaller loads keeping fewer lines in flight); 32 KB was slower again.
const PREFETCH_AHEAD: usize = 8192;

/// Asks for the cache line [`PREFETCH_AHEAD`] bytes past `p`: a kernel streaming weights calls
/// it once per 64 bytes it reads.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: a prefetch never faults, whatever the address; `wrapping_add` makes no claim
    // that the address lies inside `p`'s allocation
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD).cast()) }
}

/// Weight rows whose integer dot products one kernel call computes (a stack buffer's worth).
const BLOCK_ROWS: usize = 64;

/// The weight of a linear layer as this module reads it.
pub enum WeightRef<'a> {
    Bf16(&'a [u16]),
    /// int8 values and one scale (bf16) per output row.
    Int8(&'a [i8], &'a [u16]),
    /// 4-bit values packed as [`Q4_GROUP_BYTES`] bytes per group of [`Q4_GROUP`] inputs (see
    /// [`Q4_GROUP`] for the layout) and one scale (bf16) per group: `[n, groups * 16]` bytes and
    /// `[n, groups]` scales, `groups = k.div_ceil(Q4_GROUP)`, rows in [`Q4_TILE`]'s tiles.
    Q4(&'a [u8], &'a [u16]),
}

/// Inputs per 4-bit group (`--load-4bit`): one scale per 32 consecutive weights of a row.
///
/// Why 32, the smallest size the issue allows: the error of a group is set by its largest
/// weight, so smaller groups follow the weights' magnitudes more closely (as llama.cpp's Q4_0);
/// a bf16 scale per 32 weights costs half a bit per weight (4.5 bits in all), and the kernels
/// are bound by reading the weights, not by the scales. A group is 16 bytes: byte `j` holds
/// input `j` in its low nibble and input `j + 16` in its high one, each stored as `q + 8` for
/// `q` in -8..=7; the weight is `q * scale`. A row whose length is not a multiple of 32 ends in
/// a partial group padded with `q = 0`.
pub const Q4_GROUP: usize = 32;

/// Bytes of one 4-bit group.
pub const Q4_GROUP_BYTES: usize = Q4_GROUP / 2;

/// Weight rows per tile of the 4-bit layout. A packed matrix `[n, groups * 16]` holds its rows
/// in tiles of 16 (the last `n % 16` rows, if any, as plain rows): a tile's bytes are group after
/// group, each group's 4 chunks of 4 bytes (bytes `4c..4c + 4` of the group, see [`Q4_GROUP`])
/// one after another, each chunk the 16 rows' 4 bytes in row order; its scales `[groups, 16]`.
/// A tile fills the same bytes and scales its 16 plain rows would.
///
/// Why: one 64-byte load then holds 4 weights of each of 16 rows, which meet the same 4 inputs
/// (broadcast) in one `vpdpbusd`, and each of the 16 i32 lanes is one row's sum: no horizontal
/// sums, no shuffles of scales, and fewer instructions per weight than a row at a time (the
/// 4-bit decode was bound by them, not by memory; llama.cpp's CPU kernels repack Q4_0 this way).
pub const Q4_TILE: usize = 16;

/// Where chunk `c` (bytes `4c..4c + 4`) of group `g` of row `i` lies among the packed bytes of
/// `n` rows of `groups` groups (see [`Q4_TILE`]).
#[inline]
pub(crate) fn q4_chunk_at(n: usize, groups: usize, i: usize, g: usize, c: usize) -> usize {
    if i < n / Q4_TILE * Q4_TILE {
        ((((i / Q4_TILE) * groups + g) * 4 + c) * Q4_TILE + i % Q4_TILE) * 4
    } else {
        (i * groups + g) * Q4_GROUP_BYTES + c * 4
    }
}

/// Where the scale of group `g` of row `i` lies among the scales of `n` rows (see
/// [`Q4_TILE`]).
#[inline]
pub(crate) fn q4_scale_at(n: usize, groups: usize, i: usize, g: usize) -> usize {
    if i < n / Q4_TILE * Q4_TILE {
        ((i / Q4_TILE) * groups + g) * Q4_TILE + i % Q4_TILE
    } else {
        i * groups + g
    }
}

/// The 16 bytes and the scale of group `g` of row `i` of a packed matrix of `n` rows.
#[inline]
fn q4_row_group(
    w: &[u8],
    scales: &[u16],
    n: usize,
    groups: usize,
    i: usize,
    g: usize,
) -> ([u8; Q4_GROUP_BYTES], u16) {
    let mut bytes = [0u8; Q4_GROUP_BYTES];
    for (c, chunk) in bytes.chunks_exact_mut(4).enumerate() {
        let at = q4_chunk_at(n, groups, i, g, c);
        chunk.copy_from_slice(&w[at..at + 4]);
    }
    (bytes, scales[q4_scale_at(n, groups, i, g)])
}

/// Packed 4-bit rows `[n, groups * 16]` and their scales `[n, groups]` in plain row order (as
/// [`quantize_q4`] writes them) rearranged in place into [`Q4_TILE`]'s tiles.
pub fn tile_q4(w: &mut [u8], scales: &mut [u16], groups: usize) {
    let n = scales.len() / groups.max(1);
    assert!(groups > 0 && scales.len() == n * groups && w.len() == n * groups * Q4_GROUP_BYTES);
    let tile_bytes = Q4_TILE * groups * Q4_GROUP_BYTES;
    let mut plain = vec![0u8; tile_bytes];
    let mut plain_s = vec![0u16; Q4_TILE * groups];
    for (wt, st) in w
        .chunks_exact_mut(tile_bytes)
        .zip(scales.chunks_exact_mut(Q4_TILE * groups))
    {
        plain.copy_from_slice(wt);
        plain_s.copy_from_slice(st);
        for r in 0..Q4_TILE {
            for g in 0..groups {
                for c in 0..4 {
                    let from = (r * groups + g) * Q4_GROUP_BYTES + c * 4;
                    let to = q4_chunk_at(Q4_TILE, groups, r, g, c);
                    wt[to..to + 4].copy_from_slice(&plain[from..from + 4]);
                }
                st[q4_scale_at(Q4_TILE, groups, r, g)] = plain_s[r * groups + g];
            }
        }
    }
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Turns this path off (libtorch's `linear` everywhere) or on again, for the calling thread:
/// for comparisons.
pub fn set_enabled(on: bool) {
    ENABLED.with(|e| e.set(on));
}

/// Whether this path runs here (a kernel level above [`Level::Torch`]); elsewhere libtorch's
/// `linear` runs.
pub fn available() -> bool {
    level() > Level::Torch
}

/// Whether [`gemv`]'s kernels run for the calling thread (available, and not turned off by
/// [`set_enabled`]).
pub fn enabled_here() -> bool {
    ENABLED.with(Cell::get) && available()
}

/// Runs `f(0..n)` on the products' threads (this one included), each index once.
pub fn for_each_task(n: usize, f: impl Fn(usize) + Sync) {
    let threads = pool_threads().min(n);
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    };
    if threads <= 1 {
        work();
        return;
    }
    // this thread works too; the pool's threads join in
    run_on_threads(threads, &work);
}

/// The environment variable that forces a kernel level: `avx512bf16`, `avx512`, `avx2` or
/// `torch`.
pub const KERNEL_ENV: &str = "INTERNVL_KERNEL";

/// The kernels a product runs with, ordered from the slowest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// libtorch's `linear`; a direct [`gemv`] call takes the portable loop.
    Torch,
    /// AVX2 + FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512F: 16 f32 lanes.
    Avx512,
    /// AVX-512F, and AVX512-BF16's pair dot products for bf16 weights.
    Avx512Bf16,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Torch, Level::Avx2, Level::Avx512, Level::Avx512Bf16];

    /// The name `INTERNVL_KERNEL` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Torch => "torch",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Bf16 => "avx512bf16",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The best level this CPU runs.
    pub fn detected() -> Level {
        if simd::avx512_bf16() {
            Level::Avx512Bf16
        } else if simd::avx512() {
            Level::Avx512
        } else if simd::avx2_fma() {
            Level::Avx2
        } else {
            Level::Torch
        }
    }

    /// Every level this CPU runs, slowest first.
    pub fn supported() -> Vec<Level> {
        let best = Level::detected();
        Level::ALL.into_iter().filter(|&l| l <= best).collect()
    }
}

/// The level for a `request` (the variable's value, if set) on a CPU whose best is `best`, and
/// the warning to give when the request cannot be followed.
fn choose(request: Option<&str>, best: Level) -> (Level, Option<String>) {
    let Some(request) = request.filter(|r| !r.trim().is_empty()) else {
        return (best, None);
    };
    match Level::parse(request) {
        Some(l) if l <= best => (l, None),
        Some(l) => (
            best,
            Some(format!(
                "{KERNEL_ENV}={}: this CPU lacks it, using {}",
                l.name(),
                best.name()
            )),
        ),
        None => (
            best,
            Some(format!(
                "{KERNEL_ENV}={request:?} is not one of avx512bf16, avx512, avx2, torch; using {}",
                best.name()
            )),
        ),
    }
}

/// The level products run at in this process: the CPU's best, or the lower one `INTERNVL_KERNEL`
/// asks for (read once; a request the CPU cannot follow is logged once and falls back).
pub fn level() -> Level {
    level_and_note().0
}

/// Why the level differs from the one `INTERNVL_KERNEL` asked for, if it does.
pub fn level_note() -> Option<&'static str> {
    level_and_note().1.as_deref()
}

fn level_and_note() -> &'static (Level, Option<String>) {
    static LEVEL: OnceLock<(Level, Option<String>)> = OnceLock::new();
    LEVEL.get_or_init(|| {
        let (level, note) = choose(std::env::var(KERNEL_ENV).ok().as_deref(), Level::detected());
        if let Some(n) = &note {
            tracing::warn!("{n}");
        }
        (level, note)
    })
}

static CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many times [`linear`] ran in this process (tests check that decoding takes this path).
pub fn calls() -> usize {
    CALLS.load(Ordering::Relaxed)
}

/// Whether [`linear`] handles `x` [.., k] with `weight` (bf16, int8 or packed 4-bit; bf16
/// activations on the CPU, at most [`MAX_ROWS`] rows).
pub fn applies(xs: &Tensor, weight: &Tensor) -> bool {
    let k = *xs.size().last().unwrap_or(&0);
    takes(xs, weight) && (xs.numel() as i64 / k) as usize <= MAX_ROWS
}

/// [`applies`] but for the number of rows: [`linear`] takes `xs` [.., k] [`MAX_ROWS`] rows at
/// a time.
pub fn takes(xs: &Tensor, weight: &Tensor) -> bool {
    let k = *xs.size().last().unwrap_or(&0);
    ENABLED.with(Cell::get)
        && available()
        && xs.device() == Device::Cpu
        && weight.device() == Device::Cpu
        && xs.kind() == Kind::BFloat16
        && matches!(weight.kind(), Kind::BFloat16 | Kind::Int8 | Kind::Uint8)
        && k > 0
        && weight.is_contiguous()
}

/// `xs` [.., k] times `weight` [n, k] transposed, scaled per row by `scale` [n] (int8 weights),
/// plus `bias` [n]: [.., n] in bf16. A uint8 `weight` [n, groups * 16] is packed 4-bit with
/// `scale` [n, groups] ([`WeightRef::Q4`]). Call only where [`applies`] holds.
pub fn linear(
    xs: &Tensor,
    weight: &Tensor,
    scale: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Tensor {
    linear_at(level(), xs, weight, scale, bias)
}

/// [`linear`] with the kernels of `level`.
fn linear_at(
    level: Level,
    xs: &Tensor,
    weight: &Tensor,
    scale: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Tensor {
    CALLS.fetch_add(1, Ordering::Relaxed);
    let (n, _) = weight.size2().expect("a linear weight is 2-d");
    let k = *xs.size().last().expect("checked by applies");
    let rows = (xs.numel() as i64 / k) as usize;
    let x = xs.reshape([rows as i64, k]).contiguous();
    let bias = bias.map(|b| to_f32_vec(&b.to_kind(Kind::BFloat16).contiguous()));
    let scale = scale.map(|s| s.to_kind(Kind::BFloat16).contiguous());
    let mut shape = xs.size();
    *shape.last_mut().expect("checked above") = n;
    let out = Tensor::empty(shape.as_slice(), (Kind::BFloat16, Device::Cpu));
    let w = match (&scale, weight.kind()) {
        (None, _) => WeightRef::Bf16(slice_of::<u16>(weight)),
        (Some(s), Kind::Uint8) => WeightRef::Q4(slice_of::<u8>(weight), slice_of::<u16>(s)),
        (Some(s), _) => WeightRef::Int8(slice_of::<i8>(weight), slice_of::<u16>(s)),
    };
    // SAFETY: `out` is a fresh contiguous bf16 CPU tensor of rows * n elements, written only
    // here, through this one slice.
    let out_slice =
        unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut u16, rows * n as usize) };
    gemv_at(
        level,
        slice_of::<u16>(&x),
        rows,
        &w,
        bias.as_deref(),
        out_slice,
    );
    out
}

/// `f32` to bf16 bits as `half::bf16::from_f32` rounds them (to nearest, ties to even; a NaN
/// stays a NaN, its top mantissa bit set), without branches: the products' outputs go through
/// it by the hundred thousand per token (the int8 head alone has 151,936), and a loop over it
/// vectorises where `from_f32`'s branches kept each output scalar. The native step and the
/// 4-bit dequantization round with it too.
#[inline]
pub(crate) fn bf16_bits(y: f32) -> u16 {
    let x = y.to_bits();
    let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let quiet = ((x >> 16) | 0x0040) as u16;
    if nan {
        quiet
    } else {
        rounded
    }
}

/// The elements of a contiguous CPU tensor.
pub(crate) fn slice_of<T>(t: &Tensor) -> &[T] {
    assert!(t.is_contiguous() && t.device() == Device::Cpu);
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    assert_eq!(t.kind().elt_size_in_bytes(), std::mem::size_of::<T>());
    // SAFETY: a contiguous CPU tensor of `n` elements of this size starts at data_ptr, and the
    // borrow of `t` keeps its storage alive.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) }
}

/// A contiguous CPU bf16 tensor's values as f32.
pub(crate) fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    slice_of::<u16>(t).iter().map(|&b| b.to_f32()).collect()
}

/// Row-major `x` [rows, k] (bf16 bits) times `w` [n, k] transposed plus `bias` [n], rounded to
/// bf16 into `out` [rows, n]. `k` is `x.len() / rows`.
pub fn gemv(x: &[u16], rows: usize, w: &WeightRef, bias: Option<&[f32]>, out: &mut [u16]) {
    gemv_at(level(), x, rows, w, bias, out)
}

/// [`gemv`] with the kernels of `level` ([`Level::Torch`]: the portable loop), which this CPU
/// must run.
pub fn gemv_at(
    level: Level,
    x: &[u16],
    rows: usize,
    w: &WeightRef,
    bias: Option<&[f32]>,
    out: &mut [u16],
) {
    // the kernels' instructions exist only up to the detected level
    assert!(
        level <= Level::detected(),
        "kernel level {level:?} on a CPU without it"
    );
    assert!((1..=MAX_ROWS).contains(&rows) && x.len().is_multiple_of(rows));
    let k = x.len() / rows;
    let n = out.len() / rows;
    match w {
        WeightRef::Bf16(w) => assert_eq!(w.len(), n * k),
        WeightRef::Int8(w, s) => assert!(w.len() == n * k && s.len() == n),
        WeightRef::Q4(w, s) => {
            let groups = k.div_ceil(Q4_GROUP);
            assert!(w.len() == n * groups * Q4_GROUP_BYTES && s.len() == n * groups);
        }
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), n);
    }
    let input = match w {
        WeightRef::Bf16(_) if level == Level::Avx512Bf16 => Input::Pairs(x),
        WeightRef::Bf16(_) if level == Level::Avx2 => Input::Split(split_even_odd(x, rows, 16)),
        WeightRef::Bf16(_) if level == Level::Avx512 => Input::Split(split_even_odd(x, rows, 32)),
        WeightRef::Bf16(_) => Input::F32(x.iter().map(|&b| b.to_f32()).collect()),
        WeightRef::Int8(..) => Input::Int8(int8::Int8Input::new(x, rows)),
        WeightRef::Q4(..) => Input::Q8(q4::Q8Input::new(x, rows)),
    };
    let job = Job {
        input,
        level,
        rows,
        k,
        n,
        w,
        bias,
        out: OutPtr(out.as_mut_ptr()),
    };
    let threads = pool_threads();
    // about four chunks per thread, claimed in turn, so a descheduled thread costs little
    // (whole 4-bit tiles: a chunk starts on a tile)
    let chunk = n.div_ceil(threads * 4).max(16).next_multiple_of(Q4_TILE);
    let chunks = n.div_ceil(chunk);
    let next = AtomicUsize::new(0);
    let work = || loop {
        let c = next.fetch_add(1, Ordering::Relaxed);
        if c >= chunks {
            break;
        }
        job.run(c * chunk, ((c + 1) * chunk).min(n));
    };
    if threads == 1 || chunks == 1 {
        work();
        return;
    }
    // this thread works too; the pool's threads join in
    run_on_threads(threads.min(chunks), &work);
}

struct OutPtr(*mut u16);
// SAFETY: the chunks of one call write disjoint output columns (weight rows), and the scope
// ends before `out` is used again.
unsafe impl Sync for OutPtr {}

/// The input rows as a weight's kernels read them.
enum Input<'a> {
    /// bf16, for bf16 weights through AVX512-BF16 pair dot products.
    Pairs(&'a [u16]),
    /// f32, for bf16 weights through the portable loop.
    F32(Vec<f32>),
    /// f32 in [`split_even_odd`]'s order, for bf16 weights through the AVX-512F (blocks of 32)
    /// and AVX2 (blocks of 16) kernels.
    Split(Vec<f32>),
    /// Quantized for int8 weights (LLM.int8()).
    Int8(int8::Int8Input),
    /// Quantized in groups for 4-bit weights.
    Q8(q4::Q8Input),
}

struct Job<'a> {
    input: Input<'a>,
    /// The kernels' level.
    level: Level,
    rows: usize,
    k: usize,
    n: usize,
    w: &'a WeightRef<'a>,
    bias: Option<&'a [f32]>,
    out: OutPtr,
}

impl Job<'_> {
    /// Output columns `lo..hi` (weight rows) for every input row.
    fn run(&self, lo: usize, hi: usize) {
        // SAFETY: r < rows and i < n index inside `out` [rows, n]; this chunk alone writes
        // column i.
        let put = |i: usize, r: usize, y: u16| unsafe { *self.out.0.add(r * self.n + i) = y };
        let (w, x) = match (self.w, &self.input) {
            (WeightRef::Int8(w, s), Input::Int8(x)) => {
                return x.outputs(self.level, w, s, self.bias, lo, hi, put);
            }
            (WeightRef::Q4(w, s), Input::Q8(x)) => {
                return x.outputs(self.level, w, s, self.bias, lo, hi, put);
            }
            (WeightRef::Bf16(w), x) => (w, x),
            _ => unreachable!("the input is made for its weight"),
        };
        let mut dots = [0f32; MAX_ROWS];
        for i in lo..hi {
            let b = self.bias.map_or(0.0, |b| b[i]);
            let dots = &mut dots[..self.rows];
            let wr = &w[i * self.k..(i + 1) * self.k];
            match x {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Pairs` is only made where the CPU has AVX512-BF16.
                Input::Pairs(xb) => unsafe { simd::dot_pairs(xb, self.rows, wr, dots) },
                Input::F32(xf) => dot_portable(xf, self.rows, wr, dots),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Split` is only made for the AVX-512F and AVX2 levels, which
                // `gemv_at` checked this CPU has.
                Input::Split(xs) => unsafe {
                    if self.level == Level::Avx512 {
                        simd::dot_split512(xs, self.rows, wr, dots)
                    } else {
                        simd::dot_split(xs, self.rows, wr, dots)
                    }
                },
                _ => unreachable!("bf16 weights read bf16 or f32 inputs"),
            }
            for (r, d) in dots.iter().enumerate() {
                put(i, r, bf16_bits(d + b));
            }
        }
    }
}
/// A weight element (bf16 bits).
pub trait Weight: Copy {
    fn to_f32(self) -> f32;
}

impl Weight for u16 {
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub fn avx512_bf16() -> bool {
        false
    }
    pub fn avx512() -> bool {
        false
    }
    pub fn avx2_fma() -> bool {
        false
    }
}

/// The input rows `x` (bf16 bits, `rows` rows) as f32 for [`simd::dot_split`] (`block` 16) and
/// [`simd::dot_split512`] (32): each row's whole blocks with their even elements first, then
/// the odd ones; the last `k % block` in order.
///
/// Why: bf16 weights loaded as u32 lanes hold the odd elements in their top halves, which are
/// already those elements as f32 once the low halves are masked off, and the even ones become
/// f32 by one shift left. Two instructions widen a register's worth of weights, where widening
/// half as many at a time (`vpmovzxwd` then a shift) took four and loaded the shuffle port.
fn split_even_odd(x: &[u16], rows: usize, block: usize) -> Vec<f32> {
    let k = x.len() / rows;
    let whole = k - k % block;
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(k) {
        for block in row[..whole].chunks_exact(block) {
            out.extend(block.iter().step_by(2).map(|&b| b.to_f32()));
            out.extend(block.iter().skip(1).step_by(2).map(|&b| b.to_f32()));
        }
        out.extend(row[whole..].iter().map(|&b| b.to_f32()));
    }
    out
}

/// `dots[r] = x[r] · w` for each of `rows` input rows and one weight row (unscaled): the
/// portable loop.
fn dot_portable(x: &[f32], rows: usize, w: &[u16], dots: &mut [f32]) {
    let k = w.len();
    for (r, d) in dots.iter_mut().enumerate().take(rows) {
        // eight partial sums, as the vector kernels keep: one running sum of a long row loses
        // more than one bf16 ulp where the terms nearly cancel (and does not vectorise)
        let xr = &x[r * k..(r + 1) * k];
        let mut lanes = [0f32; 8];
        for (xs, ws) in xr.chunks_exact(8).zip(w.chunks_exact(8)) {
            for ((l, a), &b) in lanes.iter_mut().zip(xs).zip(ws) {
                *l += a * b.to_f32();
            }
        }
        let tail = k - k % 8;
        let tail_sum: f32 = xr[tail..]
            .iter()
            .zip(&w[tail..])
            .map(|(a, &b)| a * b.to_f32())
            .sum();
        *d = lanes.iter().sum::<f32>() + tail_sum;
    }
}

/// The 32 weights of 4-bit group `g` (16 packed bytes and its scale) as f32: `(q - 8) * scale`,
/// exact in f32 (a 4-bit integer times a bf16 scale).
fn q4_group(bytes: &[u8], scale: u16) -> [f32; Q4_GROUP] {
    let s = scale.to_f32();
    let mut out = [0f32; Q4_GROUP];
    for (j, &b) in bytes.iter().enumerate().take(Q4_GROUP_BYTES) {
        out[j] = ((b & 0x0f) as i32 - 8) as f32 * s;
        out[j + Q4_GROUP_BYTES] = ((b >> 4) as i32 - 8) as f32 * s;
    }
    out
}

/// `v` (|v| < 2^22) rounded to the nearest integer, ties to even, as `round_ties_even` (a libm
/// call without SSE4.1, too slow for every weight of a load or every input of a product):
/// adding and subtracting 1.5 * 2^23 leaves the f32 rounding to do it, in plain vector
/// arithmetic.
#[inline(always)]
fn round_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// The divisors [`quantize_q4`] tries: a group's first scale is its largest-magnitude weight
/// over minus one of these (8 puts that weight on -8 exactly, as llama.cpp's Q4_0 does; a
/// smaller one leaves room for a large weight of the other sign, which 8 clamps to 7).
const Q4_SEARCH: [f32; 4] = [8.0, 7.5, 7.0, 8.5];

/// One group of 32 weights (a partial group padded with zeros) to 4-bit: for each divisor of
/// [`Q4_SEARCH`], the values round(w / s) clamped to -8..=7 for s = peak / -divisor (in bf16),
/// then the least-squares scale of those values, sum(w q) / sum(q^2), rounded to bf16 (the scale
/// the kernels use); the candidate with the smallest squared error wins. An all-zero group gets
/// scale 1. Returns the 16 packed bytes and the scale's bf16 bits.
#[inline(always)]
fn quantize_group(v: &[f32; Q4_GROUP]) -> ([u8; Q4_GROUP_BYTES], u16) {
    let peak = v
        .iter()
        .fold(0f32, |p, &x| if x.abs() > p.abs() { x } else { p });
    let one = bf16::from_f32(1.0);
    let mut best: Option<(f32, bf16, [f32; Q4_GROUP])> = None;
    for c in Q4_SEARCH {
        let s = bf16::from_f32(peak / -c);
        let s = if s.to_f32() == 0.0 { one } else { s };
        let inv = 1.0 / s.to_f32();
        let mut q = [0f32; Q4_GROUP];
        for (q, &x) in q.iter_mut().zip(v) {
            // clamped first: the rounding needs a small magnitude (and NaN becomes -8)
            *q = round_small((x * inv).clamp(-8.0, 7.0));
        }
        // eight lanes of partial sums, one vector register each
        let mut num = [0f32; 8];
        let mut den = [0f32; 8];
        for (qs, vs) in q.chunks_exact(8).zip(v.chunks_exact(8)) {
            for l in 0..8 {
                num[l] += qs[l] * vs[l];
                den[l] += qs[l] * qs[l];
            }
        }
        let (num, den): (f32, f32) = (num.iter().sum(), den.iter().sum());
        let fit = bf16::from_f32(num / den.max(1.0));
        let scale = if fit.to_f32() == 0.0 { s } else { fit };
        let sf = scale.to_f32();
        let mut err = [0f32; 8];
        for (qs, vs) in q.chunks_exact(8).zip(v.chunks_exact(8)) {
            for l in 0..8 {
                let d = vs[l] - qs[l] * sf;
                err[l] += d * d;
            }
        }
        let err: f32 = err.iter().sum();
        if best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, scale, q));
        }
    }
    let (_, scale, q) = best.expect("at least one candidate");
    let mut bytes = [0u8; Q4_GROUP_BYTES];
    for (j, b) in bytes.iter_mut().enumerate() {
        let lo = (q[j] + 8.0) as u8;
        let hi = (q[j + Q4_GROUP_BYTES] + 8.0) as u8;
        *b = lo | (hi << 4);
    }
    (bytes, scale.to_bits())
}

/// [`quantize_group`] over every group of `w`'s rows of `k`.
#[inline(always)]
fn quantize_rows(w: &[f32], k: usize, q: &mut [u8], scales: &mut [u16]) {
    let groups = k.div_ceil(Q4_GROUP);
    for (i, row) in w.chunks_exact(k).enumerate() {
        for g in 0..groups {
            let start = g * Q4_GROUP;
            let len = Q4_GROUP.min(k - start);
            let mut v = [0f32; Q4_GROUP];
            v[..len].copy_from_slice(&row[start..start + len]);
            let (bytes, s) = quantize_group(&v);
            let at = (i * groups + g) * Q4_GROUP_BYTES;
            q[at..at + Q4_GROUP_BYTES].copy_from_slice(&bytes);
            scales[i * groups + g] = s;
        }
    }
}

/// [`quantize_rows`] compiled for AVX2 + FMA (8 lanes instead of SSE2's 4): the same
/// arithmetic, so the same results.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_rows_avx2(w: &[f32], k: usize, q: &mut [u8], scales: &mut [u16]) {
    quantize_rows(w, k, q, scales)
}

/// Rows of `w` [n, k] (f32) to 4-bit (see [`Q4_GROUP`] and [`quantize_group`]): the packed
/// bytes into `q` [n, groups * 16] and the scales' bf16 bits into `scales` [n, groups], in
/// plain row order ([`tile_q4`] then tiles the whole matrix), on the pool's threads.
pub fn quantize_q4(w: &[f32], k: usize, q: &mut [u8], scales: &mut [u16]) {
    let groups = k.div_ceil(Q4_GROUP);
    let n = w.len() / k.max(1);
    assert!(
        k > 0
            && w.len() == n * k
            && q.len() == n * groups * Q4_GROUP_BYTES
            && scales.len() == n * groups
    );
    let rows_of = |lo: usize, q: &mut [u8], scales: &mut [u16]| {
        let rows = &w[lo * k..(lo + scales.len() / groups) * k];
        #[cfg(target_arch = "x86_64")]
        if simd::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { quantize_rows_avx2(rows, k, q, scales) };
            return;
        }
        quantize_rows(rows, k, q, scales);
    };
    let threads = pool_threads();
    let per = n.div_ceil(threads * 4).max(16);
    if threads == 1 || n <= per {
        rows_of(0, q, scales);
        return;
    }
    let next = std::sync::Mutex::new(
        q.chunks_mut(per * groups * Q4_GROUP_BYTES)
            .zip(scales.chunks_mut(per * groups))
            .enumerate(),
    );
    let work = || loop {
        let Some((c, (q, s))) = next.lock().expect("not poisoned").next() else {
            break;
        };
        rows_of(c * per, q, s);
    };
    // this thread works too; the pool's threads join in
    run_on_threads(threads, &work);
}

/// Packed 4-bit weights `w` [n, groups * 16] with `scales` [n, groups] (see [`Q4_GROUP`], in
/// [`Q4_TILE`]'s tiles) as a
/// dense row-major [n, k] of bf16 bits (each `q * scale` rounded once to bf16, as libtorch's
/// f32 -> bf16 cast rounds), on the pool's threads: the weight prefill's GEMM reads.
pub fn dequantize_q4(w: &[u8], scales: &[u16], k: usize, out: &mut [u16]) {
    let groups = k.div_ceil(Q4_GROUP);
    let n = out.len() / k.max(1);
    assert!(
        k > 0
            && out.len() == n * k
            && w.len() == n * groups * Q4_GROUP_BYTES
            && scales.len() == n * groups
    );
    let rows_of = |lo: usize, out: &mut [u16]| {
        for (i, o) in out.chunks_exact_mut(k).enumerate() {
            let row = lo + i;
            for g in 0..groups {
                let (bytes, s) = q4_row_group(w, scales, n, groups, row, g);
                let wg = q4_group(&bytes, s);
                let start = g * Q4_GROUP;
                let len = Q4_GROUP.min(k - start);
                for (o, v) in o[start..start + len].iter_mut().zip(&wg) {
                    *o = bf16_bits(*v);
                }
            }
        }
    };
    let threads = pool_threads();
    let per = n.div_ceil(threads * 4).max(64);
    if threads == 1 || n <= per {
        rows_of(0, out);
        return;
    }
    let next = std::sync::Mutex::new(out.chunks_mut(per * k).enumerate());
    let work = || loop {
        let Some((c, chunk)) = next.lock().expect("not poisoned").next() else {
            break;
        };
        rows_of(c * per, chunk);
    };
    // this thread works too; the pool's threads join in
    run_on_threads(threads, &work);
}

#[cfg(target_arch = "x86_64")]
// indexed loops over the constant-size accumulator arrays: they unroll into registers
#[allow(clippy::needless_range_loop)]
mod simd {
    use super::Weight;
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn avx512_bf16() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| avx512() && is_x86_feature_detected!("avx512bf16"))
    }

    /// `dots[r] = x[r] · w` with bf16 `x` and `w`, 32 elements at a time by VDPBF16PS (each
    /// product exact in f32, accumulated in f32), `U` accumulators per input row: enough
    /// independent chains to hide the latency (`M * U` >= 4) without running out of registers.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot_pairs_m<const M: usize, const U: usize>(x: &[u16], w: &[u16], dots: &mut [f32]) {
        let k = w.len();
        let mut acc = [[_mm512_setzero_ps(); U]; M];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let ld = |p: *const u16| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(p.cast())) };
        let mut j = 0;
        while j + 32 * U <= k {
            for u in 0..U {
                super::prefetch(wp.add(j + 32 * u).cast());
                let wv = ld(wp.add(j + 32 * u));
                for r in 0..M {
                    acc[r][u] = _mm512_dpbf16_ps(acc[r][u], wv, ld(xp.add(r * k + j + 32 * u)));
                }
            }
            j += 32 * U;
        }
        while j + 32 <= k {
            let wv = ld(wp.add(j));
            for r in 0..M {
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], wv, ld(xp.add(r * k + j)));
            }
            j += 32;
        }
        for r in 0..M {
            let mut sum = acc[r][0];
            for u in 1..U {
                sum = _mm512_add_ps(sum, acc[r][u]);
            }
            let mut s = _mm512_reduce_add_ps(sum);
            for t in j..k {
                s += x[r * k + t].to_f32() * w[t].to_f32();
            }
            dots[r] = s;
        }
    }

    /// [`dot_pairs_m`] for `rows` (1..=8) input rows, 4 at a time (the weight row read again
    /// from cache for the next 4), every row with the same 4 accumulators: a row's sum is
    /// added in the same order whatever the rows beside it, so a scheduler row decodes the
    /// bits it would alone.
    ///
    /// # Safety
    /// The CPU has AVX512-BF16; `x` holds `rows * w.len()` values and `dots` `rows`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot_pairs(x: &[u16], rows: usize, w: &[u16], dots: &mut [f32]) {
        debug_assert!(x.len() >= rows * w.len() && dots.len() >= rows);
        let k = w.len();
        let mut r = 0;
        while r < rows {
            let (x, dots) = (&x[r * k..], &mut dots[r..]);
            match rows - r {
                1 => dot_pairs_m::<1, 4>(x, w, dots),
                2 => dot_pairs_m::<2, 4>(x, w, dots),
                3 => dot_pairs_m::<3, 4>(x, w, dots),
                _ => dot_pairs_m::<4, 4>(x, w, dots),
            }
            r += 4;
        }
    }

    pub fn avx512() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }

    pub fn avx2_fma() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// `dots[r] = x[r] · w` for `M` input rows on AVX-512F, `x` in [`super::split_even_odd`]'s
    /// order with blocks of 32: [`dot_split_m`] with 16 lanes, one block a step, two
    /// accumulators per input row (even, odd), each row's own.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_split512_m<const M: usize>(x: &[f32], w: &[u16], dots: &mut [f32]) {
        let k = w.len();
        let top = _mm512_set1_epi32(0xffff_0000_u32 as i32);
        let mut even = [_mm512_setzero_ps(); M];
        let mut odd = [_mm512_setzero_ps(); M];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut j = 0;
        while j + 32 <= k {
            super::prefetch(wp.add(j).cast());
            let v = _mm512_loadu_si512(wp.add(j).cast());
            let we = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
            let wo = _mm512_castsi512_ps(_mm512_and_si512(v, top));
            for r in 0..M {
                let xr = xp.add(r * k + j);
                even[r] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xr), even[r]);
                odd[r] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xr.add(16)), odd[r]);
            }
            j += 32;
        }
        for r in 0..M {
            let mut s = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
            // the tail, in order
            for t in j..k {
                s += x[r * k + t] * w[t].to_f32();
            }
            dots[r] = s;
        }
    }

    /// [`dot_split512_m`] for `rows` (1..=8) input rows.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x` holds `rows * w.len()` values in
    /// [`super::split_even_odd`]'s order (blocks of 32) and `dots` `rows`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_split512(x: &[f32], rows: usize, w: &[u16], dots: &mut [f32]) {
        debug_assert!(x.len() >= rows * w.len() && dots.len() >= rows);
        for_rows!(rows, dot_split512_m(x, w, dots))
    }

    /// `dots[r] = x[r] · w` for `M` input rows on AVX2, `x` in [`super::split_even_odd`]'s
    /// order: each 16 weights are loaded as 8 u32 lanes, whose top halves masked are the odd
    /// weights as f32 and whose low halves shifted up the even ones, and each meets its 8
    /// inputs in an FMA. `U` blocks of 16 a step, two accumulators each (even, odd): `2 * U`
    /// independent chains per input row.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_split_m<const M: usize, const U: usize>(x: &[f32], w: &[u16], dots: &mut [f32]) {
        let k = w.len();
        let top = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let mut even = [[_mm256_setzero_ps(); U]; M];
        let mut odd = [[_mm256_setzero_ps(); U]; M];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut j = 0;
        while j + 16 * U <= k {
            for u in 0..U {
                let at = j + 16 * u;
                if at % 32 == 0 {
                    super::prefetch(wp.add(at).cast());
                }
                let v = _mm256_loadu_si256(wp.add(at).cast());
                let we = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                let wo = _mm256_castsi256_ps(_mm256_and_si256(v, top));
                for r in 0..M {
                    let xr = xp.add(r * k + at);
                    even[r][u] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xr), even[r][u]);
                    odd[r][u] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xr.add(8)), odd[r][u]);
                }
            }
            j += 16 * U;
        }
        while j + 16 <= k {
            let v = _mm256_loadu_si256(wp.add(j).cast());
            let we = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
            let wo = _mm256_castsi256_ps(_mm256_and_si256(v, top));
            for r in 0..M {
                let xr = xp.add(r * k + j);
                even[r][0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xr), even[r][0]);
                odd[r][0] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xr.add(8)), odd[r][0]);
            }
            j += 16;
        }
        for r in 0..M {
            let mut sum = _mm256_add_ps(even[r][0], odd[r][0]);
            for u in 1..U {
                sum = _mm256_add_ps(sum, _mm256_add_ps(even[r][u], odd[r][u]));
            }
            // the 8 lanes: halves, then pairs, then the last two
            let h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
            let mut s = _mm_cvtss_f32(h);
            // the tail, in order
            for t in j..k {
                s += x[r * k + t] * w[t].to_f32();
            }
            dots[r] = s;
        }
    }

    /// [`dot_split_m`] for `rows` (1..=8) input rows, 2 at a time with the same 6 accumulators
    /// each (the weight row read again from cache for the next 2): every row's sum in the same
    /// order whatever the rows beside it, as [`dot_pairs`] has it.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `x` holds `rows * w.len()` values in
    /// [`super::split_even_odd`]'s order and `dots` `rows`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_split(x: &[f32], rows: usize, w: &[u16], dots: &mut [f32]) {
        debug_assert!(x.len() >= rows * w.len() && dots.len() >= rows);
        let k = w.len();
        let mut r = 0;
        while r < rows {
            let (x, dots) = (&x[r * k..], &mut dots[r..]);
            match rows - r {
                1 => dot_split_m::<1, 3>(x, w, dots),
                _ => dot_split_m::<2, 3>(x, w, dots),
            }
            r += 2;
        }
    }
}

/// Threads for the products: libtorch's intra-op count when first asked (after `--threads`).
fn pool_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| tch::get_num_threads().max(1) as usize)
}

/// While alive, libtorch runs its own ops on one thread and restores its count after.
///
/// For decoding steps: their libtorch ops (norms, rope, attention over one query) are too small
/// to gain from threads, and libgomp's idle threads spin after every parallel region, taking the
/// cores this module's pool needs (measured: 24.5 tok/s with both at two threads, 31 with
/// libtorch at one).
pub struct TorchSingleThreaded {
    restore: i32,
}

impl TorchSingleThreaded {
    pub fn new() -> Self {
        pool_threads(); // fixed before libtorch's count changes
        if !available() {
            // libtorch's `linear` does the products (`INTERNVL_KERNEL=torch`, an old CPU): it
            // needs its threads
            return Self { restore: 1 };
        }
        let restore = tch::get_num_threads();
        if restore != 1 {
            tch::set_num_threads(1);
        }
        Self { restore }
    }
}

impl Default for TorchSingleThreaded {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TorchSingleThreaded {
    fn drop(&mut self) {
        if self.restore != 1 {
            tch::set_num_threads(self.restore);
        }
    }
}

/// Runs `work` on `threads` threads at once, this one included (each call of `work` claims its
/// own share of the job), and returns when all of them are done.
///
/// A decoding step makes some 120 such calls per token, a few hundred microseconds apart. The
/// pool's threads spin for [`SPIN`] after each call before they sleep, so within a step they are
/// already running when the next call comes, instead of being woken for each one (as a rayon pool's
/// sleeping threads are; llama.cpp's threads spin the same way). A call that finds the pool busy
/// (another thread's product, e.g. parallel tests) runs alone on its own thread.
fn run_on_threads(threads: usize, work: &(dyn Fn() + Sync)) {
    let pool = hot_pool();
    let helpers = threads.saturating_sub(1).min(pool.workers);
    let Some(_busy) = (helpers > 0).then(|| pool.busy.try_lock().ok()).flatten() else {
        work();
        return;
    };
    // SAFETY: the pointer is only used until every helper has finished below, while `work` lives
    let job: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(work) };
    *pool.job.lock().expect("not poisoned") = Some(JobPtr(job));
    pool.resting.store(false, Ordering::Release);
    pool.pending.store(helpers, Ordering::Release);
    pool.wanted.store(helpers, Ordering::Release);
    pool.epoch.fetch_add(1, Ordering::AcqRel);
    {
        let sleeping = pool.sleepers.lock().expect("not poisoned");
        if *sleeping > 0 {
            pool.wake.notify_all();
        }
    }
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    while pool.pending.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
    *pool.job.lock().expect("not poisoned") = None;
    if pool.failed.swap(false, Ordering::AcqRel) {
        panic!("a product's thread panicked");
    }
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
}

/// Sends the products' threads to sleep now rather than after [`SPIN`]: for a caller whose
/// next work is libtorch's, whose libgomp threads need the cores.
pub fn rest() {
    hot_pool().resting.store(true, Ordering::Release);
}

/// How long a pool thread spins for the next call before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_millis(2);

#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn() + Sync + 'static));
// SAFETY: the job is `Sync`, and outlives its use (see `run_on_threads`).
unsafe impl Send for JobPtr {}

struct HotPool {
    workers: usize,
    /// Held by the call the threads work for.
    busy: std::sync::Mutex<()>,
    job: std::sync::Mutex<Option<JobPtr>>,
    /// Counts calls: a thread that sees it change takes the job.
    epoch: std::sync::atomic::AtomicU64,
    /// Threads still to take this call's job, and threads still working on it.
    wanted: AtomicUsize,
    pending: AtomicUsize,
    failed: std::sync::atomic::AtomicBool,
    /// Set by [`rest`]: the threads sleep now instead of spinning for the next call.
    resting: std::sync::atomic::AtomicBool,
    sleepers: std::sync::Mutex<usize>,
    wake: std::sync::Condvar,
}

/// The pool, created on first use with libtorch's thread count at that time.
fn hot_pool() -> &'static HotPool {
    static POOL: OnceLock<&'static HotPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool: &'static HotPool = Box::leak(Box::new(HotPool {
            workers: pool_threads().saturating_sub(1),
            busy: Default::default(),
            job: Default::default(),
            epoch: Default::default(),
            wanted: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            failed: Default::default(),
            resting: Default::default(),
            sleepers: Default::default(),
            wake: Default::default(),
        }));
        for i in 0..pool.workers {
            std::thread::Builder::new()
                .name(format!("gemv-{i}"))
                .spawn(move || pool.serve())
                .expect("starting the GEMV threads");
        }
        pool
    })
}

impl HotPool {
    fn serve(&self) {
        // the epoch the pool started with: a call may come before this thread first runs
        let mut seen = 0;
        loop {
            let t0 = std::time::Instant::now();
            let mut spins = 0u32;
            while self.epoch.load(Ordering::Acquire) == seen {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(1024)
                    && (self.resting.load(Ordering::Acquire) || t0.elapsed() > SPIN)
                {
                    let mut sleeping = self.sleepers.lock().expect("not poisoned");
                    *sleeping += 1;
                    while self.epoch.load(Ordering::Acquire) == seen {
                        sleeping = self.wake.wait(sleeping).expect("not poisoned");
                    }
                    *sleeping -= 1;
                }
            }
            seen = self.epoch.load(Ordering::Acquire);
            // a call wants `wanted` threads: the others sit this one out
            let take = self
                .wanted
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1))
                .is_ok();
            if !take {
                continue;
            }
            let job = (*self.job.lock().expect("not poisoned")).expect("set before the call");
            // SAFETY: the caller waits for `pending` to reach 0 before `work` goes away
            let ok =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job.0)() }));
            if ok.is_err() {
                self.failed.store(true, Ordering::Release);
            }
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::Rng;

    fn bf16_ulps(a: &Tensor, b: &Tensor) -> i64 {
        // bf16 bit patterns of finite same-sign values are ordered: their distance in ulps
        let bits = |t: &Tensor| t.view_dtype(Kind::Int16).to_kind(Kind::Int64);
        (bits(a) - bits(b)).abs().max().int64_value(&[])
    }

    /// Integer-valued inputs make every sum exact in f32, whatever the order: the result must then
    /// equal libtorch's bit for bit (rounding once to bf16, bias added before rounding), at
    /// every kernel level this CPU has (`Torch`: the portable loop).
    #[test]
    fn exact_sums_equal_libtorch_bit_for_bit() {
        let mut rng = Rng::new(3);
        for k in [7i64, 16, 40, 203, 896] {
            let w = rng.randint(-8, 8, &[300, k]).to_kind(Kind::BFloat16);
            let b = (rng.randint(-50, 50, &[300]) / 4.0).to_kind(Kind::BFloat16);
            for rows in 1..=MAX_ROWS as i64 {
                let x = rng.randint(-3, 4, &[1, rows, k]).to_kind(Kind::BFloat16);
                assert_eq!(applies(&x, &w), available());
                let want = x.linear(&w, Some(&b));
                let want_nb = x.linear::<&Tensor>(&w, None);
                for level in Level::supported() {
                    let got = linear_at(level, &x, &w, None, Some(&b));
                    assert_eq!(got.size(), want.size());
                    assert!(got.equal(&want), "{level:?} k {k} rows {rows}");
                    assert!(linear_at(level, &x, &w, None, None).equal(&want_nb));
                }
            }
        }
    }

    /// Real-valued inputs: within one bf16 ulp of libtorch (the f32 sums are added in another
    /// order), on every row count and kernel level; each row's outputs are the bits it gets
    /// alone (a scheduler row's answer does not depend on the requests beside it).
    #[test]
    fn random_inputs_within_one_ulp_of_libtorch() {
        let mut rng = Rng::new(4);
        for (n, k) in [(257, 904), (40, 4864)] {
            let w = (rng.randn(&[n, k]) * 0.05).to_kind(Kind::BFloat16);
            let b = rng.randn(&[n]).to_kind(Kind::BFloat16);
            for rows in 1..=MAX_ROWS as i64 {
                let x = rng.randn(&[rows, k]).to_kind(Kind::BFloat16);
                let want = x.linear(&w, Some(&b));
                for level in Level::supported() {
                    let got = linear_at(level, &x, &w, None, Some(&b));
                    assert!(bf16_ulps(&got, &want) <= 1, "{level:?} {k} rows {rows}");
                    for r in 0..rows {
                        let alone = linear_at(level, &x.narrow(0, r, 1), &w, None, Some(&b));
                        assert!(
                            got.narrow(0, r, 1).equal(&alone),
                            "{level:?} k {k} rows {rows}: row {r} differs from itself alone"
                        );
                    }
                }
            }
        }
    }

    /// bitsandbytes' LLM.int8() written in libtorch's ops, as its reference backend does
    /// (`int8_vectorwise_quant` with the threshold, `int8_mm_dequant`, the outlier columns
    /// added by `addmm`), for `x` [rows, k] (bf16), int8 `q` [n, k] with bf16 `scale` [n] and
    /// `bias` [n]: (the int8 part alone in bf16, the result in f64 before its last rounding).
    fn llm_int8_reference(
        x: &Tensor,
        q: &Tensor,
        scale: &Tensor,
        bias: &Tensor,
    ) -> (Tensor, Tensor) {
        let xf = x.to_kind(Kind::Float);
        let outlier = xf.abs().ge(INT8_THRESHOLD as f64);
        // each row's own outlier columns (see int8::Int8Input::new)
        let cols = outlier.copy();
        let kept = xf.masked_fill(&outlier, 0.0);
        let absmax = kept.abs().amax([1].as_slice(), true);
        let factor = (absmax.ones_like() * 127.0) / &absmax;
        let qx = (&kept * &factor)
            .round()
            .nan_to_num(0.0, None, None)
            .masked_fill(&cols, 0.0);
        // integer sums, exact in f64, rounded to f32 as an i32 is
        let sums = qx
            .to_kind(Kind::Double)
            .matmul(&q.to_kind(Kind::Double).tr())
            .to_kind(Kind::Float);
        let step = &absmax / 127.0;
        let sw = scale.to_kind(Kind::Float).unsqueeze(0);
        let int_part = (sums * (step * &sw) + bias.to_kind(Kind::Float)).to_kind(Kind::BFloat16);
        let wd = (q.to_kind(Kind::Float) * sw.tr()).to_kind(Kind::BFloat16);
        let out_part = xf
            .masked_fill(&cols.logical_not(), 0.0)
            .to_kind(Kind::Double)
            .matmul(&wd.to_kind(Kind::Double).tr());
        let full = int_part.to_kind(Kind::Double) + out_part;
        (int_part, full)
    }

    /// int8 weights multiply int8-quantized inputs (LLM.int8()): at every level, on lengths
    /// with and without tails of each kernel's blocks, for every row count. The integer sums are
    /// exact, so every level gives the same bits; without outliers that equals the reference bit
    /// for bit, and with outliers (inputs of magnitude >= 6, in one row only) it is within
    /// one bf16 ulp of the reference's f64 sum (the outlier products are added in f32). A zero
    /// row and a row of nothing but outliers are covered, and every row of a batch equals that
    /// row alone.
    #[test]
    fn int8_products_are_llm_int8_at_every_level() {
        let mut rng = Rng::new(6);
        let n = 70;
        for k in [8i64, 24, 64, 100, 200, 203, 896] {
            let wf = rng.randn(&[n, k]) * 0.05;
            let (q, scale) = crate::model::nn::quantize_rows(&wf, Kind::BFloat16);
            let b = rng.randn(&[n]).to_kind(Kind::BFloat16);
            for rows in 1..=MAX_ROWS as i64 {
                for outliers in [false, true] {
                    let x = rng.randn(&[rows, k]).clamp(-5.9, 5.9);
                    if outliers {
                        // large inputs in row 0 (outlier columns of that row only), a zero
                        // last row
                        let idx = Tensor::from_slice(&[0i64, k / 2, k - 1]);
                        let big = Tensor::from_slice(&[7.5f32, -19.0, 6.0]);
                        let _ = x.get(0).index_put_(&[Some(idx)], &big, false);
                        if rows > 1 {
                            let _ = x.get(rows - 1).fill_(0.0);
                        }
                        if k == 8 {
                            let _ = x.get(0).fill_(8.0);
                        }
                    }
                    let x = x.to_kind(Kind::BFloat16);
                    let (int_part, full) = llm_int8_reference(&x, &q, &scale, &b);
                    let mut first: Option<Tensor> = None;
                    for level in Level::supported() {
                        let got = linear_at(level, &x, &q, Some(&scale), Some(&b));
                        let label = format!("{level:?} k {k} rows {rows} outliers {outliers}");
                        if outliers {
                            let ulps = bf16_ulps(&got, &full.to_kind(Kind::BFloat16));
                            assert!(ulps <= 1, "{label}: {ulps} ulps");
                        } else {
                            assert!(got.equal(&int_part), "{label}");
                        }
                        // each row as it is alone, whatever the rows beside it
                        for r in 0..rows {
                            let alone =
                                linear_at(level, &x.narrow(0, r, 1), &q, Some(&scale), Some(&b));
                            assert!(got.narrow(0, r, 1).equal(&alone), "{label}: row {r} alone");
                        }
                        match &first {
                            None => first = Some(got),
                            Some(f) => assert!(got.equal(f), "{label}: levels differ"),
                        }
                    }
                }
            }
        }
    }

    /// Every level (AVX512-BF16 pairs, AVX-512 and AVX2 FMAs, the portable loop) within one ulp
    /// of libtorch on random values and exact on exact sums, on lengths that leave a tail after
    /// each kernel's blocks, for every row count.
    #[test]
    fn every_level_agrees_with_libtorch() {
        let mut rng = Rng::new(5);
        let n = 130;
        for k in [200i64, 203] {
            for exact in [true, false] {
                for rows in 1..=MAX_ROWS {
                    let r = rows as i64;
                    let (w, x) = if exact {
                        (rng.randint(-8, 8, &[n, k]), rng.randint(-3, 4, &[r, k]))
                    } else {
                        (rng.randn(&[n, k]) * 0.05, rng.randn(&[r, k]))
                    };
                    let (w, x) = (w.to_kind(Kind::BFloat16), x.to_kind(Kind::BFloat16));
                    let want = x.linear::<&Tensor>(&w, None);
                    for level in Level::supported() {
                        let mut out = vec![0u16; rows * n as usize];
                        let wr = WeightRef::Bf16(slice_of::<u16>(&w));
                        gemv_at(level, slice_of::<u16>(&x), rows, &wr, None, &mut out);
                        let got =
                            Tensor::from_slice(&out.iter().map(|&b| b as i16).collect::<Vec<_>>())
                                .view_dtype(Kind::BFloat16)
                                .view([r, n]);
                        let ulps = bf16_ulps(&got, &want);
                        assert!(
                            ulps <= if exact { 0 } else { 1 },
                            "{level:?} k {k} rows {rows} exact {exact}: {ulps}"
                        );
                    }
                }
            }
        }
    }

    fn bf16_tensor(bits: &[u16], shape: &[i64]) -> Tensor {
        Tensor::from_slice(&bits.iter().map(|&b| b as i16).collect::<Vec<_>>())
            .view_dtype(Kind::BFloat16)
            .view(shape)
    }

    /// llama.cpp's Q4_0 x Q8_0 product written in libtorch's ops, in f64 before its one
    /// rounding: the inputs `x` [rows, k] (bf16) quantized per group of 32 (scale absmax / 127,
    /// values `round(x * (127 / absmax))`), the exact integer sums of each group against the
    /// 4-bit values `q` [n, k] (-8..=7), each times its two scales, summed, plus `bias`.
    fn q4_q8_reference(x: &Tensor, q: &Tensor, scale: &Tensor, bias: &Tensor) -> Tensor {
        let (rows, k) = x.size2().unwrap();
        let n = q.size()[0];
        let groups = (k + 31) / 32;
        let pad = groups * 32 - k;
        let xg = x
            .to_kind(Kind::Float)
            .constant_pad_nd([0, pad])
            .view([rows, groups, 32]);
        let absmax = xg.abs().amax([2].as_slice(), true);
        let factor = (absmax.ones_like() * 127.0) / &absmax;
        let xq = (&xg * factor).round().nan_to_num(0.0, None, None);
        let d = (absmax / 127.0).squeeze_dim(2).to_kind(Kind::Double);
        let qw = q
            .constant_pad_nd([0, pad])
            .view([n, groups, 32])
            .to_kind(Kind::Double);
        // [rows, n, groups]
        let sums = Tensor::einsum("rgj,ngj->rng", &[xq.to_kind(Kind::Double), qw], None::<i64>);
        let s = sums * scale.to_kind(Kind::Double).unsqueeze(0) * d.unsqueeze(1);
        s.sum_dim_intlist([2].as_slice(), false, Kind::Double) + bias.to_kind(Kind::Double)
    }

    /// 4-bit weights multiply inputs quantized in groups of 32 (as Q4_0 meets Q8_0): within one
    /// bf16 ulp of the reference's f64 sum at every level (the f32 sum over groups is added in
    /// another order) and every row count, on lengths with whole groups, an odd number of
    /// groups, a partial last group, and rows shorter than a group; with zero groups and a
    /// large input in some groups.
    #[test]
    fn q4_products_are_q4_times_q8_at_every_level() {
        let mut rng = Rng::new(7);
        for (n, k) in [
            (70i64, 8i64),
            (70, 16),
            (70, 32),
            (70, 40),
            (33, 96),
            (100, 203),
            (257, 896),
            (9, 4864),
        ] {
            let wf = rng.randn(&[n, k]) * 0.05;
            let (packed, scale) = crate::model::nn::quantize_q4(&wf);
            let groups = (k + 31) / 32;
            let dense = crate::model::nn::dequantize_q4(&packed, &scale, k);
            let (_, plain_scale) = crate::model::nn::untile_q4(&packed, &scale);
            let per = plain_scale
                .to_kind(Kind::Float)
                .repeat_interleave_self_int(32, 1, None)
                .narrow(1, 0, k);
            let q = (dense.narrow(1, 0, k) / per).round();
            assert!(q.abs().max().double_value(&[]) <= 8.0 && groups == scale.size()[1]);
            let b = rng.randn(&[n]).to_kind(Kind::BFloat16);
            for rows in 1..=MAX_ROWS as i64 {
                let x = rng.randn(&[rows, k]);
                let _ = x.get(0).narrow(0, 0, k.min(32)).fill_(0.0);
                let _ = x.get(rows - 1).narrow(0, k - 1, 1).fill_(40.0);
                let x = x.to_kind(Kind::BFloat16);
                assert_eq!(applies(&x, &packed), available());
                let want = q4_q8_reference(&x, &q, &plain_scale, &b).to_kind(Kind::BFloat16);
                let portable = linear_at(Level::Torch, &x, &packed, Some(&scale), Some(&b));
                for level in Level::supported() {
                    let got = linear_at(level, &x, &packed, Some(&scale), Some(&b));
                    let ulps = bf16_ulps(&got, &want);
                    assert!(ulps <= 1, "{level:?} n {n} k {k} rows {rows}: {ulps} ulps");
                    // every level sums in the same order
                    assert!(
                        got.equal(&portable),
                        "{level:?} n {n} k {k} rows {rows}: not the portable bits"
                    );
                    // a row's outputs do not depend on the rows beside it
                    for r in 0..rows {
                        let alone =
                            linear_at(level, &x.narrow(0, r, 1), &packed, Some(&scale), Some(&b));
                        assert!(
                            got.narrow(0, r, 1).equal(&alone),
                            "{level:?} n {n} k {k} rows {rows}: row {r} differs from itself alone"
                        );
                    }
                }
            }
        }
    }

    /// The native dequantization (prefill's) equals libtorch's ops rounded to bf16, bit for bit,
    /// also over several threads' chunks.
    #[test]
    fn q4_dequantize_equals_libtorch_ops() {
        let mut rng = Rng::new(9);
        for (n, k) in [(1000i64, 64i64), (70, 203), (5, 8)] {
            let wf = rng.randn(&[n, k]);
            let (packed, scale) = crate::model::nn::quantize_q4(&wf);
            let want = crate::model::nn::dequantize_q4(&packed, &scale, k).to_kind(Kind::BFloat16);
            let mut out = vec![0u16; (n * k) as usize];
            dequantize_q4(
                slice_of::<u8>(&packed),
                slice_of::<u16>(&scale),
                k as usize,
                &mut out,
            );
            assert!(bf16_tensor(&out, &[n, k]).equal(&want), "n {n} k {k}");
        }
    }

    /// The branchless rounding equals `half`'s on every class of value: zeros, subnormals,
    /// ties either way, the largest finite values (rounding to infinity), infinities and NaNs,
    /// and a million random bit patterns.
    #[test]
    fn bf16_bits_round_as_half_does() {
        let mut special = vec![
            0u32,
            0x8000_0000,
            1,
            0x8000_0001,
            0x0000_8000,
            0x0001_8000,
            0x0001_7fff,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0xffff_ffff,
            0x7fff_8000,
        ];
        let mut state = 1u64;
        special.extend((0..1_000_000).map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 32) as u32
        }));
        for x in special {
            let y = f32::from_bits(x);
            assert_eq!(bf16_bits(y), bf16::from_f32(y).to_bits(), "{x:#010x}");
        }
    }

    #[test]
    fn kernel_requests_fall_back_to_what_the_cpu_has() {
        use Level::*;
        assert_eq!(choose(None, Avx512Bf16), (Avx512Bf16, None));
        assert_eq!(choose(Some(""), Avx2), (Avx2, None));
        assert_eq!(choose(Some("avx2"), Avx512Bf16), (Avx2, None));
        assert_eq!(choose(Some("AVX512"), Avx512Bf16), (Avx512, None));
        assert_eq!(choose(Some("torch"), Avx2), (Torch, None));
        let (l, note) = choose(Some("avx512bf16"), Avx2);
        assert_eq!(l, Avx2);
        assert_eq!(
            note.as_deref(),
            Some("INTERNVL_KERNEL=avx512bf16: this CPU lacks it, using avx2")
        );
        let (l, note) = choose(Some("sse"), Avx512);
        assert_eq!(l, Avx512);
        assert!(note.is_some_and(|n| n.contains("\"sse\" is not one of")));
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
        }
        // what this CPU has is ordered and ends at its best
        let s = Level::supported();
        assert_eq!(s.first(), Some(&Torch));
        assert_eq!(s.last(), Some(&Level::detected()));
    }

    /// The thread pool splits the weight rows: many rows, several threads, same answer as one.
    #[test]
    fn chunks_cover_every_output_once() {
        let k = 32;
        let n = 1000;
        let xf: Vec<f32> = (0..2 * k).map(|i| (i % 5) as f32).collect();
        let x: Vec<u16> = xf.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let w: Vec<u16> = (0..n * k)
            .map(|i| bf16::from_f32(((i / k) % 7) as f32).to_bits())
            .collect();
        let mut out = vec![0u16; 2 * n];
        gemv(&x, 2, &WeightRef::Bf16(&w), None, &mut out);
        let xs: [f32; 2] = [xf[..k].iter().sum(), xf[k..].iter().sum()];
        for r in 0..2 {
            for i in 0..n {
                let want = bf16::from_f32(xs[r] * (i % 7) as f32).to_bits();
                assert_eq!(out[r * n + i], want, "row {r} col {i}");
            }
        }
    }
}
