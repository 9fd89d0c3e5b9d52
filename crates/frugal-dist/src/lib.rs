//! Collectives for data-parallel training behind one small interface: [`Solo`] for a single
//! process (no MPI at all), MPI ranks (the `mpi` feature) launched by `mpirun`, and NCCL ranks
//! for GPUs (the `nccl` feature), launched by `mpirun` or by torchrun-style variables.
//!
//! Every collective is deterministic across ranks: all ranks receive bit-identical results, so
//! replicas that start equal stay equal.

mod launch;
#[cfg(feature = "mpi")]
mod mpi_ranks;
#[cfg(feature = "nccl")]
mod nccl_ranks;
pub mod rendezvous;
#[cfg(any(feature = "mpi", feature = "nccl"))]
mod watchdog;

use candle_core::{DType, Tensor};
pub use launch::{join, Launch};
#[cfg(feature = "mpi")]
pub use mpi_ranks::MpiRanks;
#[cfg(feature = "nccl")]
pub use nccl_ranks::NcclRanks;
use std::sync::Arc;

/// What can go wrong when joining the ranks of a job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process was started by an MPI launcher, but the binary has no MPI support.
    #[error("this process was started by an MPI launcher ({variable} is set), but this frugal was built without MPI; build it with `cargo build --release --features mpi` (after `scripts/setup-mpi.sh`)")]
    NoMpi { variable: &'static str },
    /// Torchrun-style variables name several ranks but no engine can join them.
    #[error("WORLD_SIZE={world_size} asks for {world_size} ranks: torchrun-style launches join GPU ranks with NCCL (--device cuda and a frugal built by `scripts/build-cuda.sh --nccl`{}); CPU ranks are joined by MPI: launch with `mpirun -np {world_size} frugal ...` (a build with --features mpi)", if *.gpu { ", which this one was not" } else { "" })]
    NoEngine { world_size: usize, gpu: bool },
    /// A launcher variable that more than one rank needs is not set.
    #[error("{0} is not set, but WORLD_SIZE={1} asks for {1} ranks: set RANK (0..WORLD_SIZE), and MASTER_ADDR and MASTER_PORT to rank 0's host and a free port, as torchrun does")]
    MissingVariable(&'static str, usize),
    /// A launcher variable that is not a number.
    #[error("the launcher variable {variable}={value} is not a rank count or index")]
    BadVariable {
        variable: &'static str,
        value: String,
    },
    /// MPI was there but could not start.
    #[error("MPI could not be initialized: {0}")]
    Init(String),
    /// The ranks could not meet over TCP.
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// NCCL could not join the ranks.
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// Collective operations over the ranks of a job. Every rank calls the same collectives in the
/// same order; each call returns when all ranks have joined it.
pub trait Collectives: Send + Sync {
    /// The engine that joins the ranks, for logs: "one process", "MPI" or "NCCL".
    fn engine(&self) -> &'static str;
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `buf` by its element-wise sum over the ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// Replaces `buf` by its element-wise sum over the ranks, in f64 (losses, counts).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// Replaces rank `root`'s `buf` by its element-wise sum over the ranks; the other ranks'
    /// `buf` stays as it was. Half the traffic of an all-reduce, for sums only one rank needs.
    fn reduce_sum(&self, buf: &mut [f32], root: usize);
    /// Every rank's `mine`, in rank order (lengths may differ).
    fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>>;
    /// Replaces `buf` by rank `root`'s (`buf` has the same length on every rank).
    fn broadcast_f32(&self, buf: &mut [f32], root: usize);
    /// Rank `root`'s `bytes`, on every rank.
    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Vec<u8>;
    /// On rank `root`, every rank's `mine` in rank order (of any size); elsewhere nothing.
    fn gather_bytes(&self, mine: Vec<u8>, root: usize) -> Vec<Vec<u8>>;
    /// Waits until every rank has reached this call.
    fn barrier(&self);
    /// Ends every rank of the job with exit status `code` (a rank failed on its own, and the
    /// others would wait for it).
    fn abort(&self, code: i32) -> !;

    /// `t` (f32) summed element-wise over the ranks, on `t`'s device. Engines on host buffers
    /// pass through the host; NCCL sums on the GPU.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        sum_through_host(self, t)
    }

    /// On rank `root`, `t` (f32) summed element-wise over the ranks, on `t`'s device; the other
    /// ranks get `t` back.
    fn reduce_sum_tensor(&self, t: &Tensor, root: usize) -> candle_core::Result<Tensor> {
        reduce_through_host(self, t, root)
    }

    /// Rank `root`'s `t` (f32) on every rank, on `t`'s device; the other ranks pass a tensor of
    /// the same shape, whose values are not read (a broadcast view of one value costs nothing).
    fn broadcast_tensor(&self, t: &Tensor, root: usize) -> candle_core::Result<Tensor> {
        broadcast_through_host(self, t, root)
    }

    /// True on rank 0, the rank that logs and writes.
    fn is_lead(&self) -> bool {
        self.rank() == 0
    }
}

/// `t`'s values as f32, in a host buffer (the buffer the host collectives work on).
fn host_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// [`Collectives::all_reduce_sum_tensor`] on a host copy of `t`.
fn sum_through_host<C: Collectives + ?Sized>(comm: &C, t: &Tensor) -> candle_core::Result<Tensor> {
    let mut values = host_values(t)?;
    comm.all_reduce_sum(&mut values);
    Tensor::from_vec(values, t.shape(), t.device())
}

/// [`Collectives::reduce_sum_tensor`] on a host copy of `t`.
fn reduce_through_host<C: Collectives + ?Sized>(
    comm: &C,
    t: &Tensor,
    root: usize,
) -> candle_core::Result<Tensor> {
    let mut values = host_values(t)?;
    comm.reduce_sum(&mut values, root);
    if comm.rank() != root {
        return Ok(t.clone());
    }
    Tensor::from_vec(values, t.shape(), t.device())
}

/// [`Collectives::broadcast_tensor`] through a host buffer.
fn broadcast_through_host<C: Collectives + ?Sized>(
    comm: &C,
    t: &Tensor,
    root: usize,
) -> candle_core::Result<Tensor> {
    let mut values = match comm.rank() == root {
        true => host_values(t)?,
        false => vec![0.0; t.elem_count()],
    };
    comm.broadcast_f32(&mut values, root);
    Tensor::from_vec(values, t.shape(), t.device())
}

/// A single process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collectives for Solo {
    fn engine(&self) -> &'static str {
        "one process"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) {}
    fn reduce_sum(&self, _buf: &mut [f32], _root: usize) {}
    fn broadcast_f32(&self, _buf: &mut [f32], _root: usize) {}
    fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        vec![mine.to_vec()]
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>, _root: usize) -> Vec<u8> {
        bytes
    }
    fn gather_bytes(&self, mine: Vec<u8>, _root: usize) -> Vec<Vec<u8>> {
        vec![mine]
    }
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A single process's collectives, shareable.
pub fn solo() -> Arc<dyn Collectives> {
    Arc::new(Solo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_reduces_and_gathers_to_itself() {
        let solo = Solo;
        let mut v = [1.5f32, -2.0];
        solo.all_reduce_sum(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        solo.reduce_sum(&mut v, 0);
        solo.broadcast_f32(&mut v, 0);
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(solo.all_gather_bytes(b"abc"), vec![b"abc".to_vec()]);
        assert_eq!(solo.broadcast_bytes(b"x".to_vec(), 0), b"x");
        assert_eq!(solo.gather_bytes(b"y".to_vec(), 0), vec![b"y".to_vec()]);
        assert!(solo.is_lead());
        let t = Tensor::new(&[[1.5f32, -2.0], [0.25, 4.0]], &candle_core::Device::Cpu).unwrap();
        let sum = solo.all_reduce_sum_tensor(&t).unwrap();
        assert_eq!(sum.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        let got = solo.broadcast_tensor(&t, 0).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        let reduced = solo.reduce_sum_tensor(&t.t().unwrap(), 0).unwrap();
        assert_eq!(
            reduced.to_vec2::<f32>().unwrap(),
            [[1.5, 0.25], [-2.0, 4.0]]
        );
    }
}
