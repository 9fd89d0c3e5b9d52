//! x·Wᵀ + s·(x·Aᵀ)·Bᵀ, a frozen linear with a LoRA adapter, as one operation. It keeps only its
//! input for the backward pass, which recomputes x·Aᵀ (r values per row); the same computation
//! from separate operations keeps x·Aᵀ, its product with Bᵀ, the scaled copy and the sum: three
//! more tensors of the output's size per adapted linear.

use super::linear;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

struct LoraLinear {
    w: Tensor,
    scale: f64,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::f32s(s1, l1, "lora-linear")?;
        let (mut y, shape) = super::cpu_linear_by(s1, l1, &self.w)?;
        let (u, u_shape) = super::cpu_linear(s1, l1, s2, l2)?;
        let (v, _) = super::cpu_linear(&u, &Layout::contiguous(u_shape), s3, l3)?;
        let (CpuStorage::F32(y32), CpuStorage::F32(v)) = (&mut y, &v) else {
            bail!("lora-linear: expects f32 inputs");
        };
        let scale = self.scale as f32;
        y32.iter_mut().zip(v).for_each(|(y, v)| *y += v * scale);
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let (inputs, outputs) = (self.w.dim(1)?, self.w.dim(0)?);
        let rows = x.elem_count() / inputs;
        let x2 = x.reshape((rows, inputs))?;
        let dy = dy.reshape((rows, outputs))?;
        let u = x2.matmul(&a.t()?)?;
        let db = (dy.t()?.matmul(&u)? * self.scale)?;
        let du = (dy.matmul(&b)? * self.scale)?;
        let da = du.t()?.matmul(&x2)?;
        let dx = (dy.matmul(&self.w)? + du.matmul(&a)?)?;
        Ok((Some(dx.reshape(x.shape())?), Some(da), Some(db)))
    }
}

/// x·Wᵀ + `scale`·(x·Aᵀ)·Bᵀ for x (..., in), a W (out, in) that gets no gradient, A (r, in)
/// and B (out, r); on the CPU in f32 as one operation, elsewhere from separate ones.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if a.dim(1)? != w.dim(1)? || b.dim(0)? != w.dim(0)? || a.dim(0)? != b.dim(1)? {
        bail!(
            "lora-linear: A {:?} and B {:?} do not fit a weight of shape {:?}",
            a.dims(),
            b.dims(),
            w.dims()
        );
    }
    if !super::fused_here(x) || !super::fused_here(a) || !super::fused_here(b) {
        let adapter = (linear(
            &linear(x, &a.to_dtype(x.dtype())?)?,
            &b.to_dtype(x.dtype())?,
        )? * scale)?;
        return super::frozen_linear(x, w)? + adapter;
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.detach(),
            scale,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::Var;

    #[test]
    fn lora_linear_matches_separate_operations_and_their_gradients() {
        let x = Var::from_tensor(&randn(&[2, 3, 6], 61)).unwrap();
        let w = randn(&[5, 6], 62);
        let a = Var::from_tensor(&randn(&[2, 6], 63)).unwrap();
        let b = Var::from_tensor(&randn(&[5, 2], 64)).unwrap();
        let fused = lora_linear(&x, &w, &a, &b, 1.5).unwrap();
        let separate = (linear(&x, &w).unwrap()
            + (linear(&linear(&x, &a).unwrap(), &b).unwrap() * 1.5).unwrap())
        .unwrap();
        assert!(max_diff(&fused, &separate) < 1e-5);
        let dy = randn(&[2, 3, 5], 65);
        let grads = |y: &Tensor| (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gs) = (grads(&fused), grads(&separate));
        for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
            let d = max_diff(gf.get(v).unwrap(), gs.get(v).unwrap());
            assert!(d < 1e-5, "{name}: {d}");
        }
        let wv = Var::from_tensor(&w).unwrap();
        let y = lora_linear(&x, wv.as_tensor(), &a, &b, 1.5).unwrap();
        assert!(y.sum_all().unwrap().backward().unwrap().get(&wv).is_none());
        let err = lora_linear(&x, &w, &b, &a, 1.0).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
    }
}
