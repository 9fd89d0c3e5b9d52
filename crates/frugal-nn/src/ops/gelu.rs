//! GELU with the exact (erf) form, y = x·Φ(x), fused: one pass forward, one pass backward
//! (dy·(Φ(x) + x·φ(x))), where candle's composed backward makes about ten.

use super::{f32s, filled, lanes, map_row_pairs, GradPass, Pass};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let out = filled(x.len(), 4096, |i, o| {
            lanes::gelu(&x[i * 4096..][..o.len()], o)
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
        let out = map_row_pairs(x, dy, 4096.min(x.len().max(1)), |o, x, dy| {
            lanes::gelu_grad(x, dy, o)
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
