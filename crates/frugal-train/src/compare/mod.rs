//! `frugal compare`: train several optimizer configurations on the same model, data, token
//! budget and seeds (same batches in the same order), then tabulate and plot the results.
//!
//! - [`runner`]: what every comparison shares: run directories, resuming, tuning.
//! - [`finetune`]: the comparison of fine-tuning methods on a classification task.

pub mod finetune;
pub mod runner;

use crate::data_parallel::DataParallel;
use crate::metrics::{read_records, Record, Summary};
use crate::plot::{write_png, Panel, Series};
use crate::run::{self, resolve};
use crate::settings::TrainSettings;
use crate::trainer::StopToken;
use crate::tune::Grid;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use runner::{with_settings, Curve, Job, Method, MethodRuns, Progress, Runner};
use serde::Serialize;
use std::path::Path;

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
    /// Tune a setting for every method (repeatable), e.g. `--tune lr=1e-3,3e-3,1e-2 --tune
    /// proj_lr_scale=0.25,1`, or for the methods of one name (`--tune galore:lr=1e-2,3e-2`,
    /// in place of the shared values): the grid's candidates are picked on the validation split
    /// (first seed) and the table reports the winners on the test split (needs
    /// --test-fraction).
    #[cfg_attr(feature = "cli", arg(long, value_name = "KEY=V1,V2,..."))]
    pub tune: Vec<String>,
    /// Successive halving while tuning: each round keeps the best 1/N of the candidates for an
    /// N times longer prefix of the schedule (1: every candidate runs in full).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 3))]
    pub halving_rate: usize,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub train: TrainSettings,
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
            .map(|p| Method::of(&format!("frugal:projection={p}")))
            .collect(),
        "state-free" => ["signsgd", "sgd", "none"]
            .iter()
            .map(|r| Method::of(&format!("frugal:state_free={r}")))
            .collect(),
        "modules" => {
            // ρ = 0: every projectable tensor is state-free, so moving one always-state-full module
            // into the projectable set takes Adam away from it entirely (the paper's ablation).
            let mut v = vec![Method {
                label: "embeddings, norms, logits state-full (ρ=0)".into(),
                spec: "frugal:density=0".into(),
                tuned: None,
            }];
            for (moved, keep) in [
                ("embed", "norm|lm_head"),
                ("norm", "embed|lm_head"),
                ("lm_head", "embed|norm"),
            ] {
                v.push(Method {
                    label: format!("{moved} state-free (ρ=0)"),
                    spec: format!("frugal:density=0,state_full_modules=({keep}),projectable_modules=({PROJECTABLE}|{moved})"),
                    tuned: None,
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
        (None, Some(m)) => runner::parse_methods(m),
        (None, None) => PAPER_ROWS.iter().map(|s| Method::of(s)).collect(),
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
                swept.push(Method::of(&with_settings(
                    &m.spec,
                    &[(key.to_string(), v.to_string())],
                )));
            }
        }
        list = swept;
    }
    for m in &list {
        crate::settings::check_optimizer_spec(&m.spec)
            .with_context(|| format!("method `{}`", m.spec))?;
    }
    Ok(list)
}

/// The figures of a finished pre-training run.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub val_ppl: f64,
    /// Perplexity on the test split (runs that hold one out).
    pub test_ppl: Option<f64>,
    pub state_bytes: u64,
    pub training_bytes: u64,
    pub tokens_per_s: f64,
    /// Wall time of the run (training, evaluation and checkpoints).
    pub wall_s: f64,
}

/// The outcome of one pre-training run.
pub type RunResult = runner::Outcome<Figures>;

/// Pre-training runs of a comparison: the shared settings with each method's optimizer.
struct Pretraining<'a> {
    base: &'a TrainSettings,
    cache: &'a Path,
    stop: &'a StopToken,
    device: &'a Device,
    parallel: &'a DataParallel,
}

impl Job for Pretraining<'_> {
    type Figures = Figures;
    const SCORE: &'static str = "validation perplexity";
    const LOWER_IS_BETTER: bool = true;

    fn steps(&self) -> usize {
        self.base.steps
    }

    fn progress(&self, dir: &Path) -> Option<Progress> {
        Summary::read(dir).ok().map(|s| Progress {
            steps: s.steps,
            interrupted: s.interrupted,
            wall_s: s.wall_s,
        })
    }

    fn train(
        &self,
        method: &Method,
        seed: u64,
        until: Option<usize>,
        dir: &Path,
        resume: bool,
    ) -> Result<()> {
        let mut args = self.base.clone();
        args.opt.optimizer = method.spec.clone();
        args.seed = seed;
        args.out = Some(dir.to_path_buf());
        args.stop_after = until;
        let config = resolve(args)?;
        run::run(
            config,
            resume.then_some(dir),
            self.cache,
            self.stop,
            self.device,
            self.parallel,
        )?;
        Ok(())
    }

    fn read(&self, dir: &Path) -> Result<(Figures, Curve)> {
        let s = Summary::read(dir)?;
        let curve = read_records(&dir.join("metrics.jsonl"))?
            .into_iter()
            .filter_map(|r| match r {
                Record::Eval(e) => Some((e.step as f64, e.val_ppl)),
                Record::Train(_) => None,
            })
            .collect();
        let state = s.optimizer_state_total_bytes as u64;
        let figures = Figures {
            val_ppl: s.val_ppl,
            test_ppl: s.test_ppl,
            state_bytes: state,
            training_bytes: state + s.parameter_bytes as u64 + s.gradient_bytes as u64,
            tokens_per_s: s.tokens_per_s,
            wall_s: s.wall_s,
        };
        Ok((figures, curve))
    }

    fn final_score(figures: &Figures) -> Option<f64> {
        Some(figures.val_ppl)
    }
}

/// One table row per method.
#[derive(Serialize)]
struct Row {
    method: String,
    spec: String,
    /// The tuned values of the spec, when tuned.
    tuned: Option<String>,
    density: Option<f64>,
    val_ppl_mean: Option<f64>,
    val_ppl_spread: Option<f64>,
    test_ppl_mean: Option<f64>,
    test_ppl_spread: Option<f64>,
    /// Against the first AdamW row: on the test split when there is one, else on validation.
    delta_vs_adamw: Option<f64>,
    state_mib: Option<f64>,
    training_mib: Option<f64>,
    tokens_per_s: Option<f64>,
    failed: Vec<String>,
}

impl Row {
    /// The perplexity the table ranks by: test when held out, else validation.
    fn score(&self) -> Option<f64> {
        self.test_ppl_mean.or(self.val_ppl_mean)
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn rows(methods: &[Method], results: &[RunResult]) -> Vec<Row> {
    let mut rows: Vec<Row> = methods
        .iter()
        .map(|m| {
            let runs = MethodRuns::of(results, &m.label);
            let val = runs.spread(|r| Some(r.val_ppl));
            let test = runs.spread(|r| r.test_ppl);
            Row {
                method: m.label.clone(),
                spec: m.spec.clone(),
                tuned: m.tuned.clone(),
                density: frugal::OptimizerConfig::parse_spec(&m.spec)
                    .ok()
                    .map(|c| c.density),
                val_ppl_mean: val.map(|p| p.0),
                val_ppl_spread: val.map(|p| p.1),
                test_ppl_mean: test.map(|p| p.0),
                test_ppl_spread: test.map(|p| p.1),
                delta_vs_adamw: None,
                state_mib: runs.mean(|r| Some(r.state_bytes as f64 / MIB)),
                training_mib: runs.mean(|r| Some(r.training_bytes as f64 / MIB)),
                tokens_per_s: runs.mean(|r| Some(r.tokens_per_s)),
                failed: runs.failures(),
            }
        })
        .collect();
    let is_adamw =
        |r: &Row| frugal::OptimizerConfig::parse_spec(&r.spec).is_ok_and(|c| c.preset == "adamw");
    let adamw = rows.iter().find(|r| is_adamw(r)).and_then(Row::score);
    for r in rows.iter_mut() {
        r.delta_vs_adamw = adamw.zip(r.score()).map(|(a, p)| p - a);
    }
    rows
}

/// `mean ± half-range`, or `failed`.
fn with_spread(mean: Option<f64>, spread: Option<f64>) -> String {
    match (mean, spread) {
        (Some(m), Some(sp)) => format!("{m:.2} ± {sp:.2}"),
        _ => "failed".into(),
    }
}

fn markdown(rows: &[Row], command: &str, seeds: &[u64], tokens: u64) -> String {
    let f = |x: Option<f64>, p: usize| x.map_or("–".to_string(), |v| format!("{v:.p$}"));
    let tuned = rows.iter().any(|r| r.tuned.is_some());
    let test = rows.iter().any(|r| r.test_ppl_mean.is_some());
    let mut columns = vec!["method"];
    if tuned {
        columns.push("tuned");
    }
    columns.extend(["ρ", "val perplexity (mean ± half-range)"]);
    if test {
        columns.push("test perplexity");
    }
    columns.extend([
        "Δ vs AdamW",
        "optimizer state MiB",
        "weights+grads+state MiB",
        "tokens/s",
    ]);
    let mut s = format!(
        "# Comparison\n\nCommand: `{command}`\n\nSeeds: {seeds:?}; {tokens} training tokens per run; same batches in the same order for every method.\n\n"
    );
    let mut cells_of = Vec::new();
    for r in rows {
        let mut cells = vec![r.method.clone()];
        if tuned {
            cells.push(r.tuned.clone().unwrap_or_else(|| "–".into()));
        }
        cells.extend([
            f(r.density, 3),
            with_spread(r.val_ppl_mean, r.val_ppl_spread),
        ]);
        if test {
            cells.push(with_spread(r.test_ppl_mean, r.test_ppl_spread));
        }
        cells.extend([
            r.delta_vs_adamw.map_or("–".into(), |d| format!("{d:+.2}")),
            f(r.state_mib, 2),
            f(r.training_mib, 1),
            f(r.tokens_per_s, 0),
        ]);
        cells_of.push(cells);
    }
    s += &runner::table(&columns, &cells_of);
    for r in rows.iter().filter(|r| !r.failed.is_empty()) {
        s += &format!("\n- **{}** failed: {}\n", r.method, r.failed.join("; "));
    }
    s
}

fn plot(
    path: &Path,
    methods: &[Method],
    results: &[RunResult],
    rows: &[Row],
    tokens_per_step: f64,
) -> Result<()> {
    let curves = runner::curves(methods, results, tokens_per_step / 1e6);
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
    parallel: &DataParallel,
) -> Result<()> {
    let methods = methods(&args)?;
    let seeds = runner::parse_seeds(&args.seeds)?;
    let grid = Grid::parse(&args.tune)?;
    if !grid.is_empty() {
        if args.train.test_fraction == 0.0 {
            bail!("--tune picks settings on the validation split, so the table needs a separate test split: add --test-fraction (e.g. 0.05)");
        }
        if grid.tunes("lr") && args.train.lr.is_some() {
            bail!("--lr fixes the rate that --tune lr=... varies; give only one of them");
        }
        runner::check_grid(
            &grid,
            &methods,
            args.train.steps,
            args.halving_rate,
            crate::settings::check_optimizer_spec,
        )?;
    }
    let out = parallel.on_lead(|| {
        runner::open_out(
            args.train.resume.as_deref(),
            args.train.out.as_deref(),
            "runs/compare",
        )
    })?;
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
    let job = Pretraining {
        base: &base,
        cache,
        stop,
        device,
        parallel,
    };
    let started = std::time::Instant::now();
    let runner = Runner {
        job: &job,
        out: &out,
        stop,
        parallel,
    };
    let compared = runner.run_all(&methods, &seeds, &grid, args.halving_rate)?;
    if parallel.rank() != 0 {
        return Ok(());
    }
    let table = rows(&compared.methods, &compared.results);
    let tokens_per_step = resolved.tokens_per_step * parallel.world_size();
    let tokens = (tokens_per_step * base.steps) as u64;
    plot(
        &out.join("compare.png"),
        &compared.methods,
        &compared.results,
        &table,
        tokens_per_step as f64,
    )?;
    let json = serde_json::json!({"command": command, "seeds": seeds, "tokens_per_run": tokens, "rows": table});
    runner.report(
        &compared,
        markdown(&table, command, &seeds, tokens),
        json,
        args.halving_rate,
        2,
        started,
    )?;
    Ok(())
}
