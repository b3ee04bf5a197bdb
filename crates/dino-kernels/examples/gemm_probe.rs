use gemm::Parallelism;
use std::time::Instant;

fn bench(name: &str, m: usize, n: usize, k: usize, at: bool, f: &dyn Fn(&mut [f32], &[f32], &[f32])) {
    // dst[m,n] = a[m,k] b[k,n]; a row-major (or a^T stored [k,m] when at), b row-major [k,n]
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 * 1e-3).collect();
    let mut c = vec![0f32; m * n];
    let _ = at;
    f(&mut c, &a, &b);
    let mut s = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..5 {
            f(&mut c, &a, &b);
        }
        s = s.min(t.elapsed().as_secs_f64() / 5.0);
    }
    println!("{name:<40} {:8.3} ms {:7.1} GFLOP/s", s * 1e3, 2.0 * (m * n * k) as f64 / s / 1e9);
}

unsafe fn g(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    p: Parallelism,
) {
    unsafe {
        gemm::gemm(m, n, k, c, 1, n as isize, false, a, a_cs, a_rs, b, b_cs, b_rs, 1.0, 1.0, false, false, false, p)
    }
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    use rayon::prelude::*;
    // dX = dy[rows, n] W^T, W stored [k, n] row-major: rhs(o, i) = W[i*n + o] -> rs=1, cs=n
    for &(name, rows, n, k) in
        &[("dX fc1 (dy 768 -> 192)", 6400usize, 768usize, 192usize), ("dX fc2 (dy 192 -> 768)", 6400, 192, 768)]
    {
        bench(&format!("{name} rayon"), rows, k, n, false, &|c, a, b| unsafe {
            g(
                rows,
                k,
                n,
                c.as_mut_ptr(),
                a.as_ptr(),
                n as isize,
                1,
                b.as_ptr(),
                1,
                n as isize,
                Parallelism::Rayon(threads),
            )
        });
        for tiles in [8usize, 16, 32] {
            let tr = rows.div_ceil(tiles);
            bench(&format!("{name} tiles {tiles}"), rows, k, n, false, &|c, a, b| {
                c.par_chunks_mut(tr * k).enumerate().for_each(|(t, cc)| unsafe {
                    g(
                        cc.len() / k,
                        k,
                        n,
                        cc.as_mut_ptr(),
                        a.as_ptr().add(t * tr * n),
                        n as isize,
                        1,
                        b.as_ptr(),
                        1,
                        n as isize,
                        Parallelism::None,
                    )
                });
            });
        }
    }
    // dW[k, n] = x^T dy: lhs(i, r) = x[r*k + i] -> rs=1, cs=k ; rhs dy[r, j] -> rs=n, cs=1
    for &(name, rows, k, n) in
        &[("dW fc1 (x 192, dy 768)", 6400usize, 192usize, 768usize), ("dW fc2 (x 768, dy 192)", 6400, 768, 192)]
    {
        bench(&format!("{name} rayon"), k, n, rows, false, &|c, a, b| unsafe {
            g(
                k,
                n,
                rows,
                c.as_mut_ptr(),
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                n as isize,
                1,
                Parallelism::Rayon(threads),
            )
        });
        for blocks in [2usize, 8] {
            let br = rows.div_ceil(blocks);
            bench(&format!("{name} T blocks {blocks}"), n, k, rows, false, &|c, a, b| {
                // a holds x? here a is [m=n? no] -> use b as dy-like and a as x-like by pointer only
                let parts: Vec<Vec<f32>> = (0..blocks)
                    .into_par_iter()
                    .map(|t| {
                        let mut out = vec![0f32; k * n];
                        let r = br.min(rows - t * br);
                        unsafe {
                            g(
                                n,
                                k,
                                r,
                                out.as_mut_ptr(),
                                a.as_ptr().add(t * br * n),
                                1,
                                n as isize,
                                b.as_ptr().add(t * br * k),
                                k as isize,
                                1,
                                Parallelism::None,
                            )
                        };
                        out
                    })
                    .collect();
                c.par_chunks_mut(16384).enumerate().for_each(|(i, o)| {
                    for p in &parts {
                        o.iter_mut().zip(&p[i * 16384..]).for_each(|(a, v)| *a += v)
                    }
                });
            });
        }
        for blocks in [2usize, 4, 8, 16] {
            let br = rows.div_ceil(blocks);
            bench(&format!("{name} blocks {blocks}"), k, n, rows, false, &|c, a, b| {
                let parts: Vec<Vec<f32>> = (0..blocks)
                    .into_par_iter()
                    .map(|t| {
                        let mut out = vec![0f32; k * n];
                        let r = br.min(rows - t * br);
                        unsafe {
                            g(
                                k,
                                n,
                                r,
                                out.as_mut_ptr(),
                                a.as_ptr().add(t * br * k),
                                1,
                                k as isize,
                                b.as_ptr().add(t * br * n),
                                n as isize,
                                1,
                                Parallelism::None,
                            )
                        };
                        out
                    })
                    .collect();
                c.par_chunks_mut(16384).enumerate().for_each(|(i, o)| {
                    for p in &parts {
                        o.iter_mut().zip(&p[i * 16384..]).for_each(|(a, v)| *a += v)
                    }
                });
            });
        }
    }
}
