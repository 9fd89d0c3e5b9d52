//! Command-line interface: subcommands and their flags. The flags of `train`, `eval`,
//! `generate` and `compare` are the settings types of `frugal-train`.

use clap::{Args, Parser, Subcommand};
use frugal_train::compare::finetune::FinetuneCompareSettings;
use frugal_train::compare::CompareSettings;
use frugal_train::eval::EvalSettings;
use frugal_train::finetune::classify::ClassifySettings;
use frugal_train::finetune::run::FinetuneSettings;
use frugal_train::generate::GenerateSettings;
use frugal_train::settings::{MemorySettings, Precision};
use frugal_train::{OptimizerSettings, TrainSettings};

/// Memory-efficient training of LLaMA-style models with FRUGAL and its baselines.
#[derive(Parser, Debug)]
#[command(name = "frugal", version, about, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Across ranks (`mpirun`, or torchrun-style variables): seconds a rank waits in a
    /// collective, or for the others to start, before it ends the job (a rank died or hangs).
    #[arg(long, global = true, default_value_t = 600.0, value_parser = collective_timeout,
          help_heading = "Device and ranks")]
    pub collective_timeout: f64,
    /// Device to train and evaluate on: cpu, cuda or cuda:N (GPUs need the CUDA binary, built
    /// by scripts/build-cuda.sh). Across ranks, `cuda` is the GPU of the rank's LOCAL_RANK.
    #[arg(
        long,
        global = true,
        default_value = "cpu",
        help_heading = "Device and ranks"
    )]
    pub device: String,
}

fn collective_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pre-train a LLaMA model (default: `tiny` on the embedded corpus with the `frugal` preset).
    Train(Box<TrainSettings>),
    /// Fine-tune a pretrained BERT or RoBERTa encoder on text classification (default: the
    /// paper's FRUGAL recipe).
    Finetune(Box<FinetuneSettings>),
    /// Classify texts, or a task file, with a fine-tuned encoder (scored where labelled).
    Classify(Box<ClassifySettings>),
    /// Validation loss and perplexity of a checkpoint.
    Eval(EvalSettings),
    /// Continue prompts with a trained model (a checkpoint, a run, or a Hugging Face LLaMA
    /// folder), token by token, many at once.
    Generate(Box<GenerateSettings>),
    /// Exact memory of weights, gradients and optimizer state, without training.
    Memory(Box<MemoryArgs>),
    /// Train several optimizer configurations on the same data and compare them (`compare
    /// finetune`: fine-tuning methods on a classification task).
    Compare(Box<CompareArgs>),
}

/// Flags of `frugal compare`: a pre-training comparison, or `compare finetune`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CompareArgs {
    #[command(subcommand)]
    pub task: Option<CompareTask>,
    #[command(flatten)]
    pub pretraining: CompareSettings,
}

/// What else `frugal compare` compares.
#[derive(Subcommand, Debug)]
pub enum CompareTask {
    /// Fine-tune a pretrained encoder with several methods and seeds (default: adamw, galore,
    /// lora, frugal-ft and frugal-ft at ρ = 0 over seeds 0, 1, 2) and tabulate test accuracy
    /// against trainable parameters and optimizer memory.
    Finetune(Box<FinetuneCompareSettings>),
}

/// Flags of `frugal memory`.
#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Built-in model or Hugging Face config.json; a BERT or RoBERTa folder plans fine-tuning by
    /// method (--methods).
    #[arg(long, default_value = "130m")]
    pub model: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Sequences per micro-batch: with it, the report plans each memory mode's activations,
    /// gradients and peak (for an encoder folder: each method's peak by mode).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per sequence [default: min(256, the model's max_position_embeddings); for an
    /// encoder folder min(128, its positions), as `frugal finetune --max-len`].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step (accumulated gradients are held).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Fine-tuning methods to plan for an encoder folder (see `frugal finetune --method`).
    #[arg(
        long,
        default_value = "adamw galore lora frugal-ft frugal-ft:embeddings=state-free frugal-ft:rank=0"
    )]
    pub methods: String,
    /// Classes of the fine-tuning head.
    #[arg(long, default_value_t = 2)]
    pub labels: usize,
    /// Data-parallel ranks (`mpirun -np N`): the optimizer state each rank holds.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// Compute precision of the planned step, as `frugal train --dtype`: f32 (the CPU's fused
    /// kernels, or with --device cuda candle's tensor operations), or bf16 (tensor operations
    /// on every device).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    #[command(flatten)]
    pub memory: MemorySettings,
    #[command(flatten)]
    pub opt: OptimizerSettings,
}
