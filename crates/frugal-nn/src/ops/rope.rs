//! Rotary position embedding (Hugging Face's rotate-half convention) fused with the split of a
//! projection into heads: one pass each way, where the composed form copies the heads out,
//! then narrows, negates, concatenates, multiplies twice and adds, and backpropagates through
//! each of those.

use super::{f32s, filled, generic, with_f32};
use candle_core::{bail, CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};

/// The rotation of `heads` heads of size d, with cos and sin tables of shape (t, d).
struct Rope {
    heads: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Self> {
        Ok(Rope {
            heads,
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
        })
    }

    /// (t, d) of the tables, from the input shape (b, t, heads·d).
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize)> {
        let (b, t, width) = shape.dims3()?;
        let d = width / self.heads;
        if d * self.heads != width || !d.is_multiple_of(2) || self.cos.len() != t * d {
            bail!(
                "rope: {width} features do not split into {} heads of even size matching tables of {} values for {t} positions",
                self.heads,
                self.cos.len()
            );
        }
        Ok((b, t, d))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope-heads"
    }

    /// x (b, t, heads·d) → y (b, heads, t, d): y = x·cos + rotate_half(x)·sin.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let (b, t, d) = self.dims(l.shape())?;
        let (n, half) = (self.heads, d / 2);
        let out = filled(x.len(), t * d, |bh, block| {
            let (bi, hi) = (bh / n, bh % n);
            for (pos, y) in block.chunks_exact_mut(d).enumerate() {
                let src = &x[(bi * t + pos) * n * d + hi * d..][..d];
                let (cos, sin) = (&self.cos[pos * d..][..d], &self.sin[pos * d..][..d]);
                for k in 0..half {
                    y[k] = src[k] * cos[k] - src[k + half] * sin[k];
                    y[k + half] = src[k + half] * cos[k + half] + src[k] * sin[k + half];
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, t, d))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, d) = self.dims(x.shape())?;
        let (n, half) = (self.heads, d / 2);
        let dx = with_f32(dy, self.name(), |dy| {
            filled(dy.len(), n * d, |row, out| {
                let (bi, pos) = (row / t, row % t);
                let (cos, sin) = (&self.cos[pos * d..][..d], &self.sin[pos * d..][..d]);
                for (hi, g) in out.chunks_exact_mut(d).enumerate() {
                    let dy = &dy[((bi * n + hi) * t + pos) * d..][..d];
                    for k in 0..half {
                        g[k] = dy[k] * cos[k] + dy[k + half] * sin[k + half];
                        g[k + half] = dy[k + half] * cos[k + half] - dy[k] * sin[k];
                    }
                }
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (b, t, n * d), &Device::Cpu)?))
    }
}

/// Splits `x` (batch, seq, heads·d) into heads (batch, heads, seq, d) and rotates each by its
/// position: x·cos + rotate_half(x)·sin, with `cos` and `sin` of shape (seq, d).
pub fn rope_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if heads == 0 {
        bail!("rope: the number of heads must be at least 1");
    }
    if !super::fused_here(x) || !super::fused_here(cos) || !super::fused_here(sin) {
        let (b, t, width) = x.dims3()?;
        let heads_first = x
            .reshape((b, t, heads, width / heads))?
            .transpose(1, 2)?
            .contiguous()?;
        return generic::rope(&heads_first, cos, sin);
    }
    x.contiguous()?.apply_op1(Rope::new(heads, cos, sin)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::Var;

    #[test]
    fn fused_rope_matches_the_composed_rotation_and_its_gradient() {
        let (b, t, n, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&randn(&[b, t, n * d], 51)).unwrap();
        let (cos, sin) = (randn(&[t, d], 52), randn(&[t, d], 53));
        let a = rope_heads(&x, n, &cos, &sin).unwrap();
        let heads_first = x
            .as_tensor()
            .reshape((b, t, n, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let want = generic::rope(&heads_first, &cos, &sin).unwrap();
        assert_eq!(a.dims(), &[b, n, t, d]);
        assert!(max_diff(&a, &want) < 1e-6, "{}", max_diff(&a, &want));
        let dy = randn(&[b, n, t, d], 54);
        let ga = (&a * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&want * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let diff = max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap());
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn heads_must_divide_the_features_evenly() {
        for (heads, message) in [(4, "heads of even size"), (0, "at least 1")] {
            let err = rope_heads(
                &randn(&[1, 2, 12], 1),
                heads,
                &randn(&[2, 3], 2),
                &randn(&[2, 3], 3),
            )
            .unwrap_err();
            assert!(err.to_string().contains(message), "{heads} heads: {err}");
        }
    }
}
