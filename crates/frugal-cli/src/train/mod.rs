//! `frugal train`: load data → build model → build optimizer → for each step: batch, forward,
//! backward, step, log, maybe evaluate and checkpoint.

pub mod checkpoint;
pub mod metrics;
pub mod schedule;

use crate::cli::TrainArgs;
use crate::data::{Batches, Dataset, Source, TokenizerChoice};
use crate::eval::mean_loss;
use crate::model::{Llama, LlamaConfig};
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use checkpoint::TrainerState;
use frugal::Frugal;
use indicatif::{ProgressBar, ProgressStyle};
use metrics::Metrics;
use schedule::Schedule;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::Instant;

/// The resolved settings of a run, written to `config.json` in the run directory.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RunConfig {
    pub args: TrainArgs,
    pub model: LlamaConfig,
    pub optimizer: frugal::OptimizerConfig,
    pub seq_len: usize,
    pub warmup: usize,
    pub eval_every: usize,
    pub save_every: usize,
    pub tokens_per_step: usize,
}

/// Final figures of a run, written to `summary.json`.
#[derive(serde::Serialize)]
pub struct Summary {
    pub steps: usize,
    pub tokens: u64,
    pub val_loss: f64,
    pub val_ppl: f64,
    pub initial_val_ppl: Option<f64>,
    pub parameters: usize,
    pub parameters_by_class: frugal::params::ClassCounts,
    pub optimizer_state_bytes: frugal::StateBytes,
    pub optimizer_state_total_bytes: usize,
    pub optimizer_workspace_bytes: usize,
    pub parameter_bytes: usize,
    pub gradient_bytes: usize,
    pub peak_rss_bytes: u64,
    pub wall_s: f64,
    /// Training tokens per second of step time (evaluation and checkpoints excluded).
    pub tokens_per_s: f64,
    pub interrupted: bool,
}

/// Set by Ctrl-C; the training loop saves a checkpoint and stops at the next step boundary.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler once per process.
fn watch_ctrl_c() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Without a handler (e.g. one installed elsewhere) Ctrl-C simply ends the process.
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
}

/// True once Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn default_out() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("run-{secs}"))
}

/// Checks the settings and fills in defaults that depend on the model.
pub fn resolve(args: TrainArgs) -> Result<RunConfig> {
    let model = LlamaConfig::resolve(&args.model)?;
    let seq_len = args
        .seq_len
        .unwrap_or(model.max_position_embeddings.min(256));
    if seq_len == 0 || seq_len > model.max_position_embeddings {
        bail!(
            "--seq-len {seq_len} must be between 1 and the model's max_position_embeddings ({})",
            model.max_position_embeddings
        );
    }
    for (flag, v) in [
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
        ("--steps", args.steps),
        ("--log-every", args.log_every),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if !(0.0..1.0).contains(&args.val_fraction) || args.val_fraction == 0.0 {
        bail!("--val-fraction {} must be in (0, 1)", args.val_fraction);
    }
    if args.clip < 0.0 || args.clip.is_nan() {
        bail!("--clip {} must be ≥ 0", args.clip);
    }
    let mut optimizer = args.opt.resolve(args.seed)?;
    if let Some(lr) = args.lr {
        optimizer.set("lr", &lr.to_string())?;
    }
    optimizer.validate()?;
    let warmup = args.warmup.unwrap_or(args.steps / 10);
    Schedule::new(
        optimizer.lr,
        warmup,
        args.steps,
        &args.schedule,
        args.min_lr_ratio,
    )?;
    let eval_every = args.eval_every.unwrap_or((args.steps / 4).max(1)).max(1);
    let save_every = args.save_every.unwrap_or(eval_every).max(1);
    Ok(RunConfig {
        tokens_per_step: args.batch_size * args.grad_accum * seq_len,
        args,
        model,
        optimizer,
        seq_len,
        warmup,
        eval_every,
        save_every,
    })
}

/// Adds `more` into `acc` for every variable.
fn accumulate(
    acc: &mut GradStore,
    more: GradStore,
    vars: &[(String, candle_core::Var)],
) -> Result<()> {
    let mut more = more;
    for (_, v) in vars {
        if let Some(g) = more.remove(v.as_tensor()) {
            let sum = match acc.remove(v.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(())
}

/// Scales gradients so that their global L2 norm is at most `max`; returns the norm before.
fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &[(String, candle_core::Var)],
    max: f64,
) -> Result<f64> {
    let mut sq = 0.0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if max > 0.0 && norm > max {
        let scale = max / norm;
        for (_, v) in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Runs (or resumes) a training run; returns its directory.
pub fn run(run: RunConfig, resume: Option<&Path>, cache: &Path) -> Result<PathBuf> {
    let args = &run.args;
    let out = match resume {
        Some(dir) => dir.to_path_buf(),
        None => args.out.clone().unwrap_or_else(default_out),
    };
    let resume_from = match resume {
        Some(dir) => Some(checkpoint::list(dir)?.pop().with_context(|| {
            format!(
                "run directory {} has no complete checkpoint to resume from",
                dir.display()
            )
        })?),
        None => {
            if out.join("config.json").exists() {
                bail!("{} already holds a run; use --resume {} to continue it or choose another --out", out.display(), out.display());
            }
            None
        }
    };
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create run directory {}", out.display()))?;

    // Data and tokenizer.
    let source = Source::resolve(&args.data)?;
    // A resumed run uses the tokenizer saved with its checkpoint.
    let saved_tokenizer = resume_from
        .as_ref()
        .map(|(_, ck)| ck.join(checkpoint::TOKENIZER));
    let tokenizer_choice = match (&saved_tokenizer, &args.tokenizer) {
        (Some(p), _) | (None, Some(p)) => TokenizerChoice::File(p),
        (None, None) => TokenizerChoice::Train(args.vocab_size.unwrap_or(run.model.vocab_size)),
    };
    let started = Instant::now();
    let data = Dataset::prepare(&source, tokenizer_choice, args.val_fraction, cache)?;
    if data.tokenizer.vocab_size() > run.model.vocab_size {
        bail!(
            "the tokenizer has {} ids but the model's vocab_size is {}; use a larger model vocabulary or --vocab-size ≤ {}",
            data.tokenizer.vocab_size(),
            run.model.vocab_size,
            run.model.vocab_size
        );
    }
    let mut train_batches = Batches::new(&data.train, run.seq_len, args.seed, "training")?;
    let val_batches = Batches::new(&data.val, run.seq_len, args.seed, "validation")?;
    eprintln!(
        "data: {} training tokens ({} sequences of {}), {} validation tokens{}, prepared in {:.1}s",
        data.train.len(),
        train_batches.windows(),
        run.seq_len,
        data.val.len(),
        if data.cached { " (cached)" } else { "" },
        started.elapsed().as_secs_f64()
    );

    // Model, optimizer, state.
    let (model, mut opt, mut state) = match &resume_from {
        Some((_, ck)) => {
            let model = Llama::load(&run.model, &ck.join(checkpoint::MODEL))?;
            let mut opt = Frugal::from_named(model.named_vars(), run.optimizer.clone())?;
            opt.load_state(&ck.join(checkpoint::OPTIMIZER))
                .with_context(|| format!("cannot resume from {}", ck.display()))?;
            (model, opt, checkpoint::trainer_state(ck)?)
        }
        None => {
            let model = Llama::init(&run.model, args.seed)?;
            let opt = Frugal::from_named(model.named_vars(), run.optimizer.clone())?;
            (model, opt, TrainerState::default())
        }
    };
    if resume_from.is_none() {
        let write = frugal::checkpoint::write_atomically;
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
    let counts = frugal::params::class_counts(&opt.params().cloned().collect::<Vec<_>>());
    let n_params = run.model.num_params();
    eprintln!(
        "model: {} parameters ({} projectable, {} state-full), optimizer `{}`{}",
        n_params,
        counts.projectable,
        counts.state_full + counts.other,
        run.optimizer.preset,
        match &resume_from {
            Some((s, _)) => format!(", resuming at step {s}"),
            None => String::new(),
        }
    );

    if let Some(b) = opt.block_schedule() {
        if b.active_count == 0 && run.optimizer.density > 0.0 {
            eprintln!(
                "warning: density {} of {} blocks rounds to no active block; every projectable tensor is {}",
                run.optimizer.density,
                b.blocks,
                if run.optimizer.state_free == frugal::config::StateFreeRule::None { "frozen" } else { "state-free" }
            );
        }
    }
    let schedule = Schedule::new(
        run.optimizer.lr,
        run.warmup,
        args.steps,
        &args.schedule,
        args.min_lr_ratio,
    )?;
    let mut metrics = Metrics::open(&out.join("metrics.jsonl"), state.step)?;
    watch_ctrl_c();
    let vars = model.named_vars();
    let evaluate = |model: &Llama| {
        mean_loss(
            model,
            &val_batches,
            args.batch_size,
            run.seq_len,
            args.eval_tokens,
        )
    };
    let mut initial_val = None;
    if state.step == 0 {
        let l = evaluate(&model)?;
        initial_val = Some(l.exp());
        metrics.log(json!({"step": 0, "val_loss": l, "val_ppl": l.exp()}))?;
        eprintln!("step 0: validation loss {l:.4}, perplexity {:.1}", l.exp());
    }

    let bar = ProgressBar::new(args.steps as u64).with_position(state.step as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    let session = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut last_val = None;
    let mut was_interrupted = false;
    while state.step < args.steps {
        let t0 = Instant::now();
        let lr = schedule.lr(state.step);
        opt.set_learning_rate(lr);
        let mut grads = GradStore::default();
        let mut loss_sum = 0.0f64;
        for _ in 0..args.grad_accum {
            let (x, y) = train_batches.shuffled(state.position, args.batch_size)?;
            state.position += args.batch_size as u64;
            let loss = model.loss(&x, &y)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let scaled = if args.grad_accum > 1 {
                (loss / args.grad_accum as f64)?
            } else {
                loss
            };
            accumulate(&mut grads, scaled.backward()?, &vars)?;
        }
        let loss = loss_sum / args.grad_accum as f64;
        if !loss.is_finite() {
            bail!(
                "the training loss became {loss} at step {}; lower --lr or set --clip",
                state.step + 1
            );
        }
        let grad_norm = if args.clip > 0.0 {
            Some(clip_grad_norm(&mut grads, &vars, args.clip)?)
        } else {
            None
        };
        opt.step_grads(&grads).map_err(|e| match e {
            frugal::Error::NonFiniteGradient { .. } => {
                anyhow::anyhow!("{e} at step {}", state.step + 1)
            }
            e => e.into(),
        })?;
        state.step += 1;
        state.tokens += run.tokens_per_step as u64;
        let dt = t0.elapsed().as_secs_f64();
        state.train_s += dt;
        state.elapsed_s = elapsed_before + session.elapsed().as_secs_f64();
        let tok_s = run.tokens_per_step as f64 / dt;
        if state.step % args.log_every == 0 || state.step == args.steps {
            let mut entry = json!({"step": state.step, "loss": loss, "lr": lr, "tokens": state.tokens, "tok_per_s": tok_s, "elapsed_s": state.elapsed_s});
            if let Some(n) = grad_norm {
                entry["grad_norm"] = json!(n);
            }
            metrics.log(entry)?;
        }
        bar.set_position(state.step as u64);
        bar.set_message(format!("loss {loss:.4} {tok_s:.0} tok/s"));
        if state.step % run.eval_every == 0 || state.step == args.steps {
            let l = evaluate(&model)?;
            last_val = Some(l);
            metrics.log(json!({"step": state.step, "val_loss": l, "val_ppl": l.exp()}))?;
            bar.suspend(|| {
                eprintln!(
                    "step {}: validation loss {l:.4}, perplexity {:.2}",
                    state.step,
                    l.exp()
                )
            });
            metrics.plot(
                &out.join("loss.png"),
                &format!("{} · {}", args.model, run.optimizer.preset),
            )?;
        }
        let stop = INTERRUPTED.load(Ordering::SeqCst);
        if stop || state.step % run.save_every == 0 || state.step == args.steps {
            let dir = checkpoint::save(
                &out,
                &model,
                &opt,
                &state,
                &data.tokenizer,
                args.keep_checkpoints,
            )?;
            if stop {
                was_interrupted = true;
                bar.suspend(|| {
                    eprintln!(
                        "interrupted: saved {}; continue with `frugal train --resume {}`",
                        dir.display(),
                        out.display()
                    )
                });
                break;
            }
        }
    }
    bar.finish_and_clear();
    let val_loss = match last_val {
        Some(l) => l,
        None => evaluate(&model)?,
    };
    let session_s = session.elapsed().as_secs_f64();
    let summary = Summary {
        steps: state.step,
        tokens: state.tokens,
        val_loss,
        val_ppl: val_loss.exp(),
        initial_val_ppl: initial_val,
        parameters: n_params,
        parameters_by_class: counts,
        optimizer_state_bytes: opt.state_bytes(),
        optimizer_state_total_bytes: opt.state_bytes().total(),
        optimizer_workspace_bytes: opt.workspace_bytes(),
        parameter_bytes: 4 * n_params,
        gradient_bytes: 4 * n_params,
        peak_rss_bytes: metrics::peak_rss_bytes(),
        wall_s: state.elapsed_s,
        tokens_per_s: state.tokens as f64 / state.train_s.max(1e-9),
        interrupted: was_interrupted,
    };
    frugal::checkpoint::write_atomically(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    metrics.plot(
        &out.join("loss.png"),
        &format!("{} · {}", args.model, run.optimizer.preset),
    )?;
    eprintln!(
        "done: {} steps, {} tokens in {:.1}s ({:.0} tok/s in training steps); validation loss {:.4}, perplexity {:.2}{}; run in {}",
        state.step,
        state.tokens,
        session_s,
        summary.tokens_per_s,
        val_loss,
        val_loss.exp(),
        initial_val.map(|p| format!(" (from {p:.1})")).unwrap_or_default(),
        out.display()
    );
    Ok(out)
}
