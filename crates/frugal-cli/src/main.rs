//! The `frugal` command-line tool: arguments → library calls.

mod cli;

use anyhow::{bail, Result};
use candle_core::Device;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use cli::{Cli, Command};
use frugal_dist::{Collectives, Launch};
use frugal_nn::llama::LlamaConfig;
use frugal_train::data_parallel::{DataParallel, SharedError};
use frugal_train::memory_report::MemoryReport;
use frugal_train::threads::CpuSettings;
use frugal_train::{data, StopToken};
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ranks of this job on this machine, from the MPI launcher (1 when alone).
fn local_ranks() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
}

/// Runs `work` on the worker pool (see [`frugal_train::threads::in_pool`]), its threads
/// shared among the ranks on this machine by default.
fn in_pool<R: Send>(cpu: CpuSettings, work: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    frugal_train::threads::in_pool(cpu, local_ranks(), work)
}

/// Names of the flags given explicitly on the command line.
fn explicit(m: &ArgMatches) -> Vec<String> {
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
}

/// `mi_option_purge_delay` in mimalloc's option enum (pinned by the `libmimalloc-sys` version;
/// the test `purge_delay_index_names_that_option` checks it).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped: a training step frees and re-allocates the same large buffers,
/// and returning them to the OS makes every step pay for page faults and zeroing.
fn keep_freed_memory() {
    // SAFETY: called once at start-up before other threads exist; -1 disables purging.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// Returns freed memory to the operating system a second after it is freed (`--memory low`):
/// the peak RSS then shows the real peak, while memory freed and reused within a layer's work
/// is not faulted in again (purging at once made `60m` steps 1.65× slower, against 1.35× with
/// this delay).
fn return_freed_memory(memory: &frugal_train::settings::BackwardSettings) {
    if memory.is_low() {
        // SAFETY: setting an option has no preconditions; the delay is in milliseconds.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 1000) };
    }
}

/// A stop token set by Ctrl-C: runs save a checkpoint and stop at the next step boundary.
fn ctrl_c_token() -> StopToken {
    let token = StopToken::new();
    let set = token.clone();
    // Without a handler (e.g. one installed elsewhere) Ctrl-C simply ends the process.
    let _ = ctrlc::set_handler(move || set.stop());
    token
}

/// Fine-tuning memory by method for the encoder folder `dir`.
fn finetune_memory(args: &cli::MemoryArgs, dir: &std::path::Path, device: &Device) -> Result<()> {
    let config: frugal_nn::encoder::EncoderConfig = frugal_nn::hf::read_config(dir)?;
    config.validate()?;
    if args.labels < 2 {
        bail!("--labels must be at least 2");
    }
    if args.memory.loss_chunks.is_some() || args.memory.loss_vocab_chunks.is_some() {
        bail!("--loss-chunks and --loss-vocab-chunks split a decoder's loss over its vocabulary; a classifier's loss is never split: leave them out for an encoder");
    }
    if args.dtype != frugal_train::settings::Precision::F32 {
        bail!("--dtype bf16 plans a LLaMA step; fine-tuning an encoder runs in f32: leave it out for an encoder");
    }
    let step = match (args.batch_size, args.seq_len) {
        (Some(batch), seq) => {
            let seq = seq.unwrap_or(config.max_tokens().min(128));
            frugal_train::trainer::at_least_one(&[
                ("--batch-size", batch),
                ("--seq-len", seq),
                ("--grad-accum", args.grad_accum),
            ])?;
            if seq > config.max_tokens() {
                bail!(
                    "--seq-len {seq} exceeds the model's {} positions; plan at most that many tokens",
                    config.max_tokens()
                );
            }
            let mode = args
                .memory
                .backward
                .step_mode(args.grad_accum)
                .on(device, candle_core::DType::F32);
            Some(frugal_train::finetune::memory::StepShape { batch, seq, mode })
        }
        (None, Some(_)) => bail!("--seq-len plans a step only with --batch-size"),
        (None, None) => None,
    };
    let methods: Vec<String> = args.methods.split_whitespace().map(String::from).collect();
    let plans = frugal_train::finetune::memory::plan(
        &config,
        args.labels,
        &methods,
        args.world_size,
        step,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plans)?);
    } else {
        println!(
            "fine-tuning {} ({} {} layers, hidden {}) with a head of {} classes; state and gradients in MiB:",
            dir.display(),
            config.model_type,
            config.num_hidden_layers,
            config.hidden_size,
            args.labels
        );
        print!("{}", frugal_train::finetune::memory::table(&plans));
        if let Some(s) = step {
            println!(
                "peaks in MiB (micro-batch {} × {}, {}): weights, optimizer state, and the step's activations, gradients and working set; * = the mode of these flags",
                s.batch,
                s.seq,
                match s.mode.kernels {
                    frugal_nn::Kernels::Fused => format!("attention {}", s.mode.attention),
                    kernels => kernels.describe().to_string(),
                }
            );
        }
    }
    Ok(())
}

/// `frugal memory`: prints the planned memory of a model and optimizer.
fn memory(args: &cli::MemoryArgs, device: &Device) -> Result<()> {
    frugal_train::trainer::at_least_one(&[("--world-size", args.world_size)])?;
    let dir = std::path::Path::new(&args.model);
    if dir.join("config.json").exists() {
        let kind: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        if matches!(kind["model_type"].as_str(), Some("bert" | "roberta")) {
            return finetune_memory(args, dir, device);
        }
    }
    let model = LlamaConfig::resolve(&args.model)?;
    // The plan is the peak (ρ at the start), whatever the horizon of a decaying density.
    let (opt, lora) = args.opt.resolve_for(&model, false, 0, 1)?;
    let mut report = MemoryReport::new(&model, &opt, lora.as_ref())?.with_world_size(
        &model,
        &opt,
        args.world_size,
    )?;
    args.memory.validate()?;
    if let Some(batch) = args.batch_size {
        let seq = args
            .seq_len
            .unwrap_or(model.max_position_embeddings.min(256));
        frugal_train::trainer::at_least_one(&[
            ("--batch-size", batch),
            ("--seq-len", seq),
            ("--grad-accum", args.grad_accum),
        ])?;
        let mode = args
            .memory
            .step_mode(args.grad_accum)
            .on(device, args.dtype.compute_dtype());
        report = report.with_steps(&model, batch, seq, mode)?;
    } else if args.seq_len.is_some() {
        bail!("--seq-len plans a step only with --batch-size");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {} ({} parameters), optimizer {} (projection {}, density {}, state-full {} with {} moments, state-free {}); MiB:",
            args.model,
            model.num_params(),
            opt.preset,
            opt.projection,
            opt.density,
            opt.state_full,
            opt.moment_storage,
            opt.state_free
        );
        if let Some(l) = &lora {
            println!("{}", frugal_train::run::lora_line(l, &model));
        }
        print!("{}", report.table());
        if let Some(end) = &report.end_state {
            println!(
                "ρ decays from {} to {} ({}): the state above is the peak, at the start; at ρ = {} it is {:.1} MiB",
                opt.density,
                opt.density_min,
                opt.density_schedule,
                opt.density_min,
                end.total() as f64 / (1024.0 * 1024.0)
            );
        }
        println!(
            "optimizer state {:.1} MiB; weights + gradients + state {:.1} MiB",
            report.state_mib(),
            report.training_mib()
        );
        if !report.steps.is_empty() {
            println!(
                "memory modes (MiB, micro-batch {} × {} {}): activations kept for the backward pass, gradients held at once, the backward working set, and the peak with weights and state; * = the mode of these flags",
                args.batch_size.unwrap_or(0),
                args.seq_len.unwrap_or(model.max_position_embeddings.min(256)),
                report.steps[0].settings.kernels.describe()
            );
        }
    }
    Ok(())
}

/// `frugal compare` of pre-training runs; `given` names the flags on the command line.
fn compare_pretraining(
    mut args: frugal_train::compare::CompareSettings,
    given: Vec<String>,
    command: &str,
    device: &Device,
    parallel: &DataParallel,
) -> Result<()> {
    in_pool(args.train.cpu, || {
        // --resume names the comparison directory, not a single run.
        let resume = args.train.resume.take();
        let given: Vec<String> = given.into_iter().filter(|k| k != "resume").collect();
        args.train = args.train.clone().merge(&given)?;
        args.train.resume = resume;
        return_freed_memory(&args.train.memory.backward);
        let cache = args
            .train
            .cache_dir
            .clone()
            .unwrap_or_else(data::default_cache_dir);
        frugal_train::compare::run(args, &cache, command, &ctrl_c_token(), device, parallel)
    })
}

fn run(matches: &ArgMatches, cli: Cli, device: Device, comm: &Arc<dyn Collectives>) -> Result<()> {
    let given = |name: &str| explicit(matches.subcommand_matches(name).expect("subcommand"));
    let across_ranks = match &cli.command {
        Command::Train(_) | Command::Finetune(_) => true,
        Command::Compare(args) => args.task.is_none(),
        _ => false,
    };
    if comm.world_size() > 1 && !across_ranks {
        return Err(SharedError(format!(
            "{} ranks were launched, but only `frugal train`, `frugal finetune` and `frugal compare` (pre-training) run across ranks; run this command as one process",
            comm.world_size()
        ))
        .into());
    }
    match cli.command {
        Command::Train(args) => in_pool(args.cpu, || {
            let merged = args.merge(&given("train"))?;
            let cache = merged
                .cache_dir
                .clone()
                .unwrap_or_else(data::default_cache_dir);
            let resume = merged.resume.clone();
            return_freed_memory(&merged.memory.backward);
            let config = frugal_train::run::resolve(merged)?;
            frugal_train::run::run(
                config,
                resume.as_deref(),
                &cache,
                &ctrl_c_token(),
                &device,
                &DataParallel::new(Arc::clone(comm)),
            )
            .map(drop)
        })?,
        Command::Eval(args) => in_pool(args.cpu, || {
            let r = frugal_train::eval::evaluate(&args, &device)?;
            println!(
                "checkpoint {}  split {}  tokens {}  loss {:.4}  perplexity {:.2}",
                r.checkpoint.display(),
                r.split,
                r.tokens,
                r.loss,
                r.perplexity
            );
            Ok(())
        })?,
        Command::Classify(args) => in_pool(args.cpu, || {
            frugal_train::finetune::classify::classify(
                &args,
                &device,
                &mut std::io::stdout().lock(),
            )
            .map(drop)
        })?,
        Command::Generate(args) => in_pool(args.cpu, || {
            frugal_train::generate::generate(&args, &device, &mut std::io::stdout().lock())
                .map(drop)
        })?,
        Command::Finetune(args) => in_pool(args.cpu, || {
            let merged = args.merge(&given("finetune"))?;
            let resume = merged.resume.clone();
            return_freed_memory(&merged.memory);
            let config = frugal_train::finetune::run::resolve(merged)?;
            frugal_train::finetune::run::run(
                config,
                resume.as_deref(),
                &ctrl_c_token(),
                &device,
                &DataParallel::new(Arc::clone(comm)),
            )
            .map(drop)
        })?,
        Command::Memory(args) => memory(&args, &device)?,
        Command::Compare(args) => {
            let compare = matches.subcommand_matches("compare").expect("subcommand");
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            match args.task {
                None => compare_pretraining(
                    args.pretraining,
                    explicit(compare),
                    &command,
                    &device,
                    &DataParallel::new(Arc::clone(comm)),
                )?,
                Some(cli::CompareTask::Finetune(mut args)) => {
                    let given = explicit(compare.subcommand_matches("finetune").expect("task"));
                    if given.iter().any(|k| k == "method") {
                        bail!("compare finetune runs the methods of --methods; --method names one run's (frugal finetune)");
                    }
                    in_pool(args.finetune.cpu, || {
                        // --resume names the comparison directory, not a single run.
                        let resume = args.finetune.resume.take();
                        let given: Vec<String> =
                            given.into_iter().filter(|k| k != "resume").collect();
                        args.finetune = args.finetune.clone().merge(&given)?;
                        args.finetune.resume = resume;
                        return_freed_memory(&args.finetune.memory);
                        frugal_train::compare::finetune::compare(
                            *args,
                            &command,
                            &ctrl_c_token(),
                            &device,
                        )
                    })?;
                }
            }
        }
    }
    Ok(())
}

fn main() {
    keep_freed_memory();
    frugal_train::threads::limit_elementwise_spinning();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let timeout = Duration::from_secs_f64(cli.collective_timeout);
    let joined = Launch::from_environment()
        .map_err(anyhow::Error::from)
        .and_then(|launch| {
            let device = frugal_train::device::select(&cli.device, launch.local_rank())?;
            let comm = frugal_dist::join(&launch, &device, timeout)?;
            Ok((device, comm))
        });
    let (device, comm) = match joined {
        Ok(joined) => joined,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    let result = run(&matches, cli, device, &comm);
    if let Err(e) = result {
        report(&e, comm);
    }
}

/// Reports a failed command and ends the process. Under data parallelism an error that every
/// rank met alike is reported by rank 0; one rank's own failure ends the whole job, since the
/// other ranks would wait for it.
fn report(e: &anyhow::Error, comm: Arc<dyn Collectives>) -> ! {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 1 {
        eprintln!("error: {e:#}");
    } else if e.downcast_ref::<SharedError>().is_none() {
        eprintln!("error: rank {rank} of {world}: {e:#}");
        comm.abort(1);
    } else if rank == 0 {
        eprintln!("error: {e:#}");
    }
    drop(comm);
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mimalloc reads `MIMALLOC_PURGE_DELAY` into the option it calls purge_delay at start-up: a
    /// child process started with it set must see that value at our index.
    #[test]
    fn purge_delay_index_names_that_option() {
        const PROBE: &str = "FRUGAL_PURGE_DELAY_PROBE";
        if std::env::var_os(PROBE).is_some() {
            // SAFETY: reading an option has no preconditions.
            let value = unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
            assert_eq!(value, 4321, "option {PURGE_DELAY} is not purge_delay");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::purge_delay_index_names_that_option"])
            .env(PROBE, "1")
            .env("MIMALLOC_PURGE_DELAY", "4321")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "the probe process failed: {text}");
        // A filter that matched nothing would also succeed: the probe must really have run.
        assert!(text.contains("1 passed"), "the probe did not run: {text}");
    }
}
