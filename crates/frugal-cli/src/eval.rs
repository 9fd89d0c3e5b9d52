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
    let seq_len = args
        .seq_len
        .unwrap_or(config.max_position_embeddings.min(256));
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
