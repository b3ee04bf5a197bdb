//! The bf16 matrix product's driver: B rounded and packed once ([`PackedRhs`], k in blocks of
//! `KC`, columns in panels of `NR`), then rows in tasks of `MC` (in parallel), each packing its
//! rows of A per k-block and running the microkernel over every (row tile, column panel).

use rayon::prelude::*;

use super::microkernel::{ALayout, MR, NR, Out, Path};
use super::round;

/// k per block: a 12 x 256 A tile (6 KiB packed) and a 32 x 256 B panel (16 KiB) stay in L1
/// while the microkernel runs.
const KC: usize = 256;
/// Rows per parallel task (8 tiles).
const MC: usize = MR * 8;

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
/// Laid out in blocks of `KC` rows of k, each as `NR`-column panels of `[pairs][NR]`.
pub struct PackedRhs {
    k: usize,
    n: usize,
    data: Vec<u32>,
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
    static SCRATCH: [std::cell::RefCell<Vec<Vec<u32>>>; 2] =
        const { [std::cell::RefCell::new(Vec::new()), std::cell::RefCell::new(Vec::new())] };
}

impl Scratch {
    /// A buffer of at least `len` values: the smallest of this thread's that holds them, else its
    /// largest, grown. Buffers keep their length (the values of the last product: packing
    /// writes every element it reads, and zeroing first was 3 % of a step), so callers slice
    /// `..len`.
    fn take(self, len: usize) -> Vec<u32> {
        let mut buffer = SCRATCH.with(|s| {
            let mut kept = s[self as usize].borrow_mut();
            let fits = (0..kept.len()).filter(|&i| kept[i].len() >= len).min_by_key(|&i| kept[i].len());
            let pick = fits.or_else(|| (0..kept.len()).max_by_key(|&i| kept[i].len()));
            pick.map(|i| kept.swap_remove(i)).unwrap_or_default()
        });
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        buffer
    }

    /// Keeps `buffer` for this thread's next products (its `KEPT` largest).
    fn give_back(self, buffer: Vec<u32>) {
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
        // Every block but the last has KC / 2 pairs (KC is even): ceil(k / 2) pairs in all.
        let len = panels * k.div_ceil(2) * NR;
        let mut data = Scratch::B.take(len);
        let mut rest = &mut data[..len];
        let mut jobs = Vec::new();
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(panels * kc.div_ceil(2) * NR);
            rest = tail;
            jobs.extend(block.chunks_mut(kc.div_ceil(2) * NR).enumerate().map(|(p, out)| (k0, kc, p * NR, out)));
        }
        // SAFETY: the caller's contract bounds every read.
        let pack =
            |(k0, kc, c0, out): (usize, usize, usize, &mut [u32])| unsafe { pack::<NR>(rhs, (k0, kc), (c0, n), out) };
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
        &self.data[start..start + panels * kc.div_ceil(2) * NR]
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
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "a bias of {} for {n} columns", bias.len());
    }
    if m == 0 || n == 0 {
        return;
    }
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

/// Two bf16 values in one `u32`, the even k in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    round(lo) as u32 | (round(hi) as u32) << 16
}

/// `out[p][j] = pair(rows[2p][j], rows[2p + 1][j])` for `j < cols` (an odd last row pairs with
/// 0): `kc` contiguous rows `rs` apart (of B, or of Aᵀ) interleaved into `[pairs][W]`. A whole
/// panel per call, so that the loops compile for the CPU's vectors together, with fixed-width
/// rows when the panel is full.
#[inline(always)]
fn interleave_rows<const W: usize>(rows: &[f32], rs: usize, kc: usize, cols: usize, out: &mut [u32]) {
    for (p, out) in out.chunks_exact_mut(W).enumerate() {
        let lo = &rows[2 * p * rs..][..cols];
        if 2 * p + 1 == kc {
            out.iter_mut().zip(lo).for_each(|(o, &l)| *o = pair(l, 0.0));
            continue;
        }
        let hi = &rows[(2 * p + 1) * rs..][..cols];
        match (<&[f32; W]>::try_from(lo), <&[f32; W]>::try_from(hi), <&mut [u32; W]>::try_from(out)) {
            (Ok(lo), Ok(hi), Ok(out)) => (0..W).for_each(|j| out[j] = pair(lo[j], hi[j])),
            (_, _, Err(_)) => unreachable!("chunks of W"),
            (_, _, Ok(out)) => out.iter_mut().zip(lo).zip(hi).for_each(|((o, &l), &h)| *o = pair(l, h)),
        }
    }
}

crate::cpu::simd::multiversion! {
    /// [`interleave_rows`] for a B panel (`NR` columns).
    fn interleave_rows_b(rows: &[f32], rs: usize, kc: usize, cols: usize, out: &mut [u32]) {
        interleave_rows::<NR>(rows, rs, kc, cols, out)
    }
}

crate::cpu::simd::multiversion! {
    /// [`interleave_rows`] for an A tile stored by columns (`MR` columns of Aᵀ).
    fn interleave_rows_a(rows: &[f32], rs: usize, kc: usize, cols: usize, out: &mut [u32]) {
        interleave_rows::<MR>(rows, rs, kc, cols, out)
    }
}

crate::cpu::simd::multiversion! {
    /// `out[i] = pair(run[2i], run[2i + 1])` (0 past the run's end): one contiguous run along k.
    fn pairs_of(run: &[f32], out: &mut [u32]) {
        let (whole, rest) = run.as_chunks::<2>();
        for (o, c) in out.iter_mut().zip(whole) {
            *o = pair(c[0], c[1]);
        }
        if let (Some(&last), Some(o)) = (rest.first(), out.get_mut(whole.len())) {
            *o = pair(last, 0.0);
        }
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
            match W {
                NR => interleave_rows_b(rows, rs, kc, cols, out),
                MR => interleave_rows_a(rows, rs, kc, cols, out),
                _ => unreachable!("panels are NR or MR wide"),
            }
        } else {
            let mut column = [0u32; KC / 2];
            let column = &mut column[..kc.div_ceil(2)];
            for j in 0..cols {
                if rs == 1 {
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

/// Packs rows `r0..r0 + MR` (zeros past `m`) of k-columns `k0..k0 + kc` of an A stored by rows
/// (column stride 1) as `[MR][pairs]`: each row one contiguous run, with no transpose.
unsafe fn pack_rows(Src((values, [rs, _])): Src, (k0, kc): (usize, usize), (r0, m): (usize, usize), out: &mut [u32]) {
    for (i, out) in out.chunks_exact_mut(kc.div_ceil(2)).enumerate() {
        if r0 + i < m {
            // SAFETY: row r0 + i holds columns k0..k0 + kc.
            pairs_of(unsafe { run(values.add((r0 + i) * rs + k0), kc) }, out);
        } else {
            out.fill(0);
        }
    }
}

/// One task: rows `rows` of `dst` (+)= `scale` x (their rows of A) x (the packed B block)
/// (+ `bias`, whose columns are `dst`'s).
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
    let pairs = kc.div_ceil(2);
    let tiles = rows.len().div_ceil(MR);
    let Src((values, [rs, cs])) = lhs;
    // Rows of A that are contiguous are converted as they lie (`[MR][pairs]`); otherwise A's
    // rows are packed as the columns of Aᵀ (`[k, m]`: the strides swapped) into `[pairs][MR]`.
    let layout = if cs == 1 { ALayout::RowsMajor } else { ALayout::PairsMajor };
    let mut buffer = Scratch::A.take(tiles * pairs * MR);
    let packed_a = &mut buffer[..tiles * pairs * MR];
    for (t, out) in packed_a.chunks_exact_mut(pairs * MR).enumerate() {
        let r0 = rows.start + t * MR;
        // SAFETY: the caller's contract.
        unsafe {
            match layout {
                ALayout::RowsMajor => pack_rows(lhs, (k0, kc), (r0, rows.end), out),
                ALayout::PairsMajor => pack::<MR>(Src((values, [cs, rs])), (k0, kc), (r0, rows.end), out),
            }
        }
    }
    for (panel, b) in packed_b.chunks_exact(pairs * NR).enumerate() {
        let c0 = panel * NR;
        let cols = NR.min(n - c0);
        for (t, a) in packed_a.chunks_exact(pairs * MR).enumerate() {
            let r0 = rows.start + t * MR;
            // SAFETY: rows r0.. of `dst` are this task's and hold columns c0..c0 + cols.
            let ptr = unsafe { dst.0.add(r0 * dst_rs + c0) };
            let bias = bias.map_or(std::ptr::null(), |b| b[c0..].as_ptr());
            let out = Out { ptr, rs: dst_rs, rows: MR.min(rows.end - r0), cols, add, scale, bias };
            // SAFETY: as above.
            unsafe { path.run(pairs, (a, layout), b, out) };
        }
    }
    Scratch::A.give_back(buffer);
}
