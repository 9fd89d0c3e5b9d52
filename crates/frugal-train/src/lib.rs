//! Training with FRUGAL: data, tokenizers, the [`Trainer`], schedules,
//! checkpoints, metrics, evaluation, pre-training runs on disk and comparisons.
//!
//! - [`data`]: corpora, the tokenizer, the token cache and batches.
//! - [`trainer`]: the training loop over any [`Model`], stopped by a
//!   [`StopToken`] the caller owns.
//! - [`grads`]: gradient accumulation and the pieces of global-norm clipping.
//! - [`data_parallel`]: gradients averaged across ranks, sharded optimizer state.
//! - [`schedule`]: learning-rate schedules.
//! - [`settings`]: the settings of a run (the command line and TOML files, with the `cli` feature).
//! - [`run`]: a pre-training run in a run directory: metrics, plots, checkpoints, resume.
//! - [`finetune`]: fine-tuning pretrained encoders on text classification.
//! - [`generate`]: text from a trained model, token by token.
//! - [`compare`]: comparisons of optimizer configurations, with [`tune`]d settings.
//! - [`checkpoint`], [`metrics`], [`eval`], [`memory_report`], [`plot`], [`run_dir`].

/// Prints a line on rank 0 only (`$lead`) of a data-parallel run.
macro_rules! say {
    ($lead:expr, $($line:tt)*) => {
        if $lead {
            eprintln!($($line)*)
        }
    };
}

pub mod checkpoint;
pub mod compare;
pub mod data;
pub mod data_parallel;
pub mod device;
pub mod eval;
pub mod finetune;
pub mod generate;
pub mod grads;
pub mod memory_report;
pub mod metrics;
pub mod plot;
pub mod run;
pub mod run_dir;
pub mod schedule;
pub mod settings;
pub mod threads;
pub mod trainer;
pub mod tune;

pub use settings::{OptimizerSettings, TrainSettings};
pub use trainer::{Model, StopToken, Trainer};

/// The README's Rust examples, compiled and run as doc tests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
