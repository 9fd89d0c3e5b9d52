//! Dropout with masks drawn from a seeded stream, so that a run (and its resume) draws the same
//! masks every time.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::Arc;

/// Mask elements drawn by one worker at a time (a multiple of 64: whole words of bits).
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
    /// On the CPU the mask is kept for the backward pass as one bit per element (an f32 mask
    /// multiplied in would keep four bytes).
    pub fn apply(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let mask = self.mask(x.elem_count(), p);
        if crate::ops::fused_here(x) {
            return x.contiguous()?.apply_op1(Masked(mask));
        }
        let factors: Vec<f32> = (0..x.elem_count()).map(|i| mask.factor(i)).collect();
        let factors = Tensor::from_vec(factors, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * factors
    }

    /// The next `n` elements' mask for dropping with probability `p` (> 0). Each element
    /// takes one f64 (two 32-bit words) of the stream, in order, and is dropped when it is
    /// below `p`; the workers draw disjoint stretches of the stream by seeking, so the mask is
    /// the one a single draw makes.
    pub(crate) fn mask(&mut self, n: usize, p: f64) -> Mask {
        let start = self.rng.get_word_pos();
        let stream = &self.rng;
        let mut kept = vec![0u64; n.div_ceil(64)];
        kept.par_chunks_mut(MASK_CHUNK / 64)
            .enumerate()
            .for_each(|(c, words)| {
                let mut rng = stream.clone();
                rng.set_word_pos(start + (2 * c * MASK_CHUNK) as u128);
                let first = c * MASK_CHUNK;
                for (w, word) in words.iter_mut().enumerate() {
                    for bit in 0..64.min(n - first - 64 * w) {
                        if rng.random::<f64>() >= p {
                            *word |= 1 << bit;
                        }
                    }
                }
            });
        self.rng.set_word_pos(start + 2 * n as u128);
        Mask {
            kept: kept.into(),
            keep: 1.0 / (1.0 - p) as f32,
        }
    }
}

/// A dropout mask: one bit per element (1: kept), and the factor of the kept elements.
#[derive(Clone)]
pub(crate) struct Mask {
    kept: Arc<[u64]>,
    keep: f32,
}

impl Mask {
    /// The factor of element `i`: 1 / (1 − p) where it is kept, else zero.
    pub(crate) fn factor(&self, i: usize) -> f32 {
        if self.kept[i / 64] >> (i % 64) & 1 == 1 {
            self.keep
        } else {
            0.0
        }
    }

    /// `values` (the mask's elements from `first`) times the mask, in place: element by
    /// element up to a multiple of 64, then a word of 64 factors at a time.
    pub(crate) fn multiply_in_place(&self, values: &mut [f32], first: usize) {
        let head = ((64 - first % 64) % 64).min(values.len());
        let (unaligned, aligned) = values.split_at_mut(head);
        for (j, v) in unaligned.iter_mut().enumerate() {
            *v *= self.factor(first + j);
        }
        let words = &self.kept[(first + head) / 64..];
        for (block, &word) in aligned.chunks_mut(64).zip(words) {
            let factors = self.factors(word);
            for (v, f) in block.iter_mut().zip(factors) {
                *v *= f;
            }
        }
    }

    /// The factors of the 64 elements of one word of the mask.
    fn factors(&self, word: u64) -> [f32; 64] {
        std::array::from_fn(|b| if word >> b & 1 == 1 { self.keep } else { 0.0 })
    }

    /// `t` times the mask, outside the backward graph (a gradient through it).
    pub(crate) fn multiply(&self, t: &Tensor) -> Result<Tensor> {
        t.contiguous()?.apply_op1_no_bwd(&Masked(self.clone()))
    }
}

/// Multiplies by a dropout mask held as bits: the products of the f32 mask, forward (x·m) and
/// backward (dy·m).
struct Masked(Mask);

impl CustomOp1 for Masked {
    fn name(&self) -> &'static str {
        "dropout-bits"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::ops::f32s(s, l, self.name())?;
        let out = crate::ops::filled(x.len(), MASK_CHUNK, |c, o| {
            let first = c * MASK_CHUNK;
            for ((block, x), &word) in o
                .chunks_mut(64)
                .zip(x[first..].chunks(64))
                .zip(&self.0.kept[first / 64..])
            {
                let factors = self.0.factors(word);
                for ((o, x), f) in block.iter_mut().zip(x).zip(factors) {
                    *o = x * f;
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        self.0.multiply(dy).map(Some)
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
    fn a_mask_multiplies_from_any_element() {
        let mask = Dropout::new(3).mask(300, 0.3);
        for (first, len) in [(0, 300), (5, 200), (64, 70), (100, 1), (127, 100)] {
            let mut values: Vec<f32> = (0..len).map(|i| i as f32 + 0.5).collect();
            mask.multiply_in_place(&mut values, first);
            for (j, v) in values.iter().enumerate() {
                assert_eq!(
                    *v,
                    (j as f32 + 0.5) * mask.factor(first + j),
                    "{first} + {j}"
                );
            }
        }
    }

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

    #[test]
    fn the_bit_mask_gives_the_products_of_the_f32_mask_forward_and_backward() {
        // Negative values, infinities and a length that ends inside a word of bits.
        let n = 3 * MASK_CHUNK + 77;
        let mut values: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
            .collect();
        (values[5], values[6]) = (f32::INFINITY, -0.0);
        let x = candle_core::Var::new(values.as_slice(), &Device::Cpu).unwrap();
        let kept = Dropout::new(3).mask(n, 0.25);
        let y = Dropout::new(3).apply(&x, 0.25).unwrap();
        let mask: Vec<f32> = (0..n).map(|i| kept.factor(i)).collect();
        let want: Vec<f32> = values.iter().zip(&mask).map(|(x, m)| x * m).collect();
        let got = y.to_vec1::<f32>().unwrap();
        assert!(got
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let dy: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin()).collect();
        let dy_t = Tensor::new(dy.as_slice(), &Device::Cpu).unwrap();
        let grads = (y * &dy_t).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(&x).unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = dy.iter().zip(&mask).map(|(d, m)| d * m).collect();
        assert!(dx
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.25).abs() < 0.01, "{dropped}");
    }
}
