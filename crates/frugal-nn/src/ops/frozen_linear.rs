//! x·Wᵀ with a frozen W: the backward pass forms dx = dy·W alone. Candle's matmul always forms
//! the weight's gradient too (a second matmul as large as the first, into a fresh buffer), even
//! for a weight that is not trained, as under LoRA.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

struct FrozenLinear {
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        super::f32s(s, l, "frozen-linear")?;
        super::cpu_linear_by(s, l, &self.w)
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
    use crate::ops::linear;
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

    #[test]
    fn frozen_linear_reads_an_input_inside_its_storage_and_a_transposed_weight() {
        // Rows 3..9 of a (4·3, 5) storage, and W stored as its transpose.
        let x = randn(&[4, 3, 5], 54).narrow(0, 1, 2).unwrap();
        let w = randn(&[5, 4], 55).t().unwrap();
        let y = frozen_linear(&x, &w).unwrap().to_vec3::<f32>().unwrap();
        let (xs, ws) = (x.to_vec3::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        for (b, rows) in xs.iter().enumerate() {
            for (t, row) in rows.iter().enumerate() {
                for (o, w_row) in ws.iter().enumerate() {
                    let want: f64 = row
                        .iter()
                        .zip(w_row)
                        .map(|(&x, &w)| x as f64 * w as f64)
                        .sum();
                    assert!((y[b][t][o] as f64 - want).abs() < 1e-5, "{b} {t} {o}");
                }
            }
        }
    }
}
