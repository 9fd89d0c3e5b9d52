//! Collectives for data-parallel training behind one small interface: [`Solo`] for a single
//! process (no MPI at all), and MPI ranks (the `mpi` feature) launched by `mpirun`.
//!
//! Every collective is deterministic across ranks: all ranks receive bit-identical results, so
//! replicas that start equal stay equal.

mod launch;
#[cfg(feature = "mpi")]
mod mpi_ranks;
#[cfg(feature = "mpi")]
mod watchdog;

pub use launch::{from_environment, Launch};
#[cfg(feature = "mpi")]
pub use mpi_ranks::MpiRanks;
use std::sync::Arc;

/// What can go wrong when joining the ranks of a job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process was started by an MPI launcher, but the binary has no MPI support.
    #[error("this process was started by an MPI launcher ({variable} is set), but this frugal was built without MPI; build it with `cargo build --release --features mpi` (after `scripts/setup-mpi.sh`)")]
    NoMpi { variable: &'static str },
    /// Torchrun-style variables name several ranks but no engine can join them.
    #[error("WORLD_SIZE={world_size} asks for {world_size} ranks, but CPU ranks are joined by MPI only; launch with `mpirun -np {world_size} frugal ...` (a build with --features mpi)")]
    NoEngine { world_size: usize },
    /// A launcher variable that is not a number.
    #[error("the launcher variable {variable}={value} is not a rank count or index")]
    BadVariable {
        variable: &'static str,
        value: String,
    },
    /// MPI was there but could not start.
    #[error("MPI could not be initialized: {0}")]
    Init(String),
}

/// Collective operations over the ranks of a job. Every rank calls the same collectives in the
/// same order; each call returns when all ranks have joined it.
pub trait Collectives: Send + Sync {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `buf` by its element-wise sum over the ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// Replaces `buf` by its element-wise sum over the ranks, in f64 (losses, counts).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// Every rank's `mine`, in rank order (lengths may differ).
    fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>>;
    /// Rank `root`'s `bytes`, on every rank.
    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Vec<u8>;
    /// On rank `root`, every rank's `mine` in rank order (of any size); elsewhere nothing.
    fn gather_bytes(&self, mine: Vec<u8>, root: usize) -> Vec<Vec<u8>>;
    /// Waits until every rank has reached this call.
    fn barrier(&self);
    /// Ends every rank of the job with exit status `code` (a rank failed on its own, and the
    /// others would wait for it).
    fn abort(&self, code: i32) -> !;

    /// True on rank 0, the rank that logs and writes.
    fn is_lead(&self) -> bool {
        self.rank() == 0
    }
}

/// A single process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collectives for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) {}
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
        assert_eq!(solo.all_gather_bytes(b"abc"), vec![b"abc".to_vec()]);
        assert_eq!(solo.broadcast_bytes(b"x".to_vec(), 0), b"x");
        assert_eq!(solo.gather_bytes(b"y".to_vec(), 0), vec![b"y".to_vec()]);
        assert!(solo.is_lead());
    }
}
