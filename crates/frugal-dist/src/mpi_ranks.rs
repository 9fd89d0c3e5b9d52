//! MPI ranks (the `mpi` feature): collectives of the MPI library the binary links, over the
//! world communicator of `mpirun`.

use crate::watchdog::Watchdog;
use crate::{Collectives, Error};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::{Equivalence, PartitionMut};
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, Source};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Count;
use std::time::Duration;

/// The ranks of an MPI job. Dropping it finalizes MPI.
pub struct MpiRanks {
    universe: Universe,
    rank: usize,
    size: usize,
    watchdog: Watchdog,
}

impl MpiRanks {
    /// Initializes MPI (once per process); collectives that wait longer than `timeout` end the
    /// process with a message.
    pub fn init(timeout: Duration) -> Result<MpiRanks, Error> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Init("MPI was already initialized in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiRanks {
            universe,
            rank,
            size,
            watchdog: Watchdog::start(rank, timeout),
        })
    }

    fn world(&self) -> SimpleCommunicator {
        self.universe.world()
    }

    /// Sums `buf` over the ranks as a reduce-scatter then an all-gather: each element is summed
    /// once, by one rank, so every rank receives the same bits.
    fn sum<T: Equivalence + Copy + Default>(&self, buf: &mut [T]) {
        let _waiting = self.watchdog.waiting("all-reduce");
        let world = self.world();
        let block = buf.len().div_ceil(self.size);
        let mut padded = vec![T::default(); block * self.size];
        padded[..buf.len()].copy_from_slice(buf);
        let mut mine = vec![T::default(); block];
        world.reduce_scatter_block_into(&padded[..], &mut mine[..], SystemOperation::sum());
        world.all_gather_into(&mine[..], &mut padded[..]);
        buf.copy_from_slice(&padded[..buf.len()]);
    }
}

/// Bytes per message of a broadcast or gather: MPI counts are C ints.
const CHUNK: usize = 1 << 30;

/// MPI counts are C ints: a longer message is a bug of the caller's chunking.
fn count(n: usize) -> Count {
    Count::try_from(n).expect("a collective of more than 2^31 elements; send it in chunks")
}

impl Collectives for MpiRanks {
    fn engine(&self) -> &'static str {
        "MPI"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        self.sum(buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        self.sum(buf)
    }

    fn reduce_sum(&self, buf: &mut [f32], root: usize) {
        let _waiting = self.watchdog.waiting("reduce");
        let world = self.world();
        let to = world.process_at_rank(root as i32);
        if self.rank == root {
            let mine = buf.to_vec();
            to.reduce_into_root(&mine[..], buf, SystemOperation::sum());
        } else {
            to.reduce_into(&buf[..], SystemOperation::sum());
        }
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        let _waiting = self.watchdog.waiting("all-gather");
        let world = self.world();
        let mut lens = vec![0u64; self.size];
        world.all_gather_into(&(mine.len() as u64), &mut lens[..]);
        if lens.iter().all(|&n| n == 0) {
            // Nothing to gather: MPI refuses an empty receive buffer.
            return vec![Vec::new(); self.size];
        }
        let counts: Vec<Count> = lens.iter().map(|&n| count(n as usize)).collect();
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |at, &n| {
                let start = *at;
                *at += n;
                Some(start)
            })
            .collect();
        let mut all = vec![0u8; lens.iter().sum::<u64>() as usize];
        let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
        world.all_gather_varcount_into(mine, &mut parts);
        let mut at = 0;
        lens.iter()
            .map(|&n| {
                let part = all[at..at + n as usize].to_vec();
                at += n as usize;
                part
            })
            .collect()
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
        let _waiting = self.watchdog.waiting("broadcast");
        let world = self.world();
        let root = world.process_at_rank(root as i32);
        for chunk in buf.chunks_mut(CHUNK / 4) {
            root.broadcast_into(chunk);
        }
    }

    fn broadcast_bytes(&self, mut bytes: Vec<u8>, root: usize) -> Vec<u8> {
        let _waiting = self.watchdog.waiting("broadcast");
        let world = self.world();
        let root = world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for chunk in bytes.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
        bytes
    }

    fn gather_bytes(&self, mine: Vec<u8>, root: usize) -> Vec<Vec<u8>> {
        let _waiting = self.watchdog.waiting("gather");
        let world = self.world();
        if self.rank != root {
            let to = world.process_at_rank(root as i32);
            to.send(&(mine.len() as u64));
            for chunk in mine.chunks(CHUNK) {
                to.send(chunk);
            }
            return Vec::new();
        }
        (0..self.size)
            .map(|r| {
                if r == root {
                    return mine.clone();
                }
                let from = world.process_at_rank(r as i32);
                let mut len = 0u64;
                from.receive_into(&mut len);
                let mut bytes = vec![0u8; len as usize];
                for chunk in bytes.chunks_mut(CHUNK) {
                    from.receive_into(chunk);
                }
                bytes
            })
            .collect()
    }

    fn barrier(&self) {
        let _waiting = self.watchdog.waiting("barrier");
        self.world().barrier();
    }

    fn abort(&self, code: i32) -> ! {
        self.world().abort(code)
    }
}
