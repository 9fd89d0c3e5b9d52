//! The seeded initialisation stream of the models.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// `n` draws of N(0, std²) by the Box–Muller transform of two uniforms each (cosine branch).
///
/// This is the exact stream every LLaMA run has been initialised with: a run with the same seed
/// gives the same weights, bit for bit, across versions. (`rand_distr`'s normal sampler uses a
/// different algorithm and would give other weights.)
pub fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random::<f32>().max(f32::MIN_POSITIVE), rng.random());
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn draws_have_the_requested_moments_and_are_seeded() {
        let a = normal(&mut ChaCha8Rng::seed_from_u64(1), 200_000, 0.5);
        let b = normal(&mut ChaCha8Rng::seed_from_u64(1), 10, 0.5);
        assert_eq!(a[..10], b[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 5e-3, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 5e-3, "std {}", var.sqrt());
        // About 4.55% of N(0,1) lies beyond 2 standard deviations.
        let tail = a.iter().filter(|x| x.abs() > 1.0).count() as f64 / a.len() as f64;
        assert!((tail - 0.0455).abs() < 3e-3, "tail {tail}");
    }
}
