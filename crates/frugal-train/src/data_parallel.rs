//! Data parallelism: each rank computes the gradients of its share of a global batch, and the
//! ranks average them before every optimizer step, in buckets. The optimizer state is sharded
//! (ZeRO-1 style): each rank keeps the state of its share of the parameters and updates those,
//! then the ranks exchange the updated values. A single process ([`Solo`]) skips every
//! collective, so its steps are those of a run without data parallelism, bit for bit.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use frugal::{Frugal, Param};
use frugal_dist::{Collectives, Solo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;

/// Gradient elements averaged per collective: 8 Mi f32 (32 MiB), so that the buffers of a
/// bucket stay small next to the gradients.
const BUCKET_ELEMENTS: usize = 8 << 20;

/// The ranks a trainer shares its batches with.
#[derive(Clone)]
pub struct DataParallel {
    comm: Arc<dyn Collectives>,
}

impl Default for DataParallel {
    fn default() -> Self {
        DataParallel {
            comm: Arc::new(Solo),
        }
    }
}

impl DataParallel {
    /// Data parallelism over the ranks of `comm`.
    pub fn new(comm: Arc<dyn Collectives>) -> Self {
        DataParallel { comm }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The collectives.
    pub fn comm(&self) -> &dyn Collectives {
        self.comm.as_ref()
    }

    /// The mean of `x` over the ranks.
    pub fn mean(&self, x: f64) -> f64 {
        if self.world_size() == 1 {
            return x;
        }
        let mut v = [x];
        self.comm.all_reduce_sum_f64(&mut v);
        v[0] / self.world_size() as f64
    }

    /// True on every rank when `flag` is true on any.
    pub fn any(&self, flag: bool) -> bool {
        if self.world_size() == 1 {
            return flag;
        }
        let mut v = [f64::from(u8::from(flag))];
        self.comm.all_reduce_sum_f64(&mut v);
        v[0] > 0.0
    }

    /// Replaces each gradient in `grads` by its mean over the ranks. Every rank must hold
    /// gradients for the same parameters; they travel in buckets of consecutive parameters.
    pub fn average(&self, grads: &mut GradStore, params: &[Param]) -> Result<()> {
        let world = self.world_size();
        if world == 1 {
            return Ok(());
        }
        let present: Vec<(&Param, Tensor)> = params
            .iter()
            .filter_map(|p| grads.get(p.var.as_tensor()).map(|g| (p, g.clone())))
            .collect();
        let scale = 1.0 / world as f32;
        let mut start = 0;
        while start < present.len() {
            let mut end = start;
            let mut elements = 0;
            while end < present.len() && (end == start || elements < BUCKET_ELEMENTS) {
                elements += present[end].1.elem_count();
                end += 1;
            }
            let bucket = &present[start..end];
            let mut flat = Vec::with_capacity(elements);
            for (_, g) in bucket {
                flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
            self.comm.all_reduce_sum(&mut flat);
            flat.iter_mut().for_each(|x| *x *= scale);
            let mut at = 0;
            for (p, g) in bucket {
                let n = g.elem_count();
                let mean = Tensor::from_slice(&flat[at..at + n], g.shape(), g.device())?
                    .to_dtype(g.dtype())?;
                grads.insert(p.var.as_tensor(), mean);
                at += n;
            }
            start = end;
        }
        Ok(())
    }

    /// Sends every rank's updated parameters to the others after a sharded step (each rank
    /// updated only those it owns, `owners[i]` being parameter i's rank), one rank's share at a
    /// time.
    pub fn share_updates(&self, params: &[Param], owners: &[usize]) -> Result<()> {
        let rank = self.rank();
        for from in 0..self.world_size() {
            let share: Vec<&Param> = params
                .iter()
                .zip(owners)
                .filter(|(_, &o)| o == from)
                .map(|(p, _)| p)
                .collect();
            let mut bytes = Vec::new();
            if from == rank {
                for p in &share {
                    let values = p
                        .var
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    bytes.extend(values.iter().flat_map(|x| x.to_le_bytes()));
                }
            }
            let bytes = self.comm.broadcast_bytes(bytes, from);
            if from == rank {
                continue;
            }
            let mut at = 0;
            for p in share {
                let n = p.var.elem_count();
                let Some(part) = bytes.get(at..at + 4 * n) else {
                    bail!(
                        "rank {from} sent {} bytes of updated parameters, too few for its share",
                        bytes.len()
                    );
                };
                let values: Vec<f32> = part
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let t = Tensor::from_vec(values, p.var.shape(), p.var.device())?;
                p.var.set(&t.to_dtype(p.var.dtype())?)?;
                at += 4 * n;
            }
        }
        Ok(())
    }

    /// Gathers every shard's optimizer state into rank 0's `optimizer`, which then holds the
    /// whole state (to save it); the other ranks send theirs.
    pub fn gather_state(&self, optimizer: &mut Frugal) -> Result<()> {
        let lead = self.rank() == 0;
        let mine = if lead {
            Vec::new()
        } else {
            optimizer.owned_state()?
        };
        for part in self.comm.gather_bytes(mine, 0).iter().skip(1) {
            optimizer.absorb_state(part)?;
        }
        Ok(())
    }

    /// Every rank's `value`, in rank order.
    pub fn all_gather_usize(&self, value: usize) -> Vec<usize> {
        self.comm
            .all_gather_bytes(&(value as u64).to_le_bytes())
            .iter()
            .map(|b| b.as_slice().try_into().map_or(0, u64::from_le_bytes) as usize)
            .collect()
    }

    /// Runs `f` on rank 0 only and hands its result to every rank; where it fails, the other
    /// ranks fail with a [`SharedError`] (rank 0 reports the failure).
    pub fn on_lead<T: Serialize + DeserializeOwned>(
        &self,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if self.world_size() == 1 {
            return f();
        }
        if self.rank() == 0 {
            let result = f();
            let shared = match &result {
                Ok(value) => Ok(serde_json::to_value(value)?),
                Err(e) => Err(format!("{e:#}")),
            };
            self.comm.broadcast_bytes(
                serde_json::to_vec::<std::result::Result<_, String>>(&shared)?,
                0,
            );
            return result;
        }
        let bytes = self.comm.broadcast_bytes(Vec::new(), 0);
        match serde_json::from_slice::<std::result::Result<serde_json::Value, String>>(&bytes)? {
            Ok(value) => Ok(serde_json::from_value(value)?),
            Err(message) => Err(SharedError(message).into()),
        }
    }

    /// Checks that every rank holds the same `what` (settings, code version): each rank's
    /// `value` is compared with rank 0's, and a difference is a [`SharedError`] naming the ranks
    /// and fields that differ.
    pub fn agree(&self, what: &str, value: &Value) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let all = self.comm.all_gather_bytes(&serde_json::to_vec(value)?);
        let values: Vec<Value> = all
            .iter()
            .map(|b| serde_json::from_slice(b))
            .collect::<std::result::Result<_, _>>()?;
        let mut differences = Vec::new();
        for (rank, v) in values.iter().enumerate().skip(1) {
            let mut fields = Vec::new();
            differing_fields("", &values[0], v, &mut fields);
            if !fields.is_empty() {
                differences.push(format!("rank {rank}: {}", fields.join(", ")));
            }
        }
        if differences.is_empty() {
            return Ok(());
        }
        Err(SharedError(format!(
            "the ranks were started with different {what}; start every rank with the same command and binary ({} differ from rank 0's)",
            differences.join("; ")
        ))
        .into())
    }
}

/// An error that every rank meets alike (a settings mismatch, or rank 0's failure handed to the
/// others): rank 0 reports it and the other ranks end quietly.
#[derive(Debug)]
pub struct SharedError(pub String);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SharedError {}

/// The fields of `b` that differ from `a`, as `path: a vs b`.
fn differing_fields(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                differing_fields(
                    &sub,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

/// The running program's version and the SHA-256 of its executable: ranks must run the same
/// build.
pub fn code_fingerprint() -> Result<String> {
    use sha2::{Digest, Sha256};
    let exe = std::env::current_exe()?;
    let bytes = std::fs::read(&exe)
        .with_context(|| format!("cannot read the running program {}", exe.display()))?;
    Ok(format!(
        "{} {:x}",
        env!("CARGO_PKG_VERSION"),
        Sha256::digest(&bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differing_fields_are_named_by_their_path() {
        let a = json!({"optimizer": {"preset": "frugal", "lr": 0.001}, "steps": 10});
        let b = json!({"optimizer": {"preset": "galore", "lr": 0.001}, "steps": 10, "x": 1});
        let mut out = Vec::new();
        differing_fields("", &a, &b, &mut out);
        assert_eq!(
            out,
            ["optimizer.preset: \"frugal\" vs \"galore\"", "x: null vs 1"]
        );
        let mut none = Vec::new();
        differing_fields("", &a, &a, &mut none);
        assert!(none.is_empty());
    }
}
