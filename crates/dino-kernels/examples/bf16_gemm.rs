//! GFLOP/s of the bf16 product (`dino_kernels::cpu_bf16`) on every kernel this CPU runs, against
//! the f32 product of the `gemm` crate that the f32 kernels use, on small28's training shapes and
//! official_s16's inference shapes:
//! `cargo run --release -p dino-kernels --example bf16_gemm [threads]`.

use std::time::Instant;

use dino_kernels::cpu_bf16::{CacheLineAligned, Path, gemm_bf16};

/// As the `dino` binary: outputs on cache lines, which the AMX kernel stores into directly.
#[global_allocator]
static ALLOCATOR: CacheLineAligned = CacheLineAligned;

/// The best seconds of 7 rounds (this machine's speed drifts within seconds).
fn best(mut f: impl FnMut()) -> f64 {
    f();
    (0..7)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("a thread pool");
    println!("threads {threads}, kernels {:?}", Path::available());
    // small28 at batch 64: 64 x 2 global crops x 50 tokens = 6400 rows, width 192.
    let shapes = [
        ("qkv     6400x192 . 192x576", [6400, 576, 192]),
        ("fc1     6400x192 . 192x768", [6400, 768, 192]),
        ("fc2     6400x768 . 768x192", [6400, 192, 768]),
        ("fc1 dW  768x6400 . 6400x192", [768, 192, 6400]),
        ("square  2048^3", [2048, 2048, 2048]),
        // official_s16's inference: 16 images x 197 tokens = 3152 rows, width 384.
        ("s16 qkv 3152x384 . 384x1152", [3152, 1152, 384]),
        ("s16 proj 3152x384 . 384x384", [3152, 384, 384]),
        ("s16 fc1 3152x384 . 384x1536", [3152, 1536, 384]),
        ("s16 fc2 3152x1536 . 1536x384", [3152, 384, 1536]),
    ];
    for (name, [m, n, k]) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![0.0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let f32_s = best(|| unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        });
        let mut line = format!("{name:<30} f32 {:>6.1} GFLOP/s", flops / f32_s * 1e-9);
        for path in Path::available() {
            let s = best(|| unsafe {
                gemm_bf16(
                    path,
                    [m, n, k],
                    (c.as_mut_ptr(), n),
                    false,
                    (a.as_ptr(), [k, 1]),
                    (b.as_ptr(), [n, 1]),
                    1.0,
                    threads,
                )
            });
            line += &format!("   bf16 {path:?} {:>6.1} GFLOP/s ({:.2}x)", flops / s * 1e-9, f32_s / s);
        }
        println!("{line}");
    }
}
