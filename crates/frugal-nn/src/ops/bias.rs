//! Adding a bias to the last dimension, with the bias gradient summed over rows in parallel
//! (candle's broadcast addition reduces over the leading dimensions in one strided pass).

use super::{f32s, filled, sum_over_rows, GradPass, Pass};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "fused-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, self.name())?;
        let b = f32s(s2, l2, self.name())?;
        let d = b.len();
        let out = filled(x.len(), d, |i, o| {
            for ((o, &x), &b) in o.iter_mut().zip(&x[i * d..][..d]).zip(b) {
                *o = x + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let db = dy.apply_op2_no_bwd(b, &Pass(ColumnSums))?;
        Ok((Some(dy), Some(db)))
    }
}

/// Σ over rows of dy, one sum per column of the bias.
struct ColumnSums;

impl GradPass for ColumnSums {
    type B = f32;
    const NAME: &'static str = "fused-add-bias-grad";

    fn run(&self, dy: &[f32], b: &[f32], _layout: &Layout) -> (Vec<f32>, Shape) {
        let d = b.len();
        let sums = sum_over_rows(dy, dy, d, |acc, dy, _| {
            acc.iter_mut().zip(dy).for_each(|(a, &g)| *a += g);
        });
        (sums, Shape::from(d))
    }
}

/// `x` (..., d) plus the bias `b` (d) on every row.
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if b.dims() != [d] {
        bail!("add_bias: a bias of shape {:?} for rows of {d}", b.dims());
    }
    if !super::fused_here(x) {
        return super::generic::add_bias(x, b);
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::Var;

    #[test]
    fn fused_bias_matches_broadcast_addition_and_its_gradients() {
        let x = Var::from_tensor(&randn(&[4, 3, 6], 41)).unwrap();
        let b = Var::from_tensor(&randn(&[6], 42)).unwrap();
        let a = add_bias(&x, &b).unwrap();
        let c = x.broadcast_add(&b).unwrap();
        assert_eq!(max_diff(&a, &c), 0.0);
        let dy = randn(&[4, 3, 6], 43);
        let ga = (&a * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&c * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(max_diff(ga.get(&x).unwrap(), gc.get(&x).unwrap()), 0.0);
        assert!(max_diff(ga.get(&b).unwrap(), gc.get(&b).unwrap()) < 1e-5);
        assert!(add_bias(&x, &randn(&[5], 1)).is_err());
    }
}
