//! LayerNorm over the last dimension: y = (x − mean) / sqrt(var + eps) ⊙ w + b.

use super::{f32s, filled, filled_chunks, sum_partials, GradPass, Pass};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::OnceLock;

struct LayerNorm {
    eps: f32,
}

/// (mean, 1 / sqrt(var + eps)) of a row.
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let x = f32s(s1, l1, self.name())?;
        let w = f32s(s2, l2, self.name())?;
        let b = f32s(s3, l3, self.name())?;
        let d = w.len();
        let out = filled(x.len(), d, |i, o| {
            let row = &x[i * d..][..d];
            let (mean, r) = moments(row, self.eps);
            for (((o, &x), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
                *o = (x - mean) * r * w + b;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let d = w.elem_count();
        let pass = Pass(LayerNormGrad {
            eps: self.eps,
            w: w.to_vec1::<f32>()?,
            sums: OnceLock::new(),
        });
        let dx = x.apply_op2_no_bwd(&dy, &pass)?;
        let Some(sums) = pass.0.sums.into_inner() else {
            candle_core::bail!("fused-layer-norm-grad: the pass did not run");
        };
        let dw = Tensor::from_slice(&sums[..d], d, x.device())?;
        let db = Tensor::from_slice(&sums[d..], d, x.device())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The three gradients in one pass over the rows: the output is
/// dx = r·(g − mean(g) − x̂·mean(g⊙x̂)) per row, with g = w⊙dy and x̂ = (x − mean)·r, and the
/// pass leaves dw = Σ_rows dy⊙x̂ and db = Σ_rows dy in `sums`, dw first.
struct LayerNormGrad {
    eps: f32,
    w: Vec<f32>,
    sums: OnceLock<Vec<f32>>,
}

impl GradPass for LayerNormGrad {
    type B = f32;
    const NAME: &'static str = "fused-layer-norm-grad";

    fn run(&self, x: &[f32], dy: &[f32], layout: &Layout) -> (Vec<f32>, Shape) {
        let d = self.w.len();
        let span = d * (4096 / d).max(1);
        let (dx, partials) = filled_chunks(x.len(), span, |i, dx| {
            let (x, dy) = (&x[i * span..][..dx.len()], &dy[i * span..][..dx.len()]);
            let mut sums = vec![0f32; 2 * d];
            let (dw, db) = sums.split_at_mut(d);
            for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
                let (mean, r) = moments(x, self.eps);
                let (mut g_mean, mut gx_mean) = (0f32, 0f32);
                for ((&x, &dy), &w) in x.iter().zip(dy).zip(&self.w) {
                    let g = w * dy;
                    g_mean += g;
                    gx_mean += g * (x - mean) * r;
                }
                let (g_mean, gx_mean) = (g_mean / d as f32, gx_mean / d as f32);
                for (((o, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(&self.w) {
                    *o = r * (w * dy - g_mean - (x - mean) * r * gx_mean);
                }
                for (((dw, db), &x), &dy) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(dy) {
                    *dw += dy * (x - mean) * r;
                    *db += dy;
                }
            }
            sums
        });
        // A pass runs once; were it run again, the sums would be the same.
        let _ = self.sums.set(sum_partials(partials, 2 * d));
        (dx, layout.shape().clone())
    }
}

/// LayerNorm of `x` (..., d) with weight `w` (d) and bias `b` (d).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [d] || b.dims() != [d] {
        candle_core::bail!(
            "layer_norm: weight {:?} and bias {:?} must both be ({d})",
            w.dims(),
            b.dims()
        );
    }
    if !super::fused_here(x) {
        return super::generic::layer_norm(x, w, b, eps);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::{Var, D};

    #[test]
    fn fused_layer_norm_matches_composed_ops() {
        let x = Var::from_tensor(&randn(&[3, 5, 8], 11)).unwrap();
        let w = Var::from_tensor(&randn(&[8], 12)).unwrap();
        let b = Var::from_tensor(&randn(&[8], 13)).unwrap();
        let a = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let centred = x
            .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
            .unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let composed = centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_diff(&a, &composed) < 1e-5);
        let dy = randn(&[3, 5, 8], 14);
        let ga = (&a * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&composed * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
            assert!(max_diff(ga.get(v).unwrap(), gb.get(v).unwrap()) < 1e-4);
        }
    }

    #[test]
    fn layer_norm_checks_its_parameters() {
        let err = layer_norm(&randn(&[2, 8], 1), &randn(&[8], 2), &randn(&[4], 3), 1e-5);
        assert!(err.unwrap_err().to_string().contains("must both be (8)"));
    }
}
