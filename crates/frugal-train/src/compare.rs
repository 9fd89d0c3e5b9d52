//! `frugal compare`: train several optimizer configurations on the same model, data, token
//! budget and seeds (same batches in the same order), then tabulate and plot the results.

use crate::checkpoint;
use crate::metrics::{read_records, Record, Summary};
use crate::plot::{write_png, Panel, Series};
use crate::run::{self, resolve};
use crate::settings::TrainSettings;
use crate::trainer::StopToken;
use crate::tune::{self, Grid, Rung};
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
    /// Tune a setting for every method (repeatable), e.g. `--tune lr=1e-3,3e-3,1e-2 --tune
    /// proj_lr_scale=0.25,1`: the grid's candidates are picked on the validation split (first
    /// seed) and the table reports the winners on the test split (needs --test-fraction).
    #[cfg_attr(feature = "cli", arg(long, value_name = "KEY=V1,V2,..."))]
    pub tune: Vec<String>,
    /// Successive halving while tuning: each round keeps the best 1/N of the candidates for an
    /// N times longer prefix of the schedule (1: every candidate runs in full).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 3))]
    pub halving_rate: usize,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub train: TrainSettings,
}

/// One configuration to compare.
#[derive(Clone, Debug, Serialize)]
pub struct Method {
    pub label: String,
    /// Optimizer spec: `preset[:key=value,...]`.
    pub spec: String,
    /// The tuned values the spec ends with, e.g. `lr=0.003 proj_lr_scale=0.25`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuned: Option<String>,
}

fn method(spec: &str) -> Method {
    let label = spec.replacen(':', " ", 1).replace(',', " ");
    Method {
        label,
        spec: spec.to_string(),
        tuned: None,
    }
}

/// `spec` with more `key=value` settings.
fn with_settings(spec: &str, pairs: &[(String, String)]) -> String {
    let mut s = spec.to_string();
    for (k, v) in pairs {
        s += if s.contains(':') { "," } else { ":" };
        s += &format!("{k}={v}");
    }
    s
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
                swept.push(method(&with_settings(
                    &m.spec,
                    &[(key.to_string(), v.to_string())],
                )));
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
    /// Perplexity on the test split (runs that hold one out).
    pub test_ppl: Option<f64>,
    pub state_bytes: Option<u64>,
    pub training_bytes: Option<u64>,
    pub tokens_per_s: Option<f64>,
    /// Wall time of the run (training, evaluation and checkpoints).
    pub wall_s: Option<f64>,
    /// (tokens, validation perplexity) at each evaluation.
    pub curve: Vec<(f64, f64)>,
}

impl RunResult {
    fn failed(method: &str, seed: u64, dir: &Path, why: String) -> Self {
        RunResult {
            method: method.to_string(),
            seed,
            dir: dir.to_path_buf(),
            failed: Some(why),
            val_ppl: None,
            test_ppl: None,
            state_bytes: None,
            training_bytes: None,
            tokens_per_s: None,
            wall_s: None,
            curve: Vec::new(),
        }
    }
}

fn read_result(method: &str, seed: u64, dir: &Path, tokens_per_step: f64) -> Result<RunResult> {
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
        method: method.to_string(),
        seed,
        dir: dir.to_path_buf(),
        failed: None,
        val_ppl: Some(s.val_ppl),
        test_ppl: s.test_ppl,
        state_bytes: Some(state),
        training_bytes: Some(state + s.parameter_bytes as u64 + s.gradient_bytes as u64),
        tokens_per_s: Some(s.tokens_per_s),
        wall_s: Some(s.wall_s),
        curve,
    })
}

/// What every run of a comparison shares.
struct Comparison<'a> {
    base: &'a TrainSettings,
    out: &'a Path,
    cache: &'a Path,
    stop: &'a StopToken,
    device: &'a Device,
    tokens_per_step: f64,
}

/// The outcome of asking for a run: its result, or `None` if the comparison was stopped.
type Ran = Option<RunResult>;

impl Comparison<'_> {
    fn dir(&self, run: &Method, seed: u64) -> PathBuf {
        self.out
            .join("runs")
            .join(format!("{}-seed{seed}", slug(&run.label)))
    }

    /// Trains `run` with `seed` up to step `until` (the whole run when `None`), resuming or
    /// reusing what an earlier call left in its directory; the result is filed under `row`.
    fn run(&self, row: &str, run: &Method, seed: u64, until: Option<usize>) -> Result<Ran> {
        let dir = self.dir(run, seed);
        match self.train(run, seed, until, &dir) {
            Ok(true) => Ok(Some(read_result(row, seed, &dir, self.tokens_per_step)?)),
            Ok(false) => Ok(None),
            Err(e) => {
                eprintln!("== {} (seed {seed}) failed: {e:#}", run.label);
                Ok(Some(RunResult::failed(row, seed, &dir, format!("{e:#}"))))
            }
        }
    }

    /// False if stopped.
    fn train(&self, method: &Method, seed: u64, until: Option<usize>, dir: &Path) -> Result<bool> {
        let target = until.unwrap_or(self.base.steps);
        let reached = Summary::read(dir)
            .is_ok_and(|s| s.steps >= target && (s.steps < self.base.steps || !s.interrupted));
        if reached {
            eprintln!(
                "== {} (seed {seed}): step {target} already reached",
                method.label
            );
            return Ok(true);
        }
        let resumable = !checkpoint::list(dir)?.is_empty();
        if !resumable && dir.exists() {
            std::fs::remove_dir_all(dir)?; // started but never checkpointed: start over
        }
        let mut args = self.base.clone();
        args.opt.optimizer = method.spec.clone();
        args.seed = seed;
        args.out = Some(dir.to_path_buf());
        args.stop_after = until;
        eprintln!(
            "== {} (seed {seed}){}",
            method.label,
            until.map(|k| format!(", to step {k}")).unwrap_or_default()
        );
        let config = resolve(args)?;
        run::run(
            config,
            resumable.then_some(dir),
            self.cache,
            self.stop,
            self.device,
        )?;
        Ok(!self.stop.is_stopped())
    }

    /// Successive halving over `grid` for `method` with `seed`: the winner (its spec and values)
    /// and every candidate's validation perplexity per round; `None` if stopped.
    fn tune(
        &self,
        method: &Method,
        grid: &Grid,
        rate: usize,
        seed: u64,
    ) -> Result<Option<(Method, Tuning)>> {
        let candidates: Vec<Method> = grid
            .points()
            .iter()
            .map(|point| {
                let values = point
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                Method {
                    label: format!("{} {values}", method.label),
                    spec: with_settings(&method.spec, point),
                    tuned: Some(values),
                }
            })
            .collect();
        let rungs = tune::rungs(candidates.len(), self.base.steps, rate)?;
        let mut scores: Vec<Vec<Option<f64>>> = vec![Vec::new(); candidates.len()];
        let mut failures: Vec<Option<String>> = vec![None; candidates.len()];
        let mut alive: Vec<usize> = (0..candidates.len()).collect();
        for (j, rung) in rungs.iter().enumerate() {
            let until = (rung.steps < self.base.steps).then_some(rung.steps);
            for &i in &alive {
                let Some(r) = self.run(&method.label, &candidates[i], seed, until)? else {
                    return Ok(None);
                };
                // The evaluation at this round's step (a resumed comparison may find the run
                // already further along).
                let at = rung.steps as f64 * self.tokens_per_step;
                let score = r
                    .curve
                    .iter()
                    .find(|(tokens, _)| *tokens == at)
                    .map(|c| c.1);
                scores[i].push(score.or(r.val_ppl).filter(|_| r.failed.is_none()));
                if r.failed.is_some() {
                    failures[i] = r.failed;
                }
            }
            let keep = rungs.get(j + 1).map_or(1, |next| next.candidates);
            let round: Vec<Option<f64>> = alive.iter().map(|&i| scores[i][j]).collect();
            alive = tune::best(&round, keep)
                .into_iter()
                .map(|k| alive[k])
                .collect();
        }
        let winner = alive[0];
        let tuning = Tuning {
            method: method.label.clone(),
            seed,
            rungs,
            candidates: candidates
                .iter()
                .zip(scores)
                .zip(failures)
                .map(|((c, val_ppl), failed)| Candidate {
                    values: c.tuned.clone().unwrap_or_default(),
                    spec: c.spec.clone(),
                    dir: self.dir(c, seed),
                    val_ppl,
                    failed,
                })
                .collect(),
            chosen: winner,
        };
        Ok(Some((candidates[winner].clone(), tuning)))
    }
}

/// One method's tuning: the rounds and every candidate's validation perplexity in each round
/// it reached.
#[derive(Clone, Debug, Serialize)]
pub struct Tuning {
    pub method: String,
    pub seed: u64,
    pub rungs: Vec<Rung>,
    pub candidates: Vec<Candidate>,
    /// Index of the chosen candidate.
    pub chosen: usize,
}

/// A point of a tuning grid and how it fared.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub values: String,
    pub spec: String,
    pub dir: PathBuf,
    pub val_ppl: Vec<Option<f64>>,
    pub failed: Option<String>,
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
            let mine: Vec<&RunResult> = results.iter().filter(|r| r.method == m.label).collect();
            let ok: Vec<&RunResult> = mine
                .iter()
                .copied()
                .filter(|r| r.failed.is_none())
                .collect();
            let spread = |f: &dyn Fn(&RunResult) -> Option<f64>| {
                mean_spread(&ok.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            let avg = |f: &dyn Fn(&RunResult) -> Option<f64>| spread(f).map(|x| x.0);
            let val = spread(&|r| r.val_ppl);
            let test = spread(&|r| r.test_ppl);
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
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    let mut s = format!(
        "# Comparison\n\nCommand: `{command}`\n\nSeeds: {seeds:?}; {tokens} training tokens per run; same batches in the same order for every method.\n\n"
    );
    s += &line(&columns.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    s += &line(&vec!["---".to_string(); columns.len()]);
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
        s += &line(&cells);
    }
    for r in rows.iter().filter(|r| !r.failed.is_empty()) {
        s += &format!("\n- **{}** failed: {}\n", r.method, r.failed.join("; "));
    }
    s
}

/// The tuning rounds of every method: validation perplexity of each candidate per round.
fn tuning_markdown(tunings: &[Tuning], rate: usize) -> String {
    let Some(first) = tunings.first() else {
        return String::new();
    };
    let mut s = format!(
        "\n## Tuning (seed {}, successive halving at rate {rate}: validation perplexity after each round)\n\n| method | candidate |",
        first.seed
    );
    for r in &first.rungs {
        s += &format!(
            " step {} ({} run{}) |",
            r.steps,
            r.candidates,
            if r.candidates == 1 { "" } else { "s" }
        );
    }
    s += &format!("\n|---|---|{}\n", "---|".repeat(first.rungs.len()));
    for t in tunings {
        for (i, c) in t.candidates.iter().enumerate() {
            let mark = if i == t.chosen { "**" } else { "" };
            s += &format!("| {} | {mark}{}{mark} |", t.method, c.values);
            for j in 0..t.rungs.len() {
                s += &match c.val_ppl.get(j) {
                    Some(Some(p)) => format!(" {p:.2} |"),
                    Some(None) => " failed |".into(),
                    None => " |".into(),
                };
            }
            s += "\n";
        }
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
    let grid = Grid::parse(&args.tune)?;
    if !grid.is_empty() {
        if args.train.test_fraction == 0.0 {
            bail!("--tune picks settings on the validation split, so the table needs a separate test split: add --test-fraction (e.g. 0.05)");
        }
        if grid.tunes("lr") && args.train.lr.is_some() {
            bail!("--lr fixes the rate that --tune lr=... varies; give only one of them");
        }
        for m in &methods {
            for point in grid.points() {
                let spec = with_settings(&m.spec, &point);
                frugal::OptimizerConfig::parse_spec(&spec)
                    .with_context(|| format!("--tune on method `{}`", m.spec))?;
            }
        }
        tune::rungs(grid.points().len(), args.train.steps, args.halving_rate)?;
    }
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
    let cx = Comparison {
        base: &base,
        out: &out,
        cache,
        stop,
        device,
        tokens_per_step: resolved.tokens_per_step as f64,
    };
    let started = std::time::Instant::now();
    let mut results = Vec::new();
    let mut tunings = Vec::new();
    // The rows: each method, with its tuned spec once chosen.
    let mut chosen: Vec<Method> = methods.clone();
    'outer: for (m, row) in methods.iter().zip(chosen.iter_mut()) {
        // The runs are named after the candidate when tuned, so the winner's run is reused.
        let mut run = m.clone();
        if !grid.is_empty() {
            let Some((winner, tuning)) = cx.tune(m, &grid, args.halving_rate, seeds[0])? else {
                break 'outer;
            };
            row.spec = winner.spec.clone();
            row.tuned = winner.tuned.clone();
            run = winner;
            tunings.push(tuning);
        }
        for &seed in &seeds {
            match cx.run(&m.label, &run, seed, None)? {
                Some(r) => results.push(r),
                None => break 'outer,
            }
        }
    }
    if stop.is_stopped() {
        eprintln!(
            "interrupted; continue with `frugal compare --resume {}` and the same flags",
            out.display()
        );
    }
    let table = rows(&chosen, &results);
    let tokens = (resolved.tokens_per_step * base.steps) as u64;
    // Every run directory once (a tuned winner's first seed is one of its candidates).
    let mut dirs: Vec<PathBuf> = results.iter().map(|r| r.dir.clone()).collect();
    dirs.extend(
        tunings
            .iter()
            .flat_map(|t| t.candidates.iter().map(|c| c.dir.clone())),
    );
    dirs.sort();
    dirs.dedup();
    let runs_wall_s: f64 = dirs
        .iter()
        .filter_map(|d| Summary::read(d).ok().map(|s| s.wall_s))
        .sum();
    let md = markdown(&table, command, &seeds, tokens)
        + &tuning_markdown(&tunings, args.halving_rate)
        + &format!(
            "\nTotal wall time of the {} runs: {runs_wall_s:.0} s.\n",
            dirs.len()
        );
    frugal::fs::write_atomically(&out.join("compare.md"), md.as_bytes())?;
    let json = serde_json::json!({"command": command, "seeds": seeds, "tokens_per_run": tokens, "methods": chosen, "rows": table, "tuning": tunings, "runs": results, "runs_wall_s": runs_wall_s});
    frugal::fs::write_atomically(
        &out.join("compare.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    plot(&out.join("compare.png"), &chosen, &results, &table)?;
    println!("{md}");
    eprintln!(
        "comparison written to {} in {:.0}s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
