//! Evaluation: mean next-token loss and perplexity over a split; the `frugal eval` command.

use crate::cli::EvalArgs;
use crate::data::{Batches, Dataset, Source, TokenizerChoice};
use crate::model::{Llama, LlamaConfig};
use crate::train::checkpoint;
use anyhow::{bail, Result};

/// Mean loss over the first `max_tokens` tokens of `batches` in order (0: all windows).
pub fn mean_loss(
    model: &Llama,
    batches: &Batches,
    batch_size: usize,
    seq_len: usize,
    max_tokens: usize,
) -> Result<f64> {
    let windows = if max_tokens == 0 {
        batches.windows()
    } else {
        (max_tokens / seq_len).clamp(1, batches.windows())
    };
    let (mut sum, mut count) = (0.0f64, 0usize);
    let mut first = 0;
    while first < windows {
        let n = batch_size.min(windows - first);
        let (x, y) = batches.sequential(first, n)?;
        let loss = model.loss(&x, &y)?.to_scalar::<f32>()? as f64;
        sum += loss * n as f64;
        count += n;
        first += n;
    }
    Ok(sum / count as f64)
}

/// The sequence length of the run a checkpoint belongs to (`<run>/checkpoints/step-N`).
fn run_seq_len(checkpoint: &std::path::Path) -> Option<usize> {
    let run = checkpoint.parent()?.parent()?;
    let text = std::fs::read_to_string(run.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    config["seq_len"].as_u64().map(|n| n as usize)
}

/// `frugal eval`: prints validation loss and perplexity of a checkpoint.
pub fn run(args: &EvalArgs) -> Result<()> {
    let dir = checkpoint::locate(&args.checkpoint)?;
    let config = LlamaConfig::from_file(&dir.join(checkpoint::MODEL_CONFIG))?;
    let model = Llama::load(&config, &dir.join(checkpoint::MODEL))?;
    let source = Source::resolve(&args.data)?;
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(crate::data::default_cache_dir);
    let tokenizer_path = dir.join(checkpoint::TOKENIZER);
    let data = Dataset::prepare(
        &source,
        TokenizerChoice::File(&tokenizer_path),
        args.val_fraction,
        &cache,
    )?;
    if data.tokenizer.vocab_size() > config.vocab_size {
        bail!("the checkpoint's tokenizer has more ids than the model's vocabulary");
    }
    let seq_len = match args.seq_len {
        Some(n) => n,
        None => run_seq_len(&dir).unwrap_or(config.max_position_embeddings.min(256)),
    };
    if seq_len == 0 || seq_len > config.max_position_embeddings {
        bail!(
            "--seq-len {seq_len} must be between 1 and the model's max_position_embeddings ({})",
            config.max_position_embeddings
        );
    }
    let shard = match args.split.as_str() {
        "val" => &data.val,
        "train" => &data.train,
        other => bail!("unknown --split `{other}`; expected val or train"),
    };
    let batches = Batches::new(shard, seq_len, 0, &args.split)?;
    let loss = mean_loss(&model, &batches, args.batch_size, seq_len, args.eval_tokens)?;
    println!(
        "checkpoint {}  split {}  tokens {}  loss {:.4}  perplexity {:.2}",
        dir.display(),
        args.split,
        if args.eval_tokens == 0 {
            batches.windows() * seq_len
        } else {
            args.eval_tokens.min(batches.windows() * seq_len)
        },
        loss,
        loss.exp()
    );
    Ok(())
}
