//! Packing and batching: the token stream is cut into windows of seq_len + 1 tokens (inputs and
//! shifted targets); each epoch visits the windows in a seeded random order. Targets marked
//! not predicted (instruction prompts, padding) become [`IGNORE`].

use super::instructions::NOT_PREDICTED;
use super::shard::TokenShard;
use crate::trainer::BatchSource;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use frugal_nn::ops::IGNORE;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Batches of (inputs, targets) from a shard, as u32 tensors on a device.
pub struct Batches<'a> {
    shard: &'a TokenShard,
    device: Device,
    seq_len: usize,
    windows: usize,
    seed: u64,
    order: Option<(u64, Vec<u32>)>,
}

impl<'a> Batches<'a> {
    /// Windows of `seq_len` inputs over `shard`, batched on `device`; fails if the shard is
    /// shorter than one window.
    pub fn new(
        shard: &'a TokenShard,
        seq_len: usize,
        seed: u64,
        what: &str,
        device: &Device,
    ) -> Result<Self> {
        let windows = shard.len().saturating_sub(1) / seq_len;
        if windows == 0 {
            bail!(
                "the {what} split has {} tokens, fewer than one sequence of {} (lower --seq-len or add text)",
                shard.len(),
                seq_len + 1
            );
        }
        Ok(Batches {
            shard,
            device: device.clone(),
            seq_len,
            windows,
            seed,
            order: None,
        })
    }

    /// Number of windows (sequences) per epoch.
    pub fn windows(&self) -> usize {
        self.windows
    }

    fn window_at(&mut self, sample: u64) -> usize {
        let epoch = sample / self.windows as u64;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<u32> = (0..self.windows as u32).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                self.seed ^ epoch.wrapping_mul(0x9E3779B97F4A7C15),
            ));
            self.order = Some((epoch, order));
        }
        let (_, order) = self.order.as_ref().expect("just set");
        order[(sample % self.windows as u64) as usize] as usize
    }

    /// The batch of `batch` sequences starting at global sample index `position` (shuffled order).
    pub fn shuffled(&mut self, position: u64, batch: usize) -> Result<(Tensor, Tensor)> {
        let windows: Vec<usize> = (0..batch as u64)
            .map(|i| self.window_at(position + i))
            .collect();
        self.gather(&windows)
    }

    /// The batch of windows `first..first + batch` in file order (evaluation).
    pub fn sequential(&self, first: usize, batch: usize) -> Result<(Tensor, Tensor)> {
        let windows: Vec<usize> = (first..(first + batch).min(self.windows)).collect();
        self.gather(&windows)
    }

    fn gather(&self, windows: &[usize]) -> Result<(Tensor, Tensor)> {
        let t = self.seq_len;
        let mut inputs = Vec::with_capacity(windows.len() * t);
        let mut targets = Vec::with_capacity(windows.len() * t);
        for &w in windows {
            let tokens = self.shard.range(w * t, t + 1);
            // Instruction streams mark the tokens that are inputs only.
            inputs.extend(tokens[..t].iter().map(|&x| x & !NOT_PREDICTED));
            targets.extend(tokens[1..].iter().map(
                |&x| {
                    if x & NOT_PREDICTED == 0 {
                        x
                    } else {
                        IGNORE
                    }
                },
            ));
        }
        let shape = (windows.len(), t);
        Ok((
            Tensor::from_vec(inputs, shape, &self.device)?,
            Tensor::from_vec(targets, shape, &self.device)?,
        ))
    }
}

impl BatchSource for Batches<'_> {
    fn batch(&mut self, position: u64, size: usize) -> Result<(Tensor, Tensor)> {
        self.shuffled(position, size)
    }
}
