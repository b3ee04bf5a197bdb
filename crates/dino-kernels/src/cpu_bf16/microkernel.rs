//! The bf16 microkernels: an `MR x NR` tile of f32 sums over packed k-pairs of bf16 values.
//!
//! Packed operands hold k in pairs, two bf16 in one `u32` (the even k in the low half):
//! an A panel is `[pairs][MR]`, a B panel `[pairs][NR]`. Each pair is added to the sum as
//! `vdpbf16ps` does it (Intel SDM): the odd k's product first, then the even k's, each an f32
//! addition rounded to nearest even, a result below f32's normal range flushed to zero. A product
//! of two bf16 values is exact in f32, so the portable kernel gets the same bits (save for
//! products that themselves fall below the normal range, which no trained network produces).

/// Rows of a tile (of the AVX-512 and portable kernels; AMX makes `amx::ROWS`).
pub(crate) const MR: usize = 12;
/// Columns of a tile: two 16-lane vectors.
pub(crate) const NR: usize = 32;

/// A tile of sums, row-major.
pub(crate) type Tile = [[f32; NR]; MR];

/// How a packed A panel holds its `MR` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ALayout {
    /// `[pairs][MR]`: what columns of Aᵀ pack into without a transpose (A stored by columns).
    PairsMajor,
    /// `[MR][pairs]`: each row of A converted as one contiguous run (A stored by rows).
    RowsMajor,
}

impl ALayout {
    /// (step between pairs, step between rows) in a panel of `pairs` pairs.
    #[inline(always)]
    fn steps(self, pairs: usize) -> (usize, usize) {
        match self {
            ALayout::PairsMajor => (MR, 1),
            ALayout::RowsMajor => (1, pairs),
        }
    }
}

/// Where a tile's sums go: its first `rows x cols` (`rows` at most [`Path::tile_rows`]) into an
/// f32 matrix with unit column stride (row stride `rs`), as `dst = scale · sums`, or `dst += scale · sums` when `add`, then plus
/// `bias[j]` on column j when `bias` is not null (it points at the tile's first column's).
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub ptr: *mut f32,
    pub rs: usize,
    pub rows: usize,
    pub cols: usize,
    pub add: bool,
    pub scale: f32,
    pub bias: *const f32,
}

/// Which microkernel runs the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Tile registers and `tdpbf16ps` (AMX-BF16: Intel Sapphire Rapids and later), where the OS
    /// grants the tile state. Sums in f32 in an order of the hardware's: not the bits of the
    /// other two, within the same error bound.
    Amx,
    /// `vdpbf16ps` on 512-bit vectors (AVX-512 BF16: Intel Cooper Lake, Sapphire Rapids and
    /// later; AMD Zen 4 and later).
    Avx512Bf16,
    /// Plain Rust that the compiler vectorises, on any CPU; the same bits as `Avx512Bf16`.
    Portable,
}

impl Path {
    /// The kernel the products run on (chosen once): the fastest this CPU runs, or the one
    /// `DINO_BF16_KERNEL` names (`amx`, `avx512bf16`, `portable`) where the CPU runs it, to
    /// compare them on one machine.
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            let available = Self::runnable();
            let fastest = *available.last().expect("the portable kernel runs anywhere");
            let Ok(name) = std::env::var("DINO_BF16_KERNEL") else { return fastest };
            match available.iter().find(|p| p.name() == name.to_ascii_lowercase()) {
                Some(&path) => path,
                None => {
                    let names: Vec<_> = available.iter().map(|p| p.name()).collect();
                    eprintln!("DINO_BF16_KERNEL={name}: this CPU runs {}; using {}", names.join(", "), fastest.name());
                    fastest
                }
            }
        })
    }

    /// Why [`Path::detect`]'s kernel may make bf16 slower than f32 on this machine, as a line for
    /// the user, or `None`: the CPU has AMX-BF16 but the OS refused its tile state (Linux before
    /// 5.16), so the products run on `vdpbf16ps`, slower than f32 on Sapphire Rapids (49.6
    /// against 70.9 img/s, BENCHMARKS.md §2); or the CPU has no bf16 instructions and they run
    /// on the portable kernel (small28 training at 18.2 img/s there against 66.6 in f32).
    /// Silent when `DINO_BF16_KERNEL` chose the kernel.
    pub fn slow_warning() -> Option<String> {
        if std::env::var_os("DINO_BF16_KERNEL").is_some() {
            return None;
        }
        match Self::detect() {
            Path::Amx => None,
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 if super::amx::in_cpu() => Some(
                "this CPU has AMX-BF16 but the OS did not grant its tile state (Linux 5.16 or later does), so bf16 \
                 products run on AVX-512 BF16, which can be slower than --precision f32 here"
                    .into(),
            ),
            Path::Avx512Bf16 => None,
            Path::Portable => Some(
                "this CPU has no bf16 instructions (AVX-512 BF16 or AMX), so bf16 products run on a portable kernel, \
                 slower than --precision f32"
                    .into(),
            ),
        }
    }

    /// Every kernel this CPU can run, slowest first (the portable one first). Checking for AMX
    /// asks the OS for the tile state, for the whole process.
    pub fn available() -> Vec<Self> {
        Self::runnable().to_vec()
    }

    /// [`Path::available`], found once.
    fn runnable() -> &'static [Path] {
        static AVAILABLE: std::sync::OnceLock<Vec<Path>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(|| {
            let mut paths = vec![Path::Portable];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                paths.push(Path::Avx512Bf16);
            }
            #[cfg(target_arch = "x86_64")]
            if super::amx::usable() {
                paths.push(Path::Amx);
            }
            paths
        })
    }

    /// The name `DINO_BF16_KERNEL` takes.
    pub fn name(self) -> &'static str {
        match self {
            Path::Amx => "amx",
            Path::Avx512Bf16 => "avx512bf16",
            Path::Portable => "portable",
        }
    }

    /// Rows of A one call of [`Path::run`] multiplies.
    pub(crate) fn tile_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Amx => super::amx::ROWS,
            _ => MR,
        }
    }

    /// The pairs of k a packed A row holds for `pairs` of them: AMX reads whole tile rows of
    /// `amx::PAIRS` (zeros past k), the others exactly `pairs`.
    pub(crate) fn padded_pairs(self, pairs: usize) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Amx => pairs.next_multiple_of(super::amx::PAIRS),
            _ => pairs,
        }
    }

    /// Panics unless this CPU (and OS) runs this kernel: what [`Path::run`] needs.
    pub(crate) fn check_runnable(self) {
        assert!(Self::runnable().contains(&self), "this CPU (or OS) does not run the {} kernel", self.name());
    }

    /// `out (+)= scale · Σ_p a[p] ⊗ b[p]` over `pairs` packed k-pairs (`a` in `layout`, `b`:
    /// `[pairs][NR]`), written straight from the sums (no tile in memory on the fast path).
    /// On AMX `pairs` is a [`Path::padded_pairs`] count and `a` is `RowsMajor`.
    ///
    /// # Safety
    /// `self` must be one of [`Path::available`]'s (checked once per product by
    /// [`Path::check_runnable`], not per tile); `out` must address `out.rows <= self.tile_rows()`
    /// rows of `out.cols <= NR` writable values, and its bias (when not null) `out.cols` values.
    pub(crate) unsafe fn run(self, pairs: usize, (a, layout): (&[u32], ALayout), b: &[u32], out: Out) {
        let rows = self.tile_rows();
        assert!(a.len() >= pairs * rows && b.len() >= pairs * NR, "packed panels hold every pair");
        assert!(out.rows <= rows && out.cols <= NR, "a tile is at most {rows} x {NR}");
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Amx => {
                assert!(
                    layout == ALayout::RowsMajor && pairs.is_multiple_of(super::amx::PAIRS),
                    "AMX reads whole tile rows"
                );
                // SAFETY: the tile state was granted (the caller's contract), the asserts bound
                // every read, and the caller's contract every write.
                unsafe { super::amx::tile(pairs / super::amx::PAIRS, a.as_ptr(), pairs, b.as_ptr(), out) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Path::Amx => unreachable!("detect() offers AMX on x86-64 only"),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Bf16 => {
                // SAFETY: the CPU has the instructions (the caller's contract), the asserts bound
                // every read, and the caller's contract every write.
                unsafe {
                    match layout {
                        ALayout::PairsMajor => avx512::tile::<false>(pairs, a.as_ptr(), b.as_ptr(), out),
                        ALayout::RowsMajor => avx512::tile::<true>(pairs, a.as_ptr(), b.as_ptr(), out),
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Path::Avx512Bf16 => unreachable!("detect() offers AVX-512 BF16 on x86-64 only"),
            Path::Portable => {
                let mut tile: Tile = [[0.0; NR]; MR];
                portable(pairs, a, layout.steps(pairs), b, &mut tile);
                // SAFETY: the caller's contract.
                unsafe { store(&tile, out) }
            }
        }
    }
}

crate::cpu::simd::multiversion! {
    /// `out (+)= scale · tile (+ bias)`, each value as `scale * sum`, then `+ dst` when adding,
    /// then `+ bias`: the arithmetic of the AVX-512 path.
    fn store_rows(tile: &Tile, out: &mut [&mut [f32]], add: bool, scale: f32, bias: Option<&[f32]>) {
        for (dst, sums) in out.iter_mut().zip(tile) {
            if add {
                dst.iter_mut().zip(sums).for_each(|(o, s)| *o += scale * s);
            } else {
                dst.iter_mut().zip(sums).for_each(|(o, s)| *o = scale * s);
            }
            if let Some(bias) = bias {
                dst.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            }
        }
    }
}

/// [`store_rows`] on the rows `out` addresses.
///
/// # Safety
/// As [`Path::run`].
unsafe fn store(tile: &Tile, out: Out) {
    let mut rows: [&mut [f32]; MR] = Default::default();
    for (i, row) in rows.iter_mut().enumerate().take(out.rows) {
        // SAFETY: the caller's contract: row i holds `cols` writable values, rows are disjoint.
        *row = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(i * out.rs), out.cols) };
    }
    // SAFETY: the caller's contract: a bias holds the tile's `cols` values.
    let bias = (!out.bias.is_null()).then(|| unsafe { std::slice::from_raw_parts(out.bias, out.cols) });
    store_rows(tile, &mut rows[..out.rows], out.add, out.scale, bias);
}

/// `x`, or a zero of its sign where it is below f32's normal range (FTZ).
#[inline(always)]
fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { f32::from_bits(x.to_bits() & 0x8000_0000) } else { x }
}

crate::cpu::simd::multiversion! {
    /// Compiled for AVX-512, AVX2 and the baseline (none fuses the multiply into the addition,
    /// so all give the same bits).
    fn portable(pairs: usize, a: &[u32], steps: (usize, usize), b: &[u32], tile: &mut Tile) {
        let (pair_step, row_step) = steps;
        for (p, bp) in b.chunks_exact(NR).take(pairs).enumerate() {
            let b_lo: [f32; NR] = std::array::from_fn(|j| super::widen(bp[j] as u16));
            let b_hi: [f32; NR] = std::array::from_fn(|j| super::widen((bp[j] >> 16) as u16));
            for (i, row) in tile.iter_mut().enumerate() {
                let pair = a[p * pair_step + i * row_step];
                let (a_lo, a_hi) = (super::widen(pair as u16), super::widen((pair >> 16) as u16));
                for j in 0..NR {
                    row[j] = flush(flush(row[j] + a_hi * b_hi[j]) + a_lo * b_lo[j]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::{Epilogue, lanes, row_masks};

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{ALayout, MR, NR, Out};

    /// `ROWS_MAJOR`: `a` is `[MR][pairs]` (else `[pairs][MR]`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16; `a` and `b` must hold `pairs` packed pairs, and `out`
    /// address its rows and columns.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile<const ROWS_MAJOR: bool>(pairs: usize, a: *const u32, b: *const u32, out: Out) {
        let layout = if ROWS_MAJOR { ALayout::RowsMajor } else { ALayout::PairsMajor };
        let (pair_step, row_step) = layout.steps(pairs);
        // 24 accumulators, 2 B vectors and a broadcast A pair: 27 of the 32 vector registers.
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..pairs {
            unsafe {
                let bp = b.add(p * NR) as *const __m512i;
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(1)));
                let ap = a.add(p * pair_step);
                for (i, row) in acc.iter_mut().enumerate() {
                    let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i * row_step) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], pair, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], pair, b1);
                }
            }
        }
        // SAFETY: the caller's contract for `out`.
        let epilogue = unsafe { Epilogue::new(out) };
        for (i, row) in acc.iter().enumerate().take(out.rows) {
            // SAFETY: as above.
            unsafe { epilogue.store(out, i, row[0], row[1]) };
        }
    }

    /// The first `n` (at most 16) lanes of a vector.
    #[inline(always)]
    pub(crate) fn lanes(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as __mmask16 }
    }

    /// The lanes of a tile row's two vectors that hold its first `cols` columns.
    #[inline(always)]
    pub(crate) fn row_masks(cols: usize) -> (__mmask16, __mmask16) {
        (lanes(cols), lanes(cols.saturating_sub(16)))
    }

    /// What a tile's rows are stored with: `dst = scale · sums (+ dst) (+ bias)` on the first
    /// `cols` lanes of a row's two vectors.
    pub(crate) struct Epilogue {
        masks: (__mmask16, __mmask16),
        scale: __m512,
        bias: Option<(__m512, __m512)>,
    }

    impl Epilogue {
        /// # Safety
        /// The CPU must have AVX-512 F; a bias in `out` must hold `out.cols` values.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub(crate) unsafe fn new(out: Out) -> Self {
            let (m0, m1) = row_masks(out.cols);
            // SAFETY: masked lanes are not read.
            let bias = (!out.bias.is_null())
                .then(|| unsafe { (_mm512_maskz_loadu_ps(m0, out.bias), _mm512_maskz_loadu_ps(m1, out.bias.add(16))) });
            Self { masks: (m0, m1), scale: _mm512_set1_ps(out.scale), bias }
        }

        /// Stores row `i`'s sums `(v0, v1)`.
        ///
        /// # Safety
        /// As [`Epilogue::new`]; row `i` of `out` must hold `out.cols` values.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub(crate) unsafe fn store(&self, out: Out, i: usize, v0: __m512, v1: __m512) {
            let (m0, m1) = self.masks;
            // SAFETY: the caller's contract; masked lanes are neither read nor written.
            unsafe {
                let dst = out.ptr.add(i * out.rs);
                let (mut v0, mut v1) = (_mm512_mul_ps(v0, self.scale), _mm512_mul_ps(v1, self.scale));
                if out.add {
                    v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, dst), v0);
                    v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, dst.add(16)), v1);
                }
                if let Some((b0, b1)) = self.bias {
                    (v0, v1) = (_mm512_add_ps(v0, b0), _mm512_add_ps(v1, b1));
                }
                _mm512_mask_storeu_ps(dst, m0, v0);
                _mm512_mask_storeu_ps(dst.add(16), m1, v1);
            }
        }
    }
}
