//! Data parallelism: each rank computes the gradients of its share of a global batch, and the
//! ranks average them before every optimizer step, in buckets. The optimizer state is sharded
//! (ZeRO-1 style): each rank keeps the state of its share of the parameters and updates those,
//! then the ranks exchange the updated values. A single process ([`Solo`]) skips every
//! collective, so its steps are those of a run without data parallelism, bit for bit.

use anyhow::{Context, Result};
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
            if bucket[0].1.device().is_cpu() {
                self.average_on_host(grads, bucket, elements, scale)?;
            } else {
                self.average_on_device(grads, bucket, scale)?;
            }
            start = end;
        }
        Ok(())
    }

    /// Averages one bucket of CPU gradients in a host buffer.
    fn average_on_host(
        &self,
        grads: &mut GradStore,
        bucket: &[(&Param, Tensor)],
        elements: usize,
        scale: f32,
    ) -> Result<()> {
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
        Ok(())
    }

    /// Averages one bucket of gradients on their device, as one flat tensor.
    fn average_on_device(
        &self,
        grads: &mut GradStore,
        bucket: &[(&Param, Tensor)],
        scale: f32,
    ) -> Result<()> {
        let flat = bucket
            .iter()
            .map(|(_, g)| g.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let sum = self.comm.all_reduce_sum_tensor(&Tensor::cat(&flat, 0)?)?;
        let mean = (sum * f64::from(scale))?;
        let mut at = 0;
        for (p, g) in bucket {
            let n = g.elem_count();
            let part = mean.narrow(0, at, n)?.reshape(g.shape())?;
            grads.insert(p.var.as_tensor(), part.to_dtype(g.dtype())?);
            at += n;
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
            let total: usize = share.iter().map(|p| p.var.elem_count()).sum();
            let Some(first) = share.first() else {
                continue;
            };
            let flat = if from == rank {
                let parts = share
                    .iter()
                    .map(|p| p.var.to_dtype(DType::F32)?.flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            } else {
                // Only the shape is read here: a view of one value, not a buffer.
                Tensor::zeros((), DType::F32, first.var.device())?.broadcast_as(total)?
            };
            let flat = self
                .comm
                .broadcast_tensor(&flat, from)
                .with_context(|| format!("receiving rank {from}'s updated parameters"))?;
            if from == rank {
                continue;
            }
            let mut at = 0;
            for p in share {
                let n = p.var.elem_count();
                let values = flat.narrow(0, at, n)?.reshape(p.var.shape())?;
                p.var.set(&values.to_dtype(p.var.dtype())?)?;
                at += n;
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
    use candle_core::{Device, Var};
    use serde_json::json;

    /// What the other rank of a two-rank job contributes: value `i` of a flat buffer.
    fn other(i: usize) -> f32 {
        (i as f32 * 0.7).cos()
    }

    /// Rank 0 of a two-rank job whose other rank sums in `other(i)` and broadcasts
    /// `other(i)` as its share.
    struct Pair;

    impl Collectives for Pair {
        fn engine(&self) -> &'static str {
            "a pair"
        }
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) {
            buf.iter_mut().enumerate().for_each(|(i, x)| *x += other(i));
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) {
            unreachable!()
        }
        fn all_gather_bytes(&self, _: &[u8]) -> Vec<Vec<u8>> {
            unreachable!()
        }
        fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Vec<u8> {
            match root {
                0 => bytes,
                _ => {
                    let n = PEER_SHARE;
                    (0..n).flat_map(|i| other(i).to_le_bytes()).collect()
                }
            }
        }
        fn gather_bytes(&self, _: Vec<u8>, _: usize) -> Vec<Vec<u8>> {
            unreachable!()
        }
        fn barrier(&self) {}
        fn abort(&self, _: i32) -> ! {
            unreachable!()
        }
    }

    const SHAPES: [&[usize]; 4] = [&[3, 4], &[5], &[2, 3, 2], &[7]];
    /// Values owned by rank 1 when it owns parameters 1 and 3.
    const PEER_SHARE: usize = 5 + 7;

    fn params() -> Vec<Param> {
        SHAPES
            .iter()
            .enumerate()
            .map(|(k, shape)| {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|i| (i + 10 * k) as f32 * 0.01).collect();
                let t = Tensor::from_vec(values, *shape, &Device::Cpu).unwrap();
                Param::with_default_label(format!("p{k}"), Var::from_tensor(&t).unwrap())
            })
            .collect()
    }

    /// Gradients of known values: parameter k's is `sin(i + k)`.
    fn grads(params: &[Param]) -> GradStore {
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (k, p) in params.iter().enumerate() {
            let n = p.var.elem_count();
            let g: Vec<f32> = (0..n).map(|i| ((i + k) as f32).sin()).collect();
            let g = Tensor::from_vec(g, p.var.shape(), &Device::Cpu).unwrap();
            loss = (loss + (p.var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        loss.backward().unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn gradients_average_alike_in_host_buffers_and_as_device_tensors() {
        let params = params();
        let parallel = DataParallel::new(Arc::new(Pair));
        let present = |g: &GradStore| -> Vec<(&Param, Tensor)> {
            params
                .iter()
                .map(|p| (p, g.get(p.var.as_tensor()).unwrap().clone()))
                .collect()
        };
        let (mut host, mut device) = (grads(&params), grads(&params));
        let elements = SHAPES.iter().map(|s| s.iter().product::<usize>()).sum();
        let bucket = present(&host);
        parallel
            .average_on_host(&mut host, &bucket, elements, 0.5)
            .unwrap();
        let bucket = present(&device);
        parallel
            .average_on_device(&mut device, &bucket, 0.5)
            .unwrap();
        let mut at = 0;
        for (k, p) in params.iter().enumerate() {
            let (h, d) = (
                host.get(p.var.as_tensor()).unwrap(),
                device.get(p.var.as_tensor()).unwrap(),
            );
            assert_eq!(h.dims(), p.var.dims());
            assert_eq!(d.dims(), p.var.dims());
            let want: Vec<f32> = (0..p.var.elem_count())
                .map(|i| (((i + k) as f32).sin() + other(at + i)) * 0.5)
                .collect();
            assert_eq!(flat(h), want, "{}", p.name);
            assert_eq!(flat(d), want, "{}", p.name);
            at += p.var.elem_count();
        }
    }

    #[test]
    fn updated_parameters_come_from_their_owners() {
        let params = params();
        let before: Vec<Vec<f32>> = params.iter().map(|p| flat(p.var.as_tensor())).collect();
        DataParallel::new(Arc::new(Pair))
            .share_updates(&params, &[0, 1, 0, 1])
            .unwrap();
        // This rank's own parameters are kept; rank 1's arrive in order, one flat share.
        assert_eq!(flat(params[0].var.as_tensor()), before[0]);
        assert_eq!(flat(params[2].var.as_tensor()), before[2]);
        assert_eq!(
            flat(params[1].var.as_tensor()),
            (0..5).map(other).collect::<Vec<_>>()
        );
        assert_eq!(
            flat(params[3].var.as_tensor()),
            (5..12).map(other).collect::<Vec<_>>()
        );
        assert_eq!(params[3].var.dims(), [7]);
    }

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
