//! What every run directory shares: its default name, the checkpoint a resumed run continues
//! from, the summary, and the progress bar.

use crate::checkpoint;
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

/// A progress bar over `steps` steps, at step `at`.
pub fn progress_bar(steps: usize, at: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64).with_position(at as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template"),
    );
    bar
}
