//! GELU with the exact (erf) form, y = x·Φ(x), fused: one pass forward, one pass backward
//! (dy·(Φ(x) + x·φ(x))), where candle's composed backward makes about ten.

use super::{f32s, lanes, map_row_pairs, GradPass, Pass};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// erf(x) to within 1.5e-7 (Abramowitz and Stegun 7.1.26), vectorizable.
#[inline]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * lanes::exp(-a * a);
    y.copysign(x)
}

/// Φ(x), the standard normal distribution function.
#[inline]
fn phi_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = x * phi_cdf(x);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&dy.contiguous()?, &Pass(GeluGrad))?,
        ))
    }
}

/// dx = dy·(Φ(x) + x·φ(x)).
struct GeluGrad;

impl GradPass for GeluGrad {
    type B = f32;
    const NAME: &'static str = "fused-gelu-erf-grad";

    fn run(&self, x: &[f32], dy: &[f32], layout: &Layout) -> (Vec<f32>, Shape) {
        // 1/√(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let out = map_row_pairs(x, dy, 4096.min(x.len().max(1)), |o, x, dy| {
            for ((o, &x), &dy) in o.iter_mut().zip(x).zip(dy) {
                let density = INV_SQRT_2PI * lanes::exp(-0.5 * x * x);
                *o = dy * (phi_cdf(x) + x * density);
            }
        });
        (out, layout.shape().clone())
    }
}

/// GELU of `x` in its exact form, x·Φ(x) (`hidden_act = "gelu"` of BERT).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !super::fused_here(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::Var;

    #[test]
    fn fused_gelu_matches_candles_exact_gelu_and_its_gradient() {
        let x = Var::from_tensor(&(randn(&[3, 7, 5], 31) * 2.5).unwrap()).unwrap();
        let a = gelu_erf(&x).unwrap();
        let b = x.as_tensor().gelu_erf().unwrap();
        assert!(max_diff(&a, &b) < 1e-6, "{}", max_diff(&a, &b));
        let dy = randn(&[3, 7, 5], 32);
        let ga = (&a * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
    }
}
