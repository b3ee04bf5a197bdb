//! Branch-free f32 math that LLVM turns into SIMD code, and a way to compile a loop for the best
//! instruction set the CPU has while the binary stays portable.
//!
//! libm's scalar `erff` alone was 11 % of a small28 training step (perf). The polynomials use
//! `f32::mul_add`, a fused multiply-add rounded once on every target: one instruction in the
//! AVX-512 and AVX2 builds (about half the instructions of `a * b + c`, which made GELU
//! compute-bound), and libm's exactly rounded `fmaf` in the portable build, so all builds of a
//! loop give bit-identical results and runs do not depend on the machine's instruction set.

/// Compiles `$body` three times (AVX-512, AVX2, baseline) and runs the best one this CPU has.
/// The body must be an expression over the named arguments; it is inlined into each variant so
/// that LLVM vectorises it with that variant's instructions.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if $crate::cpu::simd::cap() < 1
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has every feature `v4` was compiled for, checked just above.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::cpu::simd::cap() < 2
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has both features `v3` was compiled for, checked just above.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Unit tests only: the best variant `multiversion!` may take (0 any, 1 AVX2 at most, 2 the
/// baseline), so that each variant can be compared on one machine. The variants give identical
/// bits by design, so other tests running meanwhile are unaffected.
#[cfg(test)]
pub(crate) static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[cfg(test)]
pub(crate) fn cap() -> u8 {
    CAP.load(std::sync::atomic::Ordering::Relaxed)
}

/// Outside unit tests every variant may run.
#[cfg(not(test))]
#[inline(always)]
pub(crate) const fn cap() -> u8 {
    0
}

/// erf(x) for f32, absolute error below 1e-6: the rational approximation of Eigen's
/// `generic_fast_erf_float` (odd degree-13 numerator, even degree-8 denominator on [-4, 4];
/// outside, erf is ±1 in f32).
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2.mul_add(-2.72614225801306e-10, 2.77068142495902e-08);
    p = x2.mul_add(p, -2.10102402082508e-06);
    p = x2.mul_add(p, -5.69250639462346e-05);
    p = x2.mul_add(p, -7.34990630326855e-04);
    p = x2.mul_add(p, -2.95459980854025e-03);
    p = x2.mul_add(p, -1.60960333262415e-02);
    let mut q = x2.mul_add(-1.45660718464996e-05, -2.13374055278905e-04);
    q = x2.mul_add(q, -1.68282697438203e-03);
    q = x2.mul_add(q, -7.37332916720468e-03);
    q = x2.mul_add(q, -1.42647390514189e-02);
    x * p / q
}

/// [`exp`]'s input range (the clamp).
pub(crate) const EXP_RANGE: (f32, f32) = (-87.3, 88.3);
/// -ln 2 in two parts (Cody-Waite): r = x - n ln 2 as `n · EXP_LN2.1 + (n · EXP_LN2.0 + x)`.
#[allow(clippy::excessive_precision)]
pub(crate) const EXP_LN2: (f32, f32) = (-0.693_359_4, 2.121_944_4e-4);
/// [`exp`]'s polynomial in r, highest degree first.
#[allow(clippy::excessive_precision)]
pub(crate) const EXP_POLYNOMIAL: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];

/// exp(x) for f32 within 2 ulp (Cephes `expf`): x = n ln2 + r, a degree-5 polynomial in r,
/// times 2^n built from its bits. Inputs are clamped to [-87.3, 88.3], so exp of a very
/// negative number is about 1e-38 rather than 0.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn exp(x: f32) -> f32 {
    let [p0, p1, p2, p3, p4, p5] = EXP_POLYNOMIAL;
    let x = x.clamp(EXP_RANGE.0, EXP_RANGE.1);
    let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = n.mul_add(EXP_LN2.1, n.mul_add(EXP_LN2.0, x));
    let mut p = r.mul_add(p0, p1);
    p = p.mul_add(r, p2);
    p = p.mul_add(r, p3);
    p = p.mul_add(r, p4);
    p = p.mul_add(r, p5);
    let y = p.mul_add(r * r, r) + 1.0;
    // 2^n from n's bits: adding 1.5·2^23 puts the integer n in the low mantissa bits (exact for
    // |n| < 2^22), which stays in SIMD registers; `n as i32` is a saturating scalar conversion.
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Sum of a slice in 16 independent lanes (vectorisable, and the same order on every CPU).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Largest element (-inf for an empty slice), in 16 independent lanes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    // Halving the lanes in a tree of plain comparisons: a fold of NaN-aware `f32::max` is a
    // chain of 16 dependent steps, which made this pass 40 % of a 197-token softmax. The maximum
    // is the same value whichever order finds it.
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] = if lanes[i + width] > lanes[i] { lanes[i + width] } else { lanes[i] };
        }
    }
    if lanes[0] > tail { lanes[0] } else { tail }
}

/// Dot product of two equally long slices, in 16 independent lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf from its Taylor series in f64 (|x| <= 3) or the continued fraction tail.
    fn erf_f64(x: f64) -> f64 {
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0f64;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_matches_the_series_to_1e6() {
        let mut worst = 0.0f64;
        for i in -3000..=3000 {
            let x = i as f64 / 1000.0;
            worst = worst.max((erf(x as f32) as f64 - erf_f64(x)).abs());
        }
        assert!(worst < 1e-6, "max |erf error| {worst}");
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn exp_is_within_a_few_ulp() {
        for i in -8000..=8000 {
            let x = i as f32 / 100.0;
            let (ours, exact) = (exp(x) as f64, (x as f64).exp());
            assert!(((ours - exact) / exact).abs() < 3e-7, "exp({x}) = {ours}, expected {exact}");
        }
        assert!(exp(-1000.0) < 1e-37);
    }

    multiversion! {
        fn erf_exp_best(x: &[f32], out: &mut [(f32, f32)]) {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = (erf(x), exp(x));
            }
        }
    }

    #[test]
    fn every_build_agrees_bit_for_bit() {
        let x: Vec<f32> = (-9000..=9000).map(|i| i as f32 * 0.0113).collect();
        // AVX-512 (where the CPU has it), AVX2 at most, the baseline: each variant in turn.
        for cap in 0..3 {
            CAP.store(cap, std::sync::atomic::Ordering::Relaxed);
            let mut out = vec![(0.0, 0.0); x.len()];
            erf_exp_best(&x, &mut out);
            // Called here, outside any `target_feature` function, erf and exp are compiled for
            // the baseline instruction set (mul_add through libm's fmaf).
            for (&x, &(e, p)) in x.iter().zip(&out) {
                assert_eq!(erf(x).to_bits(), e.to_bits(), "erf({x}), variant cap {cap}");
                assert_eq!(exp(x).to_bits(), p.to_bits(), "exp({x}), variant cap {cap}");
            }
        }
        CAP.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    #[test]
    fn sum_and_dot_cover_the_tail() {
        let x: Vec<f32> = (0..37).map(|i| i as f32).collect();
        assert_eq!(sum(&x), (0..37).sum::<i32>() as f32);
        assert_eq!(dot(&x, &x), (0..37).map(|i| i * i).sum::<i32>() as f32);
        assert_eq!(max(&x), 36.0);
        assert_eq!(max(&x[..20]), 19.0);
    }
}
