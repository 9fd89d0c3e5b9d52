//! What every comparison does, whatever it trains: one run directory per method and seed,
//! reused or resumed when the comparison is continued, successive-halving tuning over a grid,
//! and the summary statistics of the table.

use crate::checkpoint;
use crate::data_parallel::DataParallel;
use crate::plot::Series;
use crate::trainer::StopToken;
use crate::tune::{self, Grid, Rung};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One configuration to compare.
#[derive(Clone, Debug, Serialize)]
pub struct Method {
    pub label: String,
    /// Optimizer (or fine-tuning method) spec: `name[:key=value,...]`.
    pub spec: String,
    /// The tuned values the spec ends with, e.g. `lr=0.003 proj_lr_scale=0.25`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuned: Option<String>,
}

impl Method {
    /// The method of `spec`, labelled by its settings.
    pub fn of(spec: &str) -> Method {
        Method {
            label: spec.replacen(':', " ", 1).replace(',', " "),
            spec: spec.to_string(),
            tuned: None,
        }
    }
}

/// `spec` with more `key=value` settings.
pub fn with_settings(spec: &str, pairs: &[(String, String)]) -> String {
    let mut s = spec.to_string();
    for (k, v) in pairs {
        s += if s.contains(':') { "," } else { ":" };
        s += &format!("{k}={v}");
    }
    s
}

/// The methods of `--methods`: specs separated by spaces or `;`.
pub fn parse_methods(list: &str) -> Vec<Method> {
    list.split([';', ' '])
        .filter(|s| !s.is_empty())
        .map(Method::of)
        .collect()
}

/// The seeds of `--seeds`, comma-separated.
pub fn parse_seeds(list: &str) -> Result<Vec<u64>> {
    let seeds: Vec<u64> = list
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("--seeds: `{s}` is not a number"))
        })
        .collect::<Result<_>>()?;
    if seeds.is_empty() {
        bail!("--seeds names no seed");
    }
    Ok(seeds)
}

/// The comparison directory: `resume` to continue one, else `out` (or `default`), which must
/// not hold a comparison yet.
pub fn open_out(resume: Option<&Path>, out: Option<&Path>, default: &str) -> Result<PathBuf> {
    let dir = resume
        .or(out)
        .map_or_else(|| PathBuf::from(default), Path::to_path_buf);
    if resume.is_none() && dir.join("compare.json").exists() {
        bail!(
            "{} already holds a comparison; use --resume {} to continue it or choose another --out",
            dir.display(),
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
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

/// Mean and half-range of the finished runs' values.
pub fn mean_spread(xs: &[f64]) -> Option<(f64, f64)> {
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

/// A kind of training run that a comparison repeats for each method and seed.
pub trait Job {
    /// The figures a finished run reports.
    type Figures;
    /// The validation score that tuning ranks by, e.g. "validation perplexity".
    const SCORE: &'static str;
    /// True if a lower score is better.
    const LOWER_IS_BETTER: bool;

    /// Steps of a full run.
    fn steps(&self) -> usize;
    /// How far the run in `dir` got, if it wrote a summary.
    fn progress(&self, dir: &Path) -> Option<Progress>;
    /// Trains `method` with `seed` in `dir` up to step `until` (the whole run when `None`),
    /// continuing from the directory's latest checkpoint when `resume`.
    fn train(
        &self,
        method: &Method,
        seed: u64,
        until: Option<usize>,
        dir: &Path,
        resume: bool,
    ) -> Result<()>;
    /// The figures of the run in `dir`, and its validation score at each evaluation.
    fn read(&self, dir: &Path) -> Result<(Self::Figures, Curve)>;
    /// The validation score of a run's last evaluation.
    fn final_score(figures: &Self::Figures) -> Option<f64>;
}

/// (step, validation score) at each evaluation of a run.
pub type Curve = Vec<(f64, f64)>;

/// How far a run got, from its summary.
pub struct Progress {
    pub steps: usize,
    /// True if it stopped before its last step.
    pub interrupted: bool,
    pub wall_s: f64,
}

/// The outcome of one run of a comparison: its figures, or why it failed.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome<F> {
    pub method: String,
    pub seed: u64,
    pub dir: PathBuf,
    /// Why the run failed, if it did.
    pub failed: Option<String>,
    #[serde(flatten)]
    pub figures: Option<F>,
    /// The validation score at each evaluation.
    pub curve: Curve,
}

impl<F> Outcome<F> {
    /// The validation score at `step` (the last one when the run has none there).
    fn score_at<J: Job<Figures = F>>(&self, step: usize) -> Option<f64> {
        self.curve
            .iter()
            .find(|(s, _)| *s == step as f64)
            .map(|c| c.1)
            .or(self.figures.as_ref().and_then(J::final_score))
    }
}

/// A method's runs in a comparison.
pub struct MethodRuns<'a, F> {
    pub all: Vec<&'a Outcome<F>>,
    /// The figures of the finished runs.
    pub ok: Vec<&'a F>,
}

impl<'a, F> MethodRuns<'a, F> {
    /// The runs filed under `label`.
    pub fn of(results: &'a [Outcome<F>], label: &str) -> Self {
        let all: Vec<&Outcome<F>> = results.iter().filter(|r| r.method == label).collect();
        let ok = all.iter().filter_map(|r| r.figures.as_ref()).collect();
        MethodRuns { all, ok }
    }

    /// Mean and half-range of a figure over the finished runs.
    pub fn spread(&self, f: impl Fn(&F) -> Option<f64>) -> Option<(f64, f64)> {
        mean_spread(&self.ok.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    }

    /// Mean of a figure over the finished runs.
    pub fn mean(&self, f: impl Fn(&F) -> Option<f64>) -> Option<f64> {
        self.spread(f).map(|x| x.0)
    }

    /// `seed N: why` for each failed run.
    pub fn failures(&self) -> Vec<String> {
        self.all
            .iter()
            .filter_map(|r| r.failed.as_ref().map(|f| format!("seed {}: {f}", r.seed)))
            .collect()
    }

    /// The validation curve averaged over the finished runs, with steps scaled by `x_scale`
    /// (evaluations at step 0 left out).
    pub fn mean_curve(&self, x_scale: f64) -> Vec<(f64, f64)> {
        let runs: Vec<&Outcome<F>> = self
            .all
            .iter()
            .copied()
            .filter(|r| r.failed.is_none())
            .collect();
        let Some(first) = runs.first() else {
            return Vec::new();
        };
        first
            .curve
            .iter()
            .enumerate()
            .filter(|(_, (step, _))| *step > 0.0)
            .map(|(i, (step, _))| {
                let vals: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.curve.get(i).map(|c| c.1))
                    .collect();
                (step * x_scale, vals.iter().sum::<f64>() / vals.len() as f64)
            })
            .collect()
    }
}

/// Each method's validation curve, averaged over its finished runs, steps scaled by
/// `x_scale`.
pub fn curves<F>(methods: &[Method], results: &[Outcome<F>], x_scale: f64) -> Vec<Series> {
    methods
        .iter()
        .map(|m| Series {
            name: m.label.clone(),
            points: MethodRuns::of(results, &m.label).mean_curve(x_scale),
        })
        .filter(|s| !s.points.is_empty())
        .collect()
}

/// A Markdown table of `columns` and `rows`.
pub fn table(columns: &[&str], rows: &[Vec<String>]) -> String {
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    let mut s = line(&columns.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    s += &line(&vec!["---".to_string(); columns.len()]);
    for r in rows {
        s += &line(r);
    }
    s
}

/// Trains the runs of a comparison into `out/runs`.
pub struct Runner<'a, J> {
    pub job: &'a J,
    pub out: &'a Path,
    pub stop: &'a StopToken,
    /// The ranks that train every run together; rank 0 decides what to run from the
    /// comparison's directory, prints and writes.
    pub parallel: &'a DataParallel,
}

impl<J: Job> Runner<'_, J> {
    /// The directory of `method`'s run with `seed`.
    pub fn dir(&self, method: &Method, seed: u64) -> PathBuf {
        self.out
            .join("runs")
            .join(format!("{}-seed{seed}", slug(&method.label)))
    }

    /// Trains `method` with `seed` up to step `until` (the whole run when `None`), resuming or
    /// reusing what an earlier call left in its directory; the result is filed under `row`.
    /// `None` if the comparison was stopped.
    pub fn run(
        &self,
        row: &str,
        method: &Method,
        seed: u64,
        until: Option<usize>,
    ) -> Result<Option<Outcome<J::Figures>>> {
        let dir = self.dir(method, seed);
        let mut outcome = Outcome {
            method: row.to_string(),
            seed,
            dir: dir.clone(),
            failed: None,
            figures: None,
            curve: Vec::new(),
        };
        match self.train(method, seed, until, &dir) {
            Ok(true) => {
                let (figures, curve) = self.job.read(&dir)?;
                (outcome.figures, outcome.curve) = (Some(figures), curve);
            }
            Ok(false) => return Ok(None),
            Err(e) => {
                if self.parallel.rank() == 0 {
                    eprintln!("== {} (seed {seed}) failed: {e:#}", method.label);
                }
                outcome.failed = Some(format!("{e:#}"));
            }
        }
        Ok(Some(outcome))
    }

    /// False if stopped.
    fn train(&self, method: &Method, seed: u64, until: Option<usize>, dir: &Path) -> Result<bool> {
        let steps = self.job.steps();
        let target = until.unwrap_or(steps);
        // Rank 0 reads (and clears) the run's directory; every rank follows its decision.
        let (reached, resumable) = self.parallel.on_lead(|| {
            let reached = self
                .job
                .progress(dir)
                .is_some_and(|p| p.steps >= target && (p.steps < steps || !p.interrupted));
            if reached {
                eprintln!(
                    "== {} (seed {seed}): step {target} already reached",
                    method.label
                );
                return Ok((true, false));
            }
            let resumable = !checkpoint::list(dir)?.is_empty();
            if !resumable && dir.exists() {
                std::fs::remove_dir_all(dir)?; // started but never checkpointed: start over
            }
            eprintln!(
                "== {} (seed {seed}){}",
                method.label,
                until.map(|k| format!(", to step {k}")).unwrap_or_default()
            );
            Ok((false, resumable))
        })?;
        if reached {
            return Ok(true);
        }
        self.job.train(method, seed, until, dir, resumable)?;
        Ok(!self.parallel.any(self.stop.is_stopped()))
    }

    /// Successive halving over `grid` for `method` with `seed`: the winner (its spec and values)
    /// and every candidate's validation score per round; `None` if stopped.
    pub fn tune(
        &self,
        method: &Method,
        grid: &Grid,
        rate: usize,
        seed: u64,
    ) -> Result<Option<(Method, Tuning)>> {
        let candidates: Vec<Method> = grid
            .for_method(&method.spec)
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
        let steps = self.job.steps();
        let rungs = tune::rungs(candidates.len(), steps, rate)?;
        let mut scores: Vec<Vec<Option<f64>>> = vec![Vec::new(); candidates.len()];
        let mut failures: Vec<Option<String>> = vec![None; candidates.len()];
        let mut alive: Vec<usize> = (0..candidates.len()).collect();
        for (j, rung) in rungs.iter().enumerate() {
            let until = (rung.steps < steps).then_some(rung.steps);
            for &i in &alive {
                let Some(r) = self.run(&method.label, &candidates[i], seed, until)? else {
                    return Ok(None);
                };
                // The score at this round's step (a resumed comparison may find the run
                // already further along).
                scores[i].push(r.score_at::<J>(rung.steps));
                if r.failed.is_some() {
                    failures[i] = r.failed;
                }
            }
            let keep = rungs.get(j + 1).map_or(1, |next| next.candidates);
            // `tune::best` keeps the lowest.
            let sign = if J::LOWER_IS_BETTER { 1.0 } else { -1.0 };
            let round: Vec<Option<f64>> = alive
                .iter()
                .map(|&i| scores[i][j].map(|s| sign * s))
                .collect();
            alive = tune::best(&round, keep)
                .into_iter()
                .map(|k| alive[k])
                .collect();
        }
        let winner = alive[0];
        let tuning = Tuning {
            method: method.label.clone(),
            seed,
            score: J::SCORE.into(),
            rungs,
            candidates: candidates
                .iter()
                .zip(scores)
                .zip(failures)
                .map(|((c, val), failed)| Candidate {
                    values: c.tuned.clone().unwrap_or_default(),
                    spec: c.spec.clone(),
                    dir: self.dir(c, seed),
                    val,
                    failed,
                })
                .collect(),
            chosen: winner,
        };
        Ok(Some((candidates[winner].clone(), tuning)))
    }

    /// Every method's rows: tuned on the first seed when `grid` is not empty (the winner's
    /// spec replaces the method's), then run with every seed; stops early (resumably) when the
    /// comparison is stopped.
    pub fn run_all(
        &self,
        methods: &[Method],
        seeds: &[u64],
        grid: &Grid,
        rate: usize,
    ) -> Result<Compared<Outcome<J::Figures>>> {
        let mut results = Vec::new();
        let mut tunings = Vec::new();
        let mut chosen: Vec<Method> = methods.to_vec();
        'outer: for (m, row) in methods.iter().zip(chosen.iter_mut()) {
            // The runs are named after the candidate when tuned, so the winner's run is reused.
            let mut run = m.clone();
            if !grid.for_method(&m.spec).is_empty() {
                let Some((winner, tuning)) = self.tune(m, grid, rate, seeds[0])? else {
                    break 'outer;
                };
                row.spec = winner.spec.clone();
                row.tuned = winner.tuned.clone();
                run = winner;
                tunings.push(tuning);
            }
            for &seed in seeds {
                match self.run(&m.label, &run, seed, None)? {
                    Some(r) => results.push(r),
                    None => break 'outer,
                }
            }
        }
        if self.stop.is_stopped() && self.parallel.rank() == 0 {
            eprintln!(
                "interrupted; continue the comparison with `--resume {}` and the same flags",
                self.out.display()
            );
        }
        Ok(Compared {
            methods: chosen,
            results,
            tunings,
        })
    }
}

impl<J: Job> Runner<'_, J>
where
    J::Figures: Serialize,
{
    /// Writes `compare.md` (`table`, the tuning rounds, the runs' total wall time) and
    /// `compare.json` (`json` with the methods, tunings, runs and that time), and prints the
    /// Markdown; `decimals` formats the tuning scores.
    pub fn report(
        &self,
        compared: &Compared<Outcome<J::Figures>>,
        table: String,
        mut json: serde_json::Value,
        rate: usize,
        decimals: usize,
        started: std::time::Instant,
    ) -> Result<()> {
        if self.parallel.rank() != 0 {
            return Ok(());
        }
        let dirs = run_dirs(
            compared.results.iter().map(|r| r.dir.clone()),
            &compared.tunings,
        );
        let runs_wall_s: f64 = dirs
            .iter()
            .filter_map(|d| self.job.progress(d).map(|p| p.wall_s))
            .sum();
        let md = table
            + &tuning_markdown(&compared.tunings, rate, decimals)
            + &format!(
                "\nTotal wall time of the {} runs: {runs_wall_s:.0} s.\n",
                dirs.len()
            );
        frugal::fs::write_atomically(&self.out.join("compare.md"), md.as_bytes())?;
        json["methods"] = serde_json::to_value(&compared.methods)?;
        json["tuning"] = serde_json::to_value(&compared.tunings)?;
        json["runs"] = serde_json::to_value(&compared.results)?;
        json["runs_wall_s"] = runs_wall_s.into();
        frugal::fs::write_atomically(
            &self.out.join("compare.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
        println!("{md}");
        eprintln!(
            "comparison written to {} in {:.0}s",
            self.out.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// What a comparison ran: the methods as chosen (tuned specs), every run's outcome, and the
/// tunings.
pub struct Compared<O> {
    pub methods: Vec<Method>,
    pub results: Vec<O>,
    pub tunings: Vec<Tuning>,
}

/// One method's tuning: the rounds and every candidate's validation score in each round it
/// reached.
#[derive(Clone, Debug, Serialize)]
pub struct Tuning {
    pub method: String,
    pub seed: u64,
    /// What the candidates were ranked by.
    pub score: String,
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
    /// The validation score after each round it ran in.
    pub val: Vec<Option<f64>>,
    pub failed: Option<String>,
}

/// The tuning rounds of every method: the validation score of each candidate after each
/// round it ran in.
pub fn tuning_markdown(tunings: &[Tuning], rate: usize, decimals: usize) -> String {
    let Some(first) = tunings.first() else {
        return String::new();
    };
    let mut s = format!(
        "\n## Tuning (seed {}, successive halving at rate {rate}: {} after each round)\n\n| method | candidate | rounds |\n|---|---|---|\n",
        first.seed, first.score
    );
    for t in tunings {
        for (i, c) in t.candidates.iter().enumerate() {
            let mark = if i == t.chosen { "**" } else { "" };
            let rounds: Vec<String> = t
                .rungs
                .iter()
                .zip(&c.val)
                .map(|(r, v)| match v {
                    Some(p) => format!("step {}: {p:.decimals$}", r.steps),
                    None => format!("step {}: failed", r.steps),
                })
                .collect();
            s += &format!(
                "| {} | {mark}{}{mark} | {} |\n",
                t.method,
                c.values,
                rounds.join(" → ")
            );
        }
    }
    s
}

/// Every run directory of a comparison once (a tuned winner's first seed is one of its
/// candidates).
fn run_dirs(results: impl Iterator<Item = PathBuf>, tunings: &[Tuning]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = results.collect();
    dirs.extend(
        tunings
            .iter()
            .flat_map(|t| t.candidates.iter().map(|c| c.dir.clone())),
    );
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Checks a tuning grid before anything trains: `check` validates each candidate's spec.
pub fn check_grid(
    grid: &Grid,
    methods: &[Method],
    steps: usize,
    rate: usize,
    check: impl Fn(&str) -> Result<()>,
) -> Result<()> {
    for m in methods {
        let points = grid.for_method(&m.spec).points();
        for point in &points {
            check(&with_settings(&m.spec, point))
                .with_context(|| format!("--tune on method `{}`", m.spec))?;
        }
        tune::rungs(points.len(), steps, rate)?;
    }
    Ok(())
}
