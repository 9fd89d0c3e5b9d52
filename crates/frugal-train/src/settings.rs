//! The settings of a training run: one serde type that is also the command line (with the `cli`
//! feature) and the TOML file (`--config`), and the merge of a file and a resumed run's settings.

use anyhow::{bail, Context, Result};
use frugal_nn::Attention;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The embedded corpus' name for `data`.
pub use crate::data::corpus::EMBEDDED_NAME;

/// Parses a finite number ≥ 0 (every fractional setting is one); NaN, infinities and negative
/// numbers are rejected with the reason.
pub fn non_negative(text: &str) -> std::result::Result<f64, String> {
    let x: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if !x.is_finite() || x < 0.0 {
        return Err(format!("`{text}` must be a finite number ≥ 0"));
    }
    Ok(x)
}

/// Everything that defines a training run. Also accepted from a TOML file (`--config`), whose
/// keys are these names with `_` or `-`; flags given on the command line win.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TrainSettings {
    /// TOML file with any of these settings.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Built-in model (tiny, 9m, 20m, 35m, 60m, 130m, 350m, 1b, 3b, 7b) or a Hugging Face config.json.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().model))]
    pub model: String,
    /// Corpus: a .txt/.jsonl/.json(.gz) file, a directory of them, or the embedded corpus.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().data))]
    pub data: String,
    /// Start from a pretrained Hugging Face LLaMA folder: its config.json (instead of --model),
    /// its weights (model.safetensors, or shards listed in model.safetensors.index.json) and its
    /// tokenizer.json (unless --tokenizer).
    #[cfg_attr(feature = "cli", arg(long, value_name = "DIR"))]
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// The data is instruction records (JSONL with `instruction`, optional `input`, and
    /// `output` fields, or their aliases): one sequence per record, and the loss is on the
    /// response tokens only.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub instructions: bool,
    /// Hugging Face tokenizer.json; without it a byte-level BPE is trained on the training split.
    #[cfg_attr(feature = "cli", arg(long))]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of a trained tokenizer [default: the model's vocab_size].
    #[cfg_attr(feature = "cli", arg(long))]
    pub vocab_size: Option<usize>,
    /// Share of documents held out for validation.
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative, default_value_t = TrainSettings::default().val_fraction))]
    pub val_fraction: f64,
    /// Share of documents held out as a test split, evaluated once at the end (0: none).
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative, default_value_t = TrainSettings::default().test_fraction))]
    #[serde(default)]
    pub test_fraction: f64,
    /// Tokens per sequence [default: min(256, the model's max_position_embeddings)].
    #[cfg_attr(feature = "cli", arg(long))]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().batch_size))]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().grad_accum))]
    pub grad_accum: usize,
    /// Optimizer steps.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().steps))]
    pub steps: usize,
    /// Pause after this step (evaluating and saving a checkpoint there), keeping the schedule of
    /// --steps; `--resume` continues the run.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(skip)]
    pub stop_after: Option<usize>,
    /// Peak learning rate [default: the preset's].
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative))]
    pub lr: Option<f64>,
    /// Linear warm-up steps [default: 10% of --steps].
    #[cfg_attr(feature = "cli", arg(long))]
    pub warmup: Option<usize>,
    /// Learning-rate schedule after warm-up: cosine, linear or constant.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().schedule))]
    pub schedule: String,
    /// Final learning rate as a fraction of the peak.
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative, default_value_t = TrainSettings::default().min_lr_ratio))]
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this value (0: off).
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative, default_value_t = TrainSettings::default().clip))]
    pub clip: f64,
    /// Evaluate every N steps (and at the end; 0: at the end only) [default: --steps / 4].
    #[cfg_attr(feature = "cli", arg(long))]
    pub eval_every: Option<usize>,
    /// Validation tokens per evaluation (0: the whole validation split).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().eval_tokens))]
    pub eval_tokens: usize,
    /// Save a checkpoint every N steps (and at the end; 0: at the end only) [default:
    /// --eval-every].
    #[cfg_attr(feature = "cli", arg(long))]
    pub save_every: Option<usize>,
    /// Write a metrics line every N steps.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().log_every))]
    pub log_every: usize,
    /// Checkpoints to keep (older ones are deleted after a newer one is complete; the latest
    /// is always kept).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().keep_checkpoints))]
    pub keep_checkpoints: usize,
    /// Run directory [default: runs/run-N, N the start time in Unix seconds].
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory from its latest complete checkpoint.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Compute precision: f32, or bf16 (mixed precision: bf16 forward and backward passes, f32
    /// master weights, gradients and optimizer state).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = Precision::F32))]
    #[serde(default)]
    pub dtype: Precision,
    /// Seed of initialisation, data order and the optimizer's random choices.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = TrainSettings::default().seed))]
    pub seed: u64,
    /// Worker threads and the matrix-product library.
    #[cfg_attr(feature = "cli", command(flatten))]
    #[serde(skip)]
    pub cpu: crate::threads::CpuSettings,
    /// Token cache directory [default: $FRUGAL_CACHE or ~/.cache/frugal].
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(skip)]
    pub cache_dir: Option<PathBuf>,
    #[cfg_attr(feature = "cli", command(flatten))]
    #[serde(flatten)]
    pub memory: MemorySettings,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub opt: OptimizerSettings,
}

/// The precision of a model's forward and backward computation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 compute with f32 master weights (each weight is cast where it is used).
    Bf16,
}

impl Precision {
    /// The dtype activations are computed in.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// A preset of the memory-saving techniques.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// Only the techniques asked for by their own flags.
    #[default]
    Normal,
    /// Every technique: activation checkpointing, per-layer updates, the loss in chunks
    /// (pre-training), and freed memory returned to the operating system.
    Low,
}

/// How a backward pass trades compute for memory: each technique alone, or all of them by
/// `--memory low`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct BackwardSettings {
    /// Memory preset: normal, or low (every memory-saving technique of this command, and freed
    /// memory returned to the operating system so that the peak RSS is the real peak).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = MemoryMode::Normal))]
    #[serde(default)]
    pub memory: MemoryMode,
    /// Keep only each layer's input in the forward pass; recompute each layer in the backward
    /// pass (one more forward pass of compute).
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Update each layer as soon as its gradients exist, so that the whole gradient never
    /// exists (implies the recomputation of --activation-checkpointing).
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub per_layer_updates: bool,
    /// Attention on the CPU: fused (a block of query rows at a time; no t × t scores or
    /// probabilities are kept for the backward pass, only dropout's bits) or whole (the
    /// scores, softmax and product as separate operations, which keep both).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Attention::Fused))]
    #[serde(default = "attention_of_older_runs")]
    pub attention: Attention,
}

impl BackwardSettings {
    /// The backward pass these settings ask for.
    pub fn backward(&self) -> crate::trainer::Backward {
        let low = self.is_low();
        crate::trainer::Backward {
            checkpointing: low || self.activation_checkpointing,
            per_layer_updates: low || self.per_layer_updates,
        }
    }

    /// True under `--memory low`.
    pub fn is_low(&self) -> bool {
        self.memory == MemoryMode::Low
    }

    /// The step mode these settings ask for, with `grad_accum` micro-batches per step and the
    /// loss whole.
    pub fn step_mode(&self, grad_accum: usize) -> frugal_nn::StepMode {
        let backward = self.backward();
        frugal_nn::StepMode {
            checkpointing: backward.checkpointing,
            per_layer_updates: backward.per_layer_updates,
            grad_accum,
            attention: self.attention,
            ..Default::default()
        }
    }
}

/// How a pre-training run trades compute for memory: the backward pass, and the loss in chunks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct MemorySettings {
    #[cfg_attr(feature = "cli", command(flatten))]
    #[serde(flatten)]
    pub backward: BackwardSettings,
    /// Compute the loss and its gradient over N chunks of tokens, one chunk's logits at a
    /// time, never the whole logits [default: 1, or 8 with --memory low].
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub loss_chunks: Option<usize>,
    /// Also split each chunk's vocabulary into M chunks (for very large vocabularies): at most
    /// (tokens / N) × (vocabulary / M) logits at a time, computed twice [default: 1].
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub loss_vocab_chunks: Option<usize>,
}

/// The attention of a run saved before `--attention` existed, which computed it whole: it
/// resumes as it ran, bit for bit.
fn attention_of_older_runs() -> Attention {
    Attention::Whole
}

impl MemorySettings {
    /// The step mode these settings ask for, with `grad_accum` micro-batches per step.
    pub fn step_mode(&self, grad_accum: usize) -> frugal_nn::StepMode {
        frugal_nn::StepMode {
            loss_chunks: self.loss_chunks(),
            ..self.backward.step_mode(grad_accum)
        }
    }

    /// How the loss is split.
    pub fn loss_chunks(&self) -> frugal_nn::chunked_loss::LossChunks {
        let tokens = match (self.loss_chunks, self.backward.memory) {
            (Some(n), _) => n,
            (None, MemoryMode::Low) => 8,
            (None, MemoryMode::Normal) => 1,
        };
        frugal_nn::chunked_loss::LossChunks {
            tokens,
            vocab: self.loss_vocab_chunks.unwrap_or(1),
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.loss_chunks == Some(0) {
            bail!("--loss-chunks must be at least 1 (1 computes the whole logits at once)");
        }
        if self.loss_vocab_chunks == Some(0) {
            bail!("--loss-vocab-chunks must be at least 1 (1 keeps each chunk's whole vocabulary)");
        }
        Ok(())
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            config: None,
            model: "tiny".into(),
            data: EMBEDDED_NAME.into(),
            init_from: None,
            instructions: false,
            tokenizer: None,
            vocab_size: None,
            val_fraction: 0.05,
            test_fraction: 0.0,
            seq_len: None,
            batch_size: 8,
            grad_accum: 1,
            steps: 800,
            stop_after: None,
            lr: None,
            warmup: None,
            schedule: "cosine".into(),
            min_lr_ratio: 0.1,
            clip: 0.0,
            eval_every: None,
            eval_tokens: 0,
            save_every: None,
            log_every: 1,
            keep_checkpoints: 2,
            out: None,
            resume: None,
            dtype: Precision::F32,
            seed: 0,
            cpu: Default::default(),
            cache_dir: None,
            memory: MemorySettings::default(),
            opt: OptimizerSettings::default(),
        }
    }
}

/// Optimizer settings: a preset, the common overrides as flags named like the settings they
/// set, and `--opt key=value` for any setting of [`frugal::OptimizerConfig`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct OptimizerSettings {
    /// Preset (adamw, frugal, frugal-svd, galore, badam, signsgd, sgd, fira, apollo,
    /// apollo-mini, lora), optionally with overrides: `frugal:density=0.125,projection=svd`,
    /// `lora:rank=64,alpha=16,targets=qv,others=frozen` (AdamW on LoRA adapters of the frozen
    /// linears; rank hidden/4, alpha 32, every linear, the others trained unless --init-from).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = OptimizerSettings::default().optimizer))]
    pub optimizer: String,
    /// Projection: svd, random, randperm, columns, rows, randk, blocks.
    #[cfg_attr(feature = "cli", arg(long))]
    pub projection: Option<String>,
    /// Side of matrix projections: std, reverse-std, left, right, full.
    #[cfg_attr(feature = "cli", arg(long))]
    pub proj_side: Option<String>,
    /// Block order: random, ascending, descending, mirror.
    #[cfg_attr(feature = "cli", arg(long))]
    pub block_order: Option<String>,
    /// Density ρ in [0, 1].
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative))]
    pub density: Option<f64>,
    /// Steps between subspace changes (T).
    #[cfg_attr(feature = "cli", arg(long))]
    pub update_gap: Option<usize>,
    /// Reset the state-full statistics at each subspace change.
    #[cfg_attr(feature = "cli", arg(long, overrides_with = "no_reset"))]
    #[serde(default)]
    pub reset: bool,
    /// Keep the statistics across subspace changes.
    #[cfg_attr(feature = "cli", arg(long, overrides_with = "reset"))]
    #[serde(default)]
    pub no_reset: bool,
    /// State-full rule: adamw, sgdm, lion, sgd.
    #[cfg_attr(feature = "cli", arg(long))]
    pub state_full: Option<String>,
    /// State-free rule: signsgd, sgd, none, scaled-residual, scaled-gradient.
    #[cfg_attr(feature = "cli", arg(long))]
    pub state_free: Option<String>,
    /// Decoupled weight decay.
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative))]
    pub weight_decay: Option<f64>,
    /// Adam β1 / Lion interpolation β.
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative))]
    pub beta1: Option<f64>,
    /// Adam β2 / Lion momentum β.
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative))]
    pub beta2: Option<f64>,
    /// Adam ε.
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative))]
    pub eps: Option<f64>,
    /// Momentum of the sgdm rule.
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative))]
    pub momentum: Option<f64>,
    /// Learning-rate scale of the projectable part.
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative))]
    pub proj_lr_scale: Option<f64>,
    /// Learning-rate scale of the state-free part.
    #[cfg_attr(feature = "cli", arg(long, value_parser = non_negative))]
    pub state_free_lr_scale: Option<f64>,
    /// Regex of parameters that always keep full state (overrides the model's labels).
    #[cfg_attr(feature = "cli", arg(long))]
    pub state_full_modules: Option<String>,
    /// Regex of parameters that may be projected (overrides the model's labels).
    #[cfg_attr(feature = "cli", arg(long))]
    pub projectable_modules: Option<String>,
    /// Regex of parameters that are state-free as a whole: no state, the state-free rule on the
    /// whole gradient (overrides the model's labels).
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub state_free_modules: Option<String>,
    /// Any optimizer setting as key=value (repeatable), e.g. `--opt block_unit=layer
    /// --opt nesterov=true`; an unknown key lists the valid ones.
    #[cfg_attr(feature = "cli", arg(long = "opt", value_name = "KEY=VALUE"))]
    #[serde(default)]
    pub opt: Vec<String>,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        OptimizerSettings {
            optimizer: "frugal".into(),
            projection: None,
            proj_side: None,
            block_order: None,
            density: None,
            update_gap: None,
            reset: false,
            no_reset: false,
            state_full: None,
            state_free: None,
            weight_decay: None,
            beta1: None,
            beta2: None,
            eps: None,
            momentum: None,
            proj_lr_scale: None,
            state_free_lr_scale: None,
            state_full_modules: None,
            projectable_modules: None,
            state_free_modules: None,
            opt: Vec::new(),
        }
    }
}

impl OptimizerSettings {
    /// The preset with every given override applied: the flags first (each named like the
    /// setting it sets), then `--opt` pairs, all checked by [`frugal::OptimizerConfig::apply`].
    /// A decaying density without `density_steps` decays over `steps`, the run's length.
    pub fn resolve(&self, seed: u64, steps: usize) -> Result<frugal::OptimizerConfig> {
        let mut c = frugal::OptimizerConfig::parse_spec(&self.optimizer)?;
        c.seed = seed;
        let mut pairs: Vec<(String, String)> = Vec::new();
        if let serde_json::Value::Object(flags) = serde_json::to_value(self)? {
            for (key, value) in flags {
                let text = match value {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => continue, // unset flags, the preset, the switches and --opt
                };
                if key != "optimizer" {
                    pairs.push((key, text));
                }
            }
        }
        if self.reset || self.no_reset {
            pairs.push(("reset".into(), self.reset.to_string()));
        }
        for kv in &self.opt {
            let (k, v) = kv.split_once('=').with_context(|| {
                format!("--opt `{kv}`: expected key=value (e.g. block_unit=layer)")
            })?;
            pairs.push((k.into(), v.into()));
        }
        c.apply(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        if c.density_schedule != frugal::config::DensitySchedule::Constant && c.density_steps == 0 {
            c.density_steps = steps;
        }
        c.validate()?;
        Ok(c)
    }
}

impl OptimizerSettings {
    /// [`OptimizerSettings::resolve`] for a decoder of `model`, where the preset may also be
    /// LoRA (see [`split_lora`]; its rank defaults to hidden_size / 4, and from a `pretrained`
    /// model the other weights are frozen).
    pub fn resolve_for(
        &self,
        model: &frugal_nn::llama::LlamaConfig,
        pretrained: bool,
        seed: u64,
        steps: usize,
    ) -> Result<(
        frugal::OptimizerConfig,
        Option<frugal_nn::llama::DecoderLora>,
    )> {
        let rank = (model.hidden_size / 4).max(1);
        match split_lora(&self.optimizer, rank, pretrained)? {
            None => Ok((self.resolve(seed, steps)?, None)),
            Some((lora, adamw)) => {
                let adamw = OptimizerSettings {
                    optimizer: adamw,
                    ..self.clone()
                };
                Ok((adamw.resolve(seed, steps)?, Some(lora)))
            }
        }
    }
}

/// The LoRA settings and the AdamW spec of `lora[:rank=R,alpha=A,targets=all|qv,
/// others=train|frozen,<AdamW settings>]` (AdamW on LoRA adapters of the frozen linears), or
/// `None` for another preset. The defaults follow GaLore's pre-training comparison: rank
/// `rank`, alpha 32, every linear, the embeddings, norms and head trained, or frozen when the
/// model is `pretrained`, as PEFT fine-tunes.
pub fn split_lora(
    spec: &str,
    rank: usize,
    pretrained: bool,
) -> Result<Option<(frugal_nn::llama::DecoderLora, String)>> {
    let (name, options) = spec.split_once(':').unwrap_or((spec, ""));
    if name.trim() != "lora" {
        return Ok(None);
    }
    let mut lora = frugal_nn::llama::DecoderLora {
        adapters: frugal_nn::lora::LoraConfig {
            rank,
            alpha: 32.0,
            dropout: 0.0,
            targets: frugal_nn::lora::LoraTargets::All,
        },
        train_others: !pretrained,
    };
    let mut adamw = Vec::new();
    for kv in options.split(',').filter(|s| !s.trim().is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--optimizer {spec}: expected key=value, got `{kv}`"))?;
        let (k, v) = (k.trim(), v.trim());
        if k == "others" {
            lora.train_others = match v {
                "train" => true,
                "frozen" => false,
                _ => bail!("--optimizer {spec}: others `{v}` is not train or frozen"),
            };
        } else if !lora
            .adapters
            .set(k, v)
            .with_context(|| format!("--optimizer {spec}"))?
        {
            adamw.push(format!("{k}={v}"));
        }
    }
    lora.validate()
        .with_context(|| format!("--optimizer {spec}"))?;
    let adamw = match adamw.is_empty() {
        true => "adamw".to_string(),
        false => format!("adamw:{}", adamw.join(",")),
    };
    Ok(Some((lora, adamw)))
}

/// Checks an optimizer spec as `--optimizer` takes it (a preset with settings, or LoRA).
pub fn check_optimizer_spec(spec: &str) -> Result<()> {
    let spec = match split_lora(spec, 1, false)? {
        Some((_, adamw)) => adamw,
        None => spec.to_string(),
    };
    frugal::OptimizerConfig::parse_spec(&spec)?;
    Ok(())
}

/// The setting `key` of serialised settings (top level or optimizer settings).
fn setting<'a>(args: &'a mut serde_json::Value, key: &str) -> Option<&'a mut serde_json::Value> {
    if args.get(key).is_some() {
        return args.get_mut(key);
    }
    args.get_mut("opt")?.get_mut(key)
}

/// A TOML value as JSON; NaN, infinities and negative numbers are an error naming the key.
fn toml_value(key: &str, v: toml::Value, file: &Path) -> Result<serde_json::Value> {
    let bad = |what: &str| anyhow::anyhow!("config file {}: `{key}` {what}", file.display());
    match &v {
        toml::Value::Float(x) if !x.is_finite() || *x < 0.0 => {
            Err(bad(&format!("is {x}; it must be a finite number ≥ 0")))
        }
        toml::Value::Integer(i) if *i < 0 => Err(bad(&format!("is {i}; it must be ≥ 0"))),
        _ => Ok(serde_json::to_value(v)?),
    }
}

/// The `settings` of a command line with those of the TOML file `config` for the keys not
/// `given` on the command line, or, when resuming, the run in `resume`'s saved settings (a
/// `given` key that differs from them is an error, but for the memory modes, which a resumed
/// run may change). The fields that are not saved come back at their defaults.
pub(crate) fn merged<T: Serialize + serde::de::DeserializeOwned>(
    settings: &T,
    config: Option<&Path>,
    resume: Option<&Path>,
    given: &[String],
) -> Result<T> {
    let value = merged_value(serde_json::to_value(settings)?, config, resume, given)?;
    serde_json::from_value(value).context("invalid settings")
}

/// [`merged`] on the settings as JSON.
fn merged_value(
    mut value: serde_json::Value,
    config: Option<&Path>,
    resume: Option<&Path>,
    given: &[String],
) -> Result<serde_json::Value> {
    if let Some(path) = config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("config file {} is not valid TOML: {e}", path.display())
        })?;
        for (key, v) in table {
            let key = key.replace('-', "_");
            let v = toml_value(&key, v, path)?;
            let Some(target) = setting(&mut value, &key) else {
                bail!("config file {}: unknown setting `{key}`", path.display());
            };
            if !given.contains(&key) {
                *target = v;
            }
        }
    }
    if let Some(dir) = resume {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("{} is not a run directory (no config.json)", dir.display())
        })?;
        let saved: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))?;
        let mut saved_args = saved["args"].clone();
        let mut changed = Vec::new();
        for key in given {
            let now = setting(&mut value, key).map(|v| v.clone());
            if CHANGEABLE_ON_RESUME.contains(&key.as_str()) {
                changed.extend(now.map(|now| (key, now)));
                continue;
            }
            if let (Some(now), Some(then)) = (now, setting(&mut saved_args, key)) {
                if now != *then {
                    let then = match then {
                        serde_json::Value::Null => "its default".to_string(),
                        then => then.to_string(),
                    };
                    bail!(
                        "--{} {now} differs from the run in {} ({then}); resume with the run's settings",
                        key.replace('_', "-"),
                        dir.display()
                    );
                }
            }
        }
        value = saved_args;
        if let Some(args) = value.as_object_mut() {
            for (key, now) in changed {
                args.insert(key.clone(), now);
            }
        }
    }
    Ok(value)
}

/// Settings a resumed run may change: they trade compute for memory (the backward pass's
/// modes leave every value as it was; the loss in chunks and fused attention sum in another
/// order).
const CHANGEABLE_ON_RESUME: [&str; 6] = [
    "attention",
    "memory",
    "activation_checkpointing",
    "per_layer_updates",
    "loss_chunks",
    "loss_vocab_chunks",
];

impl TrainSettings {
    /// Applies the TOML file named by `config` (settings given on the command line, named in
    /// `given`, win) and, for `resume`, the saved settings of that run (given settings that
    /// contradict them are an error).
    pub fn merge(self, given: &[String]) -> Result<TrainSettings> {
        let mut merged = merged(&self, self.config.as_deref(), self.resume.as_deref(), given)?;
        merged.config = self.config;
        merged.resume = self.resume;
        merged.cpu = self.cpu;
        merged.stop_after = self.stop_after;
        merged.cache_dir = self.cache_dir;
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_must_be_finite_and_not_negative() {
        assert_eq!(non_negative("0.25"), Ok(0.25));
        for bad in ["nan", "NaN", "inf", "-1", "-0.5", "x"] {
            assert!(non_negative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn optimizer_flags_and_opt_pairs_reach_every_setting() {
        let s = OptimizerSettings {
            optimizer: "frugal:density=0.5".into(),
            projection: Some("svd".into()),
            proj_side: Some("left".into()),
            update_gap: Some(7),
            no_reset: true,
            opt: vec!["check_finite=false".into(), "nesterov=true".into()],
            ..Default::default()
        };
        let c = s.resolve(3, 1).unwrap();
        assert!(matches!(
            c.projection,
            frugal::config::Projection::Svd {
                proj_side: frugal::config::ProjSide::Left,
                ..
            }
        ));
        assert_eq!((c.density, c.update_gap, c.seed), (0.5, 7, 3));
        // A decaying density without a horizon decays over the run; a given horizon stays.
        let decaying = |extra: &str| OptimizerSettings {
            opt: vec!["density_schedule=cosine".into(), extra.into()],
            ..Default::default()
        };
        assert_eq!(
            decaying("density_min=0")
                .resolve(0, 800)
                .unwrap()
                .density_steps,
            800
        );
        assert_eq!(
            decaying("density_steps=90")
                .resolve(0, 800)
                .unwrap()
                .density_steps,
            90
        );
        assert!(!c.reset && !c.check_finite && c.nesterov);
        let bad = OptimizerSettings {
            opt: vec!["colour=blue".into()],
            ..Default::default()
        };
        let err = format!("{:#}", bad.resolve(0, 1).unwrap_err());
        assert!(
            err.contains("colour") && err.contains("block_unit"),
            "{err}"
        );
        let bad = OptimizerSettings {
            opt: vec!["density".into()],
            ..Default::default()
        };
        assert!(format!("{:#}", bad.resolve(0, 1).unwrap_err()).contains("key=value"));
    }

    #[test]
    fn lora_specs_split_into_adapters_and_adamw() {
        use frugal_nn::lora::LoraTargets;
        let (lora, adamw) = split_lora("lora", 64, false).unwrap().unwrap();
        assert_eq!(
            (
                lora.adapters.rank,
                lora.adapters.alpha,
                lora.adapters.targets
            ),
            (64, 32.0, LoraTargets::All)
        );
        assert!(lora.train_others);
        assert_eq!(adamw, "adamw");
        let spec = "lora:rank=8,lr=3e-4,targets=qv,alpha=16,others=train,weight_decay=0.1";
        let (lora, adamw) = split_lora(spec, 64, true).unwrap().unwrap();
        assert_eq!(
            (
                lora.adapters.rank,
                lora.adapters.alpha,
                lora.adapters.targets
            ),
            (8, 16.0, LoraTargets::Qv)
        );
        assert!(
            lora.train_others,
            "others=train wins over the pretrained default"
        );
        assert_eq!(adamw, "adamw:lr=3e-4,weight_decay=0.1");
        assert!(
            !split_lora("lora:rank=2", 64, true)
                .unwrap()
                .unwrap()
                .0
                .train_others
        );
        assert!(split_lora("frugal:density=0.5", 64, false)
            .unwrap()
            .is_none());
        check_optimizer_spec("lora:rank=4,lr=1e-3").unwrap();
        check_optimizer_spec("galore").unwrap();
        for bad in [
            "lora:rank=x",
            "lora:rank",
            "lora:bogus=1",
            "lora:others=all",
        ] {
            assert!(check_optimizer_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_files_reject_non_finite_and_negative_numbers() {
        let dir = std::env::temp_dir().join(format!("frugal-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, expect) in [
            ("lr = nan", "finite"),
            ("clip = inf", "finite"),
            ("density = -0.5", "finite"),
            ("steps = -3", "≥ 0"),
            ("learning_rate = 0.1", "unknown setting"),
        ] {
            let file = dir.join("bad.toml");
            std::fs::write(&file, text).unwrap();
            let s = TrainSettings {
                config: Some(file),
                ..Default::default()
            };
            let err = format!("{:#}", s.merge(&[]).unwrap_err());
            assert!(err.contains(expect), "{text}: {err}");
        }
        let file = dir.join("ok.toml");
        std::fs::write(&file, "lr = 0.002\ndensity = 0.5\nsteps = 9").unwrap();
        let s = TrainSettings {
            config: Some(file),
            steps: 4,
            ..Default::default()
        };
        let merged = s.merge(&["steps".into()]).unwrap();
        assert_eq!(
            (merged.lr, merged.opt.density, merged.steps),
            (Some(0.002), Some(0.5), 4)
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn runs_saved_before_fused_attention_resume_computing_it_whole() {
        let dir = std::env::temp_dir().join(format!("frugal-attention-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let save = |args: serde_json::Value| {
            let config = serde_json::json!({ "args": args });
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        };
        let resume = |attention, given: &[&str]| {
            let s = TrainSettings {
                resume: Some(dir.clone()),
                memory: MemorySettings {
                    backward: BackwardSettings {
                        attention,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                ..Default::default()
            };
            let given: Vec<String> = given.iter().map(|g| g.to_string()).collect();
            s.merge(&given).unwrap().memory.backward.attention
        };
        let mut args = serde_json::to_value(TrainSettings::default()).unwrap();
        assert_eq!(args["attention"], "fused");
        save(args.clone());
        assert_eq!(resume(Attention::Fused, &[]), Attention::Fused);
        // Saved without the setting: the run computed attention whole, and resumes so unless
        // told otherwise.
        args.as_object_mut().unwrap().remove("attention");
        save(args);
        assert_eq!(resume(Attention::Fused, &[]), Attention::Whole);
        assert_eq!(resume(Attention::Fused, &["attention"]), Attention::Fused);
        std::fs::remove_dir_all(&dir).ok();
    }
}
