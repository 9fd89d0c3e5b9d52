//! Batches of tokenized examples: shuffled anew each epoch from the seed, addressed by position
//! (a resumed run sees the very batches it would have seen), each with its own dropout seed.

use super::scores::Scores;
use super::tokenize::Encoded;
use crate::data_parallel::DataParallel;
use crate::trainer::BatchSource;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use frugal_nn::encoder::{Classifier, EncoderBatch, EncoderConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Training batches over a tokenized split.
pub struct ClassBatches<'a> {
    data: &'a Encoded,
    config: &'a EncoderConfig,
    seed: u64,
    device: Device,
    /// The permutation of the epoch last used.
    order: (u64, Vec<usize>),
}

impl<'a> ClassBatches<'a> {
    pub fn new(data: &'a Encoded, config: &'a EncoderConfig, seed: u64, device: &Device) -> Self {
        Self {
            data,
            config,
            seed,
            device: device.clone(),
            order: (u64::MAX, Vec::new()),
        }
    }

    fn index(&mut self, position: u64) -> usize {
        let n = self.data.labels.len() as u64;
        let epoch = position / n;
        if self.order.0 != epoch {
            let mut order: Vec<usize> = (0..n as usize).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                self.seed ^ epoch.wrapping_mul(0x9e3779b97f4a7c15),
            ));
            self.order = (epoch, order);
        }
        self.order.1[(position % n) as usize]
    }
}

impl BatchSource<EncoderBatch> for ClassBatches<'_> {
    fn batch(&mut self, position: u64, size: usize) -> Result<(EncoderBatch, Tensor)> {
        let picks: Vec<usize> = (position..position + size as u64)
            .map(|p| self.index(p))
            .collect();
        let inputs: Vec<(Vec<u32>, Vec<u32>)> =
            picks.iter().map(|&i| self.data.inputs[i].clone()).collect();
        let labels: Vec<u32> = picks.iter().map(|&i| self.data.labels[i]).collect();
        let dropout_seed = self
            .seed
            .wrapping_add(position.wrapping_mul(0xd1b54a32d192ed03));
        let batch =
            EncoderBatch::new(self.config, &inputs, &self.device)?.with_dropout(dropout_seed);
        Ok((batch, Tensor::new(labels, &self.device)?))
    }
}

/// Mean loss and scores of the model on a split, in batches of `batch_size`, without dropout.
/// Each rank of `parallel` scores every world-th batch and the ranks share their figures, which
/// every rank then adds in batch order: the result of one process, bit for bit.
pub fn evaluate(
    model: &Classifier,
    data: &Encoded,
    batch_size: usize,
    parallel: &DataParallel,
) -> Result<(f64, Scores)> {
    let size = batch_size.max(1);
    let (rank, world) = (parallel.rank(), parallel.world_size());
    let device = model.encoder.device().clone();
    // Per batch of this rank: its mean loss (f64), then its predicted classes (u32).
    let mut mine = Vec::new();
    for (inputs, labels) in data
        .inputs
        .chunks(size)
        .zip(data.labels.chunks(size))
        .skip(rank)
        .step_by(world)
    {
        let batch = EncoderBatch::new(&model.encoder.config, inputs, &device)?;
        let logits = model.eval_logits(&batch)?;
        let targets = Tensor::new(labels, &device)?;
        let loss = frugal_nn::ops::cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64;
        mine.extend(loss.to_le_bytes());
        for class in logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()? {
            mine.extend(class.to_le_bytes());
        }
    }
    let shares = match world {
        1 => vec![mine],
        _ => parallel.comm().all_gather_bytes(&mine),
    };
    let mut unread: Vec<&[u8]> = shares.iter().map(Vec::as_slice).collect();
    let (mut loss_sum, mut predicted) = (0.0f64, Vec::with_capacity(data.labels.len()));
    for (b, labels) in data.labels.chunks(size).enumerate() {
        let from = &mut unread[b % world];
        let Some((head, rest)) = from.split_at_checked(8 + 4 * labels.len()) else {
            bail!("rank {} sent fewer evaluation figures than its batches need: are all ranks the same frugal on the same data?", b % world);
        };
        *from = rest;
        let (loss, classes) = head.split_at(8);
        let loss = f64::from_le_bytes(loss.try_into().expect("8 bytes"));
        loss_sum += loss * labels.len() as f64;
        predicted.extend(
            classes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
        );
    }
    let n = data.labels.len().max(1) as f64;
    Ok((
        loss_sum / n,
        Scores::of(&predicted, &data.labels, model.labels()),
    ))
}
