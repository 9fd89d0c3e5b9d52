//! The gradient and parameter exchange of a data-parallel step over MPI, per collective.
//!
//! For a gradient of `tiny`'s size (3.5M values) and of `60m`'s (58M), in buckets of 8Mi values
//! as the trainer sends them, rank 0 prints the median time of:
//! - an all-reduce of every bucket (every rank receives every mean);
//! - a reduce of each bucket to the rank that owns it (the ranks own equal shares), what a
//!   sharded optimizer needs;
//! - the broadcast of each rank's share (its updated parameters) to the others: as bytes
//!   converted from and to f32 values, and as a CPU tensor (f32 values in place, the trainer's
//!   path);
//!
//! and the time of a step's exchange (gradients, then parameters) as the trainer makes it
//! (reduces, tensor broadcasts) over that of all-reduces and byte broadcasts.
//!
//! Run: `scripts/bench-collectives.sh [RANKS]` (`mpirun` of this benchmark, built with
//! `--features mpi`); add `--quick` for fewer repetitions.

use candle_core::{Device, Tensor};
use frugal_dist::{Collectives, MpiRanks};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Values per collective, as the trainer's buckets.
const BUCKET: usize = 8 << 20;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// The median seconds of `reps` runs of `op` (after one unmeasured run), each the mean of the
/// ranks' times.
fn time(ranks: &MpiRanks, reps: usize, mut op: impl FnMut()) -> f64 {
    op();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        ranks.barrier();
        let t0 = Instant::now();
        op();
        let mut seconds = [t0.elapsed().as_secs_f64()];
        ranks.all_reduce_sum_f64(&mut seconds);
        times.push(seconds[0] / ranks.world_size() as f64);
    }
    median(times)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let ranks = MpiRanks::init(Duration::from_secs(600)).expect("MPI starts");
    let (rank, world) = (ranks.rank(), ranks.world_size());
    let lead = rank == 0;
    if lead {
        println!("{world} ranks over MPI, buckets of {BUCKET} f32 values; times in ms");
        println!(
            "{:<6} {:>11} {:>16} {:>16} {:>17} {:>21}",
            "values",
            "all-reduce",
            "reduce to owner",
            "broadcast bytes",
            "broadcast tensor",
            "step exchange ratio"
        );
    }
    for (name, n) in [("3.5M", 3_500_000usize), ("58M", 58_000_000)] {
        let reps = match (quick, n > BUCKET) {
            (true, _) => 3,
            (false, true) => 7,
            (false, false) => 21,
        };
        let mut buf: Vec<f32> = (0..n).map(|i| (i as f32 * 1e-3).sin()).collect();
        let share = n.div_ceil(world);
        let all_reduce = time(&ranks, reps, || {
            buf.chunks_mut(BUCKET).for_each(|b| ranks.all_reduce_sum(b));
        });
        let reduce = time(&ranks, reps, || {
            for (owner, part) in buf.chunks_mut(share).enumerate() {
                part.chunks_mut(BUCKET)
                    .for_each(|b| ranks.reduce_sum(b, owner));
            }
        });
        let as_bytes = time(&ranks, reps, || {
            for (owner, part) in buf.chunks(share).enumerate() {
                let bytes: Vec<u8> = match owner == rank {
                    true => part.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    false => Vec::new(),
                };
                let bytes = ranks.broadcast_bytes(bytes, owner);
                let values: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                black_box(values);
            }
        });
        let shares: Vec<Tensor> = buf
            .chunks(share)
            .map(|part| Tensor::from_slice(part, part.len(), &Device::Cpu).expect("a tensor"))
            .collect();
        let as_tensor = time(&ranks, reps, || {
            for (owner, part) in shares.iter().enumerate() {
                black_box(ranks.broadcast_tensor(part, owner).expect("a broadcast"));
            }
        });
        if lead {
            println!(
                "{name:<6} {:>11.1} {:>16.1} {:>16.1} {:>17.1} {:>21.2}",
                all_reduce * 1e3,
                reduce * 1e3,
                as_bytes * 1e3,
                as_tensor * 1e3,
                (reduce + as_tensor) / (all_reduce + as_bytes)
            );
        }
    }
}
