//! Command-line interface: subcommands and their flags.

use crate::data::corpus::EMBEDDED_NAME;
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Memory-efficient training of LLaMA-style models with FRUGAL and its baselines.
#[derive(Parser, Debug)]
#[command(name = "frugal", version, about, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pre-train a LLaMA model (default: `tiny` on the embedded corpus with the `frugal` preset).
    Train(Box<TrainArgs>),
    /// Validation loss and perplexity of a checkpoint.
    Eval(EvalArgs),
    /// Exact memory of weights, gradients and optimizer state, without training.
    Memory(Box<MemoryArgs>),
    /// Train several optimizer configurations on the same data and compare them.
    Compare(Box<CompareArgs>),
}

/// Flags of `frugal memory`.
#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Built-in model or Hugging Face config.json.
    #[arg(long, default_value = "130m")]
    pub model: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub opt: OptimizerArgs,
}

/// Flags of `frugal compare`: the training flags shared by every run, and what to compare.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Optimizer specs, comma-separated between specs with `;` or ` `:
    /// e.g. "adamw galore frugal:density=0.125,projection=svd" [default: the paper's rows].
    #[arg(long)]
    pub methods: Option<String>,
    /// Sweep one setting over values for every method except adamw, e.g. density=0,0.125,0.25,0.5.
    #[arg(long)]
    pub sweep: Option<String>,
    /// A set of runs mirroring the paper's ablations: projection, state-free or modules.
    #[arg(long)]
    pub ablation: Option<String>,
    /// Seeds, comma-separated; every method runs once per seed.
    #[arg(long, default_value = "0,1")]
    pub seeds: String,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// Everything that defines a training run. Also accepted from a TOML file (`--config`), whose
/// keys are these names with `_` or `-`; flags given on the command line win.
#[derive(Args, Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainArgs {
    /// TOML file with any of these settings.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Built-in model (tiny, 9m, 20m, 35m, 60m, 130m, 350m, 1b, 3b, 7b) or a Hugging Face config.json.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Corpus: a .txt/.jsonl/.json(.gz) file, a directory of them, or the embedded corpus.
    #[arg(long, default_value = EMBEDDED_NAME)]
    pub data: String,
    /// Hugging Face tokenizer.json; without it a byte-level BPE is trained on the training split.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of a trained tokenizer [default: the model's vocab_size].
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Share of documents held out for validation.
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// Tokens per sequence [default: min(256, the model's max_position_embeddings)].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 800)]
    pub steps: usize,
    /// Peak learning rate [default: the preset's].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps [default: 10% of --steps].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Learning-rate schedule after warm-up: cosine, linear or constant.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this value (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub clip: f64,
    /// Evaluate every N steps (and at the end) [default: --steps / 4].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Validation tokens per evaluation (0: the whole validation split).
    #[arg(long, default_value_t = 0)]
    pub eval_tokens: usize,
    /// Save a checkpoint every N steps (and at the end) [default: --eval-every].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Write a metrics line every N steps.
    #[arg(long, default_value_t = 1)]
    pub log_every: usize,
    /// Checkpoints to keep (older ones are deleted after a newer one is complete).
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Run directory [default: runs/<timestamp>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory from its latest complete checkpoint.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Seed of initialisation, data order and the optimizer's random choices.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads [default: all cores].
    #[arg(long)]
    #[serde(skip)]
    pub threads: Option<usize>,
    /// Token cache directory [default: $FRUGAL_CACHE or ~/.cache/frugal].
    #[arg(long)]
    #[serde(skip)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub opt: OptimizerArgs,
}

/// Optimizer flags: a preset and overrides of any of its settings.
#[derive(Args, Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OptimizerArgs {
    /// Preset: adamw, frugal, frugal-svd, galore, badam, signsgd, sgd.
    #[arg(long, default_value = "frugal")]
    pub optimizer: String,
    /// Projection: svd, random, randperm, columns, rows, randk, blocks.
    #[arg(long)]
    pub projection: Option<String>,
    /// Side of matrix projections: std, reverse-std, left, right, full.
    #[arg(long)]
    pub proj_side: Option<String>,
    /// Block order: random, ascending, descending, mirror.
    #[arg(long)]
    pub block_order: Option<String>,
    /// Density ρ in [0, 1].
    #[arg(long)]
    pub density: Option<f64>,
    /// Steps between subspace changes (T).
    #[arg(long)]
    pub update_gap: Option<usize>,
    /// Reset the state-full statistics at each subspace change.
    #[arg(long, overrides_with = "no_reset")]
    pub reset: bool,
    /// Keep the statistics across subspace changes.
    #[arg(long, overrides_with = "reset")]
    pub no_reset: bool,
    /// State-full rule: adamw, sgdm, lion, sgd.
    #[arg(long)]
    pub state_full: Option<String>,
    /// State-free rule: signsgd, sgd, none.
    #[arg(long)]
    pub state_free: Option<String>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub beta1: Option<f64>,
    #[arg(long)]
    pub beta2: Option<f64>,
    #[arg(long)]
    pub eps: Option<f64>,
    /// Momentum of the sgdm rule.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Learning-rate scale of the projectable part.
    #[arg(long)]
    pub proj_lr_scale: Option<f64>,
    /// Learning-rate scale of the state-free part.
    #[arg(long)]
    pub state_free_lr_scale: Option<f64>,
    /// Regex of parameters that always keep full state (empty: none).
    #[arg(long)]
    pub state_full_modules: Option<String>,
    /// Regex of parameters that may be projected.
    #[arg(long)]
    pub projectable_modules: Option<String>,
}

impl OptimizerArgs {
    /// The preset with every given override applied.
    pub fn resolve(&self, seed: u64) -> frugal::Result<frugal::OptimizerConfig> {
        let mut c = frugal::OptimizerConfig::parse_spec(&self.optimizer)?;
        c.seed = seed;
        let text = |x: &Option<String>| x.clone();
        let num = |x: Option<f64>| x.map(|v| v.to_string());
        let overrides = [
            ("projection", text(&self.projection)),
            ("proj_side", text(&self.proj_side)),
            ("block_order", text(&self.block_order)),
            ("density", num(self.density)),
            ("update_gap", self.update_gap.map(|v| v.to_string())),
            (
                "reset",
                (self.reset || self.no_reset).then(|| self.reset.to_string()),
            ),
            ("state_full", text(&self.state_full)),
            ("state_free", text(&self.state_free)),
            ("weight_decay", num(self.weight_decay)),
            ("beta1", num(self.beta1)),
            ("beta2", num(self.beta2)),
            ("eps", num(self.eps)),
            ("momentum", num(self.momentum)),
            ("proj_lr_scale", num(self.proj_lr_scale)),
            ("state_free_lr_scale", num(self.state_free_lr_scale)),
            ("state_full_modules", text(&self.state_full_modules)),
            ("projectable_modules", text(&self.projectable_modules)),
        ];
        for (key, value) in overrides {
            if let Some(v) = value {
                c.set(key, &v)?;
            }
        }
        c.validate()?;
        Ok(c)
    }
}

/// Flags of `frugal eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint directory, or a run directory (its latest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Corpus to evaluate on (its validation split unless --split says otherwise).
    #[arg(long, default_value = EMBEDDED_NAME)]
    pub data: String,
    /// Which split: val, train or all.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Share of documents held out for validation (as in training).
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// Tokens per sequence [default: the run's, else min(256, max_position_embeddings)].
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens to evaluate (0: all).
    #[arg(long, default_value_t = 0)]
    pub eval_tokens: usize,
    /// Token cache directory [default: $FRUGAL_CACHE or ~/.cache/frugal].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
}
