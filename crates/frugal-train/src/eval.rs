//! Evaluation: mean next-token loss and perplexity over a split, of a model in training or of a
//! saved checkpoint.

use crate::checkpoint;
use crate::data::{Batches, Dataset, Format, Holdout, Source, TokenizerChoice};
use crate::data_parallel::DataParallel;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use frugal_nn::llama::Llama;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a pass over some windows summed.
#[derive(Clone, Copy, Default)]
struct LossSum {
    /// Σ batch loss × the batch's predicted tokens.
    sum: f64,
    /// Predicted tokens (targets that are not ignored).
    predicted: usize,
    windows: usize,
}

impl LossSum {
    /// The mean loss per predicted token.
    fn mean(&self) -> f64 {
        self.sum / self.predicted.max(1) as f64
    }
}

/// The summed loss over the first `windows` windows of `batches`, in order. Under data
/// parallelism the ranks take turns batch by batch and add their sums.
fn loss_sum(
    model: &Llama,
    batches: &Batches,
    batch_size: usize,
    windows: usize,
    parallel: &DataParallel,
) -> Result<LossSum> {
    let mut total = LossSum::default();
    let (rank, world) = (parallel.rank(), parallel.world_size());
    let (mut first, mut turn) = (0, 0);
    while first < windows {
        let n = batch_size.min(windows - first);
        if turn % world == rank {
            let (x, y) = batches.sequential(first, n)?;
            let predicted = frugal_nn::ops::counted(&y.flatten_all()?.to_vec1::<u32>()?);
            let loss = model.eval_loss(&x, &y)? as f64;
            total.sum += loss * predicted as f64;
            total.predicted += predicted;
        }
        first += n;
        turn += 1;
    }
    total.windows = windows;
    if world > 1 {
        let mut sums = [total.sum, total.predicted as f64];
        parallel.comm().all_reduce_sum_f64(&mut sums);
        total.sum = sums[0];
        total.predicted = sums[1] as usize;
    }
    Ok(total)
}

/// Windows to evaluate of `batches` for a budget of `max_tokens` (0: all; at least one).
fn window_budget(batches: &Batches, seq_len: usize, max_tokens: usize) -> usize {
    if max_tokens == 0 {
        batches.windows()
    } else {
        (max_tokens / seq_len).clamp(1, batches.windows())
    }
}

/// Mean loss over the first `max_tokens` tokens of `batches` in order (0: all windows), shared
/// among the ranks of `parallel`.
pub fn mean_loss(
    model: &Llama,
    batches: &Batches,
    batch_size: usize,
    seq_len: usize,
    max_tokens: usize,
    parallel: &DataParallel,
) -> Result<f64> {
    let windows = window_budget(batches, seq_len, max_tokens);
    Ok(loss_sum(model, batches, batch_size, windows, parallel)?.mean())
}

/// Which part of a corpus to evaluate on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The held-out validation documents.
    Val,
    /// The training documents.
    Train,
    /// The held-out test documents (`--test-fraction`, as in training).
    Test,
    /// Both: validation first, then training.
    All,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "val" => Ok(Split::Val),
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            "all" => Ok(Split::All),
            other => Err(format!(
                "unknown split `{other}`; expected val, train, test or all"
            )),
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Val => "val",
            Split::Train => "train",
            Split::Test => "test",
            Split::All => "all",
        })
    }
}

/// What `frugal eval` evaluates.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct EvalSettings {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[cfg_attr(feature = "cli", arg(long))]
    pub checkpoint: PathBuf,
    /// Corpus to evaluate on (its validation split unless --split says otherwise).
    #[cfg_attr(feature = "cli", arg(long, default_value = crate::settings::EMBEDDED_NAME))]
    pub data: String,
    /// Which split: val, train, test or all (validation and training).
    #[cfg_attr(feature = "cli", arg(long, default_value = "val"))]
    pub split: Split,
    /// Share of documents held out for validation (as in training).
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative, default_value_t = 0.05))]
    pub val_fraction: f64,
    /// Share of documents held out as the test split (as in training).
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative, default_value_t = 0.0))]
    pub test_fraction: f64,
    /// Tokens per sequence [default: the run's, else min(256, max_position_embeddings)].
    #[cfg_attr(feature = "cli", arg(long))]
    pub seq_len: Option<usize>,
    /// Sequences per batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
    /// The data is instruction records: score the responses only (as `train --instructions`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub instructions: bool,
    /// Tokens to evaluate (0: all).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub eval_tokens: usize,
    /// Token cache directory [default: $FRUGAL_CACHE or ~/.cache/frugal].
    #[cfg_attr(feature = "cli", arg(long))]
    pub cache_dir: Option<PathBuf>,
    /// Worker threads and the matrix-product library.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub cpu: crate::threads::CpuSettings,
}

/// The result of evaluating a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    pub split: Split,
    pub tokens: usize,
    pub loss: f64,
    pub perplexity: f64,
}

/// The sequence length of the run a checkpoint belongs to (`<run>/checkpoints/step-N`).
fn run_seq_len(checkpoint: &Path) -> Option<usize> {
    let run = checkpoint.parent()?.parent()?;
    crate::run::RunConfig::read(run).ok().map(|c| c.seq_len)
}

/// Loss and perplexity of a checkpoint on a split of a corpus, on `device`.
pub fn evaluate(settings: &EvalSettings, device: &Device) -> Result<EvalReport> {
    let dir = checkpoint::locate(&settings.checkpoint)?;
    // A checkpoint of a LoRA run is read with its adapters merged.
    let (config, model) = Llama::from_hf(&dir, device, DType::F32)?;
    let source = Source::resolve(&settings.data)?;
    let cache = settings
        .cache_dir
        .clone()
        .unwrap_or_else(crate::data::default_cache_dir);
    let tokenizer_path = dir.join(checkpoint::TOKENIZER);
    let seq_len = match settings.seq_len {
        Some(n) => n,
        None => run_seq_len(&dir).unwrap_or(config.max_position_embeddings.min(256)),
    };
    if seq_len == 0 || seq_len > config.max_position_embeddings {
        bail!(
            "--seq-len {seq_len} must be between 1 and the model's max_position_embeddings ({})",
            config.max_position_embeddings
        );
    }
    let data = Dataset::prepare(
        &source,
        TokenizerChoice::File(&tokenizer_path),
        Holdout {
            val: settings.val_fraction,
            test: settings.test_fraction,
        },
        if settings.instructions {
            Format::Instructions { seq_len }
        } else {
            Format::Packed
        },
        &cache,
    )?;
    if data.tokenizer.vocab_size() > config.vocab_size {
        bail!("the checkpoint's tokenizer has more ids than the model's vocabulary");
    }
    let shards = match settings.split {
        Split::Val => vec![(&data.val, "validation")],
        Split::Train => vec![(&data.train, "training")],
        Split::Test => match &data.test {
            Some(test) => vec![(test, "test")],
            None => bail!("--split test needs the --test-fraction the run held out (e.g. 0.05)"),
        },
        Split::All => vec![(&data.val, "validation"), (&data.train, "training")],
    };
    let mut total = LossSum::default();
    let mut budget = settings.eval_tokens;
    for (shard, what) in shards {
        let batches = Batches::new(shard, seq_len, 0, what, device)?;
        let windows = window_budget(&batches, seq_len, budget);
        let part = loss_sum(
            &model,
            &batches,
            settings.batch_size,
            windows,
            &DataParallel::default(),
        )?;
        total.sum += part.sum;
        total.predicted += part.predicted;
        total.windows += part.windows;
        if settings.eval_tokens > 0 {
            budget = budget.saturating_sub(part.windows * seq_len);
            if budget < seq_len {
                break;
            }
        }
    }
    let loss = total.mean();
    Ok(EvalReport {
        checkpoint: dir,
        split: settings.split,
        tokens: total.predicted,
        loss,
        perplexity: loss.exp(),
    })
}
