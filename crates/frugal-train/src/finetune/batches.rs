//! Batches of tokenized examples: shuffled anew each epoch from the seed, addressed by position
//! (a resumed run sees the very batches it would have seen), each with its own dropout seed.

use super::scores::Scores;
use super::tokenize::Encoded;
use crate::trainer::BatchSource;
use anyhow::Result;
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
pub fn evaluate(model: &Classifier, data: &Encoded, batch_size: usize) -> Result<(f64, Scores)> {
    let (mut loss_sum, mut predicted) = (0.0f64, Vec::with_capacity(data.labels.len()));
    let device = model.encoder.device().clone();
    for (inputs, labels) in data
        .inputs
        .chunks(batch_size.max(1))
        .zip(data.labels.chunks(batch_size.max(1)))
    {
        let batch = EncoderBatch::new(&model.encoder.config, inputs, &device)?;
        let logits = model.logits(&batch)?;
        let targets = Tensor::new(labels, &device)?;
        let loss = frugal_nn::ops::cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64;
        loss_sum += loss * labels.len() as f64;
        predicted.extend(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?);
    }
    let n = data.labels.len().max(1) as f64;
    Ok((
        loss_sum / n,
        Scores::of(&predicted, &data.labels, model.labels()),
    ))
}
