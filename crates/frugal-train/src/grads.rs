//! Gradient utilities: accumulation over micro-batches and global-norm clipping.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
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

/// Σ g² of one gradient, summed in f32 and widened (every global norm adds these).
pub fn squared_norm(g: &Tensor) -> Result<f64> {
    Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// The global L2 norm from each parameter's [`squared_norm`], added in name order so that it
/// does not depend on the order in which a model lists, or a backward pass makes, them.
pub fn norm_in_name_order(mut squares: Vec<(&str, f64)>) -> f64 {
    squares.sort_by(|a, b| a.0.cmp(b.0));
    squares.iter().map(|(_, s)| s).sum::<f64>().sqrt()
}

/// The global L2 norm of the gradients (see [`norm_in_name_order`]).
pub fn global_norm(grads: &GradStore, params: &[Param]) -> Result<f64> {
    let mut squares = Vec::with_capacity(params.len());
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            squares.push((p.name.as_str(), squared_norm(g)?));
        }
    }
    Ok(norm_in_name_order(squares))
}

/// The factor that brings a global norm `norm` down to `max` (0: no clipping), if it is above.
pub fn clip_factor(norm: f64, max: f64) -> Option<f64> {
    (max > 0.0 && norm > max).then(|| max / norm)
}

/// Scales the gradients so that their global L2 norm is at most `max` (0: no clipping); returns
/// the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Param], max: f64) -> Result<f64> {
    let norm = global_norm(grads, params)?;
    if let Some(scale) = clip_factor(norm, max) {
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
    use candle_core::{Device, Var};

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
