//! The SwiGLU gate silu(g)⊙u of LLaMA's MLP, fused: one pass forward, and one backward pass
//! that writes both gradients, where candle's composed SiLU and product make about ten passes
//! and as many temporaries.

use super::{lanes, map_row_pairs, with_f32};
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 4096;

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = super::f32s(s1, l1, self.name())?;
        let u = super::f32s(s2, l2, self.name())?;
        let out = map_row_pairs(g, u, CHUNK, |o, g, u| lanes::swiglu(g, u, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(g, "swiglu", |g| {
            with_f32(u, "swiglu", |u| {
                with_f32(dy, "swiglu", |dy| {
                    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                        .zip(dy.par_chunks(CHUNK))
                        .for_each(|(((dg, du), (g, u)), dy)| lanes::swiglu_grad(g, u, dy, dg, du));
                    (dg, du)
                })
            })
        })???;
        let shape = g.shape();
        Ok((
            Some(Tensor::from_vec(dg, shape, &Device::Cpu)?),
            Some(Tensor::from_vec(du, shape, &Device::Cpu)?),
        ))
    }
}

/// silu(g)⊙u for `g` and `u` of the same shape (LLaMA's gated MLP).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.shape() != u.shape() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ", g.dims(), u.dims());
    }
    if !super::fused_here(g) {
        return g.silu()? * u;
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::Var;

    #[test]
    fn fused_swiglu_matches_candles_silu_product_and_its_gradients() {
        let g = Var::from_tensor(&(randn(&[3, 7, 600], 41) * 3.0).unwrap()).unwrap();
        let u = Var::from_tensor(&randn(&[3, 7, 600], 42)).unwrap();
        let a = swiglu(&g, &u).unwrap();
        let b = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
        let dy = randn(&[3, 7, 600], 43);
        let ga = (&a * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&g, &u] {
            let d = max_diff(ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn shapes_must_agree() {
        let err = swiglu(&randn(&[2, 3], 1), &randn(&[3, 2], 2)).unwrap_err();
        assert!(err.to_string().contains("differ"), "{err}");
    }
}
