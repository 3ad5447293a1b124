//! Attention over many queries on the CPU in bf16: InternViT's (full, 1025 tokens a tile, 16
//! heads of 64); also a decoder prompt's (causal, grouped-query, after any cached positions;
//! `Llm::prefill`), where a query's bits do not depend on the queries computed with it.
//!
//! Why our own: libtorch's CPU attention for InternViT's shape (its flash kernel, or the eager
//! `softmax(q k^T) v` the reference writes) runs `q k^T` with an inner size of only 64 through
//! oneDNN at about a third of this machine's bf16 matmul speed and goes through the 16 x 1025 x
//! 1025 scores several times in memory: it took as long as the layer's q/k/v product. For a
//! prompt the decoders passed a dense causal mask, under which libtorch computed every score.
//! Here each block of 16 queries gets its scores against the keys it may see in one buffer that
//! stays in cache, an exact softmax over them, and their product with the values: pair dot
//! products (AVX512-BF16's `vdpbf16ps`: bf16 products exact in f32, f32 sums) against keys and
//! values repacked once per key-value head.
//!
//! What it computes is what libtorch's flash kernel computes for bf16: scores in f32 scaled in
//! f32, softmax in f32 (max subtracted), probabilities rounded to bf16 for the product with the
//! values and summed as rounded, accumulated in f32, divided by the sum and rounded once to
//! bf16. A unit test holds its error against attention in f64 to that kernel's.
//!
//! Runs where the products' kernel level is AVX512-BF16 (`INTERNVL_KERNEL` forces it off) on
//! bf16 CPU tensors with an even head size; elsewhere libtorch's attention runs. Where the CPU
//! has AMX, a prompt's blocks with a head size that is a multiple of 32 multiply in AMX tiles
//! (`tdpbf16ps`, the same pair products and f32 sums per element; a 7-tile prompt's first
//! token 5.1 -> 4.6 s) and pictures go to libtorch's flash kernel (see [`applies_full`]).
use super::gemv;
use tch::{Device, Kind, Tensor};

/// Queries a task takes: their scores against every key (f32) stay in one buffer.
const QUERY_BLOCK: usize = 16;

/// Query blocks whose prompt attention ran in AMX tiles in this process (tests check the path).
static TILE_BLOCKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether a prompt's attention runs in AMX tiles here: the CPU has them (see [`applies_full`])
/// and Linux lets this process use them. Its head size must also be a multiple of 32.
#[cfg(test)]
fn prompt_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd::amx_ready()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether [`attention`] runs for these `[batch, heads, tokens, head_dim]` queries.
pub fn applies(q: &Tensor) -> bool {
    let size = q.size();
    size.len() == 4
        && size[3] % 2 == 0
        && q.kind() == Kind::BFloat16
        && q.device() == Device::Cpu
        && gemv::level() == gemv::Level::Avx512Bf16
}

/// Whether [`attention`] runs for a picture's (full, not causal) attention over these queries:
/// where [`applies`] holds and the CPU has no AMX. libtorch's flash kernel multiplies in AMX
/// tiles where the CPU has them (oneDNN's brgemm), and there it is the faster one: 7.0 ms
/// against this kernel's 23.5 for one tile's 16 heads, 52 against 163 for seven
/// (`examples/profile_attention.rs`, on the project's machine once its VM exposed AMX). A
/// prompt's attention stays here: there a query's bits must not depend on the queries beside it.
pub fn applies_full(q: &Tensor) -> bool {
    applies(q) && !amx()
}

/// Whether the CPU multiplies bf16 in AMX tiles and the OS keeps their state (CPUID leaf 7's
/// AMX-BF16 and AMX-TILE, XCR0's tile bits): what oneDNN checks before it uses them.
fn amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            // SAFETY: CPUID exists on every x86-64 CPU; XGETBV only runs where CPUID says the OS
            // enabled it (OSXSAVE)
            unsafe {
                if __cpuid(0).eax < 7 || __cpuid(1).ecx & (1 << 27) == 0 {
                    return false;
                }
                let edx = __cpuid_count(7, 0).edx;
                #[target_feature(enable = "xsave")]
                unsafe fn xcr0() -> u64 {
                    _xgetbv(0)
                }
                let tiles = 0b11 << 17;
                edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && xcr0() & tiles == tiles
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `softmax(q k^T * scale) v` for `[batch, heads, tokens, head_dim]` views `q`, `k`, `v` (any
/// strides, the last dimension contiguous), as `[batch, tokens, heads * head_dim]`: the layout
/// the output projection takes. Call only where [`applies`] holds.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    attention_with(q, k, v, scale, None)
}

/// [`attention`] for queries `[batch, heads, q, d]` over keys and values
/// `[batch, kv_heads, kv, d]` (`heads` a multiple of `kv_heads`: query head `h` reads key-value
/// head `h / (heads / kv_heads)`, as `repeat_kv` has it); with `causal = Some(past)`, query `i`
/// sees keys `0..=past + i` only (a prompt after `past` cached positions, `kv = past + q`).
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: Option<usize>,
) -> Tensor {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(applies(q), "attention: bf16 CPU queries with AVX512-BF16");
        let (q, k, v) = (dense_last(q), dense_last(k), dense_last(v));
        let size = q.size();
        let (b, h, nq, d) = (
            size[0] as usize,
            size[1] as usize,
            size[2] as usize,
            size[3] as usize,
        );
        let ks = k.size();
        assert_eq!(v.size(), ks, "values shaped as the keys");
        assert!(
            ks[0] == size[0] && ks[3] == size[3] && ks[1] > 0 && size[1] % ks[1] == 0,
            "keys {ks:?} do not fit queries {size:?}"
        );
        let (kvh, n) = (ks[1] as usize, ks[2] as usize);
        if let Some(past) = causal {
            assert_eq!(
                past + nq,
                n,
                "causal: the keys are the past and the queries"
            );
        }
        let out = Tensor::empty(
            [b as i64, nq as i64, (h * d) as i64],
            (Kind::BFloat16, Device::Cpu),
        );
        let shape = Shape::new(nq, n, d, causal);
        // SAFETY: the level check above means the CPU has AVX512-BF16; the views describe
        // live tensors of the asserted shapes, and `out` is written only here
        unsafe {
            simd::attention(
                &shape,
                &View::of(&q, h),
                &View::of(&k, kvh),
                &View::of(&v, kvh),
                &out,
                scale as f32,
            )
        };
        out
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (k, v, scale, causal);
        unreachable!(
            "attention: no kernel for {:?} on this architecture",
            q.size()
        )
    }
}

/// The tensor itself if its last dimension is contiguous, else a contiguous copy.
fn dense_last(t: &Tensor) -> Tensor {
    if t.stride().last() == Some(&1) {
        t.shallow_clone()
    } else {
        t.contiguous()
    }
}

/// Sizes derived from the token counts and head size.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Queries.
    nq: usize,
    /// Keys.
    n: usize,
    d: usize,
    /// Causal: query `i` sees keys `0..=past + i`.
    causal: Option<usize>,
    /// Tokens rounded up to whole tiles of score columns; keys and values past `n` are zero.
    n_pad: usize,
    /// Head size rounded up to whole vectors of 16 output columns.
    d_pad: usize,
}

impl Shape {
    /// Score columns a tile of the `q k^T` kernel computes (two vectors of 16).
    const COLS: usize = 32;

    fn new(nq: usize, n: usize, d: usize, causal: Option<usize>) -> Self {
        Self {
            nq,
            n,
            d,
            causal,
            n_pad: n.div_ceil(Self::COLS) * Self::COLS,
            d_pad: d.div_ceil(16) * 16,
        }
    }

    /// Keys query `i` sees.
    fn seen(&self, i: usize) -> usize {
        self.causal
            .map_or(self.n, |past| (past + i + 1).min(self.n))
    }

    /// u32 pairs of one head's packed keys: per tile of 32 keys, `d / 2` rows of 32 pairs.
    fn keys_len(&self) -> usize {
        self.n_pad * self.d / 2
    }

    /// u32 pairs of one head's packed values: per pair of keys, `d_pad` columns.
    fn values_len(&self) -> usize {
        self.n_pad / 2 * self.d_pad
    }
}

/// Where `[batch, heads, tokens, d]` bf16 elements are: a base pointer and element strides.
struct View {
    ptr: *const u16,
    batch: usize,
    head: usize,
    token: usize,
    heads: usize,
}

// SAFETY: only read, while the tensor it describes lives (the duration of `attention`)
unsafe impl Sync for View {}

impl View {
    fn of(t: &Tensor, h: usize) -> Self {
        let s = t.stride();
        Self {
            ptr: t.data_ptr() as *const u16,
            batch: s[0] as usize,
            head: s[1] as usize,
            token: s[2] as usize,
            heads: h,
        }
    }

    /// Element 0 of token `j` of head `bh` (batch-major).
    fn row(&self, bh: usize, j: usize) -> *const u16 {
        let (b, h) = (bh / self.heads, bh % self.heads);
        // SAFETY (of the caller's use): in bounds for bh < batch * heads and j < tokens
        self.ptr
            .wrapping_add(b * self.batch + h * self.head + j * self.token)
    }
}

/// A buffer written from several threads at disjoint places.
struct Shared<T>(*mut T);
// SAFETY: every task writes its own part (see its uses)
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

#[cfg(target_arch = "x86_64")]
// indexed loops over the constant-size accumulator arrays: they unroll into registers
#[allow(clippy::needless_range_loop)]
mod simd {
    use super::{gemv, Shape, Shared, View, QUERY_BLOCK};
    use std::arch::x86_64::*;
    use std::cell::RefCell;
    use tch::Tensor;

    /// Queries one `q k^T` call takes.
    const QK_ROWS: usize = 8;
    /// The largest head size the AMX path takes (a block's queries are copied to the stack).
    const MAX_TILE_D: usize = 256;
    /// Queries one probabilities-times-values call takes (4 x 4 accumulators of 16 columns).
    const PV_ROWS: usize = 4;
    /// Output vectors of 16 columns one probabilities-times-values call takes.
    const PV_VECS: usize = 4;

    thread_local! {
        /// A task's scores (f32) and probabilities (bf16), kept between calls.
        static SCRATCH: RefCell<(Vec<f32>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// 16 bf16 pairs (32 values) from `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pairs(p: *const u32) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
    }

    /// One bf16 pair (two values packed in a u32) in every lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn broadcast(pair: i32) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair))
    }

    /// 16 bf16 values to `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn store_bf16(p: *mut u16, v: __m256bh) {
        _mm256_storeu_si256(p.cast(), std::mem::transmute::<__m256bh, __m256i>(v));
    }

    /// Whether this process may use AMX tiles ([`amx::ready`]).
    #[cfg(test)]
    pub fn amx_ready() -> bool {
        amx::ready()
    }

    /// AMX tiles for the scores and the outputs of a block of [`QUERY_BLOCK`] queries, where
    /// the CPU has them (the prompt's attention only; pictures go to libtorch there, see
    /// [`super::applies_full`]). Each tile's element is its own chain of pair products over the
    /// inner dimension, whatever the other rows hold, so a query's bits still do not depend on
    /// the queries computed with it. On this project's machine a 1847-token prompt's attention
    /// took 32 ms a layer in `vdpbf16ps` (about 70% of that instruction's peak on two cores).
    mod amx {
        use std::arch::asm;
        use std::sync::OnceLock;

        /// `ldtilecfg`'s 64 bytes: palette 1, every tile 16 rows of 64 bytes.
        #[repr(C, align(64))]
        struct Config {
            palette: u8,
            start_row: u8,
            reserved: [u8; 14],
            colsb: [u16; 16],
            rows: [u8; 16],
        }

        const CONFIG: Config = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
            rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
        };

        /// Whether this process may use AMX tiles: the CPU and OS keep their state
        /// ([`super::super::amx`]) and Linux granted this process the tile data
        /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once).
        pub fn ready() -> bool {
            static READY: OnceLock<bool> = OnceLock::new();
            *READY.get_or_init(|| {
                #[cfg(target_os = "linux")]
                {
                    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                    const XFEATURE_XTILEDATA: libc::c_long = 18;
                    // SAFETY: a plain system call; it only changes what this process may use
                    super::super::amx()
                        && unsafe {
                            libc::syscall(
                                libc::SYS_arch_prctl,
                                ARCH_REQ_XCOMP_PERM,
                                XFEATURE_XTILEDATA,
                            )
                        } == 0
                }
                // elsewhere the request differs; the kernel's own vector path runs
                #[cfg(not(target_os = "linux"))]
                false
            })
        }

        /// Configures this thread's tiles (every tile 16 x 64 bytes); [`off`] after.
        ///
        /// # Safety
        /// [`ready`] holds.
        pub unsafe fn on() {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const Config, options(nostack));
        }

        /// Releases this thread's tiles.
        ///
        /// # Safety
        /// [`on`] ran on this thread.
        pub unsafe fn off() {
            asm!("tilerelease", options(nostack, nomem));
        }

        /// `asm!` on accumulator tile `c` (0 to 3): the register is part of the instruction,
        /// `$pre tmmC $post`.
        macro_rules! on_acc {
            ($c:expr, $pre:literal, $post:literal, $($rest:tt)*) => {
                match $c {
                    0 => asm!(concat!($pre, "tmm0", $post), $($rest)*),
                    1 => asm!(concat!($pre, "tmm1", $post), $($rest)*),
                    2 => asm!(concat!($pre, "tmm2", $post), $($rest)*),
                    _ => asm!(concat!($pre, "tmm3", $post), $($rest)*),
                }
            };
        }

        /// Accumulator tile `c` (0 to 3) = 0.
        #[inline]
        pub unsafe fn zero(c: usize) {
            on_acc!(c, "tilezero ", "", options(nostack, nomem));
        }

        /// Tile 4 (the left operand: 16 rows of 32 bf16) from rows `stride` bytes apart.
        #[inline]
        pub unsafe fn load_a(p: *const u8, stride: usize) {
            asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly));
        }

        /// Tile 5 (a right operand: 16 rows of 16 bf16 pairs) from rows `stride` bytes apart.
        #[inline]
        pub unsafe fn load_b(p: *const u8, stride: usize) {
            asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride, options(nostack, readonly));
        }

        /// Accumulator tile `c` += tile 4 x tile 5 (`tdpbf16ps`).
        #[inline]
        pub unsafe fn dot(c: usize) {
            on_acc!(c, "tdpbf16ps ", ", tmm4, tmm5", options(nostack, nomem));
        }

        /// Accumulator tile `c` (16 rows of 16 f32) to rows `stride` bytes apart.
        #[inline]
        pub unsafe fn store(c: usize, p: *mut u8, stride: usize) {
            on_acc!(c, "tilestored [{p} + {s}*1], ", "", p = in(reg) p, s = in(reg) stride, options(nostack));
        }
    }

    /// [`scores_m`] for the block's 16 query rows at `qs` (`d` bf16 each, `d` a multiple of
    /// 32, rows past the block zero) in AMX tiles: 16 x 32 scores at a time into 16 rows of
    /// `width` f32 at `dst`, the first `m` (the block's queries) scaled.
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_amx(
        s: &Shape,
        width: usize,
        qs: &[u16],
        keys: &[u32],
        scale: f32,
        m: usize,
        dst: *mut f32,
    ) {
        let dp = s.d / 2;
        let kp = keys.as_ptr();
        for tile in 0..width / Shape::COLS {
            let kt = kp.add(tile * dp * Shape::COLS);
            amx::zero(0);
            amx::zero(1);
            for k in 0..s.d / 32 {
                amx::load_a(qs.as_ptr().add(k * 32).cast(), s.d * 2);
                // pair rows 16k.., the tile's first and second 16 keys
                let b = kt.add(k * 16 * Shape::COLS);
                amx::load_b(b.cast(), Shape::COLS * 4);
                amx::dot(0);
                amx::load_b(b.add(16).cast(), Shape::COLS * 4);
                amx::dot(1);
            }
            let at = dst.add(tile * Shape::COLS);
            amx::store(0, at.cast(), width * 4);
            amx::store(1, at.add(16).cast(), width * 4);
        }
        let scale = _mm512_set1_ps(scale);
        for j in (0..m * width).step_by(16) {
            let p = dst.add(j);
            _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), scale));
        }
    }

    /// [`outputs_m`] for the block's queries in AMX tiles: their probabilities (16 rows of
    /// `width` bf16 at `p`; rows past `m` are not used) times the packed values, times
    /// `inv[i]`, rounded to bf16 into `out[i][..d]` for the first `m` rows.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn outputs_amx(
        s: &Shape,
        width: usize,
        p: *const u16,
        values: &[u32],
        inv: &[f32; QUERY_BLOCK],
        m: usize,
        out: [*mut u16; QUERY_BLOCK],
    ) {
        let mut acc = [0f32; QUERY_BLOCK * 64];
        let vp = values.as_ptr();
        let mut col = 0;
        while col < s.d_pad {
            let tiles = ((s.d_pad - col) / 16).min(4);
            for c in 0..tiles {
                amx::zero(c);
            }
            for step in 0..width / 32 {
                amx::load_a(p.add(step * 32).cast(), width * 2);
                for c in 0..tiles {
                    // token pairs 16 step.., columns col + 16 c..
                    amx::load_b(
                        vp.add(step * 16 * s.d_pad + col + 16 * c).cast(),
                        s.d_pad * 4,
                    );
                    amx::dot(c);
                }
            }
            for c in 0..tiles {
                amx::store(c, acc.as_mut_ptr().add(16 * c).cast(), 64 * 4);
            }
            for r in 0..m {
                let scale = _mm512_set1_ps(inv[r]);
                for c in 0..tiles {
                    let v =
                        _mm512_mul_ps(_mm512_loadu_ps(acc.as_ptr().add(r * 64 + 16 * c)), scale);
                    let bf: [u16; 16] =
                        std::mem::transmute::<__m256bh, [u16; 16]>(_mm512_cvtneps_pbh(v));
                    let at = col + 16 * c;
                    let take = s.d.saturating_sub(at).min(16);
                    std::ptr::copy_nonoverlapping(bf.as_ptr(), out[r].add(at), take);
                }
            }
            col += 64;
        }
    }

    /// Queries x keys x heads x head size up to which a call runs on this thread alone (about
    /// 0.3 ms of work; a follow-up question's 17 positions over a 311-token picture prompt are
    /// 5M): a short prompt runs between libtorch's GEMMs, whose libgomp threads spin on the
    /// cores after each one, and gemv's threads, woken for the call, spin after it in turn. A
    /// follow-up's 17 positions took 0.14 to 0.16 s with both pools spinning, 0.066 to 0.076
    /// on this thread alone (with libtorch single-threaded too for up to 8 positions,
    /// `Llm::prefill`, 7 positions took 0.05 instead of 0.15 to 0.20).
    const SMALL: usize = 1 << 23;

    /// `f(0..n)` on this thread alone where the call is `small`, else on gemv's threads.
    fn tasks(small: bool, n: usize, f: impl Fn(usize) + Sync) {
        if small {
            (0..n).for_each(f);
        } else {
            gemv::for_each_task(n, f);
        }
    }

    /// # Safety
    /// The CPU has AVX512-BF16; `q` describes a live `[b, h, nq, d]` bf16 tensor and `k`, `v`
    /// live `[b, kv_heads, n, d]` ones, with a contiguous last dimension, and `out` is a
    /// contiguous `[b, nq, h * d]` bf16 tensor.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn attention(s: &Shape, q: &View, k: &View, v: &View, out: &Tensor, scale: f32) {
        let batch = out.size()[0] as usize;
        let (bh, bkv) = (batch * q.heads, batch * k.heads);
        let groups = q.heads / k.heads;
        let (kl, vl) = (s.keys_len(), s.values_len());
        // keys and values of every key-value head repacked into pairs, once
        let mut keys = vec![0u32; bkv * kl];
        let mut values = vec![0u32; bkv * vl];
        let small = s.nq * s.n * bh * s.d <= SMALL;
        {
            let (kp, vp) = (Shared(keys.as_mut_ptr()), Shared(values.as_mut_ptr()));
            tasks(small, bkv, |i| {
                // SAFETY: task i writes head i's part only
                let kd = std::slice::from_raw_parts_mut(kp.at(i * kl), kl);
                let vd = std::slice::from_raw_parts_mut(vp.at(i * vl), vl);
                pack_keys(s, k, i, kd);
                pack_values(s, v, i, vd);
            });
        }
        let blocks = s.nq.div_ceil(QUERY_BLOCK);
        let hd = q.heads * s.d;
        let tiles =
            s.causal.is_some() && s.d.is_multiple_of(32) && s.d <= MAX_TILE_D && amx::ready();
        let o = Shared(out.data_ptr() as *mut u16);
        // causal blocks grow with their position: the last ones first, so the threads end
        // together
        tasks(small, bh * blocks, |t| {
            let (head, blk) = (t % bh, blocks - 1 - t / bh);
            let (b, h) = (head / q.heads, head % q.heads);
            let kv = b * k.heads + h / groups;
            let rows = blk * QUERY_BLOCK..((blk + 1) * QUERY_BLOCK).min(s.nq);
            // keys this block sees, in whole tiles of score columns
            let width = s.seen(rows.end - 1).div_ceil(Shape::COLS) * Shape::COLS;
            SCRATCH.with(|sc| {
                let (scores, probs) = &mut *sc.borrow_mut();
                scores.resize(QUERY_BLOCK * s.n_pad, 0.0);
                probs.resize(QUERY_BLOCK * s.n_pad, 0);
                let kp = &keys[kv * kl..][..kl];
                let vp = &values[kv * vl..][..vl];
                let mut inv = [0f32; QUERY_BLOCK];
                if tiles {
                    // the block's queries, contiguous and zero past the block, as tile rows
                    let mut qs = [0u16; QUERY_BLOCK * MAX_TILE_D];
                    for (i, t) in rows.clone().enumerate() {
                        std::ptr::copy_nonoverlapping(
                            q.row(head, t),
                            qs.as_mut_ptr().add(i * s.d),
                            s.d,
                        );
                    }
                    amx::on();
                    let qs = &qs[..QUERY_BLOCK * s.d];
                    scores_amx(s, width, qs, kp, scale, rows.len(), scores.as_mut_ptr());
                } else {
                    // scores, 8 queries at a time
                    let mut r = 0;
                    while r < rows.len() {
                        let m = (rows.len() - r).min(QK_ROWS);
                        let qs: [*const u16; QK_ROWS] =
                            std::array::from_fn(|i| q.row(head, rows.start + r + i.min(m - 1)));
                        let dst = scores.as_mut_ptr().add(r * width);
                        match m {
                            8 => scores_m::<8>(s, width, qs, kp, scale, dst),
                            7 => scores_m::<7>(s, width, qs, kp, scale, dst),
                            6 => scores_m::<6>(s, width, qs, kp, scale, dst),
                            5 => scores_m::<5>(s, width, qs, kp, scale, dst),
                            4 => scores_m::<4>(s, width, qs, kp, scale, dst),
                            3 => scores_m::<3>(s, width, qs, kp, scale, dst),
                            2 => scores_m::<2>(s, width, qs, kp, scale, dst),
                            _ => scores_m::<1>(s, width, qs, kp, scale, dst),
                        }
                        r += m;
                    }
                }
                for r in 0..rows.len() {
                    let row = &scores[r * width..][..width];
                    let p = &mut probs[r * width..][..width];
                    inv[r] = 1.0 / softmax_row(row, s.seen(rows.start + r), p);
                }
                // SAFETY (of the writes through these): the block's outputs are this task's alone
                let out_row = |i: usize| o.at(((b * s.nq) + rows.start + i) * hd + h * s.d);
                if tiles {
                    let os: [*mut u16; QUERY_BLOCK] =
                        std::array::from_fn(|i| out_row(i.min(rows.len() - 1)));
                    outputs_amx(s, width, probs.as_ptr(), vp, &inv, rows.len(), os);
                    amx::off();
                    super::TILE_BLOCKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                // outputs, 4 queries at a time
                let mut r = 0;
                while r < rows.len() {
                    let m = (rows.len() - r).min(PV_ROWS);
                    let ps: [*const u16; PV_ROWS] =
                        std::array::from_fn(|i| probs.as_ptr().add((r + i.min(m - 1)) * width));
                    let os: [*mut u16; PV_ROWS] =
                        std::array::from_fn(|i| out_row(r + i.min(m - 1)));
                    let sc: [f32; PV_ROWS] = std::array::from_fn(|i| inv[r + i.min(m - 1)]);
                    match m {
                        4 => outputs_m::<4>(s, width, ps, vp, sc, os),
                        3 => outputs_m::<3>(s, width, ps, vp, sc, os),
                        2 => outputs_m::<2>(s, width, ps, vp, sc, os),
                        _ => outputs_m::<1>(s, width, ps, vp, sc, os),
                    }
                    r += m;
                }
            });
        });
        if !small && tch::get_num_threads() > 1 {
            // libtorch's output projection comes next, on libgomp's threads, which need the
            // cores (with libtorch on one thread, a prompt of up to 8 positions, the projection
            // is gemv's own, and its threads should stay awake for it)
            gemv::rest();
        }
    }

    /// Head `bh`'s keys as pairs along the head dimension: for each tile of 32 keys, `d / 2`
    /// rows of 32 pairs (key `j`'s elements `2p` and `2p + 1` in one u32), so a tile's
    /// `vdpbf16ps` operands are consecutive. Keys past `n` stay zero.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_keys(s: &Shape, k: &View, bh: usize, dst: &mut [u32]) {
        let dp = s.d / 2;
        assert_eq!(dst.len(), s.n_pad / Shape::COLS * dp * Shape::COLS);
        let out = dst.as_mut_ptr();
        for tile in 0..s.n.div_ceil(Shape::COLS) {
            let keys = (s.n - tile * Shape::COLS).min(Shape::COLS);
            let src: [*const u32; Shape::COLS] =
                std::array::from_fn(|c| k.row(bh, tile * Shape::COLS + c.min(keys - 1)).cast());
            let tile_out = out.add(tile * dp * Shape::COLS);
            for p in 0..dp {
                let row = tile_out.add(p * Shape::COLS);
                for (c, key) in src.iter().enumerate().take(keys) {
                    *row.add(c) = key.add(p).read_unaligned();
                }
            }
        }
    }

    /// Head `bh`'s values as pairs along the tokens: for each pair of tokens, `d_pad` columns
    /// (tokens `2t` and `2t + 1`'s element `c` in one u32). Tokens past `n` and columns past
    /// `d` stay zero.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_values(s: &Shape, v: &View, bh: usize, dst: &mut [u32]) {
        assert_eq!(dst.len(), s.n_pad / 2 * s.d_pad);
        let out = dst.as_mut_ptr();
        for t in 0..s.n.div_ceil(2) {
            let lo = v.row(bh, 2 * t);
            let hi = (2 * t + 1 < s.n).then(|| v.row(bh, 2 * t + 1));
            let row = out.add(t * s.d_pad);
            let mut c = 0;
            while c + 16 <= s.d {
                let l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(lo.add(c).cast()));
                let h = match hi {
                    Some(hi) => _mm512_cvtepu16_epi32(_mm256_loadu_si256(hi.add(c).cast())),
                    None => _mm512_setzero_si512(),
                };
                _mm512_storeu_si512(
                    row.add(c).cast(),
                    _mm512_or_si512(l, _mm512_slli_epi32::<16>(h)),
                );
                c += 16;
            }
            for c in c..s.d {
                let h = hi.map_or(0, |hi| hi.add(c).read() as u32);
                *row.add(c) = lo.add(c).read() as u32 | h << 16;
            }
        }
    }

    /// Scores of `M` queries (`q[i]`: a query's `d` elements) against the first `width` keys
    /// (whole tiles), scaled, into `M` rows of `width` f32 at `dst`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn scores_m<const M: usize>(
        s: &Shape,
        width: usize,
        q: [*const u16; QK_ROWS],
        keys: &[u32],
        scale: f32,
        dst: *mut f32,
    ) {
        let dp = s.d / 2;
        let scale = _mm512_set1_ps(scale);
        let kp = keys.as_ptr();
        for tile in 0..width / Shape::COLS {
            let kt = kp.add(tile * dp * Shape::COLS);
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            for p in 0..dp {
                let b0 = pairs(kt.add(p * 32));
                let b1 = pairs(kt.add(p * 32 + 16));
                for r in 0..M {
                    let pair = q[r].cast::<i32>().add(p).read_unaligned();
                    let a = broadcast(pair);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
                }
            }
            for r in 0..M {
                let row = dst.add(r * width + tile * Shape::COLS);
                _mm512_storeu_ps(row, _mm512_mul_ps(acc[r][0], scale));
                _mm512_storeu_ps(row.add(16), _mm512_mul_ps(acc[r][1], scale));
            }
        }
    }

    /// `e^x` for `x <= 0` within about 2 ulps (below -87.3 it is 0 or a subnormal-free tiny
    /// value): `x = k ln2 + r`, `|r| <= ln2 / 2`, a degree-6 polynomial for `e^r`, scaled by
    /// `2^k`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.3));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts: k * LN2_HI is exact for |k| < 2^9
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428_606_8e-6), r);
        let c = |v: f32| _mm512_set1_ps(v);
        let mut p = c(1.0 / 720.0);
        p = _mm512_fmadd_ps(p, r, c(1.0 / 120.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 24.0));
        p = _mm512_fmadd_ps(p, r, c(1.0 / 6.0));
        p = _mm512_fmadd_ps(p, r, c(0.5));
        p = _mm512_fmadd_ps(p, r, c(1.0));
        p = _mm512_fmadd_ps(p, r, c(1.0));
        _mm512_scalef_ps(p, k)
    }

    /// One query's probabilities from its scores `row[..n]`: `e^(x - max)` as bf16 into
    /// `p[..n]` (zeros after, up to its length); returns their f32 sum.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn softmax_row(row: &[f32], n: usize, p: &mut [u16]) -> f32 {
        let full = n / 16 * 16;
        let tail: __mmask16 = ((1u32 << (n - full)) - 1) as __mmask16;
        let rp = row.as_ptr();
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut j = 0;
        while j < full {
            mx = _mm512_max_ps(mx, _mm512_loadu_ps(rp.add(j)));
            j += 16;
        }
        if tail != 0 {
            mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, rp.add(full)));
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_ps();
        let pp = p.as_mut_ptr();
        let mut j = 0;
        while j < full {
            let e = _mm512_cvtneps_pbh(exp(_mm512_sub_ps(_mm512_loadu_ps(rp.add(j)), mx)));
            sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(e));
            store_bf16(pp.add(j), e);
            j += 16;
        }
        if tail != 0 {
            let e = _mm512_maskz_mov_ps(
                tail,
                exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, rp.add(full)), mx)),
            );
            let e = _mm512_cvtneps_pbh(e);
            sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(e));
            store_bf16(pp.add(full), e);
            j += 16;
        }
        let len = p.len();
        p[j.min(len)..].fill(0);
        _mm512_reduce_add_ps(sum)
    }

    /// Outputs of `M` queries: their probabilities (`p[i]`: `n_pad` bf16, zero past `n`) times
    /// the packed values, times `inv[i]` (one over the probabilities' sum), rounded to bf16
    /// into `out[i][..d]`; up to [`PV_VECS`] vectors of 16 columns at a time.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn outputs_m<const M: usize>(
        s: &Shape,
        width: usize,
        p: [*const u16; PV_ROWS],
        values: &[u32],
        inv: [f32; PV_ROWS],
        out: [*mut u16; PV_ROWS],
    ) {
        let mut col = 0;
        while col < s.d_pad {
            match (s.d_pad - col) / 16 {
                1 => outputs_mc::<M, 1>(s, width, p, values, inv, out, col),
                2 => outputs_mc::<M, 2>(s, width, p, values, inv, out, col),
                3 => outputs_mc::<M, 3>(s, width, p, values, inv, out, col),
                _ => outputs_mc::<M, 4>(s, width, p, values, inv, out, col),
            }
            col += 16 * PV_VECS;
        }
    }

    /// [`outputs_m`] for the `C` vectors of 16 columns from column `col`: `M * C` accumulators
    /// held in registers.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn outputs_mc<const M: usize, const C: usize>(
        s: &Shape,
        width: usize,
        p: [*const u16; PV_ROWS],
        values: &[u32],
        inv: [f32; PV_ROWS],
        out: [*mut u16; PV_ROWS],
        col: usize,
    ) {
        let token_pairs = width / 2;
        let vp = values.as_ptr().add(col);
        let mut acc = [[_mm512_setzero_ps(); C]; M];
        for t in 0..token_pairs {
            let row = vp.add(t * s.d_pad);
            let mut b: [__m512bh; C] = [std::mem::zeroed(); C];
            for c in 0..C {
                b[c] = pairs(row.add(16 * c));
            }
            for r in 0..M {
                let pair = p[r].cast::<i32>().add(t).read_unaligned();
                let a = broadcast(pair);
                for c in 0..C {
                    acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
                }
            }
        }
        for r in 0..M {
            let scale = _mm512_set1_ps(inv[r]);
            for c in 0..C {
                let bf: [u16; 16] = std::mem::transmute::<__m256bh, [u16; 16]>(_mm512_cvtneps_pbh(
                    _mm512_mul_ps(acc[r][c], scale),
                ));
                let at = col + 16 * c;
                let take = s.d.saturating_sub(at).min(16);
                std::ptr::copy_nonoverlapping(bf.as_ptr(), out[r].add(at), take);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llm::causal_mask;
    use crate::testutil::Rng;

    /// Attention in f64 from the same bf16 inputs: the exact result both kernels approximate.
    /// Keys and values `[b, kv_heads, kv, d]` serve `heads / kv_heads` query heads each; with
    /// `causal = Some(past)` query `i` sees keys `0..=past + i`.
    fn exact(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: Option<i64>) -> Tensor {
        let (b, h, nq, d) = q.size4().unwrap();
        let kvh = k.size()[1];
        let groups = h / kvh;
        let rep = |t: &Tensor| {
            t.to_kind(Kind::Double)
                .repeat_interleave_self_int(groups, Some(1), None)
        };
        let (q, k, v) = (q.to_kind(Kind::Double), rep(k), rep(v));
        let mut scores = q.matmul(&k.transpose(-2, -1)) * scale;
        if let Some(past) = causal {
            let hidden = causal_mask(nq, past, Device::Cpu).logical_not();
            scores = scores.masked_fill(&hidden, f64::NEG_INFINITY);
        }
        let a = scores.softmax(-1, Kind::Double);
        a.matmul(&v).transpose(1, 2).reshape([b, nq, h * d])
    }

    fn torch_bf16(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: Option<i64>) -> Tensor {
        let (b, h, nq, d) = q.size4().unwrap();
        let kvh = k.size()[1];
        let groups = h / kvh;
        let rep = |t: &Tensor| t.repeat_interleave_self_int(groups, Some(1), None);
        let mask = causal.map(|past| causal_mask(nq, past, Device::Cpu));
        Tensor::scaled_dot_product_attention(
            q,
            &rep(k),
            &rep(v),
            mask.as_ref(),
            0.0,
            false,
            scale,
            false,
        )
        .transpose(1, 2)
        .reshape([b, nq, h * d])
    }

    /// A query's output does not depend on the queries computed with it: a causal prompt cut
    /// anywhere (the cached prefix, then the rest; one new position after a reused prefix as
    /// the scheduler has it) gives each query the bits the whole prompt gives it, so a
    /// prompt's first logits do not depend on how much of it was cached.
    #[test]
    fn a_query_gets_the_same_bits_however_the_prompt_is_cut() {
        let _guard = tch::no_grad_guard();
        if gemv::level() != gemv::Level::Avx512Bf16 {
            eprintln!("attention kernel: this CPU lacks AVX512-BF16; nothing to cut");
            return;
        }
        let mut rng = Rng::new(5);
        let tiled = TILE_BLOCKS.load(std::sync::atomic::Ordering::Relaxed);
        // head sizes 64 and 128 run in AMX tiles where the CPU has them, 16 and 24 never
        for (h, kvh, n, d) in [
            (14, 2, 75, 64),
            (16, 8, 70, 128),
            (4, 2, 40, 16),
            (6, 3, 33, 24),
        ] {
            let q = (rng.randn(&[1, n, h, d]) * 1.5)
                .to_kind(Kind::BFloat16)
                .transpose(1, 2);
            let kv = (rng.randn(&[1, n, 2, kvh, d]) * 1.5)
                .to_kind(Kind::BFloat16)
                .permute([2, 0, 3, 1, 4]);
            let (k, v) = (kv.get(0), kv.get(1));
            let scale = (d as f64).powf(-0.5);
            let whole = attention_with(&q, &k, &v, scale, Some(0));
            for cut in [1, 7, 16, 17, 31, 32, n - 1] {
                let rest = n - cut;
                let part =
                    attention_with(&q.narrow(2, cut, rest), &k, &v, scale, Some(cut as usize));
                assert!(
                    part.equal(&whole.narrow(1, cut, rest)),
                    "h {h}/{kvh} n {n} d {d}: queries from {cut} on differ when computed apart"
                );
            }
        }
        if prompt_tiles() {
            assert!(
                TILE_BLOCKS.load(std::sync::atomic::Ordering::Relaxed) > tiled,
                "this CPU has AMX, yet no prompt block ran in tiles"
            );
        }
    }

    /// Against attention in f64, the kernel's largest error is no larger than libtorch's bf16
    /// attention's (its flash kernel, which the bf16 golden runs used), for head sizes of the
    /// tiny fixtures (16, 24), InternViT-300M (64) and -6B (128), token counts that do and do not
    /// fill a tile of 32 keys or a block of 16 queries, and q/k/v read in place from a fused
    /// `[b, n, 3, h, d]` projection as the vision model passes them.
    #[test]
    fn attention_is_as_accurate_as_libtorchs() {
        let _guard = tch::no_grad_guard();
        if gemv::level() != gemv::Level::Avx512Bf16 {
            // the kernel needs AVX512-BF16: elsewhere the vision model keeps libtorch's
            let q = Tensor::zeros([1, 1, 4, 64], (Kind::BFloat16, Device::Cpu));
            assert!(!applies(&q), "no AVX512-BF16, yet the kernel would run");
            eprintln!("attention kernel: this CPU lacks AVX512-BF16; checked that it stays off");
            return;
        }
        let mut rng = Rng::new(11);
        // (batch, heads, kv heads, queries, past keys, head size, causal)
        for (b, h, kvh, nq, past, d, causal) in [
            (1, 2, 2, 1, 0, 16, false),
            (2, 2, 2, 33, 0, 24, false),
            (1, 3, 3, 100, 0, 64, false),
            (2, 16, 16, 257, 0, 64, false),
            (1, 4, 4, 1025, 0, 64, false),
            (1, 2, 2, 70, 0, 128, false),
            // the decoders' prompts: grouped-query heads, causal, after cached positions or not
            (1, 14, 2, 311, 0, 64, true),
            (1, 4, 2, 50, 37, 16, true),
            (2, 6, 3, 17, 0, 24, true),
            (1, 16, 8, 129, 300, 128, true),
        ] {
            let n = past + nq;
            // scores of a realistic spread: some rows nearly one-hot, some flat
            let q = (rng.randn(&[b, nq, h, d]) * 1.5)
                .to_kind(Kind::BFloat16)
                .transpose(1, 2);
            let kv = (rng.randn(&[b, n, 2, kvh, d]) * 1.5)
                .to_kind(Kind::BFloat16)
                .permute([2, 0, 3, 1, 4]);
            let (k, v) = (kv.get(0), kv.get(1));
            assert!(applies(&q));
            let scale = (d as f64).powf(-0.5);
            let causal = causal.then_some(past);
            let ours = attention_with(&q, &k, &v, scale, causal.map(|p| p as usize));
            assert_eq!(ours.size(), [b, nq, h * d]);
            let want = exact(&q, &k, &v, scale, causal);
            let err = |t: &Tensor| {
                (t.to_kind(Kind::Double) - &want)
                    .abs()
                    .max()
                    .double_value(&[])
            };
            let mean = |t: &Tensor| {
                (t.to_kind(Kind::Double) - &want)
                    .abs()
                    .mean(Kind::Double)
                    .double_value(&[])
            };
            let torch = torch_bf16(&q, &k, &v, scale, causal);
            let (e_ours, e_torch) = (err(&ours), err(&torch));
            let (m_ours, m_torch) = (mean(&ours), mean(&torch));
            let case = format!("b {b} h {h}/{kvh} q {nq} past {past} d {d} causal {causal:?}");
            eprintln!(
                "{case}: error max {e_ours:.5} mean {m_ours:.6}; libtorch's max {e_torch:.5} mean {m_torch:.6}"
            );
            assert!(
                m_ours <= m_torch * 1.05 + 1e-9,
                "{case}: mean error ours {m_ours} vs libtorch {m_torch}"
            );
            assert!(
                e_ours <= e_torch * 1.25 + 1e-6,
                "{case}: ours {e_ours} vs libtorch {e_torch}"
            );
        }
    }
}
