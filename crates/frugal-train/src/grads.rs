//! Gradient utilities: accumulation over micro-batches and the pieces of global-norm clipping
//! (see [`crate::data_parallel::DataParallel::clip_grad_norm`]).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use frugal::Param;
use std::ops::Range;

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

/// Elements per f32 partial sum of a squared norm: the pieces of a sharded parameter start
/// at multiples of it, so that a rank holding a piece sums its chunks as one process does.
pub const NORM_CHUNK: usize = frugal::sharding::PIECE;

/// Σ g² of the elements `range` (flat) of a gradient, one f32 sum per [`NORM_CHUNK`] elements
/// from the range's start.
pub fn chunk_squares(g: &Tensor, range: Range<usize>) -> Result<Vec<f32>> {
    let flat = g.flatten_all()?.narrow(0, range.start, range.len())?;
    let (full, tail) = (range.len() / NORM_CHUNK, range.len() % NORM_CHUNK);
    let mut sums = Vec::with_capacity(full + 1);
    if full > 0 {
        let rows = flat.narrow(0, 0, full * NORM_CHUNK)?;
        sums = rows.reshape((full, NORM_CHUNK))?.sqr()?.sum(1)?.to_vec1()?;
    }
    if tail > 0 {
        let rest = flat.narrow(0, full * NORM_CHUNK, tail)?;
        sums.push(rest.sqr()?.sum_all()?.to_scalar()?);
    }
    Ok(sums)
}

/// The global L2 norm from each parameter's Σ g² (see [`crate::data_parallel::DataParallel::squared_norms`]),
/// added in name order so that it
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
    fn squares_are_summed_by_chunks_from_the_range_start() {
        let n = 2 * NORM_CHUNK + 4;
        let values: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let g = Tensor::from_vec(values.clone(), (n / 4, 4), &Device::Cpu).unwrap();
        let want = |r: std::ops::Range<usize>| values[r].iter().map(|x| x * x).sum::<f32>();
        let whole = chunk_squares(&g, 0..n).unwrap();
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0], want(0..NORM_CHUNK));
        assert_eq!(whole[2], want(2 * NORM_CHUNK..n));
        // A piece from a chunk boundary has the same chunks.
        assert_eq!(chunk_squares(&g, NORM_CHUNK..n).unwrap(), whole[1..]);
        assert_eq!(chunk_squares(&g, 5..8).unwrap(), [want(5..8)]);
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
        let b = chunk_squares(acc.get(params[1].var.as_tensor()).unwrap(), 0..1).unwrap();
        let squares = vec![("b", f64::from(b[0])), ("a", 25.0)];
        assert_eq!(norm_in_name_order(squares), 41f64.sqrt());
        assert_eq!(clip_factor(41f64.sqrt(), 1.0), Some(1.0 / 41f64.sqrt()));
        assert_eq!(clip_factor(41f64.sqrt(), 10.0), None);
        assert_eq!(clip_factor(41f64.sqrt(), 0.0), None);
    }
}
