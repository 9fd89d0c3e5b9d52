//! The `frugal` command-line tool.

mod cli;
mod compare;
mod data;
mod eval;
mod memory_report;
mod model;
mod plot;
mod train;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use cli::{Cli, Command, TrainArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Uses `threads` worker threads for candle, faer and the optimizer (before any pool starts).
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .ok();
    }
    Ok(())
}

/// Names of the flags given explicitly on the command line.
fn explicit(m: &ArgMatches) -> Vec<String> {
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
}

/// The setting `key` of serialised training arguments (top level or optimizer flags).
fn setting<'a>(args: &'a mut serde_json::Value, key: &str) -> Option<&'a mut serde_json::Value> {
    if args.get(key).is_some() {
        return args.get_mut(key);
    }
    args.get_mut("opt")?.get_mut(key)
}

/// Applies `--config` (flags win) and, for `--resume`, the saved settings of the run (flags that
/// contradict them are an error).
fn merge_train_args(args: TrainArgs, given: &[String]) -> Result<TrainArgs> {
    let mut value = serde_json::to_value(&args)?;
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("config file {} is not valid TOML: {e}", path.display())
        })?;
        for (key, v) in table {
            let key = key.replace('-', "_");
            let Some(target) = setting(&mut value, &key) else {
                bail!("config file {}: unknown setting `{key}`", path.display());
            };
            if !given.contains(&key) {
                *target = serde_json::to_value(v)?;
            }
        }
    }
    if let Some(dir) = &args.resume {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("{} is not a run directory (no config.json)", dir.display())
        })?;
        let saved: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))?;
        let mut saved_args = saved["args"].clone();
        for key in given {
            let now = setting(&mut value, key).map(|v| v.clone());
            if let (Some(now), Some(then)) = (now, setting(&mut saved_args, key)) {
                if now != *then {
                    bail!(
                        "--{} {now} differs from the run in {} ({then}); resume with the run's settings",
                        key.replace('_', "-"),
                        dir.display()
                    );
                }
            }
        }
        value = saved_args;
    }
    let mut merged: TrainArgs = serde_json::from_value(value).context("invalid settings")?;
    merged.config = args.config;
    merged.resume = args.resume;
    merged.threads = args.threads;
    merged.cache_dir = args.cache_dir;
    Ok(merged)
}

/// Keeps freed memory mapped: a training step frees and re-allocates the same large buffers,
/// and returning them to the OS makes every step pay for page faults and zeroing.
fn keep_freed_memory() {
    // `mi_option_purge_delay` (index 15 in mimalloc 3's option enum, pinned by the crate version).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: called once at start-up before other threads exist; -1 disables purging.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// `frugal memory`: prints the planned memory of a model and optimizer.
fn memory(args: &cli::MemoryArgs) -> Result<()> {
    let model = model::LlamaConfig::resolve(&args.model)?;
    let opt = args.opt.resolve(0)?;
    let report = memory_report::MemoryReport::new(&model, &opt)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {} ({} parameters), optimizer {} (projection {}, density {}, state-full {}, state-free {}); MiB:",
            args.model,
            model.num_params(),
            opt.preset,
            opt.projection,
            opt.density,
            opt.state_full,
            opt.state_free
        );
        print!("{}", report.table());
        println!(
            "optimizer state {:.1} MiB; weights + gradients + state {:.1} MiB",
            report.state_mib(),
            report.training_mib()
        );
    }
    Ok(())
}

fn main() {
    keep_freed_memory();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Train(args) => {
            let sub = matches
                .subcommand_matches("train")
                .expect("train subcommand");
            set_threads(args.threads).and_then(|_| {
                let merged = merge_train_args(*args, &explicit(sub))?;
                let cache = merged
                    .cache_dir
                    .clone()
                    .unwrap_or_else(data::default_cache_dir);
                let resume = merged.resume.clone();
                let run = train::resolve(merged)?;
                train::run(run, resume.as_deref(), &cache).map(|_| ())
            })
        }
        Command::Eval(args) => set_threads(args.threads).and_then(|_| eval::run(&args)),
        Command::Memory(args) => memory(&args),
        Command::Compare(mut args) => {
            let sub = matches
                .subcommand_matches("compare")
                .expect("compare subcommand");
            set_threads(args.train.threads).and_then(|_| {
                // --resume names the comparison directory, not a single run.
                let resume = args.train.resume.take();
                let given: Vec<String> = explicit(sub)
                    .into_iter()
                    .filter(|k| k != "resume")
                    .collect();
                args.train = merge_train_args(args.train.clone(), &given)?;
                args.train.resume = resume;
                let cache = args
                    .train
                    .cache_dir
                    .clone()
                    .unwrap_or_else(data::default_cache_dir);
                let command = std::env::args().collect::<Vec<_>>().join(" ");
                compare::run(*args, &cache, &command)
            })
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
