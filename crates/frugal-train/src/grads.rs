//! Gradient utilities: accumulation over micro-batches and global-norm clipping.

use candle_core::backprop::GradStore;
use candle_core::Result;
use frugal::Param;

/// Adds the gradients in `more` into `acc`, parameter by parameter (gradient accumulation).
pub fn accumulate(acc: &mut GradStore, mut more: GradStore, params: &[Param]) -> Result<()> {
    for p in params {
        if let Some(g) = more.remove(p.var.as_tensor()) {
            let sum = match acc.remove(p.var.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(p.var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// The global L2 norm of the gradients, summed in name order so that it does not depend on the
/// order in which a model lists its parameters.
pub fn global_norm(grads: &GradStore, params: &[Param]) -> Result<f64> {
    let mut by_name: Vec<&Param> = params.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    let mut sq = 0.0f64;
    for p in by_name {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    Ok(sq.sqrt())
}

/// Scales the gradients so that their global L2 norm is at most `max` (0: no clipping); returns
/// the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Param], max: f64) -> Result<f64> {
    let norm = global_norm(grads, params)?;
    if max > 0.0 && norm > max {
        let scale = max / norm;
        for p in params {
            if let Some(g) = grads.remove(p.var.as_tensor()) {
                grads.insert(p.var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    fn param(name: &str, values: &[f32]) -> Param {
        let t = Tensor::new(values, &Device::Cpu).unwrap();
        Param::with_default_label(name, Var::from_tensor(&t).unwrap())
    }

    fn grads_of(params: &[Param], values: &[&[f32]]) -> GradStore {
        let mut g = GradStore::default();
        for (p, v) in params.iter().zip(values) {
            g.insert(p.var.as_tensor(), Tensor::new(*v, &Device::Cpu).unwrap());
        }
        g
    }

    #[test]
    fn accumulation_sums_and_clipping_scales_to_the_bound() {
        let params = [param("a", &[0.0, 0.0]), param("b", &[0.0])];
        let mut acc = GradStore::default();
        accumulate(&mut acc, grads_of(&params, &[&[1.0, 2.0], &[2.0]]), &params).unwrap();
        accumulate(&mut acc, grads_of(&params, &[&[2.0, 2.0], &[2.0]]), &params).unwrap();
        let get =
            |g: &GradStore, p: &Param| g.get(p.var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(get(&acc, &params[0]), [3.0, 4.0]);
        assert_eq!(get(&acc, &params[1]), [4.0]);
        // ‖(3, 4, 4)‖ = √41; clipped to 1 every entry shrinks by 1/√41.
        let norm = clip_grad_norm(&mut acc, &params, 1.0).unwrap();
        assert!((norm - 41f64.sqrt()).abs() < 1e-12);
        assert!((global_norm(&acc, &params).unwrap() - 1.0).abs() < 1e-6);
        let a = get(&acc, &params[0]);
        assert!((a[0] as f64 - 3.0 / 41f64.sqrt()).abs() < 1e-6);
        // Under the bound nothing changes.
        let before = get(&acc, &params[1]);
        clip_grad_norm(&mut acc, &params, 10.0).unwrap();
        assert_eq!(get(&acc, &params[1]), before);
    }
}
