//! What the operation benchmarks share: deterministic inputs and the timing of a pass.

use candle_core::{Device, Tensor, Var};
use std::time::Instant;

/// A variable of `shape` with values in [−`half`, `half`) from a hash of the index and `seed`:
/// deterministic, without a random generator.
pub fn hashed_var(shape: &[usize], seed: u64, half: f32) -> Var {
    let n: usize = shape.iter().product();
    let x: Vec<f32> = (0..n)
        .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 1000.0 * 2.0 * half - half)
        .collect();
    Var::from_tensor(&Tensor::from_vec(x, shape, &Device::Cpu).unwrap()).unwrap()
}

/// A forward pass to a scalar, timed with its backward pass.
pub type Pass<'a> = dyn Fn() -> Tensor + 'a;

/// Milliseconds of `pass` (a forward pass to a scalar, then its backward pass), median of
/// `reps` after one warm-up.
pub fn median_ms(reps: usize, pass: &Pass<'_>) -> f64 {
    let mut times: Vec<f64> = (0..reps + 1)
        .map(|_| {
            let start = Instant::now();
            pass().backward().unwrap();
            start.elapsed().as_secs_f64() * 1e3
        })
        .skip(1)
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}
