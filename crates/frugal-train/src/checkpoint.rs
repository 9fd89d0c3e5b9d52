//! Run checkpoints: `checkpoints/step-N/` with the model (Hugging Face layout), the optimizer
//! state, the tokenizer and the trainer's position. Written under a temporary name and renamed,
//! so a crash at any moment leaves the previous checkpoints intact.

use crate::trainer::TrainerState;
use anyhow::{Context, Result};
use frugal::Frugal;
use frugal_nn::llama::Llama;
use std::path::{Path, PathBuf};

/// Files of one checkpoint directory.
pub const MODEL: &str = "model.safetensors";
pub const MODEL_CONFIG: &str = "config.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TRAINER: &str = "trainer.json";

fn checkpoints(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Saves a checkpoint of step `state.step` of a LLaMA run; keeps the newest `keep` checkpoints.
pub fn save(
    run: &Path,
    model: &Llama,
    opt: &Frugal,
    state: &TrainerState,
    tokenizer: &crate::data::TextTokenizer,
    keep: usize,
) -> Result<PathBuf> {
    save_with(run, opt, state, keep, |tmp| {
        model.save(&tmp.join(MODEL))?;
        let hf = model.config.to_hf_json(tokenizer.eos);
        std::fs::write(tmp.join(MODEL_CONFIG), serde_json::to_string_pretty(&hf)?)?;
        std::fs::write(tmp.join(TOKENIZER), tokenizer.to_json()?)?;
        Ok(())
    })
}

/// Saves a checkpoint of step `state.step` whose model files `write_model` writes into the
/// directory it is given; keeps the newest `keep` checkpoints.
pub fn save_with(
    run: &Path,
    opt: &Frugal,
    state: &TrainerState,
    keep: usize,
    write_model: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let root = checkpoints(run);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    // Unique to this process, so two writers never share a temporary directory.
    let tmp = root.join(format!(".step-{}.{}.tmp", state.step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    write_model(&tmp)?;
    opt.save_state(&tmp.join(OPTIMIZER))?;
    std::fs::write(tmp.join(TRAINER), serde_json::to_string_pretty(state)?)?;
    for f in std::fs::read_dir(&tmp)? {
        std::fs::File::open(f?.path())?.sync_all()?;
    }
    let dest = root.join(format!("step-{}", state.step));
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("cannot move checkpoint into {}", dest.display()))?;
    std::fs::File::open(&root)?.sync_all()?;
    let all = list(run)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(old).ok();
    }
    Ok(dest)
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = checkpoints(run);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p
                .file_name()?
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            p.join(TRAINER).exists().then_some((step, p))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// A checkpoint directory itself, or the latest checkpoint of a run directory.
pub fn locate(path: &Path) -> Result<PathBuf> {
    if path.join(MODEL).exists() {
        return Ok(path.to_path_buf());
    }
    list(path)?.pop().map(|(_, p)| p).with_context(|| {
        format!(
            "{} is neither a checkpoint nor a run directory with a complete checkpoint",
            path.display()
        )
    })
}

/// The optimizer of `params` with the state saved in checkpoint `dir`, and the trainer state;
/// for rank `rank` of `world` (more than one), only that rank's shard of the state is read.
pub fn restore(
    params: Vec<frugal::Param>,
    config: frugal::OptimizerConfig,
    dir: &Path,
    (rank, world): (usize, usize),
) -> Result<(Frugal, TrainerState)> {
    let mut opt = Frugal::from_params(params, config)?;
    if world > 1 {
        opt.shard_evenly(rank, world)?;
    }
    opt.load_state(&dir.join(OPTIMIZER))
        .with_context(|| format!("cannot resume from {}", dir.display()))?;
    Ok((opt, trainer_state(dir)?))
}

/// Reads the trainer state of a checkpoint.
pub fn trainer_state(dir: &Path) -> Result<TrainerState> {
    let text = std::fs::read_to_string(dir.join(TRAINER))
        .with_context(|| format!("cannot read {}", dir.join(TRAINER).display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("corrupt trainer state in {}", dir.display()))
}
