//! x·Wᵀ with a frozen W: the backward pass forms dx = dy·W alone. Candle's matmul always forms
//! the weight's gradient too (a second matmul as large as the first, into a fresh buffer), even
//! for a weight that is not trained, as under LoRA.

use super::linear;
use candle_core::{bail, CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(all) = s else {
            bail!("frozen-linear: expects f32 inputs");
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("frozen-linear: expects a contiguous input");
        };
        let x = Tensor::from_slice(&all[start..end], l.shape(), &Device::Cpu)?;
        let y = linear(&x, &self.w)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dims = dy.dims().to_vec();
        let (out, lead) = dims.split_last().expect("an output of rank ≥ 1");
        let rows: usize = lead.iter().product();
        let dx = dy.reshape((rows, *out))?.matmul(&self.w)?;
        let mut shape = lead.to_vec();
        shape.push(self.w.dim(1)?);
        Ok(Some(dx.reshape(shape)?))
    }
}

/// x·Wᵀ for x (..., in) and a W (out, in) that gets no gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !super::fused_here(x) {
        return super::generic::frozen_linear(x, w);
    }
    x.contiguous()?.apply_op1(FrozenLinear { w: w.detach() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::Var;

    #[test]
    fn frozen_linear_matches_linear_and_passes_the_input_gradient() {
        let x = Var::from_tensor(&randn(&[2, 3, 5], 51)).unwrap();
        let w = randn(&[4, 5], 52);
        let a = frozen_linear(&x, &w).unwrap();
        let b = linear(&x, &w).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0);
        let dy = randn(&[2, 3, 4], 53);
        let ga = (&a * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-6);
    }
}
