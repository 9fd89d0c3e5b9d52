//! Dropout with masks drawn from a seeded stream, so that a run (and its resume) draws the same
//! masks every time.

use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mask elements drawn by one worker at a time.
const MASK_CHUNK: usize = 1 << 14;

/// A stream of dropout masks; a clone draws the same masks as the stream from where it was
/// cloned.
#[derive(Clone)]
pub struct Dropout {
    rng: ChaCha8Rng,
}

impl Dropout {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// `x` with each element zeroed with probability `p` and the rest scaled by 1 / (1 − p).
    pub fn apply(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - p) as f32;
        // Each element takes one f64 (two 32-bit words) of the stream, in order; the workers
        // draw disjoint stretches of it by seeking, so the mask is the one a single draw makes.
        let start = self.rng.get_word_pos();
        let stream = &self.rng;
        let mask = crate::ops::filled(x.elem_count(), MASK_CHUNK, |i, chunk| {
            let mut rng = stream.clone();
            rng.set_word_pos(start + (2 * i * MASK_CHUNK) as u128);
            for m in chunk {
                *m = if rng.random::<f64>() < p { 0.0 } else { keep };
            }
        });
        self.rng.set_word_pos(start + 2 * x.elem_count() as u128);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// Applies dropout when a stream is given (training), and is the identity otherwise.
pub fn maybe(dropout: &mut Option<&mut Dropout>, x: &Tensor, p: f64) -> Result<Tensor> {
    match dropout {
        Some(d) => d.apply(x, p),
        None => Ok(x.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_keeps_the_mean_and_repeats_with_its_seed() {
        let x = Tensor::ones(100_000, candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = Dropout::new(7)
            .apply(&x, 0.1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let zeros = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((zeros - 0.1).abs() < 0.005, "{zeros}");
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        // The mask is the stream drawn in order, one f64 per element, and the stream goes on
        // after it: a second mask starts where the first ended.
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut d = Dropout::new(7);
        for mask in 0..2 {
            let got = d.apply(&x, 0.1).unwrap().to_vec1::<f32>().unwrap();
            for (i, &v) in got.iter().enumerate() {
                let want = if rng.random::<f64>() < 0.1 {
                    0.0
                } else {
                    1.0 / 0.9
                };
                assert_eq!(v, want as f32, "mask {mask}, element {i}");
            }
        }
        let b = Dropout::new(7)
            .apply(&x, 0.1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        let c = Dropout::new(8)
            .apply(&x, 0.1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(a, c);
        assert_eq!(
            Dropout::new(7)
                .apply(&x, 0.0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.0; 100_000]
        );
    }
}
