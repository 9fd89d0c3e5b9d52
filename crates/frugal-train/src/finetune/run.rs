//! A fine-tuning run on disk: read and split the task, tokenize it with the model's tokenizer,
//! load the pretrained encoder with a new head (or resume), and drive the [`Trainer`] with hooks
//! that write metrics, plots, evaluations and checkpoints into the run directory.

use super::batches::{evaluate, ClassBatches};
use super::scores::Scores;
use super::task::{read_examples, Task, TaskChoice, TextColumns};
use super::tokenize::{ClassTokenizer, Encoded};
use crate::checkpoint;
use crate::data_parallel::{code_fingerprint, keep_global_batch, DataParallel};
use crate::memory_report::{start_line, ModePlan};
use crate::metrics::{peak_rss_bytes, EvalRecord, TrainRecord};
use crate::run_dir::RunLog;
use crate::schedule::Schedule;
use crate::settings::BackwardSettings;
use crate::trainer::{
    at_least_one, Hooks, LoopSettings, Outcome, StopToken, Trainer, TrainerState,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use frugal::labels::RoleCounts;
use frugal::sharding::state_per_rank;
use frugal::{Frugal, OptimizerConfig};
use frugal_nn::encoder::{Classifier, Encoder, EncoderConfig, LoraConfig, LoraTargets, Pooling};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything that defines a fine-tuning run (also a TOML file's keys, `--config`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct FinetuneSettings {
    /// TOML file with any of these settings.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Hugging Face BERT or RoBERTa folder (config.json, model.safetensors, tokenizer.json).
    #[cfg_attr(
        feature = "cli",
        arg(long, default_value = "data/finetune/all-MiniLM-L6-v2")
    )]
    pub model: PathBuf,
    /// Labelled text: a .csv, .tsv or .jsonl file, or a folder with one subfolder of text files
    /// per class.
    #[cfg_attr(feature = "cli", arg(long))]
    pub data: Option<PathBuf>,
    #[cfg_attr(feature = "cli", command(flatten))]
    #[serde(flatten)]
    pub columns: TextColumns,
    /// Column with the label.
    #[cfg_attr(feature = "cli", arg(long, default_value = "label"))]
    pub label_column: String,
    /// The classes to keep, comma-separated, in class-id order; examples of other labels are
    /// dropped [default: every label, sorted].
    #[cfg_attr(feature = "cli", arg(long))]
    pub labels: Option<String>,
    /// Keep at most N examples, chosen by a hash of the text (never by file position).
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_examples: Option<usize>,
    /// Share of examples held out for validation.
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative, default_value_t = 0.1))]
    pub val_fraction: f64,
    /// Share of examples held out as a test split, scored once at the end.
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative, default_value_t = 0.1))]
    pub test_fraction: f64,
    /// Longest input in tokens; longer ones are cut (and counted) [at most the model's positions].
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    pub max_len: usize,
    /// How the hidden states become one vector: mean (over real tokens) or cls.
    #[cfg_attr(feature = "cli", arg(long, default_value = "mean"))]
    pub pooling: String,
    /// Dropout before the head [default: the model's hidden_dropout_prob].
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative))]
    pub dropout: Option<f64>,
    /// What is trained and how: adamw, galore, lora (adapters of rank 8, alpha 16, dropout 0.1
    /// on query/value, trained with AdamW, e.g. `lora:rank=4,alpha=8,targets=all`; the merged
    /// model is written to `merged/` at the end), frugal-ft (the paper's fine-tuning recipe:
    /// columns of query/value at rank 8, ρ = 0 on the other linears, T = 500, state-free scale
    /// 0.1, weight decay 0.1; `frugal-ft:rank=0` is ρ = 0 on every linear, and
    /// `frugal-ft:embeddings=state-free` makes the embeddings state-free too), or any optimizer
    /// spec.
    #[cfg_attr(feature = "cli", arg(long, default_value = "frugal-ft"))]
    pub method: String,
    /// Any optimizer setting as key=value (repeatable).
    #[cfg_attr(feature = "cli", arg(long = "opt", value_name = "KEY=VALUE"))]
    #[serde(default)]
    pub opt: Vec<String>,
    /// Examples per micro-batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32))]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub grad_accum: usize,
    /// Optimizer steps.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 300))]
    pub steps: usize,
    /// Pause after this step (evaluating and saving there); `--resume` continues.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(skip)]
    pub stop_after: Option<usize>,
    /// Peak learning rate [default: the method's `lr=`, or 5e-5, or 5e-4 for lora].
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative))]
    pub lr: Option<f64>,
    /// Linear warm-up steps [default: 10% of --steps].
    #[cfg_attr(feature = "cli", arg(long))]
    pub warmup: Option<usize>,
    /// Learning-rate schedule after warm-up: linear, cosine or constant.
    #[cfg_attr(feature = "cli", arg(long, default_value = "linear"))]
    pub schedule: String,
    /// Final learning rate as a fraction of the peak.
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative, default_value_t = 0.0))]
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this value (0: off).
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative, default_value_t = 1.0))]
    pub clip: f64,
    /// Evaluate on the validation split every N steps (and at the end; 0: at the end only)
    /// [default: --steps / 5].
    #[cfg_attr(feature = "cli", arg(long))]
    pub eval_every: Option<usize>,
    /// Save a checkpoint every N steps (and at the end; 0: at the end only) [default:
    /// --eval-every].
    #[cfg_attr(feature = "cli", arg(long))]
    pub save_every: Option<usize>,
    /// Write a metrics line every N steps.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 10))]
    pub log_every: usize,
    /// Checkpoints to keep (older ones are deleted after a newer one is complete; the latest
    /// is always kept).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 2))]
    pub keep_checkpoints: usize,
    /// Run directory [default: runs/finetune-N, N the start time in Unix seconds].
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory from its latest complete checkpoint.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Seed of the head, the data order, dropout and the optimizer's random choices.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Worker threads and the matrix-product library.
    #[cfg_attr(feature = "cli", command(flatten))]
    #[serde(skip)]
    pub cpu: crate::threads::CpuSettings,
    #[cfg_attr(feature = "cli", command(flatten))]
    #[serde(flatten)]
    pub memory: BackwardSettings,
}

impl Default for FinetuneSettings {
    fn default() -> Self {
        FinetuneSettings {
            config: None,
            model: "data/finetune/all-MiniLM-L6-v2".into(),
            data: None,
            columns: Default::default(),
            label_column: "label".into(),
            labels: None,
            max_examples: None,
            val_fraction: 0.1,
            test_fraction: 0.1,
            max_len: 128,
            pooling: "mean".into(),
            dropout: None,
            method: "frugal-ft".into(),
            opt: Vec::new(),
            batch_size: 32,
            grad_accum: 1,
            steps: 300,
            stop_after: None,
            lr: None,
            warmup: None,
            schedule: "linear".into(),
            min_lr_ratio: 0.0,
            clip: 1.0,
            eval_every: None,
            save_every: None,
            log_every: 10,
            keep_checkpoints: 2,
            out: None,
            resume: None,
            seed: 0,
            cpu: Default::default(),
            memory: Default::default(),
        }
    }
}

impl FinetuneSettings {
    /// Applies the TOML file named by `config` and, for `resume`, the run's saved settings (see
    /// [`crate::settings::TrainSettings::merge`]).
    pub fn merge(self, given: &[String]) -> Result<FinetuneSettings> {
        let (config, resume) = (self.config.as_deref(), self.resume.as_deref());
        let mut merged = crate::settings::merged(&self, config, resume, given)?;
        merged.config = self.config;
        merged.resume = self.resume;
        merged.cpu = self.cpu;
        merged.stop_after = self.stop_after;
        Ok(merged)
    }
}

/// What a fine-tuning method trains and with which optimizer.
pub struct Method {
    pub optimizer: OptimizerConfig,
    /// LoRA adapters on the frozen encoder (trained with the optimizer), or none.
    pub lora: Option<LoraConfig>,
}

/// The LoRA settings of `lora[:rank=R,alpha=A,dropout=P,targets=qv|all]`; the other keys are
/// the optimizer's.
fn lora_method(
    method: &str,
    options: &str,
    pairs: &mut Vec<(String, String)>,
) -> Result<LoraConfig> {
    let mut lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.1,
        targets: LoraTargets::Qv,
    };
    for kv in options.split(',').filter(|s| !s.is_empty()) {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("method {method}: expected key=value, got `{kv}`");
        };
        if !lora.set(k, v).with_context(|| format!("method {method}"))? {
            pairs.push((k.into(), v.into()));
        }
    }
    lora.validate()?;
    Ok(lora)
}

/// The optimizer (and adapters) of a fine-tuning method for an encoder of `hidden` features,
/// with `--opt` settings. The peak rate is `lr`, or an `lr=` of the method, or the default:
/// 5e-4 for LoRA, 5e-5 otherwise.
pub fn method(
    method: &str,
    hidden: usize,
    seed: u64,
    lr: Option<f64>,
    opt: &[String],
) -> Result<Method> {
    let (name, options) = method.split_once(':').unwrap_or((method, ""));
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut lora = None;
    let spec = if name == "lora" {
        lora = Some(lora_method(method, options, &mut pairs)?);
        "adamw".to_string()
    } else if name == "frugal-ft" {
        let (mut rank, mut state_free) = (8usize, r"(key|dense)\.weight$");
        for kv in options.split(',').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("rank", r)) => {
                    rank = r.parse().with_context(|| {
                        format!("method {method}: rank `{r}` is not a whole number")
                    })?
                }
                Some(("embeddings", "state-free")) => {
                    state_free = r"((key|dense)\.weight|_embeddings\.weight)$"
                }
                Some(("embeddings", "state-full")) => {}
                Some(("embeddings", e)) => {
                    bail!("method {method}: embeddings `{e}` is not state-full or state-free")
                }
                Some((k, v)) => pairs.push((k.into(), v.into())),
                None => bail!("method {method}: expected key=value, got `{kv}`"),
            }
        }
        if rank > hidden {
            bail!("method {method}: rank {rank} exceeds the model's hidden size {hidden}");
        }
        // Columns of query and value keep state; the other linears are state-free (ρ = 0);
        // embeddings (unless `embeddings=state-free`), norms, biases and the head keep full
        // AdamW state.
        let density = rank as f64 / hidden as f64;
        let density = if (hidden as f64 * density).floor() < rank as f64 {
            density + 1e-12
        } else {
            density
        };
        format!(
            "frugal:projection=coordinates,density={density},update_gap=500,state_free_lr_scale=0.1,weight_decay=0.1,decay_mask=labels,projectable_modules=(query|value)\\.weight$,state_free_modules={state_free}"
        )
    } else {
        for kv in options.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("method {method}: expected key=value, got `{kv}`"))?;
            pairs.push((k.into(), v.into()));
        }
        name.to_string()
    };
    let mut c = OptimizerConfig::parse_spec(&spec)?;
    c.seed = seed;
    for kv in opt {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--opt `{kv}`: expected key=value"))?;
        pairs.push((k.into(), v.into()));
    }
    let named = pairs.iter().any(|(k, _)| k.trim() == "lr");
    match lr {
        Some(_) if named => {
            bail!("method {method}: the rate is given twice (--lr and lr=); give only one")
        }
        Some(lr) => pairs.push(("lr".into(), lr.to_string())),
        None if !named => {
            let default = if lora.is_some() { 5e-4 } else { 5e-5 };
            pairs.push(("lr".into(), default.to_string()));
        }
        None => {}
    }
    c.apply(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    c.validate()?;
    Ok(Method { optimizer: c, lora })
}

/// The resolved settings of a fine-tuning run, written to `config.json` in the run directory.
#[derive(Serialize, Deserialize)]
pub struct FinetuneConfig {
    pub args: FinetuneSettings,
    pub encoder: EncoderConfig,
    pub optimizer: OptimizerConfig,
    pub pooling: Pooling,
    pub dropout: f64,
    /// LoRA adapters (method `lora`).
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    pub warmup: usize,
    pub eval_every: usize,
    pub save_every: usize,
    /// The classes, in class-id order (known once the data is read).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Ranks the run was started on (data parallelism; `batch_size` is per rank).
    #[serde(default = "crate::run::one")]
    pub world_size: usize,
}

impl FinetuneConfig {
    /// Examples per optimizer step, over all ranks.
    pub fn global_batch(&self) -> usize {
        self.world_size * self.args.batch_size * self.args.grad_accum
    }

    /// Tokens per input, at most: `--max-len`, or fewer where the encoder has fewer positions.
    pub fn seq_len(&self) -> usize {
        self.args.max_len.min(self.encoder.max_tokens())
    }

    /// The settings for training on `world` ranks (see [`keep_global_batch`]).
    fn on_ranks(&mut self, world: usize) -> Result<Option<String>> {
        let a = &mut self.args;
        let note = keep_global_batch(
            self.world_size,
            world,
            &mut a.batch_size,
            &mut a.grad_accum,
            "examples",
        )?;
        self.world_size = world;
        Ok(note)
    }

    fn loop_settings(&self) -> LoopSettings {
        let a = &self.args;
        LoopSettings {
            steps: a.steps,
            stop_after: a.stop_after,
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            // Counts examples as the loop's "tokens".
            seq_len: 1,
            clip: a.clip,
            backward: a.memory.backward(),
            log_every: a.log_every,
            eval_every: self.eval_every,
            save_every: self.save_every,
        }
    }

    fn schedule(&self) -> Result<Schedule> {
        let a = &self.args;
        Schedule::new(
            self.optimizer.lr,
            self.warmup,
            a.steps,
            &a.schedule,
            a.min_lr_ratio,
        )
    }
}

/// Checks the settings against the model's configuration and fills in the defaults.
pub fn resolve(args: FinetuneSettings) -> Result<FinetuneConfig> {
    let encoder: EncoderConfig = frugal_nn::hf::read_config(&args.model).with_context(|| {
        format!(
            "--model {}: scripts/fetch-finetune.sh installs all-MiniLM-L6-v2",
            args.model.display()
        )
    })?;
    encoder.validate()?;
    at_least_one(&[
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
        ("--steps", args.steps),
        ("--log-every", args.log_every),
        ("--max-len", args.max_len),
    ])?;
    if args.data.is_none() {
        bail!("--data is required: a .csv, .tsv or .jsonl file or a folder of class subfolders (scripts/fetch-finetune.sh installs two tasks)");
    }
    if args.stop_after == Some(0) {
        bail!("--stop-after must be at least 1 (it is a step after which to pause)");
    }
    let pooling: Pooling = args.pooling.parse()?;
    let dropout = args.dropout.unwrap_or(encoder.hidden_dropout_prob);
    if !(0.0..1.0).contains(&dropout) {
        bail!("--dropout {dropout} must be in [0, 1)");
    }
    let Method { optimizer, lora } = method(
        &args.method,
        encoder.hidden_size,
        args.seed,
        args.lr,
        &args.opt,
    )?;
    let warmup = args.warmup.unwrap_or(args.steps / 10);
    let eval_every = args.eval_every.unwrap_or((args.steps / 5).max(1));
    let save_every = args.save_every.unwrap_or(eval_every);
    let config = FinetuneConfig {
        args,
        encoder,
        optimizer,
        pooling,
        dropout,
        lora,
        warmup,
        eval_every,
        save_every,
        classes: Vec::new(),
        world_size: 1,
    };
    config.schedule()?;
    Ok(config)
}

/// Figures of a finished (or interrupted) fine-tuning run, written to `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneSummary {
    pub method: String,
    pub steps: usize,
    pub examples: u64,
    pub classes: Vec<String>,
    pub val_loss: f64,
    pub val: Scores,
    /// Scores on the test split (finished runs with one).
    pub test: Option<Scores>,
    pub initial_val: Option<Scores>,
    /// Weights of the model.
    pub parameters: usize,
    /// Weights the optimizer updates.
    pub trainable_parameters: usize,
    pub parameters_by_class: RoleCounts,
    pub optimizer_state_bytes: frugal::StateBytes,
    pub optimizer_state_total_bytes: usize,
    /// Each rank's optimizer state, in rank order (data-parallel runs).
    #[serde(default)]
    pub optimizer_state_bytes_per_rank: Vec<usize>,
    /// Ranks the run ended on.
    #[serde(default = "crate::run::one")]
    pub world_size: usize,
    /// The planned peak of one rank's step (weights, optimizer state and the step, as `frugal
    /// memory` plans it; absent from runs written before it was planned).
    #[serde(default)]
    pub planned_peak_bytes: Option<usize>,
    pub peak_rss_bytes: u64,
    /// Each rank's peak resident memory, in rank order (data-parallel runs).
    #[serde(default)]
    pub peak_rss_bytes_per_rank: Vec<u64>,
    pub wall_s: f64,
    /// Training examples per second of step time.
    pub examples_per_s: f64,
    /// Inputs cut to the longest length: training, validation, test.
    pub truncated: [usize; 3],
    pub interrupted: bool,
}

/// Writes a classifier's model files: `tensors`, a Hugging Face config with the labels, and the
/// tokenizer.
fn write_model(
    dir: &Path,
    tensors: Vec<(String, candle_core::Tensor)>,
    config: &FinetuneConfig,
    tokenizer: &Path,
) -> Result<()> {
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join(checkpoint::MODEL))?;
    let mut hf = serde_json::to_value(&config.encoder)?;
    let arch = if config.encoder.model_type == "roberta" {
        "RobertaForSequenceClassification"
    } else {
        "BertForSequenceClassification"
    };
    hf["architectures"] = serde_json::json!([arch]);
    hf["id2label"] = config
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), serde_json::Value::from(c.clone())))
        .collect();
    hf["label2id"] = config
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), serde_json::Value::from(i)))
        .collect();
    hf["classifier_dropout"] = config.dropout.into();
    hf["frugal_pooling"] = serde_json::to_value(config.pooling)?;
    std::fs::write(
        dir.join(checkpoint::MODEL_CONFIG),
        serde_json::to_string_pretty(&hf)?,
    )?;
    std::fs::copy(tokenizer, dir.join(checkpoint::TOKENIZER))
        .with_context(|| format!("cannot copy {}", tokenizer.display()))?;
    Ok(())
}

/// Loads the classifier of a checkpoint written by a fine-tuning run (with its LoRA adapters
/// for `lora`; a merged folder loads without).
pub fn load_classifier(
    dir: &Path,
    pooling: Pooling,
    dropout: f64,
    lora: Option<&LoraConfig>,
    device: &Device,
) -> Result<Classifier> {
    let encoder: EncoderConfig = frugal_nn::hf::read_config(dir)?;
    let tensors = frugal_nn::hf::read_weights(dir)?;
    let (encoder, rest) = Encoder::from_checkpoint(&encoder, tensors, device, lora)?;
    Ok(Classifier::from_head(encoder, rest, pooling, dropout)?)
}

struct FinetuneHooks<'a> {
    out: &'a Path,
    config: &'a FinetuneConfig,
    tokenizer: &'a Path,
    log: RunLog<'a>,
    val: &'a Encoded,
    parallel: &'a DataParallel,
    last_val: Option<(f64, Scores)>,
}

impl Hooks<Classifier> for FinetuneHooks<'_> {
    fn step_done(&mut self, r: &TrainRecord) {
        self.log
            .step_done(r, &format!("{:.1} examples/s", r.tok_per_s));
    }

    fn log(&mut self, r: &TrainRecord) -> Result<()> {
        self.log.log(r)
    }

    fn evaluate(&mut self, model: &Classifier, state: &TrainerState) -> Result<()> {
        let batch = self.config.args.batch_size;
        let (loss, scores) = evaluate(model, self.val, batch, self.parallel)?;
        if !loss.is_finite() {
            bail!("the validation loss became {loss}: the weights diverged; lower --lr");
        }
        self.last_val = Some((loss, scores));
        let line = format!(
            "step {}: validation loss {loss:.4}, accuracy {:.4}, macro-F1 {:.4}",
            state.step, scores.accuracy, scores.macro_f1
        );
        let record = EvalRecord::new(state.step, loss).with_scores(scores);
        self.log.evaluated(record, &line)?;
        self.log.plot()
    }

    fn checkpoint(&mut self, t: &Trainer<Classifier>, stopped: bool) -> Result<()> {
        let keep = self.config.args.keep_checkpoints;
        let dir = checkpoint::save_with(self.out, t, keep, |tmp| {
            write_model(tmp, t.model.named_tensors(), self.config, self.tokenizer)
        })?;
        if stopped {
            self.log.interrupted(&dir, "finetune");
        }
        Ok(())
    }
}

/// Runs (or resumes, from the latest checkpoint of `resume`) a fine-tuning run on `device`, as
/// one of the ranks of `parallel` (see [`Trainer::with_data_parallel`]); stops early, with a
/// checkpoint, when `stop` is set. Rank 0 writes the run directory. Returns the run directory.
/// A device that runs out of memory is named with the run's planned peak.
pub fn run(
    config: FinetuneConfig,
    resume: Option<&Path>,
    stop: &StopToken,
    device: &Device,
    parallel: &DataParallel,
) -> Result<PathBuf> {
    let world = parallel.world_size();
    let note = (!device.is_cpu()).then(|| out_of_memory_note(&config, world, device));
    finetune(config, resume, stop, device, parallel).map_err(|e| match note {
        Some(note) if crate::device::out_of_memory(&e) => e.context(note),
        _ => e,
    })
}

/// The planned memory of one rank's step in this run's method and memory mode on `device`, as
/// `frugal memory --model <encoder folder>` plans it (a head of two classes until the data has
/// named them).
pub fn planned_step(config: &FinetuneConfig, world: usize, device: &Device) -> Result<ModePlan> {
    let args = &config.args;
    let step = super::memory::StepShape {
        batch: args.batch_size,
        seq: config.seq_len(),
        mode: args
            .memory
            .step_mode(args.grad_accum)
            .on(device, DType::F32),
    };
    let trained = Method {
        optimizer: config.optimizer.clone(),
        lora: config.lora,
    };
    let labels = config.classes.len().max(2);
    let plans = super::memory::method_memory(
        &config.encoder,
        labels,
        &args.method,
        &trained,
        world,
        Some(step),
    )?;
    ModePlan::selected(plans.steps)
}

/// Where `frugal memory` plans every method and memory mode of this run's step.
fn memory_command(config: &FinetuneConfig) -> String {
    format!(
        "`frugal memory --model {} --batch-size {} --seq-len {}` plans each method and mode",
        config.args.model.display(),
        config.args.batch_size,
        config.seq_len()
    )
}

/// What a device that ran out of memory was asked for: the planned peak of the run's step
/// (see `frugal memory`), and what to change.
pub fn out_of_memory_note(config: &FinetuneConfig, world: usize, device: &Device) -> String {
    crate::memory_report::out_of_memory_note(
        device,
        planned_step(config, world, device).ok().as_ref(),
        (config.args.batch_size, config.seq_len()),
        &memory_command(config),
        "Lower --batch-size (and raise --grad-accum to keep the batch) or --max-len, or use --memory low",
    )
}

fn finetune(
    mut config: FinetuneConfig,
    resume: Option<&Path>,
    stop: &StopToken,
    device: &Device,
    parallel: &DataParallel,
) -> Result<PathBuf> {
    let (lead, world) = (parallel.rank() == 0, parallel.world_size());
    if world > 1 {
        let agreed = serde_json::json!({ "flags": &config.args, "code": code_fingerprint()? });
        parallel.agree("settings or code", &agreed)?;
    }
    let (out, resume_from) = parallel
        .on_lead(|| crate::run_dir::open(config.args.out.as_deref(), resume, "finetune"))?;
    let saved: Option<FinetuneConfig> = match &resume_from {
        Some(_) => Some(
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)
                .with_context(|| format!("corrupt {}", out.join("config.json").display()))?,
        ),
        None => None,
    };
    config.world_size = saved.as_ref().map_or(world, |c| c.world_size);
    if let Some(note) = config.on_ranks(world)? {
        say!(lead, "note: {note}");
    }
    let args = config.args.clone();

    // The task.
    let started = Instant::now();
    let data = args.data.as_deref().context("--data is required")?;
    let columns = args.columns.with_label(Some(&args.label_column));
    let labels: Vec<String> = args
        .labels
        .as_deref()
        .map(|l| {
            l.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let task = Task::new(
        read_examples(data, &columns)?,
        &TaskChoice {
            labels: &labels,
            max_examples: args.max_examples,
            val_fraction: args.val_fraction,
            test_fraction: args.test_fraction,
        },
    )?;
    if let Some(saved) = &saved {
        if saved.classes != task.classes {
            bail!(
                "the data's classes ({}) differ from the run's ({}); resume with the run's data",
                task.classes.join(", "),
                saved.classes.join(", ")
            );
        }
    }
    config.classes = task.classes.clone();
    let tokenizer_path = match &resume_from {
        Some((_, ck)) => ck.join(checkpoint::TOKENIZER),
        None => args.model.join("tokenizer.json"),
    };
    let tokenizer = ClassTokenizer::load(&tokenizer_path, &config.encoder, args.max_len)?;
    let (train, val, test) = (
        tokenizer.encode(&task.train)?,
        tokenizer.encode(&task.val)?,
        tokenizer.encode(&task.test)?,
    );
    let per_class: Vec<String> = task
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "{c} {}",
                train.labels.iter().filter(|&&l| l == i as u32).count()
            )
        })
        .collect();
    say!(
        lead,
        "data: {} training, {} validation, {} test examples in {} classes (training: {}){}{}, read in {:.1}s",
        train.labels.len(),
        val.labels.len(),
        test.labels.len(),
        task.classes.len(),
        per_class.join(", "),
        if task.dropped > 0 { format!("; {} examples of other labels dropped", task.dropped) } else { String::new() },
        if task.subsampled_out > 0 { format!("; {} left out by --max-examples", task.subsampled_out) } else { String::new() },
        started.elapsed().as_secs_f64()
    );
    let truncated = [train.truncated, val.truncated, test.truncated];
    if truncated.iter().any(|&t| t > 0) {
        say!(
            lead,
            "note: inputs longer than {} tokens were cut: {} training, {} validation, {} test",
            tokenizer.max_len(),
            truncated[0],
            truncated[1],
            truncated[2]
        );
    }

    // Model, optimizer, loop state.
    let (mut model, opt, state) = match &resume_from {
        Some((_, ck)) => {
            let lora = config.lora.as_ref();
            let model = load_classifier(ck, config.pooling, config.dropout, lora, device)?;
            let shard = (parallel.rank(), world);
            let (opt, state) =
                checkpoint::restore(model.params(), config.optimizer.clone(), ck, shard)?;
            (model, opt, state)
        }
        None => {
            let mut encoder = Encoder::load(&args.model, device)?;
            if let Some(lora) = &config.lora {
                encoder = encoder.with_lora(lora, args.seed ^ 0x4c6f5241)?;
            }
            let model = Classifier::new(
                encoder,
                task.classes.len(),
                config.pooling,
                config.dropout,
                args.seed,
            )?;
            let opt = Frugal::from_params(model.params(), config.optimizer.clone())?;
            (model, opt, TrainerState::default())
        }
    };
    model.encoder.set_attention(args.memory.attention);
    if resume_from.is_none() && lead {
        frugal::fs::write_atomically(
            &out.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
    }
    let infos: Vec<_> = opt.params().cloned().collect();
    let counts = RoleCounts::of(&infos);
    let parameters = counts.state_full + counts.projectable + counts.state_free;
    let shapes = model_shapes(&model);
    say!(
        lead,
        "model: {} ({} parameters: {} state-full, {} projectable, {} state-free), method `{}` ({:.2} MiB of optimizer state), {} examples per step{}",
        args.model.display(),
        parameters,
        counts.state_full,
        counts.projectable,
        counts.state_free,
        args.method,
        frugal::memory::plan(&config.optimizer, &shapes)?.iter().map(|(_, b)| b.total()).sum::<usize>() as f64 / (1024.0 * 1024.0),
        config.global_batch(),
        match &resume_from {
            Some((s, _)) => format!(", resuming at step {s}"),
            None => String::new(),
        }
    );
    if world > 1 {
        say!(
            lead,
            "data parallel over {}: {world} ranks × batch {} × {} micro-batches = a global batch of {} examples; optimizer state sharded: {} MiB per rank",
            parallel.comm().engine(),
            args.batch_size,
            args.grad_accum,
            config.global_batch(),
            state_per_rank(&config.optimizer, &shapes, world)?
                .iter()
                .map(|b| format!("{:.2}", b.total() as f64 / (1024.0 * 1024.0)))
                .collect::<Vec<_>>()
                .join(" + ")
        );
    }

    let planned = planned_step(&config, world, device)?;
    let shape = (args.batch_size, config.seq_len());
    say!(
        lead,
        "{}",
        start_line(&planned, shape, world, &memory_command(&config))
    );
    for line in args.memory.backward().notes(args.grad_accum, args.clip) {
        say!(lead, "note: {line}");
    }

    let title = format!("{} · {}", args.model.display(), args.method);
    let mut hooks = FinetuneHooks {
        out: &out,
        config: &config,
        tokenizer: &tokenizer_path,
        log: RunLog::open(&out, lead, (state.step, args.steps), title)?,
        val: &val,
        parallel,
        last_val: None,
    };
    let mut initial = None;
    if state.step == 0 {
        let (loss, scores) = evaluate(&model, &val, args.batch_size, parallel)?;
        initial = Some(scores);
        let line = format!(
            "step 0: validation loss {loss:.4}, accuracy {:.4}, macro-F1 {:.4}",
            scores.accuracy, scores.macro_f1
        );
        hooks
            .log
            .evaluated(EvalRecord::new(0, loss).with_scores(scores), &line)?;
    }
    let mut batches = ClassBatches::new(&train, &config.encoder, args.seed, device);
    let mut trainer = Trainer::new(
        model,
        opt,
        config.schedule()?,
        config.loop_settings(),
        state,
        stop.clone(),
    )?
    .with_data_parallel(parallel.clone())?;
    let outcome = trainer.train(&mut batches, &mut hooks)?;
    hooks.log.finish();
    let (val_loss, val_scores) = match hooks.last_val {
        Some(v) => v,
        None => evaluate(&trainer.model, &val, args.batch_size, parallel)?,
    };
    let test_scores = match outcome {
        Outcome::Finished if !test.labels.is_empty() => {
            let (loss, s) = evaluate(&trainer.model, &test, args.batch_size, parallel)?;
            say!(
                lead,
                "test: loss {loss:.4}, accuracy {:.4}, macro-F1 {:.4}",
                s.accuracy,
                s.macro_f1
            );
            Some(s)
        }
        _ => None,
    };
    let (state, opt) = (&trainer.state, &trainer.optimizer);
    let summary = FinetuneSummary {
        method: args.method.clone(),
        steps: state.step,
        examples: state.tokens,
        classes: config.classes.clone(),
        val_loss,
        val: val_scores,
        test: test_scores,
        initial_val: initial,
        parameters: trainer
            .model
            .named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum(),
        trainable_parameters: parameters,
        parameters_by_class: counts,
        optimizer_state_bytes: opt.state_bytes(),
        optimizer_state_total_bytes: opt.state_bytes().total(),
        optimizer_state_bytes_per_rank: parallel.per_rank(opt.state_bytes().total()),
        world_size: world,
        planned_peak_bytes: Some(planned.peak_bytes),
        peak_rss_bytes: peak_rss_bytes(),
        peak_rss_bytes_per_rank: parallel.peak_rss_per_rank(),
        wall_s: state.elapsed_s,
        examples_per_s: state.tokens as f64 / state.train_s.max(1e-9),
        truncated,
        interrupted: outcome != Outcome::Finished,
    };
    // Rank 0 writes the merged model and the summary; every rank returns once they are written.
    parallel.on_lead(|| {
        if config.lora.is_some() && outcome == Outcome::Finished {
            let merged = out.join("merged");
            std::fs::create_dir_all(&merged)?;
            write_model(
                &merged,
                trainer.model.merged_tensors()?,
                &config,
                &tokenizer_path,
            )?;
            eprintln!(
                "LoRA adapters merged into the weights: {} loads as a plain model",
                merged.display()
            );
        }
        hooks.log.plot()?;
        let paused = (outcome == Outcome::Paused).then_some((state.step, args.steps));
        crate::run_dir::write_summary(&out, &summary, paused, "finetune")?;
        eprintln!(
            "done: {} steps, {} examples ({:.1} examples/s in training steps); validation accuracy {:.4}, macro-F1 {:.4}; run in {}",
            state.step,
            state.tokens,
            summary.examples_per_s,
            val_scores.accuracy,
            val_scores.macro_f1,
            out.display()
        );
        Ok(())
    })?;
    Ok(out)
}

/// The labelled shapes of a classifier's parameters, for the memory plan.
fn model_shapes(model: &Classifier) -> Vec<frugal::labels::ParamShape> {
    model
        .params()
        .into_iter()
        .map(|p| frugal::labels::ParamShape {
            shape: p.var.dims().to_vec(),
            name: p.name,
            label: p.label,
        })
        .collect()
}
