//! `frugal compare finetune`: fine-tune the same pretrained encoder on the same task with
//! several methods and seeds (same splits, same batches in the same order), then tabulate test
//! accuracy and macro-F1 against trainable parameters and optimizer memory.

use super::runner::{self, Curve, Job, Method, MethodRuns, Outcome, Progress, Runner};
use crate::data_parallel::DataParallel;
use crate::finetune::run::{resolve, run, FinetuneSettings, FinetuneSummary};
use crate::finetune::scores::Scores;
use crate::metrics::{read_records, read_summary, Record};
use crate::plot::{write_png, Panel, Series};
use crate::trainer::StopToken;
use crate::tune::Grid;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;
use std::path::Path;

/// What to compare: the fine-tuning settings shared by every run, and the methods.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct FinetuneCompareSettings {
    /// Fine-tuning methods (see `frugal finetune --method`), separated by spaces or `;`.
    #[cfg_attr(
        feature = "cli",
        arg(long, default_value = "adamw galore lora frugal-ft frugal-ft:rank=0")
    )]
    pub methods: String,
    /// Seeds, comma-separated; every method runs once per seed.
    #[cfg_attr(feature = "cli", arg(long, default_value = "0,1,2"))]
    pub seeds: String,
    /// Tune a setting for every method (repeatable), e.g. `--tune lr=1e-4,1e-3`, or for the
    /// methods of one name (`--tune lora:lr=1e-3,3e-3`, in place of the shared values):
    /// candidates are ranked by validation macro-F1 (first seed); the table reports the test
    /// split.
    #[cfg_attr(feature = "cli", arg(long, value_name = "KEY=V1,V2,..."))]
    pub tune: Vec<String>,
    /// Successive halving while tuning: each round keeps the best 1/N of the candidates for an
    /// N times longer prefix of the schedule (1: every candidate runs in full).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 3))]
    pub halving_rate: usize,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub finetune: FinetuneSettings,
}

/// The figures of a finished fine-tuning run.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub val: Scores,
    pub test: Option<Scores>,
    pub trainable_parameters: usize,
    pub state_bytes: u64,
    pub examples_per_s: f64,
    pub peak_rss_bytes: u64,
    pub wall_s: f64,
}

/// The outcome of one fine-tuning run.
pub type FinetuneResult = Outcome<Figures>;

/// Fine-tuning runs of a comparison: the shared settings with each method.
struct Finetuning<'a> {
    base: &'a FinetuneSettings,
    stop: &'a StopToken,
    device: &'a Device,
}

fn summary(dir: &Path) -> Result<FinetuneSummary> {
    read_summary(dir)
}

impl Job for Finetuning<'_> {
    type Figures = Figures;
    const SCORE: &'static str = "validation macro-F1";
    const LOWER_IS_BETTER: bool = false;

    fn steps(&self) -> usize {
        self.base.steps
    }

    fn progress(&self, dir: &Path) -> Option<Progress> {
        summary(dir).ok().map(|s| Progress {
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
        args.method = method.spec.clone();
        args.seed = seed;
        args.out = Some(dir.to_path_buf());
        args.stop_after = until;
        run(
            resolve(args)?,
            resume.then_some(dir),
            self.stop,
            self.device,
            &DataParallel::default(),
        )?;
        Ok(())
    }

    fn read(&self, dir: &Path) -> Result<(Figures, Curve)> {
        let s = summary(dir)?;
        let curve = read_records(&dir.join("metrics.jsonl"))?
            .into_iter()
            .filter_map(|r| match r {
                Record::Eval(e) => e.macro_f1.map(|f| (e.step as f64, f)),
                Record::Train(_) => None,
            })
            .collect();
        let figures = Figures {
            val: s.val,
            test: s.test,
            trainable_parameters: s.trainable_parameters,
            state_bytes: s.optimizer_state_total_bytes as u64,
            examples_per_s: s.examples_per_s,
            peak_rss_bytes: s.peak_rss_bytes,
            wall_s: s.wall_s,
        };
        Ok((figures, curve))
    }

    fn final_score(figures: &Figures) -> Option<f64> {
        Some(figures.val.macro_f1)
    }
}

/// One table row per method.
#[derive(Serialize)]
struct Row {
    method: String,
    spec: String,
    tuned: Option<String>,
    trainable_parameters: Option<usize>,
    state_mib: Option<f64>,
    val_accuracy: Option<f64>,
    test_accuracy_mean: Option<f64>,
    test_accuracy_spread: Option<f64>,
    test_macro_f1_mean: Option<f64>,
    test_macro_f1_spread: Option<f64>,
    examples_per_s: Option<f64>,
    peak_rss_mib: Option<f64>,
    failed: Vec<String>,
}

const MIB: f64 = 1024.0 * 1024.0;

fn rows(methods: &[Method], results: &[FinetuneResult]) -> Vec<Row> {
    methods
        .iter()
        .map(|m| {
            let runs = MethodRuns::of(results, &m.label);
            let accuracy = runs.spread(|r| r.test.map(|t| t.accuracy));
            let f1 = runs.spread(|r| r.test.map(|t| t.macro_f1));
            Row {
                method: m.label.clone(),
                spec: m.spec.clone(),
                tuned: m.tuned.clone(),
                trainable_parameters: runs.ok.first().map(|r| r.trainable_parameters),
                state_mib: runs.mean(|r| Some(r.state_bytes as f64 / MIB)),
                val_accuracy: runs.mean(|r| Some(r.val.accuracy)),
                test_accuracy_mean: accuracy.map(|p| p.0),
                test_accuracy_spread: accuracy.map(|p| p.1),
                test_macro_f1_mean: f1.map(|p| p.0),
                test_macro_f1_spread: f1.map(|p| p.1),
                examples_per_s: runs.mean(|r| Some(r.examples_per_s)),
                peak_rss_mib: runs.mean(|r| Some(r.peak_rss_bytes as f64 / MIB)),
                failed: runs.failures(),
            }
        })
        .collect()
}

fn markdown(rows: &[Row], command: &str, seeds: &[u64], base: &FinetuneSettings) -> String {
    let f = |x: Option<f64>, p: usize| x.map_or("–".to_string(), |v| format!("{v:.p$}"));
    let pm = |m: Option<f64>, s: Option<f64>| match (m, s) {
        (Some(m), Some(s)) => format!("{m:.3} ± {s:.3}"),
        _ => "failed".into(),
    };
    let tuned = rows.iter().any(|r| r.tuned.is_some());
    let mut columns = vec!["method"];
    if tuned {
        columns.push("tuned");
    }
    columns.extend([
        "trainable parameters",
        "optimizer state MiB",
        "val accuracy",
        "test accuracy (mean ± half-range)",
        "test macro-F1",
        "examples/s",
        "peak RSS MiB",
    ]);
    let mut s = format!(
        "# Fine-tuning comparison\n\nCommand: `{command}`\n\nSeeds: {seeds:?}; {} steps of {} examples per run; same splits and batches in the same order for every method.\n\n",
        base.steps,
        base.batch_size * base.grad_accum
    );
    let mut cells_of = Vec::new();
    for r in rows {
        let mut cells = vec![r.method.clone()];
        if tuned {
            cells.push(r.tuned.clone().unwrap_or_else(|| "–".into()));
        }
        cells.extend([
            r.trainable_parameters
                .map_or("–".into(), |p| format!("{:.2}M", p as f64 / 1e6)),
            f(r.state_mib, 2),
            f(r.val_accuracy, 3),
            pm(r.test_accuracy_mean, r.test_accuracy_spread),
            pm(r.test_macro_f1_mean, r.test_macro_f1_spread),
            f(r.examples_per_s, 1),
            f(r.peak_rss_mib, 0),
        ]);
        cells_of.push(cells);
    }
    s += &runner::table(&columns, &cells_of);
    for r in rows.iter().filter(|r| !r.failed.is_empty()) {
        s += &format!("\n- **{}** failed: {}\n", r.method, r.failed.join("; "));
    }
    s
}

fn plot(path: &Path, methods: &[Method], results: &[FinetuneResult], rows: &[Row]) -> Result<()> {
    let curves = runner::curves(methods, results, 1.0);
    let memory: Vec<Series> = rows
        .iter()
        .filter_map(|r| {
            Some(Series {
                name: r.method.clone(),
                points: vec![(r.state_mib?, r.test_accuracy_mean?)],
            })
        })
        .collect();
    write_png(
        path,
        &[
            Panel {
                title: "validation macro-F1",
                x_label: "step",
                y_label: "macro-F1",
                series: &curves,
                log_y: false,
            },
            Panel {
                title: "test accuracy vs optimizer state",
                x_label: "optimizer state (MiB)",
                y_label: "test accuracy",
                series: &memory,
                log_y: false,
            },
        ],
    )
}

/// Runs the fine-tuning comparison on `device` and writes its report (`compare.md`,
/// `compare.json`, `compare.png`); stops (resumably) when `stop` is set.
pub fn compare(
    args: FinetuneCompareSettings,
    command: &str,
    stop: &StopToken,
    device: &Device,
) -> Result<()> {
    let methods = runner::parse_methods(&args.methods);
    if methods.is_empty() {
        bail!("--methods names no method");
    }
    let seeds = runner::parse_seeds(&args.seeds)?;
    let mut base = args.finetune.clone();
    base.resume = None;
    base.stop_after = None;
    if base.test_fraction == 0.0 {
        bail!("the table reports the test split: --test-fraction must be above 0");
    }
    // Evaluations cost as much as training steps: by default only the tuning rounds and the
    // end are scored.
    base.eval_every.get_or_insert(base.steps);
    // Every method must resolve before anything trains.
    let check = |spec: &str| {
        let mut a = base.clone();
        a.method = spec.to_string();
        resolve(a).map(|_| ())
    };
    for m in &methods {
        check(&m.spec).with_context(|| format!("method `{}`", m.spec))?;
    }
    let grid = Grid::parse(&args.tune)?;
    if !grid.is_empty() {
        if grid.tunes("lr") && base.lr.is_some() {
            bail!("--lr fixes the rate that --tune lr=... varies; give only one of them");
        }
        runner::check_grid(&grid, &methods, base.steps, args.halving_rate, check)?;
    }
    let out = runner::open_out(
        args.finetune.resume.as_deref(),
        args.finetune.out.as_deref(),
        "runs/compare-finetune",
    )?;
    let job = Finetuning {
        base: &base,
        stop,
        device,
    };
    let started = std::time::Instant::now();
    let runner = Runner {
        job: &job,
        out: &out,
        stop,
        parallel: &DataParallel::default(),
    };
    let compared = runner.run_all(&methods, &seeds, &grid, args.halving_rate)?;
    let table = rows(&compared.methods, &compared.results);
    plot(
        &out.join("compare.png"),
        &compared.methods,
        &compared.results,
        &table,
    )?;
    let json =
        serde_json::json!({"command": command, "seeds": seeds, "steps": base.steps, "rows": table});
    runner.report(
        &compared,
        markdown(&table, command, &seeds, &base),
        json,
        args.halving_rate,
        3,
        started,
    )?;
    Ok(())
}
