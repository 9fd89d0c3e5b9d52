//! Run checkpoints: `checkpoints/step-N/` with the model (Hugging Face layout), the optimizer
//! state (whole, or one part per rank where it is sharded), the tokenizer and the trainer's
//! position. Written under a temporary name and renamed,
//! so a crash at any moment leaves the previous checkpoints intact.

use crate::trainer::{Model, Trainer, TrainerState};
use anyhow::{bail, Context, Result};
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

/// The file of rank `rank`'s part of the optimizer state of a run of `world` ranks whose state
/// is sharded: `optimizer-00001-of-00004.safetensors` holds rank 0's part of four.
pub fn optimizer_part(rank: usize, world: usize) -> String {
    format!("optimizer-{:05}-of-{world:05}.safetensors", rank + 1)
}

/// The rank and world size of an optimizer part's file name.
fn part_of(name: &str) -> Option<(usize, usize)> {
    let (k, n) = name
        .strip_prefix("optimizer-")?
        .strip_suffix(".safetensors")?
        .split_once("-of-")?;
    let (k, n): (usize, usize) = (k.parse().ok()?, n.parse().ok()?);
    (1..=n).contains(&k).then_some((k - 1, n))
}

/// The optimizer state files of checkpoint `dir`: the whole state, or every rank's part of a
/// sharded one, in rank order.
pub fn optimizer_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let whole = dir.join(OPTIMIZER);
    if whole.exists() {
        return Ok(vec![whole]);
    }
    let mut parts: Vec<(usize, usize)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| part_of(e.ok()?.file_name().to_str()?))
        .collect();
    parts.sort();
    let Some(&(_, world)) = parts.first() else {
        bail!(
            "{} holds no optimizer state ({OPTIMIZER}, or parts such as {})",
            dir.display(),
            optimizer_part(0, 2)
        );
    };
    if parts.iter().any(|&(_, n)| n != world) {
        bail!(
            "{} holds optimizer parts of different numbers of ranks; keep only those of the run that saved it",
            dir.display()
        );
    }
    let missing: Vec<String> = (0..world)
        .filter(|r| !parts.contains(&(*r, world)))
        .map(|r| optimizer_part(r, world))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} lacks part of its optimizer state ({}); copy every file of the checkpoint",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok((0..world)
        .map(|r| dir.join(optimizer_part(r, world)))
        .collect())
}

/// Saves a checkpoint of step `t.state.step` of a LLaMA run; keeps the newest `keep`
/// checkpoints. Every rank calls it (see [`save_with`]).
pub fn save(
    run: &Path,
    t: &Trainer<Llama>,
    tokenizer: &crate::data::TextTokenizer,
    keep: usize,
) -> Result<PathBuf> {
    save_with(run, t, keep, |tmp| {
        t.model.save(&tmp.join(MODEL))?;
        t.model.save_adapters(tmp)?;
        let hf = t.model.config.to_hf_json(tokenizer.eos);
        std::fs::write(tmp.join(MODEL_CONFIG), serde_json::to_string_pretty(&hf)?)?;
        std::fs::write(tmp.join(TOKENIZER), tokenizer.to_json()?)?;
        Ok(())
    })
}

/// Saves a checkpoint of step `t.state.step` whose model files `write_model` writes into the
/// directory it is given; keeps the newest `keep` checkpoints; returns the checkpoint's
/// directory. Every rank of a data-parallel run calls it: rank 0 writes the model and the
/// trainer's position; a sharded optimizer's ranks write their parts of the state at once
/// (see [`DataParallel::save_state_parts`](crate::data_parallel::DataParallel::save_state_parts)),
/// so that no rank ever holds more than its own part.
pub fn save_with<M: Model>(
    run: &Path,
    t: &Trainer<M>,
    keep: usize,
    write_model: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let parallel = t.parallel();
    let tmp = parallel.on_lead(|| begin(run, t.state.step))?;
    let sharded = parallel.shards().is_some();
    if sharded {
        if let Err(e) = parallel.save_state_parts(&t.optimizer, &tmp) {
            if parallel.rank() == 0 {
                std::fs::remove_dir_all(&tmp).ok();
            }
            return Err(e);
        }
    }
    parallel.on_lead(|| {
        write_model(&tmp)?;
        if !sharded {
            t.optimizer.save_state(&tmp.join(OPTIMIZER))?;
        }
        finish(run, &tmp, &t.state, keep)
    })
}

/// Makes the temporary directory of a checkpoint of step `step`.
fn begin(run: &Path, step: usize) -> Result<PathBuf> {
    let root = checkpoints(run);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    // Unique to this process and moment, so two writers never share a temporary directory,
    // and ranks on another file system never see one of their own under this name.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = root.join(format!(".step-{step}.{}-{nanos}.tmp", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok(tmp)
}

/// Completes the checkpoint in `tmp`: the trainer's position, every file synced, then the
/// directory renamed into place; keeps the newest `keep` checkpoints.
fn finish(run: &Path, tmp: &Path, state: &TrainerState, keep: usize) -> Result<PathBuf> {
    let root = checkpoints(run);
    std::fs::write(tmp.join(TRAINER), serde_json::to_string_pretty(state)?)?;
    for f in std::fs::read_dir(tmp)? {
        std::fs::File::open(f?.path())?.sync_all()?;
    }
    let dest = root.join(format!("step-{}", state.step));
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::rename(tmp, &dest)
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
/// for rank `rank` of `world` (more than one), only that rank's shard of the state is read,
/// whatever number of ranks saved it.
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
    opt.load_state_parts(&optimizer_files(dir)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_optimizer_files_are_the_whole_state_or_every_rank_s_part() {
        let dir = std::env::temp_dir().join(format!("frugal-parts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let touch = |name: &str| std::fs::write(dir.join(name), b"").unwrap();
        let err = optimizer_files(&dir).unwrap_err().to_string();
        assert!(err.contains("holds no optimizer state"), "{err}");
        touch("optimizer-00001-of-00003.safetensors");
        touch("optimizer-00003-of-00003.safetensors");
        touch("optimizer-00004-of-00003.safetensors"); // not a part: ignored
        let err = optimizer_files(&dir).unwrap_err().to_string();
        assert!(
            err.contains("optimizer-00002-of-00003.safetensors") && !err.contains("00001"),
            "{err}"
        );
        touch("optimizer-00002-of-00003.safetensors");
        let names: Vec<String> = optimizer_files(&dir)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            (0..3).map(|r| optimizer_part(r, 3)).collect::<Vec<_>>()
        );
        touch("optimizer-00001-of-00002.safetensors");
        let err = optimizer_files(&dir).unwrap_err().to_string();
        assert!(err.contains("different numbers of ranks"), "{err}");
        touch(OPTIMIZER);
        assert_eq!(optimizer_files(&dir).unwrap(), [dir.join(OPTIMIZER)]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
