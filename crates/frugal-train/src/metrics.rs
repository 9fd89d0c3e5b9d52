//! Metrics of a run: typed records in `metrics.jsonl` (one per logged step and per
//! evaluation), the run summary, the loss plot, and process memory. The writer, the plots,
//! `eval` and `compare` all read and write these types.

use crate::plot::{write_png, Panel, Series};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One training step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub step: usize,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Training tokens consumed so far.
    pub tokens: u64,
    /// Tokens per second of this step.
    pub tok_per_s: f64,
    /// Wall time of the run so far, over all sessions.
    pub elapsed_s: f64,
    /// Global gradient norm before clipping (when clipping is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
}

/// One evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: usize,
    pub val_loss: f64,
    pub val_ppl: f64,
    /// Validation accuracy (classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Validation macro-F1 (classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
}

impl EvalRecord {
    /// The record of validation loss `loss` at `step`.
    pub fn new(step: usize, loss: f64) -> Self {
        EvalRecord {
            step,
            val_loss: loss,
            val_ppl: loss.exp(),
            accuracy: None,
            macro_f1: None,
        }
    }

    /// The record with classification scores.
    pub fn with_scores(self, scores: crate::finetune::scores::Scores) -> Self {
        EvalRecord {
            accuracy: Some(scores.accuracy),
            macro_f1: Some(scores.macro_f1),
            ..self
        }
    }
}

/// A line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    Train(TrainRecord),
    Eval(EvalRecord),
}

impl Record {
    /// The step the record belongs to.
    pub fn step(&self) -> usize {
        match self {
            Record::Train(r) => r.step,
            Record::Eval(r) => r.step,
        }
    }
}

/// The records of a metrics file; a torn last line (killed mid-write) is skipped.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Final figures of a run, written to `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub tokens: u64,
    pub val_loss: f64,
    pub val_ppl: f64,
    /// Loss and perplexity on the test split (finished runs that hold one out).
    #[serde(default)]
    pub test_loss: Option<f64>,
    #[serde(default)]
    pub test_ppl: Option<f64>,
    pub initial_val_ppl: Option<f64>,
    pub parameters: usize,
    pub parameters_by_class: frugal::labels::RoleCounts,
    /// State held by this process (rank 0's shard under data parallelism).
    pub optimizer_state_bytes: frugal::StateBytes,
    pub optimizer_state_total_bytes: usize,
    /// Under data parallelism, the state each rank holds at the end, in rank order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub optimizer_state_bytes_per_rank: Vec<usize>,
    /// The ranks that trained (1: one process).
    #[serde(default = "one_rank")]
    pub world_size: usize,
    pub optimizer_workspace_bytes: usize,
    pub parameter_bytes: usize,
    /// Parameter gradients held at once, at most (all of them, or one part with per-layer
    /// updates).
    pub gradient_bytes: usize,
    /// The planned peak of one rank's step (weights, optimizer state and the step, as `frugal
    /// memory` plans it; absent from runs written before it was planned).
    #[serde(default)]
    pub planned_peak_bytes: Option<usize>,
    pub peak_rss_bytes: u64,
    /// Under data parallelism, each rank's peak RSS, in rank order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peak_rss_bytes_per_rank: Vec<u64>,
    pub wall_s: f64,
    /// Training tokens per second of step time (evaluation and checkpoints excluded).
    pub tokens_per_s: f64,
    pub interrupted: bool,
}

fn one_rank() -> usize {
    1
}

impl Summary {
    /// Reads a run's `summary.json`.
    pub fn read(run: &Path) -> Result<Self> {
        read_summary(run)
    }
}

/// Reads the `summary.json` of a run (pre-training or fine-tuning) as `T`.
pub fn read_summary<T: serde::de::DeserializeOwned>(run: &Path) -> Result<T> {
    let path = run.join("summary.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))
}

/// Append-only metrics file with the history needed for plots.
pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
    /// (step, training loss)
    pub train: Vec<(f64, f64)>,
    /// (step, validation loss)
    pub val: Vec<(f64, f64)>,
}

impl Metrics {
    /// Opens `path`, keeping only entries up to `keep_through` (the checkpoint resumed from).
    pub fn open(path: &Path, keep_through: usize) -> Result<Self> {
        let mut kept = Vec::new();
        if path.exists() {
            kept = read_records(path)?;
            kept.retain(|r| r.step() <= keep_through);
            let mut body = String::new();
            for r in &kept {
                body += &serde_json::to_string(r)?;
                body.push('\n');
            }
            frugal::fs::write_atomically(path, body.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut m = Metrics {
            path: path.to_path_buf(),
            file,
            train: Vec::new(),
            val: Vec::new(),
        };
        for v in &kept {
            m.remember(v);
        }
        Ok(m)
    }

    fn remember(&mut self, r: &Record) {
        match r {
            Record::Train(t) => self.train.push((t.step as f64, t.loss)),
            Record::Eval(e) => self.val.push((e.step as f64, e.val_loss)),
        }
    }

    /// Appends one record.
    pub fn log(&mut self, r: Record) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(&r)?)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.remember(&r);
        Ok(())
    }

    /// Draws training and validation loss against steps.
    pub fn plot(&self, path: &Path, title: &str) -> Result<()> {
        let series = [
            Series {
                name: "train loss".into(),
                points: self.train.clone(),
            },
            Series {
                name: "validation loss".into(),
                points: self.val.clone(),
            },
        ];
        write_png(
            path,
            &[Panel {
                title,
                x_label: "step",
                y_label: "loss (nats/token)",
                series: &series,
                log_y: false,
            }],
        )
    }
}

/// Peak resident memory of this process in bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_old_lines_parse() {
        let train = Record::Train(TrainRecord {
            step: 3,
            loss: 7.25,
            lr: 1e-3,
            tokens: 3072,
            tok_per_s: 5000.5,
            elapsed_s: 1.5,
            grad_norm: None,
        });
        let eval = Record::Eval(EvalRecord::new(4, 2.0));
        for r in [&train, &eval] {
            let line = serde_json::to_string(r).unwrap();
            assert_eq!(&serde_json::from_str::<Record>(&line).unwrap(), r);
        }
        assert!(!serde_json::to_string(&train).unwrap().contains("grad_norm"));
        // Lines as written before the records were typed (keys in alphabetical order).
        let old_train = r#"{"elapsed_s":0.5,"grad_norm":2.5,"loss":8.3,"lr":0.0001,"step":1,"tok_per_s":6000.0,"tokens":1024}"#;
        let old_eval = r#"{"step":0,"val_loss":8.37,"val_ppl":4322.6}"#;
        match serde_json::from_str::<Record>(old_train).unwrap() {
            Record::Train(t) => assert_eq!((t.step, t.grad_norm), (1, Some(2.5))),
            r => panic!("{r:?}"),
        }
        assert_eq!(serde_json::from_str::<Record>(old_eval).unwrap().step(), 0);
    }
}
