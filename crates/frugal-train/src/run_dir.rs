//! What every run directory shares: its default name, the checkpoint a resumed run continues
//! from, the metrics, plot and progress bar as the run goes, and the summary.

use crate::checkpoint;
use crate::metrics::{EvalRecord, Metrics, Record, TrainRecord};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// Writes the run's `summary.json` (atomically); a run paused after step k of n (`paused`)
/// says how to continue it with `frugal <command> --resume`.
pub fn write_summary(
    out: &Path,
    summary: &impl serde::Serialize,
    paused: Option<(usize, usize)>,
    command: &str,
) -> Result<()> {
    frugal::fs::write_atomically(
        &out.join("summary.json"),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    if let Some((step, steps)) = paused {
        eprintln!(
            "paused after step {step} of {steps}; continue with `frugal {command} --resume {}`",
            out.display()
        );
    }
    Ok(())
}

/// `runs/<prefix>-<unix seconds>`.
pub fn default_out(prefix: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{prefix}-{secs}"))
}

/// The run directory, created: `resume`, else `out`, else [`default_out`] of `prefix`; and when
/// resuming, its latest complete checkpoint (step, directory). A new run refuses a directory
/// that already holds one.
pub fn open(
    out: Option<&Path>,
    resume: Option<&Path>,
    prefix: &str,
) -> Result<(PathBuf, Option<(usize, PathBuf)>)> {
    let dir = match (resume, out) {
        (Some(dir), _) | (None, Some(dir)) => dir.to_path_buf(),
        (None, None) => default_out(prefix),
    };
    let from = match resume {
        Some(dir) => Some(checkpoint::list(dir)?.pop().with_context(|| {
            format!(
                "run directory {} has no complete checkpoint to resume from",
                dir.display()
            )
        })?),
        None => {
            if dir.join("config.json").exists() {
                bail!(
                    "{} already holds a run; use --resume {} to continue it or choose another --out",
                    dir.display(),
                    dir.display()
                );
            }
            None
        }
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create run directory {}", dir.display()))?;
    Ok((dir, from))
}

/// What a run shows and writes as it goes: on rank 0, its metrics (`metrics.jsonl`), its loss
/// plot (`loss.png`) and a progress bar; on the other ranks of a data-parallel run, which only
/// take their share of evaluations, nothing.
pub struct RunLog<'a> {
    out: &'a Path,
    title: String,
    metrics: Option<Metrics>,
    bar: ProgressBar,
}

impl<'a> RunLog<'a> {
    /// The log of the run in `out` at step `at` of `steps`, its plot titled `title`; `lead`:
    /// this process is rank 0. The metrics file keeps its records up to step `at`.
    pub fn open(
        out: &'a Path,
        lead: bool,
        (at, steps): (usize, usize),
        title: String,
    ) -> Result<Self> {
        Ok(RunLog {
            out,
            title,
            metrics: match lead {
                true => Some(Metrics::open(&out.join("metrics.jsonl"), at)?),
                false => None,
            },
            bar: match lead {
                true => progress_bar(steps, at),
                false => ProgressBar::hidden(),
            },
        })
    }

    /// True on rank 0, which writes and reports.
    fn is_lead(&self) -> bool {
        self.metrics.is_some()
    }

    /// Moves the bar to the step of `r`, with its loss and `rate` (e.g. "5012 tok/s").
    pub fn step_done(&self, r: &TrainRecord, rate: &str) {
        self.bar.set_position(r.step as u64);
        self.bar.set_message(format!("loss {:.4} {rate}", r.loss));
    }

    /// Writes a training step's record.
    pub fn log(&mut self, r: &TrainRecord) -> Result<()> {
        match &mut self.metrics {
            Some(m) => m.log(Record::Train(r.clone())),
            None => Ok(()),
        }
    }

    /// Writes an evaluation's record and prints `line` above the bar.
    pub fn evaluated(&mut self, record: EvalRecord, line: &str) -> Result<()> {
        let Some(metrics) = &mut self.metrics else {
            return Ok(());
        };
        metrics.log(Record::Eval(record))?;
        self.bar.suspend(|| eprintln!("{line}"));
        Ok(())
    }

    /// Draws the loss plot from the records so far.
    pub fn plot(&self) -> Result<()> {
        match &self.metrics {
            Some(m) => m.plot(&self.out.join("loss.png"), &self.title),
            None => Ok(()),
        }
    }

    /// Says, on rank 0, that the run was interrupted with its checkpoint saved in `dir`, and
    /// how `frugal <command> --resume` continues it.
    pub fn interrupted(&self, dir: &Path, command: &str) {
        if self.is_lead() {
            self.bar.suspend(|| {
                eprintln!(
                    "interrupted: saved {}; continue with `frugal {command} --resume {}`",
                    dir.display(),
                    self.out.display()
                )
            });
        }
    }

    /// Clears the bar at the end of the training loop.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A progress bar over `steps` steps, at step `at`.
fn progress_bar(steps: usize, at: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64).with_position(at as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    bar
}
