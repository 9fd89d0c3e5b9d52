//! Row kernels in eight f32 lanes: e^x, and sums, maxima and dot products of rows, and the
//! element-wise SwiGLU and GELU with their gradients, and a masked softmax of a row.
//!
//! Each kernel is written once and compiled three times: for AVX-512 and for AVX2, chosen at run
//! time where the CPU has them, and for the x86-64 baseline (SSE2). All three compile the same
//! additions and multiplications in the same order (no fused multiply-add), so they give the same
//! bits on every machine; only the width of the registers differs. Sums and maxima keep eight
//! lane totals and read sixteen elements at a time, the first eight into the lanes before the
//! second eight: the order of one chunk of eight after another, with the element-wise work
//! sixteen wide.

/// Lanes of the running totals: one AVX2 register of f32.
const LANES: usize = 8;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// e^x by range reduction, x = k·ln 2 + r with |r| ≤ ln 2 / 2, and the degree-7 Taylor polynomial
/// of e^r (relative error below 2.4·10⁻⁷, two units in the last place). Results under
/// 2.4·10⁻³⁸ flush to zero, results over f32::MAX are infinite, and NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    /// Below this e^x flushes to zero (k would leave the range of a normal power of two).
    const LOW: f32 = -86.6;
    /// ln(f32::MAX): above this e^x overflows.
    const HIGH: f32 = 88.722_84;
    /// ln 2 in two parts: k·LN2_HI is exact for the k that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    /// 1.5·2²³: adding then subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let c = x.clamp(LOW, HIGH);
    let rounded = c * std::f32::consts::LOG2_E + ROUND;
    let k = rounded - ROUND;
    let r = (c - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^k as 2^(k−1)·2, so that k = 128 (x near HIGH) stays representable. `rounded` has
    // ROUND's exponent and unit steps, so its bits are ROUND's plus k: integer arithmetic on
    // them gives the exponent field without a float-to-integer conversion.
    let biased = rounded.to_bits().wrapping_sub(ROUND.to_bits() - 126);
    let half_scale = f32::from_bits(biased << 23);
    let y = p * half_scale * 2.0;
    let y = if x < LOW { 0.0 } else { y };
    let y = if x > HIGH { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// Sums eight lane totals in a fixed tree.
#[inline(always)]
fn total(acc: [f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Σ f(a_i, b_i) in eight lanes (element i into lane i mod 8, in order), then the lanes in a
/// tree. Sixteen values are computed at a time, then added to the lanes in two halves.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(2 * LANES), b.chunks_exact(2 * LANES));
    for (ca, cb) in (&mut ca).zip(&mut cb) {
        let mut v = [0f32; 2 * LANES];
        for ((v, &a), &b) in v.iter_mut().zip(ca).zip(cb) {
            *v = f(a, b);
        }
        let (low, high) = v.split_at(LANES);
        for ((acc, &low), &high) in acc.iter_mut().zip(low).zip(high) {
            *acc = (*acc + low) + high;
        }
    }
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (i, (&a, &b)) in ra.iter().zip(rb).enumerate() {
        acc[i % LANES] += f(a, b);
    }
    total(acc)
}

/// The largest element in eight lanes (element i into lane i mod 8, in order), then across the
/// lanes.
#[inline(always)]
fn lane_max(src: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = src.chunks_exact(2 * LANES);
    for chunk in &mut chunks {
        let (low, high) = chunk.split_at(LANES);
        for ((a, &low), &high) in acc.iter_mut().zip(low).zip(high) {
            *a = a.max(low).max(high);
        }
    }
    for (i, &x) in chunks.remainder().iter().enumerate() {
        acc[i % LANES] = acc[i % LANES].max(x);
    }
    acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// The vector instructions the row kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RowKernels {
    /// The x86-64 baseline (SSE2), or the portable build elsewhere.
    Baseline,
    /// AVX2 (eight f32 lanes).
    Avx2,
    /// AVX-512 (sixteen f32 lanes).
    Avx512,
}

/// The widest row kernels allowed ([`limit_row_kernels`]); all by default.
static WIDEST: AtomicU8 = AtomicU8::new(RowKernels::Avx512 as u8);

/// Runs the row kernels no wider than `widest` from now on (they give the same bits at every
/// width: this only changes their speed, e.g. to compare widths).
pub fn limit_row_kernels(widest: RowKernels) {
    WIDEST.store(widest as u8, Ordering::Relaxed);
}

impl RowKernels {
    /// The widest this CPU runs (detected once), within [`limit_row_kernels`].
    fn best() -> RowKernels {
        static DETECTED: OnceLock<RowKernels> = OnceLock::new();
        let detected = *DETECTED.get_or_init(|| *Self::available().last().unwrap());
        let widest = match WIDEST.load(Ordering::Relaxed) {
            0 => RowKernels::Baseline,
            1 => RowKernels::Avx2,
            _ => RowKernels::Avx512,
        };
        detected.min(widest)
    }

    /// Every width this CPU runs, narrowest first.
    pub fn available() -> Vec<RowKernels> {
        #[allow(unused_mut)]
        let mut all = vec![RowKernels::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                all.push(RowKernels::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(RowKernels::Avx512);
            }
        }
        all
    }

    /// The name of the instructions: `"AVX-512"`, `"AVX2"` or `"SSE2"` (`"portable"` off
    /// x86-64).
    pub fn name(self) -> &'static str {
        match self {
            RowKernels::Avx512 => "AVX-512",
            RowKernels::Avx2 => "AVX2",
            RowKernels::Baseline if cfg!(target_arch = "x86_64") => "SSE2",
            RowKernels::Baseline => "portable",
        }
    }
}

/// Defines `pub fn $name`, which runs `$on` with the widest instructions of this CPU, and
/// `fn $on(isa, ...)`, which runs the body compiled for AVX-512, AVX2 or the baseline.
macro_rules! dispatched {
    ($on:ident => $(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            $on(RowKernels::best(), $($arg),*)
        }

        fn $on(isa: RowKernels, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            match isa {
                // SAFETY: `isa` is one of `RowKernels::available()`, what this CPU runs.
                RowKernels::Avx512 => return unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                RowKernels::Avx2 => return unsafe { avx2($($arg),*) },
                RowKernels::Baseline => {}
            }
            let _ = isa;
            portable($($arg),*)
        }
    };
}

/// The instruction set the row kernels run with now (see [`RowKernels::name`]).
pub fn kernel_isa() -> &'static str {
    RowKernels::best().name()
}

dispatched! { exp_affine_on =>
    /// dst = e^(scale·src − shift), elementwise; returns Σ dst.
    pub fn exp_affine(src: &[f32], scale: f32, shift: f32, dst: &mut [f32]) -> f32 {
        assert_eq!(src.len(), dst.len(), "exp_affine: slices differ in length");
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = exp(s * scale - shift);
        }
        lane_sum(dst, dst, |d, _| d)
    }
}

dispatched! { sum_exp_on =>
    /// Σ e^(src − shift).
    pub fn sum_exp(src: &[f32], shift: f32) -> f32 {
        lane_sum(src, src, |x, _| exp(x - shift))
    }
}

dispatched! { max_on =>
    /// The largest element (−∞ for an empty row; NaN elements are skipped).
    pub fn max(src: &[f32]) -> f32 {
        lane_max(src)
    }
}

dispatched! { dot_on =>
    /// Σ a⊙b.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: slices differ in length");
        lane_sum(a, b, |a, b| a * b)
    }
}

dispatched! { swiglu_on =>
    /// silu(g)⊙u = g·σ(g)·u into `out`, elementwise.
    pub fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

dispatched! { swiglu_grad_on =>
    /// The gradients of silu(g)⊙u from the output's gradient `dy`: into `dg` and `du`.
    pub fn swiglu_grad(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let s = 1.0 / (1.0 + exp(-g));
            let silu = g * s;
            *du = dy * silu;
            *dg = dy * u * (s + silu * (1.0 - s));
        }
    }
}

/// erf(x) to within 1.5e-7 (Abramowitz and Stegun 7.1.26), branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// Φ(x), the standard normal distribution function.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

dispatched! { gelu_on =>
    /// GELU in its exact form, x·Φ(x), of each element of `x`, into `out`.
    pub fn gelu(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = x * normal_cdf(x);
        }
    }
}

dispatched! { gelu_grad_on =>
    /// The gradient of x·Φ(x) from the output's gradient `dy`, dy·(Φ(x) + x·φ(x)), into `dx`.
    pub fn gelu_grad(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        // 1/√(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let density = INV_SQRT_2PI * exp(-0.5 * x * x);
            *dx = dy * (normal_cdf(x) + x * density);
        }
    }
}

dispatched! { masked_softmax_on =>
    /// Softmax of scale·`row` over the entries where `keep` (at least one), into `out`; the
    /// others get zero.
    pub fn masked_softmax(row: &[f32], keep: &[bool], scale: f32, out: &mut [f32]) {
        for ((o, &v), &keep) in out.iter_mut().zip(row).zip(keep) {
            *o = if keep { v * scale } else { f32::NEG_INFINITY };
        }
        let max = lane_max(out);
        // e^(−∞) is 0: the masked entries drop out of the sum.
        out.iter_mut().for_each(|o| *o = exp(*o - max));
        let inv = 1.0 / lane_sum(out, out, |o, _| o);
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..2003).map(|i| (i as f32 - 1000.0) * 0.0917).collect();
        v.extend([0.0, -0.0, 1e-30, -1e-30, 88.7, -86.5, 0.3465736, -0.3465736]);
        v
    }

    #[test]
    fn exp_is_within_two_ulps_of_f64() {
        for x in xs() {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            if want < 2.4e-38 {
                assert!(got < 2.4e-38, "e^{x}: {got}");
                continue;
            }
            if want > f32::MAX as f64 {
                assert_eq!(got, f64::INFINITY, "e^{x}");
                continue;
            }
            assert!(
                ((got - want) / want).abs() < 2.4e-7,
                "e^{x}: {got} against {want}"
            );
        }
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.72).is_finite());
    }

    #[test]
    fn row_kernels_match_f64_sums() {
        let x = xs();
        let shift = 10.0f32;
        let want: f64 = x.iter().map(|&v| (v as f64 * 0.5 - 10.0).exp()).sum();
        let mut dst = vec![0.0; x.len()];
        let got = exp_affine(&x, 0.5, shift, &mut dst) as f64;
        assert!(((got - want) / want).abs() < 1e-5, "{got} against {want}");
        let want: f64 = x.iter().map(|&v| (v as f64 - 10.0).exp()).sum();
        let got = sum_exp(&x, 10.0) as f64;
        assert!(((got - want) / want).abs() < 1e-5, "{got} against {want}");
        assert_eq!(max(&x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN, -2.0, f32::NAN]), -2.0);
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let got = dot(&x, &x) as f64;
        assert!(((got - want) / want).abs() < 1e-5);
    }

    #[test]
    fn swiglu_and_its_gradient_match_f64() {
        let g = xs();
        let u: Vec<f32> = g.iter().map(|v| (v * 0.37).sin()).collect();
        let dy: Vec<f32> = g.iter().map(|v| (v * 0.11).cos()).collect();
        let mut out = vec![0.0; g.len()];
        let (mut dg, mut du) = (vec![0.0; g.len()], vec![0.0; g.len()]);
        swiglu(&g, &u, &mut out);
        swiglu_grad(&g, &u, &dy, &mut dg, &mut du);
        for i in 0..g.len() {
            let (g, u, dy) = (g[i] as f64, u[i] as f64, dy[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            let close =
                |got: f32, want: f64| (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs());
            assert!(close(out[i], g * s * u), "silu·u at {g}");
            assert!(close(du[i], dy * g * s), "du at {g}");
            assert!(close(dg[i], dy * u * (s + g * s * (1.0 - s))), "dg at {g}");
        }
    }

    #[test]
    fn masked_softmax_matches_f64_and_gives_masked_keys_nothing() {
        let x = xs();
        let keep: Vec<bool> = (0..x.len()).map(|i| i % 5 != 2).collect();
        // Rows of 1 to 64 keys: the remainder alone, whole chunks, and both.
        for k in [1, 7, 8, 9, 16, 17, 24, 64] {
            for (row, keep) in x.chunks_exact(k).zip(keep.chunks_exact(k)).take(20) {
                if !keep.iter().any(|&k| k) {
                    continue;
                }
                let mut out = vec![f32::NAN; k];
                masked_softmax(row, keep, 0.3, &mut out);
                let kept = || {
                    row.iter()
                        .zip(keep)
                        .filter(|(_, &k)| k)
                        .map(|(&v, _)| 0.3 * v as f64)
                };
                let max = kept().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = kept().map(|v| (v - max).exp()).sum();
                for ((&o, &v), &keep) in out.iter().zip(row).zip(keep) {
                    let want = if keep {
                        (0.3 * v as f64 - max).exp() / sum
                    } else {
                        0.0
                    };
                    assert!(
                        (o as f64 - want).abs() <= 1e-5 * want + 1e-30,
                        "{o} vs {want}"
                    );
                }
            }
        }
    }

    /// The AVX-512, AVX2 and baseline builds give the same bits (those this CPU runs), for
    /// rows with and without a remainder after whole chunks of sixteen.
    #[test]
    fn every_width_gives_the_same_bits() {
        let all = xs();
        let run = |isa: RowKernels, n: usize| {
            let x = &all[..n];
            let u: Vec<f32> = x.iter().map(|v| (v * 0.37).sin()).collect();
            let mut dst = vec![0.0; x.len()];
            let s = exp_affine_on(isa, x, 0.7, 1.5, &mut dst);
            let (mut y, mut dg, mut du) =
                (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
            swiglu_on(isa, x, &u, &mut y);
            swiglu_grad_on(isa, x, &u, &dst, &mut dg, &mut du);
            let (mut gelu, mut gelu_dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            gelu_on(isa, x, &mut gelu);
            gelu_grad_on(isa, x, &u, &mut gelu_dx);
            let keep: Vec<bool> = (0..x.len()).map(|i| i % 3 != 1).collect();
            let mut softmax = vec![0.0; x.len()];
            masked_softmax_on(isa, x, &keep, 0.3, &mut softmax);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (
                [
                    bits(&dst),
                    bits(&y),
                    bits(&dg),
                    bits(&du),
                    bits(&gelu),
                    bits(&gelu_dx),
                    bits(&softmax),
                ],
                [
                    s,
                    sum_exp_on(isa, x, 2.0),
                    dot_on(isa, x, &dst),
                    max_on(isa, x),
                ]
                .map(f32::to_bits),
            )
        };
        // Sums are those of element i into lane i mod 8, in order.
        let lanes_in_order = |x: &[f32]| {
            let mut acc = [0f32; LANES];
            for (i, &v) in x.iter().enumerate() {
                acc[i % LANES] += v * v;
            }
            total(acc)
        };
        for n in [all.len(), 24, 13] {
            let dot = dot_on(RowKernels::Baseline, &all[..n], &all[..n]);
            assert_eq!(dot.to_bits(), lanes_in_order(&all[..n]).to_bits(), "{n}");
        }
        // 2011 elements leave 11 after whole chunks of sixteen; 24 leave 8, 13 no whole chunk.
        for n in [all.len(), 24, 13] {
            let baseline = run(RowKernels::Baseline, n);
            for isa in RowKernels::available() {
                assert_eq!(run(isa, n), baseline, "{isa:?}, {n} elements");
            }
        }
    }
}
