//! Data parallelism: each rank computes the gradients of its share of a global batch, and the
//! ranks average them before every optimizer step, in buckets. The optimizer state is sharded
//! (ZeRO-1 style, see [`ShardPlan`]): each rank keeps the state of its share of the parameters,
//! and of a piece of each large state-full one, and updates those, so each mean is reduced to
//! the rank that owns it only (half the traffic of an all-reduce), and the ranks then exchange
//! the updated values. A single process ([`Solo`]) skips every collective, so its steps are
//! those of a run without data parallelism, bit for bit.

use crate::grads::{chunk_squares, clip_factor, norm_in_name_order, NORM_CHUNK};
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use frugal::{Frugal, Param, ShardPlan};
use frugal_dist::{Collectives, Solo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// Gradient elements averaged per collective: 8 Mi f32 (32 MiB), so that the buffers of a
/// bucket stay small next to the gradients.
const BUCKET_ELEMENTS: usize = 8 << 20;

/// The ranks a trainer shares its batches with, and which rank updates each parameter (or
/// each piece of one) when the optimizer is sharded.
#[derive(Clone)]
pub struct DataParallel {
    comm: Arc<dyn Collectives>,
    /// Which rank updates each parameter or piece; none while every rank updates all.
    shards: Option<Arc<ShardPlan>>,
}

/// A range of one parameter's elements, with its gradient.
type Segment<'a> = (&'a Param, Tensor, Range<usize>);

impl Default for DataParallel {
    fn default() -> Self {
        DataParallel::new(Arc::new(Solo))
    }
}

impl DataParallel {
    /// Data parallelism over the ranks of `comm`.
    pub fn new(comm: Arc<dyn Collectives>) -> Self {
        DataParallel { comm, shards: None }
    }

    /// The same ranks with a sharded optimizer, whose pieces are updated by the ranks of
    /// `shards` (see [`Frugal::shard_evenly`]): each averaged gradient piece goes to its rank
    /// only.
    pub fn with_shards(self, shards: ShardPlan) -> Self {
        DataParallel {
            shards: Some(shards.into()),
            ..self
        }
    }

    /// Which rank updates each parameter or piece (a sharded optimizer).
    pub fn shards(&self) -> Option<&ShardPlan> {
        self.shards.as_deref()
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
    /// With [`DataParallel::shards`], each piece's mean reaches its owner only: the other ranks
    /// keep their own gradient of it, which a sharded optimizer does not read.
    pub fn average(&self, grads: &mut GradStore, params: &[Param]) -> Result<()> {
        let world = self.world_size();
        if world == 1 {
            return Ok(());
        }
        let shards = self.shards();
        let mut segments: Vec<(Option<usize>, Segment)> = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            match shards {
                None => segments.push((None, (p, g.clone(), 0..g.elem_count()))),
                Some(plan) => segments.extend(
                    plan.pieces(i)
                        .iter()
                        .map(|piece| (Some(piece.rank), (p, g.clone(), piece.range.clone()))),
                ),
            }
        }
        let roots: Vec<Option<usize>> = match shards {
            Some(_) => (0..world).map(Some).collect(),
            None => vec![None],
        };
        let scale = 1.0 / world as f32;
        for root in roots {
            let share: Vec<Segment> = segments
                .iter()
                .filter(|(r, _)| *r == root)
                .map(|(_, segment)| segment.clone())
                .collect();
            let mut start = 0;
            while start < share.len() {
                let mut end = start;
                let mut elements = 0;
                while end < share.len() && (end == start || elements < BUCKET_ELEMENTS) {
                    elements += share[end].2.len();
                    end += 1;
                }
                let bucket = &share[start..end];
                let means = if bucket[0].1.device().is_cpu() {
                    self.mean_on_host(bucket, elements, scale, root)?
                } else {
                    self.mean_on_device(bucket, scale, root)?
                };
                if let Some(means) = means {
                    insert_means(grads, bucket, &means)?;
                }
                start = end;
            }
        }
        Ok(())
    }

    /// Σ g² of each gradient in `grads` (named, in `params` order) after
    /// [`DataParallel::average`], added in f64 from f32 sums of [`NORM_CHUNK`] elements: with
    /// shards, each rank measures the chunks of the means it owns and the ranks add their
    /// figures, so that every rank gets every mean's, as one process would.
    pub fn squared_norms<'a>(
        &self,
        grads: &GradStore,
        params: &'a [Param],
    ) -> Result<Vec<(&'a str, f64)>> {
        let (rank, shards) = (self.rank(), self.shards());
        let mut spans = Vec::with_capacity(params.len());
        let mut chunks: Vec<f64> = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let at = chunks.len();
            chunks.resize(at + g.elem_count().div_ceil(NORM_CHUNK), 0.0);
            let mine: Vec<Range<usize>> = match shards {
                None => std::iter::once(0..g.elem_count()).collect(),
                Some(plan) => plan
                    .pieces(i)
                    .iter()
                    .filter(|piece| piece.rank == rank)
                    .map(|piece| piece.range.clone())
                    .collect(),
            };
            for range in mine {
                let first = at + range.start / NORM_CHUNK;
                for (k, s) in chunk_squares(g, range)?.into_iter().enumerate() {
                    chunks[first + k] = f64::from(s);
                }
            }
            spans.push((p.name.as_str(), at..chunks.len()));
        }
        if shards.is_some() && self.world_size() > 1 {
            // One owner's figure and zeros: the sums are exact.
            self.comm.all_reduce_sum_f64(&mut chunks);
        }
        Ok(spans
            .into_iter()
            .map(|(name, span)| (name, chunks[span].iter().sum()))
            .collect())
    }

    /// Scales the gradients after [`DataParallel::average`] so that their global L2 norm (see
    /// [`norm_in_name_order`]) is at most `max` (0: no clipping), and returns the norm before
    /// clipping. With shards only the gradients this rank owns some of are scaled.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, params: &[Param], max: f64) -> Result<f64> {
        let norm = norm_in_name_order(self.squared_norms(grads, params)?);
        if let Some(scale) = clip_factor(norm, max) {
            let (rank, shards) = (self.rank(), self.shards());
            for (i, p) in params.iter().enumerate() {
                if shards.is_some_and(|s| !s.owns(i, rank)) {
                    continue;
                }
                if let Some(g) = grads.remove(p.var.as_tensor()) {
                    grads.insert(p.var.as_tensor(), (g * scale)?);
                }
            }
        }
        Ok(norm)
    }

    /// Sums a bucket over the ranks in a host buffer, into every rank's (no `root`) or into
    /// `root`'s only, and scales it by `scale`: the means, where this rank gets them.
    fn mean_on_host(
        &self,
        bucket: &[Segment],
        elements: usize,
        scale: f32,
        root: Option<usize>,
    ) -> Result<Option<Tensor>> {
        let mut flat = Vec::with_capacity(elements);
        for (_, g, range) in bucket {
            flat.extend(flat_range(g, range)?.to_vec1::<f32>()?);
        }
        match root {
            None => self.comm.all_reduce_sum(&mut flat),
            Some(r) => self.comm.reduce_sum(&mut flat, r),
        }
        if root.is_some_and(|r| r != self.rank()) {
            return Ok(None);
        }
        flat.iter_mut().for_each(|x| *x *= scale);
        Ok(Some(Tensor::from_vec(
            flat,
            elements,
            bucket[0].1.device(),
        )?))
    }

    /// The means of a bucket on its device, summed as one flat tensor (see
    /// [`DataParallel::mean_on_host`]).
    fn mean_on_device(
        &self,
        bucket: &[Segment],
        scale: f32,
        root: Option<usize>,
    ) -> Result<Option<Tensor>> {
        let flat = bucket
            .iter()
            .map(|(_, g, range)| flat_range(g, range))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = Tensor::cat(&flat, 0)?;
        let sum = match root {
            None => self.comm.all_reduce_sum_tensor(&flat)?,
            Some(r) if r == self.rank() => self.comm.reduce_sum_tensor(&flat, r)?,
            Some(r) => {
                self.comm.reduce_sum_tensor(&flat, r)?;
                return Ok(None);
            }
        };
        Ok(Some((sum * f64::from(scale))?))
    }

    /// Sends every rank's updated parameters to the others after a sharded step (each rank
    /// updated only the pieces it owns), one rank's share at a time; nothing without shards.
    pub fn share_updates(&self, params: &[Param]) -> Result<()> {
        let Some(shards) = self.shards() else {
            return Ok(());
        };
        let rank = self.rank();
        for from in 0..self.world_size() {
            let share: Vec<(&Param, Range<usize>)> = params
                .iter()
                .enumerate()
                .flat_map(|(i, p)| {
                    shards
                        .pieces(i)
                        .iter()
                        .filter(|piece| piece.rank == from)
                        .map(move |piece| (p, piece.range.clone()))
                })
                .collect();
            let total: usize = share.iter().map(|(_, r)| r.len()).sum();
            let Some((first, _)) = share.first() else {
                continue;
            };
            let flat = if from == rank {
                let parts = share
                    .iter()
                    .map(|(p, range)| flat_range(p.var.as_tensor(), range))
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
            for (p, range) in share {
                let values = flat.narrow(0, at, range.len())?.to_dtype(p.var.dtype())?;
                if range.len() == p.var.elem_count() {
                    p.var.set(&values.reshape(p.var.shape())?)?;
                } else {
                    // A piece: written in place into the parameter's storage.
                    p.var.flatten_all()?.slice_set(&values, 0, range.start)?;
                }
                at += range.len();
            }
        }
        Ok(())
    }

    /// Writes every rank's part of the sharded `optimizer`'s state into `dir`, the checkpoint
    /// directory rank 0 made, as [`crate::checkpoint::optimizer_part`] names it: each rank
    /// writes its own part, at the same time as the others. A rank that cannot see `dir` (its
    /// file system is not rank 0's) sends its part to rank 0, which writes it, one rank at a
    /// time. Fails on every rank when a part could not be written, naming the rank and why.
    pub fn save_state_parts(&self, optimizer: &Frugal, dir: &Path) -> Result<()> {
        let (rank, world) = (self.rank(), self.world_size());
        let file = |r: usize| dir.join(crate::checkpoint::optimizer_part(r, world));
        let sees: Vec<bool> = match world {
            1 => vec![true],
            _ => self
                .per_rank(dir.is_dir() as usize)
                .iter()
                .map(|&s| s == 1)
                .collect(),
        };
        let mut outcome: Result<()> = match sees[rank] {
            true => optimizer
                .save_state_part(&file(rank))
                .with_context(|| format!("cannot write {}", file(rank).display())),
            false => Ok(()),
        };
        for from in (1..world).filter(|&r| !sees[r]) {
            let mine = match (rank == from).then(|| optimizer.owned_state()) {
                Some(Ok(bytes)) => bytes,
                Some(Err(e)) => {
                    outcome = Err(e.into());
                    Vec::new()
                }
                None => Vec::new(),
            };
            let parts = self.comm.gather_bytes(mine, 0);
            if rank == 0 && !parts[from].is_empty() && outcome.is_ok() {
                outcome = frugal::fs::write_atomically(&file(from), &parts[from])
                    .with_context(|| format!("cannot write rank {from}'s part"));
            }
        }
        if world == 1 {
            return outcome;
        }
        let mine = outcome.err().map(|e| format!("{e:#}")).unwrap_or_default();
        let failed: Vec<String> = self
            .comm
            .all_gather_bytes(mine.as_bytes())
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.is_empty())
            .map(|(r, e)| format!("rank {r}: {}", String::from_utf8_lossy(e)))
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        let message = format!(
            "the optimizer state could not be saved ({}); check that the run directory has room and is writable",
            failed.join("; ")
        );
        match rank {
            0 => Err(anyhow::anyhow!(message)),
            _ => Err(SharedError(message).into()),
        }
    }

    /// Every rank's `value`, in rank order, for a data-parallel run's summary; nothing in one
    /// process.
    pub fn per_rank(&self, value: usize) -> Vec<usize> {
        if self.world_size() == 1 {
            return Vec::new();
        }
        self.comm
            .all_gather_bytes(&(value as u64).to_le_bytes())
            .iter()
            .map(|b| b.as_slice().try_into().map_or(0, u64::from_le_bytes) as usize)
            .collect()
    }

    /// Every rank's peak resident memory ([`crate::metrics::peak_rss_bytes`]), in rank order;
    /// nothing in one process.
    pub fn peak_rss_per_rank(&self) -> Vec<u64> {
        let peak = crate::metrics::peak_rss_bytes() as usize;
        self.per_rank(peak).into_iter().map(|b| b as u64).collect()
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

/// The elements `range` of `t`, flat, as f32.
fn flat_range(t: &Tensor, range: &Range<usize>) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)?
        .flatten_all()?
        .narrow(0, range.start, range.len())
}

/// Puts the means of a bucket (`flat`, in the bucket's order) in place of its gradients: a
/// whole gradient is replaced, a piece is written over the rank's own gradient of the rest.
fn insert_means(grads: &mut GradStore, bucket: &[Segment], flat: &Tensor) -> Result<()> {
    let mut at = 0;
    for (p, g, range) in bucket {
        let n = range.len();
        let mean = flat.narrow(0, at, n)?;
        let mean = if n == g.elem_count() {
            mean.reshape(g.shape())?
        } else {
            let own = g.to_dtype(DType::F32)?.flatten_all()?;
            let after = own.elem_count() - range.end;
            let mut parts = vec![own.narrow(0, 0, range.start)?, mean];
            parts.push(own.narrow(0, range.end, after)?);
            Tensor::cat(&parts, 0)?.reshape(g.shape())?
        };
        grads.insert(p.var.as_tensor(), mean.to_dtype(g.dtype())?);
        at += n;
    }
    Ok(())
}

/// Keeps a run's global batch when it resumes on `world` ranks after starting on `started`: the
/// micro-batches per step change (or else the batch per rank), and a note says so; an error
/// where `world` ranks cannot share the batch evenly. `unit` names what a batch holds.
pub fn keep_global_batch(
    started: usize,
    world: usize,
    batch_size: &mut usize,
    grad_accum: &mut usize,
    unit: &str,
) -> Result<Option<String>> {
    if started == world {
        return Ok(None);
    }
    let global = started * *batch_size * *grad_accum;
    if global.is_multiple_of(world * *batch_size) {
        *grad_accum = global / (world * *batch_size);
    } else if global.is_multiple_of(world * *grad_accum) {
        *batch_size = global / (world * *grad_accum);
    } else {
        anyhow::bail!(
            "the run's global batch of {global} {unit} ({started} ranks × batch {batch_size} × {grad_accum} micro-batches) cannot be shared evenly by {world} ranks; resume on a number of ranks that divides it"
        );
    }
    Ok(Some(format!(
        "the run was started on {started} rank(s); on {world} it keeps its global batch of {global} {unit} as batch {batch_size} × {grad_accum} micro-batches per rank"
    )))
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

    /// Rank 0 of a two-rank job whose other rank sums in `other(i)` (also when reducing to
    /// rank 0; it keeps its sums to itself), adds its `squares` to f64 sums, and broadcasts
    /// `other(i)` as its share of `share` values.
    struct Pair {
        squares: &'static [f64],
        share: usize,
    }

    /// Rank 1's figures in a sum of squared norms, when it owns parameters 1 and 3.
    const PEER_SQUARES: [f64; 4] = [0.0, 4.0, 0.0, 9.0];

    /// Rank 1 of [`params`] owning parameters 1 and 3.
    fn pair() -> Arc<Pair> {
        Arc::new(Pair {
            squares: &PEER_SQUARES,
            share: PEER_SHARE,
        })
    }

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
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
            assert_eq!(buf.len(), self.squares.len());
            buf.iter_mut().zip(self.squares).for_each(|(x, y)| *x += y);
        }
        fn reduce_sum(&self, buf: &mut [f32], root: usize) {
            if root == 0 {
                self.all_reduce_sum(buf);
            }
        }
        fn all_gather_bytes(&self, _: &[u8]) -> Vec<Vec<u8>> {
            unreachable!()
        }
        fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
            if root == 1 {
                assert_eq!(buf.len(), self.share);
                buf.iter_mut().enumerate().for_each(|(i, x)| *x = other(i));
            }
        }
        fn broadcast_bytes(&self, _: Vec<u8>, _: usize) -> Vec<u8> {
            unreachable!()
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
        let parallel = DataParallel::new(pair());
        let present = |g: &GradStore| -> Vec<Segment> {
            params
                .iter()
                .map(|p| {
                    (
                        p,
                        g.get(p.var.as_tensor()).unwrap().clone(),
                        0..p.var.elem_count(),
                    )
                })
                .collect()
        };
        // Into both ranks, into this one, and into the other one (this rank's stay its own).
        for root in [None, Some(0), Some(1)] {
            let (mut host, mut device) = (grads(&params), grads(&params));
            let elements = SHAPES.iter().map(|s| s.iter().product::<usize>()).sum();
            let bucket = present(&host);
            let means = parallel.mean_on_host(&bucket, elements, 0.5, root).unwrap();
            assert_eq!(means.is_some(), root != Some(1));
            if let Some(means) = means {
                insert_means(&mut host, &bucket, &means).unwrap();
            }
            let bucket = present(&device);
            if let Some(means) = parallel.mean_on_device(&bucket, 0.5, root).unwrap() {
                insert_means(&mut device, &bucket, &means).unwrap();
            }
            let mut at = 0;
            for (k, p) in params.iter().enumerate() {
                let (h, d) = (
                    host.get(p.var.as_tensor()).unwrap(),
                    device.get(p.var.as_tensor()).unwrap(),
                );
                assert_eq!(h.dims(), p.var.dims());
                assert_eq!(d.dims(), p.var.dims());
                let want: Vec<f32> = (0..p.var.elem_count())
                    .map(|i| match root {
                        Some(1) => ((i + k) as f32).sin(),
                        _ => (((i + k) as f32).sin() + other(at + i)) * 0.5,
                    })
                    .collect();
                assert_eq!(flat(h), want, "{} {root:?}", p.name);
                assert_eq!(flat(d), want, "{} {root:?}", p.name);
                at += p.var.elem_count();
            }
        }
    }

    #[test]
    fn sharded_means_reach_their_owners_and_clipping_measures_them_all() {
        let params = params();
        let owners = [0, 1, 0, 1];
        let numels: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
        let plan = ShardPlan::whole(&owners, &numels, 2);
        let parallel = DataParallel::new(pair()).with_shards(plan);
        let mut g = grads(&params);
        parallel.average(&mut g, &params).unwrap();
        // This rank's parameters 0 and 2 travel as one bucket, reduced to it; 1 and 3 are
        // rank 1's, so their gradients here stay this rank's own.
        let mut at = 0;
        for (k, p) in params.iter().enumerate() {
            let n = p.var.elem_count();
            let want: Vec<f32> = (0..n)
                .map(|i| match owners[k] {
                    0 => (((i + k) as f32).sin() + other(at + i)) * 0.5,
                    _ => ((i + k) as f32).sin(),
                })
                .collect();
            assert_eq!(flat(g.get(p.var.as_tensor()).unwrap()), want, "{}", p.name);
            at += if owners[k] == 0 { n } else { 0 };
        }
        // The global norm adds this rank's means' squares to rank 1's figures.
        let square = |k: usize| {
            let v = flat(g.get(params[k].var.as_tensor()).unwrap());
            v.iter().map(|x| x * x).sum::<f32>() as f64
        };
        let norm = (square(0) + PEER_SQUARES[1] + square(2) + PEER_SQUARES[3]).sqrt();
        let before: Vec<Vec<f32>> = (0..4)
            .map(|k| flat(g.get(params[k].var.as_tensor()).unwrap()))
            .collect();
        let got = parallel.clip_grad_norm(&mut g, &params, 0.5).unwrap();
        assert!((got - norm).abs() < 1e-9 * norm, "{got} vs {norm}");
        for (k, p) in params.iter().enumerate() {
            let after = flat(g.get(p.var.as_tensor()).unwrap());
            match owners[k] {
                0 => after.iter().zip(&before[k]).for_each(|(a, b)| {
                    assert!((a - b * (0.5 / norm) as f32).abs() < 1e-6, "{a} {b}")
                }),
                _ => assert_eq!(after, before[k]),
            }
        }
    }

    #[test]
    fn one_process_clips_to_the_bound() {
        let values: [&[f32]; 2] = [&[3.0, 4.0], &[4.0]];
        let params: Vec<Param> = ["a", "b"]
            .iter()
            .zip(values)
            .map(|(name, v)| {
                let t = Tensor::new(v, &Device::Cpu).unwrap();
                Param::with_default_label(*name, Var::from_tensor(&t).unwrap())
            })
            .collect();
        // Gradient = the parameter's value: d(Σ p²/2)/dp.
        let loss = |params: &[Param]| {
            let terms: Vec<Tensor> = params
                .iter()
                .map(|p| (p.var.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap())
                .collect();
            Tensor::stack(&terms, 0).unwrap().sum_all().unwrap()
        };
        let solo = DataParallel::default();
        let get = |g: &GradStore, p: &Param| flat(g.get(p.var.as_tensor()).unwrap());
        // ‖(3, 4, 4)‖ = √41; clipped to 1 every entry shrinks by 1/√41.
        let mut g = loss(&params).backward().unwrap();
        let norm = solo.clip_grad_norm(&mut g, &params, 1.0).unwrap();
        assert!((norm - 41f64.sqrt()).abs() < 1e-12);
        let a = get(&g, &params[0]);
        assert!((a[0] as f64 - 3.0 / 41f64.sqrt()).abs() < 1e-6);
        let clipped = solo.clip_grad_norm(&mut g, &params, 0.0).unwrap();
        assert!((clipped - 1.0).abs() < 1e-6);
        // Under the bound nothing changes.
        let mut g = loss(&params).backward().unwrap();
        solo.clip_grad_norm(&mut g, &params, 10.0).unwrap();
        assert_eq!(get(&g, &params[1]), [4.0]);
    }

    #[test]
    fn updated_parameters_come_from_their_owners() {
        let params = params();
        let before: Vec<Vec<f32>> = params.iter().map(|p| flat(p.var.as_tensor())).collect();
        let numels: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
        DataParallel::new(pair())
            .with_shards(ShardPlan::whole(&[0, 1, 0, 1], &numels, 2))
            .share_updates(&params)
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
    fn pieces_of_a_split_parameter_reach_their_owners_and_come_back_from_them() {
        use frugal::sharding::{Piece, PIECE};
        // `a` is split: its first PIECE values are this rank's, the last 10 and `b` rank 1's.
        let n = PIECE + 10;
        let var = |values: Vec<f32>| Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap());
        let a: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
        let params = [
            Param::with_default_label("a", var(a.clone()).unwrap()),
            Param::with_default_label("b", var(vec![1.0, 2.0, 3.0]).unwrap()),
        ];
        let pieces = vec![
            vec![
                Piece {
                    rank: 0,
                    range: 0..PIECE,
                },
                Piece {
                    rank: 1,
                    range: PIECE..n,
                },
            ],
            vec![Piece {
                rank: 1,
                range: 0..3,
            }],
        ];
        let plan = ShardPlan::new(2, pieces).unwrap();
        // Rank 1's figures for a's two chunks and b's one.
        static SQUARES: [f64; 3] = [0.0, 500.0, 700.0];
        let comm = Pair {
            squares: &SQUARES,
            share: 10 + 3,
        };
        let parallel = DataParallel::new(Arc::new(comm)).with_shards(plan);
        let grad = |k: usize| (k as f32 * 0.01).sin();
        let loss = (params[0].var.as_tensor()
            * Tensor::new((0..n).map(grad).collect::<Vec<_>>(), &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
        let loss = (loss + params[1].var.as_tensor().sum_all().unwrap()).unwrap();
        let mut g = loss.backward().unwrap();
        parallel.average(&mut g, &params).unwrap();
        let mean_a = flat(g.get(params[0].var.as_tensor()).unwrap());
        for (k, x) in mean_a.iter().enumerate() {
            let want = match k < PIECE {
                true => (grad(k) + other(k)) * 0.5,
                false => grad(k), // rank 1's piece: this rank's own gradient
            };
            assert_eq!(*x, want, "a[{k}]");
        }
        assert_eq!(flat(g.get(params[1].var.as_tensor()).unwrap()), [1.0; 3]);
        // The norm: this rank's chunk of a, rank 1's chunk of a and b.
        let mine: f64 = mean_a[..PIECE].iter().map(|&x| f64::from(x * x)).sum();
        let norm = parallel.clip_grad_norm(&mut g, &params, 0.0).unwrap();
        let want = (mine + 500.0 + 700.0).sqrt();
        assert!((norm - want).abs() < 1e-5 * want, "{norm} vs {want}");
        // Rank 1's updated piece of a and all of b arrive; this rank's piece stays.
        parallel.share_updates(&params).unwrap();
        let got = flat(params[0].var.as_tensor());
        assert_eq!(got[..PIECE], a[..PIECE]);
        assert_eq!(got[PIECE..], (0..10).map(other).collect::<Vec<_>>());
        assert_eq!(
            flat(params[1].var.as_tensor()),
            (10..13).map(other).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_resumed_run_keeps_its_global_batch_on_other_ranks() {
        let keep = |started, world, batch, accum| {
            let (mut b, mut a) = (batch, accum);
            keep_global_batch(started, world, &mut b, &mut a, "examples").map(|note| (b, a, note))
        };
        assert_eq!(keep(2, 2, 4, 1).unwrap(), (4, 1, None));
        // 2 × 4 × 1 = 8: one rank takes two micro-batches of 4, four ranks one of 2.
        let (b, a, note) = keep(2, 1, 4, 1).unwrap();
        assert_eq!((b, a), (4, 2));
        assert!(note
            .unwrap()
            .contains("keeps its global batch of 8 examples as batch 4 × 2"));
        let (b, a, _) = keep(2, 4, 4, 1).unwrap();
        assert_eq!((b, a), (2, 1));
        // 8 cannot be shared by 3 ranks.
        let err = keep(2, 3, 4, 1).unwrap_err().to_string();
        assert!(err.contains("cannot be shared evenly by 3 ranks"), "{err}");
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

    /// Rank 0 of a pair whose rank 1 cannot see the checkpoint directory: it sends `part` to
    /// rank 0 and then reports `error` (empty: none).
    struct Distant {
        part: Vec<u8>,
        error: String,
        gathers: std::sync::Mutex<usize>,
    }

    impl Distant {
        fn new(part: Vec<u8>, error: &str) -> Arc<Self> {
            Arc::new(Distant {
                part,
                error: error.into(),
                gathers: Default::default(),
            })
        }
    }

    impl Collectives for Distant {
        fn engine(&self) -> &'static str {
            "a distant pair"
        }
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, _: &mut [f32]) {
            unreachable!()
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64]) {
            unreachable!()
        }
        fn reduce_sum(&self, _: &mut [f32], _: usize) {
            unreachable!()
        }
        /// First whether rank 1 sees the directory (it does not), then its error.
        fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
            let mut calls = self.gathers.lock().unwrap();
            *calls += 1;
            let theirs = match *calls {
                1 => 0u64.to_le_bytes().to_vec(),
                _ => self.error.as_bytes().to_vec(),
            };
            vec![mine.to_vec(), theirs]
        }
        fn broadcast_f32(&self, _: &mut [f32], _: usize) {
            unreachable!()
        }
        fn broadcast_bytes(&self, _: Vec<u8>, _: usize) -> Vec<u8> {
            unreachable!()
        }
        fn gather_bytes(&self, mine: Vec<u8>, root: usize) -> Vec<Vec<u8>> {
            assert_eq!(root, 0);
            vec![mine, self.part.clone()]
        }
        fn barrier(&self) {}
        fn abort(&self, _: i32) -> ! {
            unreachable!()
        }
    }

    #[test]
    fn rank_0_writes_the_part_of_a_rank_that_cannot_see_the_checkpoint() {
        let dir = std::env::temp_dir().join(format!("frugal-distant-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // AdamW after one step, whole or a shard owning `owned`.
        let stepped = |owned: &[Option<Range<usize>>]| {
            let params = params();
            let config = frugal::OptimizerConfig::preset("adamw").unwrap();
            let mut opt = Frugal::from_params(params.clone(), config).unwrap();
            opt.shard(owned).unwrap();
            opt.step_grads(&grads(&params)).unwrap();
            opt
        };
        let n: Vec<usize> = SHAPES.iter().map(|s| s.iter().product()).collect();
        let mine = stepped(&[Some(0..n[0]), None, Some(0..n[2]), None]);
        let theirs = stepped(&[None, Some(0..n[1]), None, Some(0..n[3])]);
        let parallel = DataParallel::new(Distant::new(theirs.owned_state().unwrap(), ""));
        parallel.save_state_parts(&mine, &dir).unwrap();
        let parts: Vec<_> = (0..2)
            .map(|r| dir.join(crate::checkpoint::optimizer_part(r, 2)))
            .collect();
        assert!(std::fs::read(&parts[1]).unwrap() == theirs.owned_state().unwrap());
        let whole = stepped(&n.iter().map(|&k| Some(0..k)).collect::<Vec<_>>());
        let mut joined =
            Frugal::from_params(params(), frugal::OptimizerConfig::preset("adamw").unwrap())
                .unwrap();
        joined.load_state_parts(&parts).unwrap();
        assert!(joined.owned_state().unwrap() == whole.owned_state().unwrap());
        // A rank that failed fails rank 0 too, which names it.
        let failing = DataParallel::new(Distant::new(Vec::new(), "no space left"));
        let err = failing.save_state_parts(&mine, &dir).unwrap_err();
        assert!(
            format!("{err:#}").contains("rank 1: no space left"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
