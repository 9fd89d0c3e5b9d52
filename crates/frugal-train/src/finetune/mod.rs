//! Fine-tuning pretrained encoders (BERT, RoBERTa) on text classification.
//!
//! - [`task`]: labelled examples from CSV / TSV / JSONL or class folders, split by text hash.
//! - [`tokenize`]: the model's own tokenizer, with truncation counted.
//! - [`batches`]: shuffled training batches with dropout seeds, and evaluation.
//! - [`scores`]: accuracy and macro-F1.
//! - [`memory`]: fine-tuning memory by method.
//! - [`run`]: a fine-tuning run in a run directory: metrics, plots, checkpoints, resume.
//! - [`classify`]: the classes a fine-tuned model gives texts or a task file.

pub mod batches;
pub mod classify;
pub mod memory;
pub mod run;
pub mod scores;
pub mod task;
pub mod tokenize;

use crate::trainer::{GradSink, Model};
use anyhow::Result;
use candle_core::Tensor;
use frugal::Param;
use frugal_nn::encoder::{Classifier, EncoderBatch};

impl Model for Classifier {
    type Input = EncoderBatch;

    fn loss(&self, inputs: &EncoderBatch, targets: &Tensor) -> Result<Tensor> {
        Ok(Classifier::loss(self, inputs, targets)?)
    }

    fn params(&self) -> Vec<Param> {
        Classifier::params(self)
    }

    fn backward_by_layers(
        &self,
        inputs: &EncoderBatch,
        targets: &Tensor,
        scale: f64,
        sink: &mut GradSink<'_>,
    ) -> Result<f64> {
        let loss = Classifier::backward_by_layers(self, inputs, targets, scale, sink)?;
        Ok(loss as f64)
    }
}
