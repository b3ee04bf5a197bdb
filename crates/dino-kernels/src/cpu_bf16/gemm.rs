//! The bf16 matrix product's driver: B rounded and packed once ([`PackedRhs`], k in blocks of
//! `KC`, columns in panels of `NR`), then rows in tasks of `MC` (in parallel), each packing its
//! rows of A per k-block and running the microkernel over every (row tile, column panel). The
//! packing is the same for every path but A's on AMX, which takes A by rows, 32 at a time.

use rayon::prelude::*;

use super::convert::{interleave_rows, pair, pairs_of};
use super::microkernel::{ALayout, MR, NR, Out, Path};

/// k per block: a 12 x 256 A tile (6 KiB packed) and a 32 x 256 B panel (16 KiB) stay in L1
/// while the microkernel runs.
const KC: usize = 256;
/// Rows per parallel task: 8 tiles of `MR`, 3 of AMX's 32.
const MC: usize = MR * 8;
const _: () = assert!(MC.is_multiple_of(32), "a task holds whole AMX tiles");

/// The pairs a B panel holds for a block of `kc` rows of k: whole AMX tiles of 16 pairs (zeros
/// past k), so that one packed weight serves every path; the other kernels read `kc / 2` of them.
fn panel_pairs(kc: usize) -> usize {
    kc.div_ceil(2).next_multiple_of(16)
}

/// A matrix operand: its first element and its (row, column) strides in elements.
pub type Operand = (*const f32, [usize; 2]);

/// A raw pointer that tasks share; each writes its own rows.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: tasks write disjoint rows of the destination.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// Operands read through shared pointers by every task.
#[derive(Clone, Copy)]
struct Src(Operand);
// SAFETY: the operands are only read while the product runs.
unsafe impl Send for Src {}
unsafe impl Sync for Src {}

/// `rhs [k, n]` rounded to bf16 and packed for [`gemm_bf16_packed`] once, to multiply many left
/// operands (the row tiles of a layer's input, or a step's crops) without converting it again.
/// Laid out in blocks of `KC` rows of k, each as `NR`-column panels of `[panel_pairs][NR]`.
pub struct PackedRhs {
    k: usize,
    n: usize,
    data: Aligned,
}

/// Packed values in 64-byte lines. Every tile row, panel and block of the packing starts on a
/// line, so that no AMX tile row straddles two cache lines: a tile load that does runs 5 times
/// slower (16 ns against 3 per 1 KiB tile, measured on Sapphire Rapids).
#[derive(Default)]
pub(super) struct Aligned(Vec<Line>);

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u32; 16]);

impl Aligned {
    /// Room for `len` values (more kept: callers slice `..len`).
    pub(super) fn grow(&mut self, len: usize) {
        if self.len() < len {
            self.0.resize(len.div_ceil(16), Line([0; 16]));
        }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        // SAFETY: a `Line` is 16 `u32` and nothing else (repr(C), 64 bytes).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u32, self.0.len() * 16) }
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in `deref`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u32, self.0.len() * 16) }
    }
}

impl Drop for PackedRhs {
    fn drop(&mut self) {
        Scratch::B.give_back(std::mem::take(&mut self.data));
    }
}

/// Packing buffers kept per thread between products: attention makes thousands of small
/// products a step, and a fresh buffer each time (allocation, page faults, zeroing) cost as much
/// as some of the products. A buffer in use is taken out, so a product started meanwhile on
/// the same thread (rayon's work stealing) gets another one.
#[derive(Clone, Copy)]
enum Scratch {
    /// Packed right operands ([`PackedRhs`]).
    B,
    /// A row task's packed rows of the left operand.
    A,
}

/// Buffers a thread keeps of each kind. A layer's packed weight (two at once in the fused block
/// halves) and the attention's small operands take turns: with one buffer kept, the weight's was
/// dropped for a small one and allocated and zeroed again every layer.
const KEPT: usize = 4;

thread_local! {
    static SCRATCH: [std::cell::RefCell<Vec<Aligned>>; 2] =
        const { [std::cell::RefCell::new(Vec::new()), std::cell::RefCell::new(Vec::new())] };
}

impl Scratch {
    /// A buffer of at least `len` values: the smallest of this thread's that holds them, else its
    /// largest, grown. Buffers keep their length (the values of the last product: packing
    /// writes every element it reads, and zeroing first was 3 % of a step), so callers slice
    /// `..len`.
    fn take(self, len: usize) -> Aligned {
        let mut buffer = SCRATCH.with(|s| {
            let mut kept = s[self as usize].borrow_mut();
            let fits = (0..kept.len()).filter(|&i| kept[i].len() >= len).min_by_key(|&i| kept[i].len());
            let pick = fits.or_else(|| (0..kept.len()).max_by_key(|&i| kept[i].len()));
            pick.map(|i| kept.swap_remove(i)).unwrap_or_default()
        });
        buffer.grow(len);
        buffer
    }

    /// Keeps `buffer` for this thread's next products (its `KEPT` largest).
    fn give_back(self, buffer: Aligned) {
        SCRATCH.with(|s| {
            let mut kept = s[self as usize].borrow_mut();
            kept.push(buffer);
            if kept.len() > KEPT {
                let smallest = (0..kept.len()).min_by_key(|&i| kept[i].len()).expect("buffers kept");
                kept.swap_remove(smallest);
            }
        });
    }
}

impl PackedRhs {
    /// Packs `rhs`, `[k, n]` under its strides, on `threads`.
    ///
    /// # Safety
    /// `rhs` must address the whole `[k, n]` matrix under its strides.
    pub unsafe fn new(rhs: Operand, [k, n]: [usize; 2], threads: usize) -> Self {
        let rhs = Src(rhs);
        let panels = n.div_ceil(NR);
        // Every block but the last has KC / 2 pairs (a multiple of 16).
        let len = panels * NR * ((k / KC) * (KC / 2) + panel_pairs(k % KC));
        let mut data = Scratch::B.take(len);
        let mut rest = &mut data[..len];
        let mut jobs = Vec::new();
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(panels * panel_pairs(kc) * NR);
            rest = tail;
            jobs.extend(block.chunks_mut(panel_pairs(kc) * NR).enumerate().map(|(p, out)| (k0, kc, p * NR, out)));
        }
        let pack = |(k0, kc, c0, out): (usize, usize, usize, &mut [u32])| {
            let (pairs, padding) = out.split_at_mut(kc.div_ceil(2) * NR);
            // SAFETY: the caller's contract bounds every read.
            unsafe { pack::<NR>(rhs, (k0, kc), (c0, n), pairs) };
            padding.fill(0);
        };
        if threads > 1 {
            jobs.into_par_iter().for_each(pack);
        } else {
            jobs.into_iter().for_each(pack);
        }
        Self { k, n, data }
    }

    /// `[k, n]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.k, self.n]
    }

    /// The packed panels of k-block `b` (rows `b·KC..`).
    fn block(&self, b: usize) -> &[u32] {
        let panels = self.n.div_ceil(NR);
        let kc = KC.min(self.k - b * KC);
        let start = panels * NR * b * (KC / 2);
        &self.data[start..start + panels * panel_pairs(kc) * NR]
    }
}

/// `dst[m, n] = scale · bf16(lhs[m, k]) · bf16(rhs[k, n])`, plus the previous `dst` when
/// `accumulate`, with f32 sums; `dst` is (first element, row stride) of a matrix with unit
/// column stride. The same contract as the f32 product (`cpu::matmul::gemm`), on `path`'s
/// microkernel; `threads > 1` runs the row tasks on rayon's pool.
///
/// # Safety
/// Every pointer must address its whole matrix under the given strides, and `dst` must be
/// initialised when `accumulate` is true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16(
    path: Path,
    [m, n, k]: [usize; 3],
    dst: (*mut f32, usize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    threads: usize,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let rhs = PackedRhs::new(rhs, [k, n], threads);
        gemm_bf16_packed(path, m, dst, accumulate, lhs, &rhs, scale, None, threads);
    }
}

/// [`gemm_bf16`] with the right operand packed beforehand: `dst[m, n] (+)= scale · lhs[m, k] ·
/// rhs`, plus `bias` `[n]` on every row when given (added to the first k-block's sums, so a
/// layer's output needs no pass that writes the bias first). Rows go to tasks of `MC`; each task
/// packs its rows of `lhs` per k-block and sweeps every column panel, so `dst`'s rows stay in
/// cache across the k-blocks.
///
/// # Safety
/// `lhs` must address the whole `[m, k]` matrix and `dst` the whole `[m, n]` one under their
/// strides, and `dst` must be initialised when `accumulate` is true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16_packed(
    path: Path,
    m: usize,
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    lhs: Operand,
    rhs: &PackedRhs,
    scale: f32,
    bias: Option<&[f32]>,
    threads: usize,
) {
    let [k, n] = rhs.dims();
    path.check_runnable();
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "a bias of {} for {n} columns", bias.len());
    }
    if m == 0 || n == 0 {
        return;
    }
    // The bias copied once onto cache lines, where AMX loads a panel's bias straight into tiles.
    let mut aligned = Aligned::default();
    let bias = bias.map(|bias| {
        aligned.grow(bias.len());
        aligned.iter_mut().zip(bias).for_each(|(a, b)| *a = b.to_bits());
        // SAFETY: a u32 and an f32 have the same size and alignment, and every bit pattern is an f32.
        unsafe { std::slice::from_raw_parts(aligned.as_ptr() as *const f32, bias.len()) }
    });
    let (dst, lhs) = (Dst(dst), Src(lhs));
    if k == 0 {
        for i in 0..m {
            // SAFETY: row i of `dst` holds n values.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.0.add(i * dst_rs), n) };
            if !accumulate {
                row.fill(0.0);
            }
            if let Some(bias) = bias {
                row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
            }
        }
        return;
    }
    let task = |t: usize| {
        let rows = t * MC..(t * MC + MC).min(m);
        for (b, k0) in (0..k).step_by(KC).enumerate() {
            let add = accumulate || b > 0;
            // The bias goes onto the first block's sums only.
            let bias = bias.filter(|_| b == 0);
            // SAFETY: the caller's contract; this task writes rows `rows` only.
            unsafe {
                row_task(
                    path,
                    rows.clone(),
                    (k0, KC.min(k - k0)),
                    lhs,
                    rhs.block(b),
                    (dst, dst_rs, n),
                    (add, scale, bias),
                )
            }
        }
    };
    if threads > 1 {
        (0..m.div_ceil(MC)).into_par_iter().for_each(task);
    } else {
        (0..m.div_ceil(MC)).for_each(task);
    }
}

/// `len` values from `ptr`.
///
/// # Safety
/// They must be inside one allocation and not written meanwhile.
unsafe fn run<'a>(ptr: *const f32, len: usize) -> &'a [f32] {
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// Packs columns `c0..c0 + W` (zeros past `n`) of rows `k0..k0 + kc` of a `[k, n]` operand as
/// `[pairs][W]`, from contiguous rows or contiguous columns where the strides allow. B panels
/// are `W = NR` columns of B; A tiles are `W = MR` columns of Aᵀ (A with its strides swapped).
unsafe fn pack<const W: usize>(
    Src((values, [rs, cs])): Src,
    (k0, kc): (usize, usize),
    (c0, n): (usize, usize),
    out: &mut [u32],
) {
    let cols = W.min(n - c0);
    if cols < W {
        out.fill(0);
    }
    // SAFETY (all reads): rows k0..k0 + kc and columns c0..c0 + cols are inside the operand.
    unsafe {
        if cs == 1 {
            let rows = run(values.add(k0 * rs + c0), (kc - 1) * rs + cols);
            interleave_rows::<W>(rows, rs, kc, cols, out)
        } else {
            let mut column = [0u32; KC / 2];
            let column = &mut column[..kc.div_ceil(2)];
            for j in 0..cols {
                if rs == 1 {
                    if j + AHEAD < cols {
                        prefetch(values.wrapping_add((c0 + j + AHEAD) * cs + k0), kc);
                    }
                    pairs_of(run(values.add((c0 + j) * cs + k0), kc), column);
                } else {
                    let at = |r: usize| if r < kc { *values.add((k0 + r) * rs + (c0 + j) * cs) } else { 0.0 };
                    column.iter_mut().enumerate().for_each(|(p, v)| *v = pair(at(2 * p), at(2 * p + 1)));
                }
                column.iter().zip(out.chunks_exact_mut(W)).for_each(|(&v, out)| out[j] = v);
            }
        }
    }
}

/// Packs rows `r0..m` of k-columns `k0..k0 + kc` of an A stored by rows (column stride 1) as
/// `[rows][stride]` (`out.len() / stride` rows, those past `m` left as they are, zeros past
/// `kc / 2` pairs): each row one contiguous run, with no transpose.
unsafe fn pack_rows(
    Src((values, [rs, _])): Src,
    (k0, kc): (usize, usize),
    (r0, m): (usize, usize),
    stride: usize,
    out: &mut [u32],
) {
    for (i, out) in out.chunks_exact_mut(stride).enumerate() {
        if r0 + i + AHEAD < m {
            prefetch(values.wrapping_add((r0 + i + AHEAD) * rs + k0), kc);
        }
        // Rows past m keep what they held: their sums are not stored, so zeroing them (27 rows
        // of the last tile of a 197-token sample, per k-block) was work for nothing.
        if r0 + i < m {
            let (pairs, padding) = out.split_at_mut(kc.div_ceil(2));
            // SAFETY: row r0 + i holds columns k0..k0 + kc.
            pairs_of(unsafe { run(values.add((r0 + i) * rs + k0), kc) }, pairs);
            padding.fill(0);
        }
    }
}

/// Runs ahead of the one being converted (rows of A, or columns of a B stored by columns) whose
/// values are fetched meanwhile. A run is a few cache lines, a whole row of the matrix away
/// from the last: the hardware's prefetchers do not follow, and in training the conversions
/// waited on L3 and memory (perf: `pairs_of` 11.8 % of an official_s16 step; 5.4 % with these
/// prefetches, the step 5 % faster). 2 runs ahead did as well as 4; prefetching the rows that
/// `interleave_rows` pairs, 8 or 24 pairs ahead, gained nothing.
const AHEAD: usize = 2;

/// Asks for the cache lines of `len` values at `at` into L1.
#[inline(always)]
fn prefetch(at: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..len).step_by(16) {
        // SAFETY: a prefetch does not fault, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.wrapping_add(line) as *const i8)
        };
    }
}

/// [`pack_rows`] for an A that is not stored by rows: 16 rows at a time packed as the columns of
/// Aᵀ (`[pairs][16]`, as B panels are), then transposed to `[16][stride]`.
unsafe fn pack_rows_transposed(
    Src((values, [rs, cs])): Src,
    (k0, kc): (usize, usize),
    (r0, m): (usize, usize),
    stride: usize,
    out: &mut [u32],
) {
    let pairs = kc.div_ceil(2);
    let mut columns = [0u32; (KC / 2) * 16];
    for (g, out) in out.chunks_exact_mut(16 * stride).enumerate() {
        let r = r0 + 16 * g;
        if r >= m {
            out.fill(0);
            continue;
        }
        let columns = &mut columns[..pairs * 16];
        // SAFETY: the caller's contract (rows past m are not read).
        unsafe { pack::<16>(Src((values, [cs, rs])), (k0, kc), (r, m), columns) };
        transpose_16(columns, stride, out);
    }
}

crate::cpu::simd::multiversion! {
    /// `out[i][p] = columns[p][i]` for 16 rows of `stride` (zeros past the pairs).
    fn transpose_16(columns: &[u32], stride: usize, out: &mut [u32]) {
        let pairs = columns.len() / 16;
        for (i, row) in out.chunks_exact_mut(stride).enumerate() {
            let (values, padding) = row.split_at_mut(pairs);
            values.iter_mut().zip(columns.chunks_exact(16)).for_each(|(v, column)| *v = column[i]);
            padding.fill(0);
        }
    }
}

/// One task: rows `rows` of `dst` (+)= `scale` x (their rows of A) x (the packed B block)
/// (+ `bias`, whose columns are `dst`'s).
///
/// # Safety
/// As [`gemm_bf16_packed`], with `path` checked to run here.
#[allow(clippy::too_many_arguments)]
unsafe fn row_task(
    path: Path,
    rows: std::ops::Range<usize>,
    (k0, kc): (usize, usize),
    lhs: Src,
    packed_b: &[u32],
    (dst, dst_rs, n): (Dst, usize, usize),
    (add, scale, bias): (bool, f32, Option<&[f32]>),
) {
    // The pairs a packed row of A holds, and the pairs the microkernel runs over.
    let pairs = path.padded_pairs(kc.div_ceil(2));
    let tile_rows = path.tile_rows();
    let tile = tile_rows * pairs;
    let tiles = rows.len().div_ceil(tile_rows);
    let Src((values, [rs, cs])) = lhs;
    // Rows of A that are contiguous are converted as they lie (`[rows][pairs]`); otherwise A's
    // rows are packed as the columns of Aᵀ (`[k, m]`: the strides swapped) into `[pairs][MR]`,
    // then transposed for AMX, which reads A by rows.
    let layout = if cs == 1 || path == Path::Amx { ALayout::RowsMajor } else { ALayout::PairsMajor };
    let mut buffer = Scratch::A.take(tiles * tile);
    let packed_a = &mut buffer[..tiles * tile];
    for (t, out) in packed_a.chunks_exact_mut(tile).enumerate() {
        let r0 = rows.start + t * tile_rows;
        // SAFETY: the caller's contract.
        unsafe {
            match layout {
                ALayout::RowsMajor if cs == 1 => pack_rows(lhs, (k0, kc), (r0, rows.end), pairs, out),
                ALayout::RowsMajor => pack_rows_transposed(lhs, (k0, kc), (r0, rows.end), pairs, out),
                ALayout::PairsMajor => pack::<MR>(Src((values, [cs, rs])), (k0, kc), (r0, rows.end), out),
            }
        }
    }
    for (t, a) in packed_a.chunks_exact(tile).enumerate() {
        let r0 = rows.start + t * tile_rows;
        for (panel, b) in packed_b.chunks_exact(panel_pairs(kc) * NR).enumerate() {
            let c0 = panel * NR;
            let cols = NR.min(n - c0);
            // SAFETY: rows r0.. of `dst` are this task's and hold columns c0..c0 + cols.
            let ptr = unsafe { dst.0.add(r0 * dst_rs + c0) };
            let bias = bias.map_or(std::ptr::null(), |b| b[c0..].as_ptr());
            let out = Out { ptr, rs: dst_rs, rows: tile_rows.min(rows.end - r0), cols, add, scale, bias };
            // SAFETY: as above; the caller checked that the CPU runs `path`.
            unsafe { path.run(pairs, (a, layout), b, out) };
        }
    }
    Scratch::A.give_back(buffer);
}
