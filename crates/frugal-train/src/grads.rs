//! Gradient utilities: accumulation over micro-batches and the pieces of global-norm clipping
//! (see [`crate::DataParallel::clip_grad_norm`]).

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

/// The factor that brings a global norm `norm` down to `max` (0: no clipping), if it is above.
pub fn clip_factor(norm: f64, max: f64) -> Option<f64> {
    (max > 0.0 && norm > max).then(|| max / norm)
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
    fn accumulation_sums_micro_batches() {
        let params = [param("a", &[0.0, 0.0]), param("b", &[0.0])];
        let mut acc = GradStore::default();
        accumulate(&mut acc, grads_of(&params, &[&[1.0, 2.0], &[2.0]]), &params).unwrap();
        accumulate(&mut acc, grads_of(&params, &[&[2.0, 2.0], &[2.0]]), &params).unwrap();
        let get =
            |g: &GradStore, p: &Param| g.get(p.var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(get(&acc, &params[0]), [3.0, 4.0]);
        assert_eq!(get(&acc, &params[1]), [4.0]);
        // ‖(3, 4, 4)‖ = √41, whichever order the parameters come in.
        let squares = vec![
            (
                "b",
                squared_norm(acc.get(params[1].var.as_tensor()).unwrap()).unwrap(),
            ),
            ("a", 25.0),
        ];
        assert_eq!(norm_in_name_order(squares), 41f64.sqrt());
        assert_eq!(clip_factor(41f64.sqrt(), 1.0), Some(1.0 / 41f64.sqrt()));
        assert_eq!(clip_factor(41f64.sqrt(), 10.0), None);
        assert_eq!(clip_factor(41f64.sqrt(), 0.0), None);
    }
}
