//! The bf16 matrix product against a plain reference (bf16-rounded inputs, f64 sums), on every
//! microkernel this CPU runs, with strided, transposed and ragged operands.

use dino_kernels::cpu_bf16::{Path, gemm_bf16, round, widen};

/// Deterministic values spread over several magnitudes, most not representable in bf16.
fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as f32 * 0.618 + seed as f32 * 1.7).sin() * 3.0).powi(3) * 0.37 + 0.011 * seed as f32)
        .collect()
}

/// How an operand is stored.
#[derive(Clone, Copy)]
enum Layout {
    /// Rows contiguous.
    Rows,
    /// Columns contiguous (the transposed matrix).
    Columns,
    /// Neither: every other element of the rows (row stride 2·cols, column stride 2).
    Gapped,
}

impl Layout {
    /// The (row, column) strides of a `rows x cols` matrix, and the buffer length it needs.
    fn strides(self, rows: usize, cols: usize) -> ([usize; 2], usize) {
        match self {
            Layout::Rows => ([cols, 1], rows * cols),
            Layout::Columns => ([1, rows], rows * cols),
            Layout::Gapped => ([2 * cols, 2], 2 * rows * cols),
        }
    }
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    lhs: Layout,
    rhs: Layout,
    accumulate: bool,
    scale: f32,
}

/// Runs the product of `case` on `path` with `threads`; returns (result, reference, bound).
fn run(case: &Case, path: Path, threads: usize) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let Case { m, n, k, .. } = *case;
    // Logical a[i, p] and b[p, j], stored as the case says.
    let ((a_strides, a_len), (b_strides, b_len)) = (case.lhs.strides(m, k), case.rhs.strides(k, n));
    let (a, b) = (values(a_len, 1), values(b_len, 2));
    let at = |i: usize, p: usize| a[i * a_strides[0] + p * a_strides[1]];
    let bt = |p: usize, j: usize| b[p * b_strides[0] + j * b_strides[1]];
    let dst_rs = n + 3;
    let mut dst: Vec<f32> = values(m * dst_rs, 3);
    let before = dst.clone();
    unsafe {
        gemm_bf16(
            path,
            [m, n, k],
            (dst.as_mut_ptr(), dst_rs),
            case.accumulate,
            (a.as_ptr(), a_strides),
            (b.as_ptr(), b_strides),
            case.scale,
            threads,
        );
    }
    let (mut got, mut want, mut bound) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..m {
        for j in 0..n {
            let products: Vec<f64> =
                (0..k).map(|p| widen(round(at(i, p))) as f64 * widen(round(bt(p, j))) as f64).collect();
            let sum: f64 = products.iter().sum();
            let size: f64 = products.iter().map(|x| x.abs()).sum();
            let prior = if case.accumulate { before[i * dst_rs + j] as f64 } else { 0.0 };
            got.push(dst[i * dst_rs + j]);
            want.push(prior + case.scale as f64 * sum);
            // f32 sums of k products (exact each), then the scale and the prior value.
            bound.push((k as f64 + 2.0) * 2f64.powi(-24) * (case.scale.abs() as f64 * size + prior.abs()) + 1e-30);
        }
        // Columns past n (the row stride's slack) are never written.
        assert_eq!(dst[i * dst_rs + n..(i + 1) * dst_rs], before[i * dst_rs + n..(i + 1) * dst_rs]);
    }
    (got, want, bound)
}

fn cases() -> Vec<Case> {
    use Layout::*;
    let case = |m, n, k, lhs, rhs, accumulate, scale| Case { m, n, k, lhs, rhs, accumulate, scale };
    vec![
        case(1, 1, 1, Rows, Rows, false, 1.0),
        case(12, 32, 2, Rows, Rows, false, 1.0),
        case(13, 33, 3, Rows, Columns, true, 0.5),
        case(97, 70, 257, Columns, Rows, false, 1.0),
        case(100, 65, 513, Columns, Columns, true, -2.0),
        case(200, 130, 64, Rows, Rows, true, 1.0),
        case(30, 40, 75, Gapped, Gapped, true, 1.0),
        case(25, 3, 300, Gapped, Columns, false, 1.0),
        case(5, 7, 0, Rows, Rows, false, 1.0),
        // AMX's edges: a second tile of one row, A by columns with a ragged last group of 16.
        case(33, 16, 32, Rows, Rows, false, 1.0),
        case(65, 50, 50, Columns, Columns, true, 0.125),
    ]
}

#[test]
fn every_path_equals_the_reference_of_rounded_inputs() {
    for path in Path::available() {
        for case in cases() {
            let (got, want, bound) = run(&case, path, 2);
            for (idx, ((g, w), b)) in got.iter().zip(&want).zip(&bound).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= *b,
                    "{path:?} m {} n {} k {}: element {idx} is {g}, reference {w} (bound {b:e})",
                    case.m,
                    case.n,
                    case.k
                );
            }
        }
    }
}

/// The kernel that gives `path`'s bits on one thread: the portable one for AVX-512 BF16 (the
/// order of the sums is fixed by the packing, not by the instructions), AMX itself (its tiles
/// add in an order of the hardware's).
fn same_bits_as(path: Path) -> Path {
    if path == Path::Amx { Path::Amx } else { Path::Portable }
}

/// Every kernel gives the bits of its reference kernel, serial or parallel: threads split the
/// rows, never a sum.
#[test]
fn paths_and_thread_counts_agree_to_the_bit() {
    println!("kernels on this CPU: {:?}", Path::available());
    for case in cases() {
        for path in Path::available() {
            let (first, ..) = run(&case, same_bits_as(path), 1);
            for threads in [1, 2] {
                let (got, ..) = run(&case, path, threads);
                let same = first.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{path:?} on {threads} threads differs from {:?} on one (m {} n {} k {})",
                    same_bits_as(path),
                    case.m,
                    case.n,
                    case.k
                );
            }
        }
    }
}

/// `a [m, k] · b [k, n]`, both stored by rows, on `path` and the calling thread.
fn product_by_rows(path: Path, [m, n, k]: [usize; 3], a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut dst = vec![0.0f32; m * n];
    // SAFETY: a holds m·k values, b k·n and dst m·n, each stored by rows.
    unsafe {
        gemm_bf16(path, [m, n, k], (dst.as_mut_ptr(), n), false, (a.as_ptr(), [k, 1]), (b.as_ptr(), [n, 1]), 1.0, 1);
    }
    dst
}

/// The product really is bf16: on values that bf16 cannot hold it differs from the f32 product
/// by about bf16's precision, not f32's.
#[test]
fn inputs_are_rounded_to_bf16() {
    let (m, n, k) = (4, 4, 64);
    let (a, b) = (values(m * k, 1), values(k * n, 2));
    let dst = product_by_rows(Path::detect(), [m, n, k], &a, &b);
    let mut worst = 0.0f64;
    for i in 0..m {
        for j in 0..n {
            let exact: f64 = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
            let size: f64 = (0..k).map(|p| (a[i * k + p] as f64 * b[p * n + j] as f64).abs()).sum();
            worst = worst.max((dst[i * n + j] as f64 - exact).abs() / size);
        }
    }
    assert!(worst > 1e-5 && worst < 2f64.powi(-7), "relative error {worst:e}");
}

/// A layer's bias goes onto the sums as they are stored, once (on the first of several k-blocks
/// here), with the same bits on every kernel and for any thread count.
#[test]
fn the_bias_is_added_once_to_the_sums() {
    use dino_kernels::cpu_bf16::{PackedRhs, gemm_bf16_packed};
    let (m, n, k) = (30, 45, 600);
    let (a, b, bias) = (values(m * k, 1), values(k * n, 2), values(n, 4));
    let product = |path: Path, threads: usize| {
        let mut dst = vec![f32::NAN; m * n];
        unsafe {
            let rhs = PackedRhs::new((b.as_ptr(), [n, 1]), [k, n], threads);
            gemm_bf16_packed(
                path,
                m,
                (dst.as_mut_ptr(), n),
                false,
                (a.as_ptr(), [k, 1]),
                &rhs,
                1.0,
                Some(&bias),
                threads,
            );
        }
        dst
    };
    for path in Path::available() {
        let first = product(same_bits_as(path), 1);
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|p| widen(round(a[i * k + p])) as f64 * widen(round(b[p * n + j])) as f64);
                let (sum, size) = terms.fold((0.0, 0.0), |(s, z), t| (s + t, z + t.abs()));
                let bound = (k as f64 + 2.0) * 2f64.powi(-24) * (size + bias[j].abs() as f64);
                let got = first[i * n + j] as f64;
                assert!((got - (sum + bias[j] as f64)).abs() <= bound, "{path:?}: element ({i}, {j}) is {got}");
            }
        }
        for threads in [1, 2] {
            let same = product(path, threads).iter().zip(&first).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{path:?} on {threads} threads differs from {:?} on one", same_bits_as(path));
        }
    }
}

/// The user is warned exactly when the chosen kernel can be slower than f32: never on AMX,
/// always on the portable kernel (unless `DINO_BF16_KERNEL` chose it).
#[test]
fn a_slow_kernel_is_warned_of() {
    let chosen = std::env::var_os("DINO_BF16_KERNEL").is_some();
    match Path::detect() {
        Path::Amx => assert_eq!(Path::slow_warning(), None),
        Path::Portable if !chosen => assert!(Path::slow_warning().is_some_and(|w| w.contains("portable"))),
        _ => {}
    }
}

/// Rows of a packed tile past the matrix's last row keep whatever the thread's packing buffer
/// held (they make sums that are never stored): a product after one whose rows were all NaN
/// and infinities still gives exactly the bits it gives on a fresh thread.
#[test]
fn rows_past_the_matrix_never_reach_the_result() {
    let (n, k) = (40, 300);
    let b = values(k * n, 2);
    let product = |path: Path, a: &[f32], m: usize| product_by_rows(path, [m, n, k], a, &b);
    for path in Path::available() {
        for m in [1, 5, 17, 33] {
            let a = values(m * k, 1);
            let fresh = std::thread::scope(|s| s.spawn(|| product(path, &a, m)).join().unwrap());
            let poison: Vec<f32> = (0..96 * k).map(|i| [f32::NAN, f32::INFINITY, -f32::INFINITY][i % 3]).collect();
            assert!(product(path, &poison, 96).iter().all(|v| !v.is_finite()));
            let after = product(path, &a, m);
            let same = fresh.iter().zip(&after).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{path:?}, {m} rows after a product of NaN rows");
        }
    }
}
