//! `frugal compare`: train several optimizer configurations on the same model, data, token
//! budget and seeds (same batches in the same order), then tabulate and plot the results.

use crate::checkpoint;
use crate::metrics::{read_records, Record, Summary};
use crate::plot::{write_png, Panel, Series};
use crate::run::{self, resolve};
use crate::settings::TrainSettings;
use crate::trainer::StopToken;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What to compare: the training settings shared by every run, and the methods.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct CompareSettings {
    /// Optimizer specs, comma-separated between specs with `;` or ` `:
    /// e.g. "adamw galore frugal:density=0.125,projection=svd" [default: the paper's rows].
    #[cfg_attr(feature = "cli", arg(long))]
    pub methods: Option<String>,
    /// Sweep one setting over values for every method except adamw, e.g. density=0,0.125,0.25,0.5.
    #[cfg_attr(feature = "cli", arg(long))]
    pub sweep: Option<String>,
    /// A set of runs mirroring the paper's ablations: projection, state-free or modules.
    #[cfg_attr(feature = "cli", arg(long))]
    pub ablation: Option<String>,
    /// Seeds, comma-separated; every method runs once per seed.
    #[cfg_attr(feature = "cli", arg(long, default_value = "0,1"))]
    pub seeds: String,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub train: TrainSettings,
}

/// One configuration to compare.
#[derive(Clone, Debug, Serialize)]
pub struct Method {
    pub label: String,
    /// Optimizer spec: `preset[:key=value,...]`.
    pub spec: String,
}

fn method(spec: &str) -> Method {
    let label = spec.replacen(':', " ", 1).replace(',', " ");
    Method {
        label,
        spec: spec.to_string(),
    }
}

const PAPER_ROWS: &[&str] = &[
    "adamw",
    "galore:density=0.25",
    "badam:density=0.25",
    "frugal:density=0.25",
    "frugal:density=0",
];
const PROJECTABLE: &str = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj";

/// The runs of an ablation mirroring the paper.
fn ablation(name: &str) -> Result<Vec<Method>> {
    Ok(match name {
        "projection" => ["svd", "random", "randperm", "columns", "blocks"]
            .iter()
            .map(|p| method(&format!("frugal:projection={p}")))
            .collect(),
        "state-free" => ["signsgd", "sgd", "none"]
            .iter()
            .map(|r| method(&format!("frugal:state_free={r}")))
            .collect(),
        "modules" => {
            // ρ = 0: every projectable tensor is state-free, so moving one always-state-full module
            // into the projectable set takes Adam away from it entirely (the paper's ablation).
            let mut v = vec![Method {
                label: "embeddings, norms, logits state-full (ρ=0)".into(),
                spec: "frugal:density=0".into(),
            }];
            for (moved, keep) in [
                ("embed", "norm|lm_head"),
                ("norm", "embed|lm_head"),
                ("lm_head", "embed|norm"),
            ] {
                v.push(Method {
                    label: format!("{moved} state-free (ρ=0)"),
                    spec: format!("frugal:density=0,state_full_modules=({keep}),projectable_modules=({PROJECTABLE}|{moved})"),
                });
            }
            v
        }
        other => bail!("unknown --ablation `{other}`; expected projection, state-free or modules"),
    })
}

/// The configurations selected by the flags.
pub fn methods(args: &CompareSettings) -> Result<Vec<Method>> {
    let mut list = match (&args.ablation, &args.methods) {
        (Some(_), Some(_)) => bail!("use either --ablation or --methods"),
        (Some(a), None) => ablation(a)?,
        (None, Some(m)) => m
            .split([';', ' '])
            .filter(|s| !s.is_empty())
            .map(method)
            .collect(),
        (None, None) => PAPER_ROWS.iter().map(|s| method(s)).collect(),
    };
    if let Some(sweep) = &args.sweep {
        let (key, values) = sweep
            .split_once('=')
            .context("--sweep expects key=v1,v2,... (e.g. density=0,0.125,0.25,0.5)")?;
        let mut swept = Vec::new();
        for m in &list {
            if m.spec == "adamw" {
                swept.push(m.clone());
                continue;
            }
            for v in values.split(',') {
                let sep = if m.spec.contains(':') { "," } else { ":" };
                swept.push(method(&format!("{}{sep}{key}={v}", m.spec)));
            }
        }
        list = swept;
    }
    for m in &list {
        frugal::OptimizerConfig::parse_spec(&m.spec)
            .with_context(|| format!("method `{}`", m.spec))?;
    }
    Ok(list)
}

fn slug(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '=' {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .replace("--", "-")
}

/// The outcome of one run.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub method: String,
    pub seed: u64,
    pub dir: PathBuf,
    /// Why the run failed, if it did.
    pub failed: Option<String>,
    pub val_ppl: Option<f64>,
    pub state_bytes: Option<u64>,
    pub training_bytes: Option<u64>,
    pub tokens_per_s: Option<f64>,
    /// Wall time of the run (training, evaluation and checkpoints).
    pub wall_s: Option<f64>,
    /// (tokens, validation perplexity) at each evaluation.
    pub curve: Vec<(f64, f64)>,
}

fn read_result(method: &Method, seed: u64, dir: &Path, tokens_per_step: f64) -> Result<RunResult> {
    let s = Summary::read(dir)?;
    let curve = read_records(&dir.join("metrics.jsonl"))?
        .into_iter()
        .filter_map(|r| match r {
            Record::Eval(e) => Some((e.step as f64 * tokens_per_step, e.val_ppl)),
            Record::Train(_) => None,
        })
        .collect();
    let state = s.optimizer_state_total_bytes as u64;
    Ok(RunResult {
        method: method.label.clone(),
        seed,
        dir: dir.to_path_buf(),
        failed: None,
        val_ppl: Some(s.val_ppl),
        state_bytes: Some(state),
        training_bytes: Some(state + s.parameter_bytes as u64 + s.gradient_bytes as u64),
        tokens_per_s: Some(s.tokens_per_s),
        wall_s: Some(s.wall_s),
        curve,
    })
}

/// Trains one method with one seed (or resumes / reuses its finished run); false if stopped.
fn run_one(
    base: &TrainSettings,
    method: &Method,
    seed: u64,
    dir: &Path,
    cache: &Path,
    stop: &StopToken,
    device: &Device,
) -> Result<bool> {
    let finished = Summary::read(dir).is_ok_and(|s| !s.interrupted);
    if finished {
        eprintln!("== {} (seed {seed}): already finished", method.label);
        return Ok(true);
    }
    let resumable = !checkpoint::list(dir)?.is_empty();
    if !resumable && dir.exists() {
        std::fs::remove_dir_all(dir)?; // started but never checkpointed: start over
    }
    let mut args = base.clone();
    args.opt.optimizer = method.spec.clone();
    args.seed = seed;
    args.out = Some(dir.to_path_buf());
    eprintln!("== {} (seed {seed})", method.label);
    let config = resolve(args)?;
    run::run(config, resumable.then_some(dir), cache, stop, device)?;
    Ok(!stop.is_stopped())
}

/// Mean and half-range of the finished runs' values.
fn mean_spread(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let (lo, hi) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    Some((mean, (hi - lo) / 2.0))
}

/// One table row per method.
#[derive(Serialize)]
struct Row {
    method: String,
    spec: String,
    density: Option<f64>,
    val_ppl_mean: Option<f64>,
    val_ppl_spread: Option<f64>,
    delta_vs_adamw: Option<f64>,
    state_mib: Option<f64>,
    training_mib: Option<f64>,
    tokens_per_s: Option<f64>,
    failed: Vec<String>,
}

const MIB: f64 = 1024.0 * 1024.0;

fn rows(methods: &[Method], results: &[RunResult]) -> Vec<Row> {
    let mut rows: Vec<Row> = methods
        .iter()
        .map(|m| {
            let mine: Vec<&RunResult> = results.iter().filter(|r| r.method == m.label).collect();
            let ok: Vec<&RunResult> = mine
                .iter()
                .copied()
                .filter(|r| r.failed.is_none())
                .collect();
            let ppl = mean_spread(&ok.iter().filter_map(|r| r.val_ppl).collect::<Vec<_>>());
            let avg = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                mean_spread(&ok.iter().filter_map(|r| f(r)).collect::<Vec<_>>()).map(|x| x.0)
            };
            Row {
                method: m.label.clone(),
                spec: m.spec.clone(),
                density: frugal::OptimizerConfig::parse_spec(&m.spec)
                    .ok()
                    .map(|c| c.density),
                val_ppl_mean: ppl.map(|p| p.0),
                val_ppl_spread: ppl.map(|p| p.1),
                delta_vs_adamw: None,
                state_mib: avg(&|r| r.state_bytes.map(|b| b as f64 / MIB)),
                training_mib: avg(&|r| r.training_bytes.map(|b| b as f64 / MIB)),
                tokens_per_s: avg(&|r| r.tokens_per_s),
                failed: mine
                    .iter()
                    .filter_map(|r| r.failed.as_ref().map(|f| format!("seed {}: {f}", r.seed)))
                    .collect(),
            }
        })
        .collect();
    let adamw = rows
        .iter()
        .find(|r| r.spec == "adamw")
        .and_then(|r| r.val_ppl_mean);
    for r in rows.iter_mut() {
        r.delta_vs_adamw = adamw.zip(r.val_ppl_mean).map(|(a, p)| p - a);
    }
    rows
}

fn markdown(rows: &[Row], command: &str, seeds: &[u64], tokens: u64) -> String {
    let f = |x: Option<f64>, p: usize| x.map_or("–".to_string(), |v| format!("{v:.p$}"));
    let mut s = format!(
        "# Comparison\n\nCommand: `{command}`\n\nSeeds: {seeds:?}; {tokens} training tokens per run; same batches in the same order for every method.\n\n\
         | method | ρ | val perplexity (mean ± half-range) | Δ vs AdamW | optimizer state MiB | weights+grads+state MiB | tokens/s |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let ppl = match (r.val_ppl_mean, r.val_ppl_spread) {
            (Some(m), Some(sp)) => format!("{m:.2} ± {sp:.2}"),
            _ => "failed".into(),
        };
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.method,
            f(r.density, 3),
            ppl,
            r.delta_vs_adamw.map_or("–".into(), |d| format!("{d:+.2}")),
            f(r.state_mib, 2),
            f(r.training_mib, 1),
            f(r.tokens_per_s, 0)
        );
    }
    for r in rows.iter().filter(|r| !r.failed.is_empty()) {
        s += &format!("\n- **{}** failed: {}\n", r.method, r.failed.join("; "));
    }
    s
}

fn plot(path: &Path, methods: &[Method], results: &[RunResult], rows: &[Row]) -> Result<()> {
    let curves: Vec<Series> = methods
        .iter()
        .filter_map(|m| {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.method == m.label && r.failed.is_none())
                .collect();
            let first = runs.first()?;
            let points = first
                .curve
                .iter()
                .enumerate()
                .filter(|(_, (tokens, _))| *tokens > 0.0)
                .map(|(i, (tokens, _))| {
                    let vals: Vec<f64> = runs
                        .iter()
                        .filter_map(|r| r.curve.get(i).map(|c| c.1))
                        .collect();
                    (*tokens / 1e6, vals.iter().sum::<f64>() / vals.len() as f64)
                })
                .collect();
            Some(Series {
                name: m.label.clone(),
                points,
            })
        })
        .collect();
    let memory: Vec<Series> = rows
        .iter()
        .filter_map(|r| {
            Some(Series {
                name: r.method.clone(),
                points: vec![(r.state_mib?, r.val_ppl_mean?)],
            })
        })
        .collect();
    write_png(
        path,
        &[
            Panel {
                title: "validation perplexity",
                x_label: "training tokens (millions)",
                y_label: "perplexity",
                series: &curves,
                log_y: true,
            },
            Panel {
                title: "perplexity vs optimizer state",
                x_label: "optimizer state (MiB)",
                y_label: "final perplexity",
                series: &memory,
                log_y: false,
            },
        ],
    )
}

/// Runs the comparison on `device` into the output directory and writes the report; stops
/// (resumably) when `stop` is set.
pub fn run(
    args: CompareSettings,
    cache: &Path,
    command: &str,
    stop: &StopToken,
    device: &Device,
) -> Result<()> {
    let methods = methods(&args)?;
    let seeds: Vec<u64> = args
        .seeds
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("--seeds: `{s}` is not a number"))
        })
        .collect::<Result<_>>()?;
    let out = args
        .train
        .resume
        .clone()
        .or(args.train.out.clone())
        .unwrap_or_else(|| PathBuf::from("runs/compare"));
    if args.train.resume.is_none() && out.join("compare.json").exists() {
        bail!(
            "{} already holds a comparison; use --resume {} to continue it or choose another --out",
            out.display(),
            out.display()
        );
    }
    std::fs::create_dir_all(&out)?;
    let mut base = args.train.clone();
    base.resume = None;
    if base.eval_every.is_none() {
        base.eval_every = Some((base.steps / 10).max(1));
    }
    let resolved = resolve({
        let mut a = base.clone();
        a.opt.optimizer = methods[0].spec.clone();
        a
    })?;
    let tokens_per_step = resolved.tokens_per_step as f64;
    let started = std::time::Instant::now();
    let mut results = Vec::new();
    'outer: for m in &methods {
        for &seed in &seeds {
            let dir = out
                .join("runs")
                .join(format!("{}-seed{seed}", slug(&m.label)));
            match run_one(&base, m, seed, &dir, cache, stop, device) {
                Ok(true) => results.push(read_result(m, seed, &dir, tokens_per_step)?),
                Ok(false) => {
                    eprintln!("interrupted; continue with `frugal compare --resume {}` and the same flags", out.display());
                    break 'outer;
                }
                Err(e) => {
                    eprintln!("== {} (seed {seed}) failed: {e:#}", m.label);
                    results.push(RunResult {
                        method: m.label.clone(),
                        seed,
                        dir: dir.clone(),
                        failed: Some(format!("{e:#}")),
                        val_ppl: None,
                        state_bytes: None,
                        training_bytes: None,
                        tokens_per_s: None,
                        wall_s: None,
                        curve: Vec::new(),
                    });
                }
            }
        }
    }
    let table = rows(&methods, &results);
    let tokens = (resolved.tokens_per_step * base.steps) as u64;
    let runs_wall_s: f64 = results.iter().filter_map(|r| r.wall_s).sum();
    let md = markdown(&table, command, &seeds, tokens)
        + &format!("\nTotal wall time of the runs: {runs_wall_s:.0} s.\n");
    frugal::fs::write_atomically(&out.join("compare.md"), md.as_bytes())?;
    let json = serde_json::json!({"command": command, "seeds": seeds, "tokens_per_run": tokens, "methods": methods, "rows": table, "runs": results, "runs_wall_s": runs_wall_s});
    frugal::fs::write_atomically(
        &out.join("compare.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    plot(&out.join("compare.png"), &methods, &results, &table)?;
    println!("{md}");
    eprintln!(
        "comparison written to {} in {:.0}s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
