//! Metrics of a run: `metrics.jsonl` (one object per logged step and per evaluation), the loss
//! plot, and process memory.

use crate::plot::{write_png, Panel, Series};
use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

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
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for line in text.lines() {
                // A torn last line (killed mid-write) is dropped like entries past the checkpoint.
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if v["step"]
                    .as_u64()
                    .is_some_and(|s| s as usize <= keep_through)
                {
                    kept.push(v);
                }
            }
            let body: String = kept.iter().map(|v| format!("{v}\n")).collect();
            frugal::checkpoint::write_atomically(path, body.as_bytes())?;
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

    fn remember(&mut self, v: &Value) {
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            self.train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64() {
            self.val.push((step, l));
        }
    }

    /// Appends one entry.
    pub fn log(&mut self, v: Value) -> Result<()> {
        writeln!(self.file, "{v}")
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.remember(&v);
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
