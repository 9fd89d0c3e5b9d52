//! A pre-training run on disk: resolve the settings, prepare the data, build (or resume) the
//! model and optimizer, and drive the [`Trainer`] with hooks that write metrics, plots,
//! evaluations and checkpoints into the run directory.

use crate::checkpoint;
use crate::data::{Batches, Dataset, Format, Holdout, Source, TextTokenizer, TokenizerChoice};
use crate::data_parallel::{keep_global_batch, DataParallel};
use crate::eval::mean_loss;
use crate::memory_report::{start_line, MemoryReport, ModePlan};
use crate::metrics::{peak_rss_bytes, EvalRecord, Summary, TrainRecord};
use crate::run_dir::RunLog;
use crate::schedule::Schedule;
use crate::settings::{Precision, TrainSettings};
use crate::trainer::{
    at_least_one, Hooks, LoopSettings, Outcome, StopToken, Trainer, TrainerState,
};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use frugal::labels::RoleCounts;
use frugal::Frugal;
use frugal_dist::{Collectives, Solo};
use frugal_nn::llama::{DecoderLora, Llama, LlamaConfig};
use frugal_nn::StepMode;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The resolved settings of a run, written to `config.json` in the run directory.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RunConfig {
    pub args: TrainSettings,
    pub model: LlamaConfig,
    pub optimizer: frugal::OptimizerConfig,
    pub seq_len: usize,
    pub warmup: usize,
    pub eval_every: usize,
    pub save_every: usize,
    /// Training tokens per optimizer step, over all ranks.
    pub tokens_per_step: usize,
    /// Ranks the run was started on (data parallelism; `batch_size` is per rank).
    #[serde(default = "one")]
    pub world_size: usize,
    /// LoRA adapters on the frozen linears (`--optimizer lora`), trained with `optimizer`.
    #[serde(default)]
    pub lora: Option<DecoderLora>,
}

/// What a run under LoRA trains, for its log.
pub fn lora_line(lora: &DecoderLora, model: &LlamaConfig) -> String {
    let a = &lora.adapters;
    let trained: usize = lora
        .trained_shapes(model)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    format!(
        "lora: adapters of rank {}, alpha {} on {} of every layer (the linears frozen); embeddings, norms and head {}; {} parameters trained",
        a.rank,
        a.alpha,
        match a.targets {
            frugal_nn::lora::LoraTargets::All => "every linear",
            frugal_nn::lora::LoraTargets::Qv => "q_proj and v_proj",
        },
        if lora.train_others { "trained" } else { "frozen" },
        trained
    )
}

/// What the seed of a run's LoRA adapters differs from its seed by.
const LORA_SEED: u64 = 0x4c6f5241;

/// One rank: the world size of runs written before data parallelism.
pub(crate) fn one() -> usize {
    1
}

impl RunConfig {
    /// The settings saved in the run directory `dir` (its `config.json`).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))
    }

    /// The loop settings of this run.
    pub fn loop_settings(&self) -> LoopSettings {
        let a = &self.args;
        LoopSettings {
            steps: a.steps,
            stop_after: a.stop_after,
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            seq_len: self.seq_len,
            clip: a.clip,
            backward: a.memory.backward.backward(),
            log_every: a.log_every,
            eval_every: self.eval_every,
            save_every: self.save_every,
        }
    }

    /// How this run's steps use memory on `device` (what [`LlamaConfig::step_memory`] plans).
    pub fn step_mode(&self, device: &Device) -> StepMode {
        self.args
            .memory
            .step_mode(self.args.grad_accum)
            .on(device, self.args.dtype.compute_dtype())
    }

    /// What the memory settings cost or save under accumulation and clipping, one line each.
    pub fn step_mode_notes(&self) -> Vec<String> {
        let a = &self.args;
        a.memory.backward.backward().notes(a.grad_accum, a.clip)
    }

    /// The trained parameters' shapes and labels: every weight, or what `lora` trains.
    pub fn trained_shapes(&self) -> Vec<frugal::labels::ParamShape> {
        self.model.trained_shapes(self.lora.as_ref())
    }

    /// Sequences per optimizer step, over all ranks.
    pub fn global_batch(&self) -> usize {
        self.world_size * self.args.batch_size * self.args.grad_accum
    }

    /// The settings for training on `world` ranks. A new run is started on them; a resumed run
    /// started on another number of ranks keeps its global batch by changing the micro-batches
    /// per step (or else the batch per rank), and says so.
    pub fn on_ranks(&mut self, world: usize) -> Result<Option<String>> {
        let a = &mut self.args;
        let note = keep_global_batch(
            self.world_size,
            world,
            &mut a.batch_size,
            &mut a.grad_accum,
            "sequences",
        )?;
        self.world_size = world;
        self.tokens_per_step = self.global_batch() * self.seq_len;
        Ok(note)
    }

    /// The learning-rate schedule of this run.
    pub fn schedule(&self) -> Result<Schedule> {
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

/// Checks the settings and fills in defaults that depend on the model.
pub fn resolve(mut args: TrainSettings) -> Result<RunConfig> {
    let model = match &args.init_from {
        Some(dir) => {
            let config = dir.join("config.json");
            if ![TrainSettings::default().model, config.display().to_string()].contains(&args.model)
            {
                bail!(
                    "--init-from takes the model's configuration from {}; drop --model {}",
                    config.display(),
                    args.model
                );
            }
            args.model = config.display().to_string();
            LlamaConfig::from_file(&config).with_context(|| {
                format!(
                    "--init-from {}: not a Hugging Face LLaMA folder",
                    dir.display()
                )
            })?
        }
        None => LlamaConfig::resolve(&args.model)?,
    };
    let seq_len = args
        .seq_len
        .unwrap_or(model.max_position_embeddings.min(256));
    if seq_len == 0 || seq_len > model.max_position_embeddings {
        bail!(
            "--seq-len {seq_len} must be between 1 and the model's max_position_embeddings ({})",
            model.max_position_embeddings
        );
    }
    at_least_one(&[
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
        ("--steps", args.steps),
        ("--log-every", args.log_every),
    ])?;
    for (flag, x) in [
        ("--val-fraction", args.val_fraction),
        ("--test-fraction", args.test_fraction),
        ("--clip", args.clip),
        ("--min-lr-ratio", args.min_lr_ratio),
        ("--lr", args.lr.unwrap_or(0.0)),
    ] {
        if !x.is_finite() || x < 0.0 {
            bail!("{flag} {x} must be a finite number ≥ 0");
        }
    }
    if !(0.0..1.0).contains(&args.val_fraction) || args.val_fraction == 0.0 {
        bail!("--val-fraction {} must be in (0, 1)", args.val_fraction);
    }
    if !args.test_fraction.is_finite() || args.val_fraction + args.test_fraction >= 1.0 {
        bail!(
            "--val-fraction {} plus --test-fraction {} must leave documents for training (sum below 1)",
            args.val_fraction,
            args.test_fraction
        );
    }
    args.memory.validate()?;
    if args.stop_after == Some(0) {
        bail!("--stop-after must be at least 1 (it is a step after which to pause)");
    }
    let (mut optimizer, lora) =
        args.opt
            .resolve_for(&model, args.init_from.is_some(), args.seed, args.steps)?;
    if let Some(lr) = args.lr {
        optimizer.set("lr", &lr.to_string())?;
    }
    optimizer.validate()?;
    let warmup = args.warmup.unwrap_or(args.steps / 10);
    let eval_every = args.eval_every.unwrap_or((args.steps / 4).max(1));
    let save_every = args.save_every.unwrap_or(eval_every);
    let run = RunConfig {
        tokens_per_step: args.batch_size * args.grad_accum * seq_len,
        args,
        model,
        optimizer,
        seq_len,
        warmup,
        eval_every,
        save_every,
        world_size: 1,
        lora,
    };
    run.schedule()?;
    Ok(run)
}

/// Writes metrics, plots, evaluations and checkpoints of a run into its directory.
struct RunHooks<'a> {
    out: &'a Path,
    run: &'a RunConfig,
    log: RunLog<'a>,
    val: Batches<'a>,
    parallel: &'a DataParallel,
    tokenizer: &'a TextTokenizer,
    last_val: Option<f64>,
}

impl RunHooks<'_> {
    fn validation_loss(&self, model: &Llama) -> Result<f64> {
        let a = &self.run.args;
        let l = mean_loss(
            model,
            &self.val,
            a.batch_size,
            self.run.seq_len,
            a.eval_tokens,
            self.parallel,
        )?;
        if !l.is_finite() {
            bail!("the validation loss became {l}: the weights diverged; lower --lr or set --clip");
        }
        Ok(l)
    }
}

impl Hooks<Llama> for RunHooks<'_> {
    fn step_done(&mut self, r: &TrainRecord) {
        self.log.step_done(r, &format!("{:.0} tok/s", r.tok_per_s));
    }

    fn log(&mut self, r: &TrainRecord) -> Result<()> {
        self.log.log(r)
    }

    fn evaluate(&mut self, model: &Llama, state: &TrainerState) -> Result<()> {
        let l = self.validation_loss(model)?;
        self.last_val = Some(l);
        let line = format!(
            "step {}: validation loss {l:.4}, perplexity {:.2}",
            state.step,
            l.exp()
        );
        self.log.evaluated(EvalRecord::new(state.step, l), &line)?;
        self.log.plot()
    }

    fn checkpoint(&mut self, t: &Trainer<Llama>, stopped: bool) -> Result<()> {
        let keep = self.run.args.keep_checkpoints;
        let dir = checkpoint::save(self.out, t, self.tokenizer, keep)?;
        if stopped {
            self.log.interrupted(&dir, "train");
        }
        Ok(())
    }
}

/// The optimizer state each of `world` ranks holds after the first step, planned.
pub fn sharded_plan(run: &RunConfig, world: usize) -> Result<Vec<usize>> {
    let shares = frugal::sharding::state_per_rank(&run.optimizer, &run.trained_shapes(), world)?;
    Ok(shares.iter().map(|s| s.total()).collect())
}

/// What every rank of a run must agree on: its flags (less those that may differ between
/// machines; the rest of the run's settings follow from them) and the code that runs them.
fn agreed_settings(run: &RunConfig) -> Result<serde_json::Value> {
    let mut flags = serde_json::to_value(&run.args)?;
    if let Some(flags) = flags.as_object_mut() {
        flags.remove("threads");
        flags.remove("cache_dir");
    }
    Ok(serde_json::json!({ "flags": flags, "code": crate::data_parallel::code_fingerprint()? }))
}

/// Runs (or resumes, from the latest checkpoint of `resume`) a training run with f32 weights on
/// `device`, as one of the ranks of `parallel` (see [`Trainer::with_data_parallel`]); stops
/// early, with a checkpoint, when `stop` is set. Rank 0 writes the run directory. Returns the
/// run directory.
pub fn run(
    run: RunConfig,
    resume: Option<&Path>,
    cache: &Path,
    stop: &StopToken,
    device: &Device,
    parallel: &DataParallel,
) -> Result<PathBuf> {
    let note = (!device.is_cpu()).then(|| out_of_memory_note(&run, device));
    train(run, resume, cache, stop, device, parallel).map_err(|e| match note {
        Some(note) if crate::device::out_of_memory(&e) => e.context(note),
        _ => e,
    })
}

/// The planned memory of one rank's step in this run's memory mode, as `frugal memory` plans
/// it: weights, the rank's share of the optimizer state, and the step's activations, gradients
/// and working set.
pub fn planned_step(run: &RunConfig, device: &Device) -> Result<ModePlan> {
    let (model, opt) = (&run.model, &run.optimizer);
    let report = MemoryReport::new(model, opt, run.lora.as_ref())?
        .with_world_size(model, opt, run.world_size)?
        .with_steps(
            model,
            run.args.batch_size,
            run.seq_len,
            run.step_mode(device),
        )?;
    ModePlan::selected(report.steps)
}

/// Where `frugal memory` plans every memory mode of this run's step.
fn memory_command(run: &RunConfig) -> String {
    format!(
        "`frugal memory --model {} --batch-size {} --seq-len {}` (with this run's optimizer and memory flags) plans each memory mode",
        run.args.model, run.args.batch_size, run.seq_len
    )
}

/// What a device that ran out of memory was asked for: the planned peak of the run's step
/// (see `frugal memory`), and what to change.
fn out_of_memory_note(run: &RunConfig, device: &Device) -> String {
    crate::memory_report::out_of_memory_note(
        device,
        planned_step(run, device).ok().as_ref(),
        (run.args.batch_size, run.seq_len),
        &memory_command(run),
        "Lower --batch-size (and raise --grad-accum to keep the batch), or use --dtype bf16 or --memory low",
    )
}

/// [`run`] on one device.
fn train(
    mut run: RunConfig,
    resume: Option<&Path>,
    cache: &Path,
    stop: &StopToken,
    device: &Device,
    parallel: &DataParallel,
) -> Result<PathBuf> {
    let device = device.clone();
    let (lead, world) = (parallel.rank() == 0, parallel.world_size());
    if world > 1 {
        parallel.agree("settings or code", &agreed_settings(&run)?)?;
    }
    let (out, resume_from) =
        parallel.on_lead(|| crate::run_dir::open(run.args.out.as_deref(), resume, "run"))?;
    run.world_size = match resume_from {
        Some(_) => RunConfig::read(&out)?.world_size,
        None => world,
    };
    if let Some(note) = run.on_ranks(world)? {
        say!(lead, "note: {note}");
    }
    let run = run;
    let args = &run.args;

    // Data and tokenizer; a resumed run uses the tokenizer saved with its checkpoint.
    let source = Source::resolve(&args.data)?;
    let saved_tokenizer = resume_from
        .as_ref()
        .map(|(_, ck)| ck.join(checkpoint::TOKENIZER));
    let pretrained_tokenizer = args.init_from.as_ref().map(|d| d.join("tokenizer.json"));
    let tokenizer_choice = match (&saved_tokenizer, &args.tokenizer, &pretrained_tokenizer) {
        (Some(p), _, _) | (None, Some(p), _) => TokenizerChoice::File(p),
        (None, None, Some(p)) => {
            if !p.exists() {
                bail!("--init-from: {} does not exist; the model's tokenizer is needed (or give --tokenizer)", p.display());
            }
            TokenizerChoice::File(p)
        }
        (None, None, None) => {
            TokenizerChoice::Train(args.vocab_size.unwrap_or(run.model.vocab_size))
        }
    };
    let started = Instant::now();
    let holdout = Holdout {
        val: args.val_fraction,
        test: args.test_fraction,
    };
    let format = if args.instructions {
        Format::Instructions {
            seq_len: run.seq_len,
        }
    } else {
        Format::Packed
    };
    // Rank 0 prepares (and caches) the data first; the other ranks then read the cache.
    let prepare = || Dataset::prepare(&source, tokenizer_choice, holdout, format, cache);
    let mut prepared = None;
    parallel.on_lead(|| {
        prepared = Some(prepare()?);
        Ok(())
    })?;
    let data = match prepared {
        Some(data) => data,
        None => prepare()?,
    };
    for note in &data.notes {
        say!(lead, "note: {note}");
    }
    if data.tokenizer.vocab_size() > run.model.vocab_size {
        bail!(
            "the tokenizer has {} ids but the model's vocab_size is {}; use a larger model vocabulary or --vocab-size ≤ {}",
            data.tokenizer.vocab_size(),
            run.model.vocab_size,
            run.model.vocab_size
        );
    }
    let mut train_batches = Batches::new(&data.train, run.seq_len, args.seed, "training", &device)?;
    let val_batches = Batches::new(&data.val, run.seq_len, args.seed, "validation", &device)?;
    say!(
        lead,
        "data: {} training tokens ({} sequences of {}), {} validation tokens{}{}, prepared in {:.1}s",
        data.train.len(),
        train_batches.windows(),
        run.seq_len,
        data.val.len(),
        data.test
            .as_ref()
            .map(|t| format!(", {} test tokens", t.len()))
            .unwrap_or_default(),
        if data.cached { " (cached)" } else { "" },
        started.elapsed().as_secs_f64()
    );

    // Model, optimizer, loop state.
    let (mut model, opt, state) = match &resume_from {
        Some((_, ck)) => {
            let mut model =
                Llama::load(&run.model, &ck.join(checkpoint::MODEL), &device, DType::F32)?;
            if let Some(lora) = &run.lora {
                model = model.with_saved_adapters(lora, ck)?;
            }
            let shard = (parallel.rank(), world);
            let (opt, state) =
                checkpoint::restore(model.params(), run.optimizer.clone(), ck, shard)?;
            (model, opt, state)
        }
        None => {
            let model = match &args.init_from {
                Some(dir) => {
                    say!(lead, "model: weights of {}", dir.display());
                    Llama::from_hf(dir, &device, DType::F32)?.1
                }
                None => Llama::init(&run.model, args.seed, &device, DType::F32)?,
            };
            let model = match &run.lora {
                Some(lora) => model.with_lora(lora, args.seed ^ LORA_SEED)?,
                None => model,
            };
            let opt = Frugal::from_params(model.params(), run.optimizer.clone())?;
            (model, opt, TrainerState::default())
        }
    };
    model.set_loss_chunks(args.memory.loss_chunks());
    model.set_attention(args.memory.backward.attention);
    model.set_compute_dtype(args.dtype.compute_dtype());
    if resume_from.is_none() && lead {
        let write = frugal::fs::write_atomically;
        write(
            &out.join("tokenizer.json"),
            data.tokenizer.to_json()?.as_bytes(),
        )?;
        // config.json last: its presence marks the directory as a run.
        write(
            &out.join("config.json"),
            serde_json::to_string_pretty(&run)?.as_bytes(),
        )?;
    }
    let counts = RoleCounts::of(&opt.params().cloned().collect::<Vec<_>>());
    let n_params =
        run.model.num_params() + run.lora.as_ref().map_or(0, |l| l.adapter_count(&run.model));
    let planned: usize = frugal::memory::plan(&run.optimizer, &run.trained_shapes())?
        .iter()
        .map(|(_, bytes)| bytes.total())
        .sum();
    say!(
        lead,
        "model: {} parameters ({} projectable, {} state-full) on {}{}{}, optimizer `{}` ({:.1} MiB of state), {} tokens per step{}",
        n_params,
        counts.projectable,
        counts.state_full,
        crate::device::name(&device),
        if device.is_cpu() {
            format!(" ({})", frugal_nn::ops::cpu_kernels())
        } else {
            String::new()
        },
        match args.dtype {
            Precision::F32 => "",
            Precision::Bf16 => " in bf16 (f32 master weights)",
        },
        run.optimizer.preset,
        planned as f64 / (1024.0 * 1024.0),
        run.tokens_per_step,
        match &resume_from {
            Some((s, _)) => format!(", resuming at step {s}"),
            None => String::new(),
        }
    );
    if let Some(lora) = &run.lora {
        say!(lead, "{}", lora_line(lora, &run.model));
    }
    if let Some(b) = opt.block_schedule() {
        if b.active_count == 0 && b.blocks > 0 && run.optimizer.density > 0.0 {
            say!(
                lead,
                "warning: density {} of {} blocks rounds to no active block; every projectable tensor is {}",
                run.optimizer.density,
                b.blocks,
                if run.optimizer.state_free == frugal::config::StateFreeRule::None { "frozen" } else { "state-free" }
            );
        }
    }
    let planned = planned_step(&run, &device)?;
    let shape = (args.batch_size, run.seq_len);
    say!(
        lead,
        "{}",
        start_line(&planned, shape, world, &memory_command(&run))
    );
    for line in run.step_mode_notes() {
        say!(lead, "note: {line}");
    }
    if world > 1 || parallel.comm().engine() != Solo.engine() {
        say!(
            lead,
            "data parallel over {}: {world} rank{} × batch {} × {} micro-batches = a global batch of {} sequences ({} tokens per step); optimizer state sharded: {} MiB per rank",
            parallel.comm().engine(),
            if world == 1 { "" } else { "s" },
            args.batch_size,
            args.grad_accum,
            run.global_batch(),
            run.tokens_per_step,
            sharded_plan(&run, world)?
                .iter()
                .map(|b| format!("{:.1}", *b as f64 / (1024.0 * 1024.0)))
                .collect::<Vec<_>>()
                .join(" + ")
        );
    }

    let title = format!("{} · {}", args.model, run.optimizer.preset);
    let mut hooks = RunHooks {
        out: &out,
        run: &run,
        log: RunLog::open(&out, lead, (state.step, args.steps), title)?,
        val: val_batches,
        parallel,
        tokenizer: &data.tokenizer,
        last_val: None,
    };
    let mut initial_val = None;
    if state.step == 0 {
        let l = hooks.validation_loss(&model)?;
        initial_val = Some(l.exp());
        let line = format!("step 0: validation loss {l:.4}, perplexity {:.1}", l.exp());
        hooks.log.evaluated(EvalRecord::new(0, l), &line)?;
    }
    let session = Instant::now();
    let mut trainer = Trainer::new(
        model,
        opt,
        run.schedule()?,
        run.loop_settings(),
        state,
        stop.clone(),
    )?
    .with_data_parallel(parallel.clone())?;
    let outcome = trainer.train(&mut train_batches, &mut hooks)?;
    hooks.log.finish();

    let val_loss = match hooks.last_val {
        Some(l) => l,
        None => hooks.validation_loss(&trainer.model)?,
    };
    // The test split is scored once, on the finished model only.
    let test_loss = match (&data.test, outcome) {
        (Some(test), Outcome::Finished) => {
            let batches = Batches::new(test, run.seq_len, args.seed, "test", &device)?;
            let l = mean_loss(
                &trainer.model,
                &batches,
                args.batch_size,
                run.seq_len,
                args.eval_tokens,
                parallel,
            )?;
            say!(lead, "test loss {l:.4}, perplexity {:.2}", l.exp());
            Some(l)
        }
        _ => None,
    };
    let (state, opt) = (&trainer.state, &trainer.optimizer);
    let summary = Summary {
        steps: state.step,
        tokens: state.tokens,
        val_loss,
        val_ppl: val_loss.exp(),
        test_loss,
        test_ppl: test_loss.map(f64::exp),
        initial_val_ppl: initial_val,
        parameters: n_params,
        parameters_by_class: counts,
        optimizer_state_bytes: opt.state_bytes(),
        optimizer_state_total_bytes: opt.state_bytes().total(),
        optimizer_state_bytes_per_rank: parallel.per_rank(opt.state_bytes().total()),
        world_size: world,
        optimizer_workspace_bytes: opt.workspace_bytes(),
        parameter_bytes: 4 * n_params,
        gradient_bytes: planned.step.gradients,
        planned_peak_bytes: Some(planned.peak_bytes),
        peak_rss_bytes: peak_rss_bytes(),
        peak_rss_bytes_per_rank: parallel.peak_rss_per_rank(),
        wall_s: state.elapsed_s,
        tokens_per_s: state.tokens as f64 / state.train_s.max(1e-9),
        interrupted: outcome != Outcome::Finished,
    };
    // Rank 0 writes the summary; every rank returns once it is written.
    parallel.on_lead(|| {
        hooks.log.plot()?;
        let paused = (outcome == Outcome::Paused).then_some((state.step, args.steps));
        crate::run_dir::write_summary(&out, &summary, paused, "train")?;
        eprintln!(
            "done: {} steps, {} tokens in {:.1}s ({:.0} tok/s in training steps); validation loss {:.4}, perplexity {:.2}{}; run in {}",
            state.step,
            state.tokens,
            session.elapsed().as_secs_f64(),
            summary.tokens_per_s,
            val_loss,
            val_loss.exp(),
            initial_val.map(|p| format!(" (from {p:.1})")).unwrap_or_default(),
            out.display()
        );
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{BackwardSettings, MemorySettings};

    #[test]
    fn per_layer_updates_say_what_accumulation_and_clipping_cost() {
        let settings = |grad_accum, clip| TrainSettings {
            grad_accum,
            clip,
            memory: MemorySettings {
                backward: BackwardSettings {
                    per_layer_updates: true,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(resolve(settings(1, 0.0))
            .unwrap()
            .step_mode_notes()
            .is_empty());
        let notes = resolve(settings(3, 1.0)).unwrap().step_mode_notes();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("first 2 micro-batches keep whole summed gradients"));
        assert!(notes[1].contains("measures the global gradient norm before any update"));
        // Without per-layer updates neither applies.
        let plain = TrainSettings {
            grad_accum: 3,
            clip: 1.0,
            ..Default::default()
        };
        assert!(resolve(plain).unwrap().step_mode_notes().is_empty());
    }
}
