//! The MPI collectives with two real ranks: `mpirun` starts this test binary's
//! `rank_checks` on each rank.
#![cfg(feature = "mpi")]

use candle_core::{Device, Tensor};
use frugal_dist::{Collectives, MpiRanks};
use std::process::Command;
use std::time::{Duration, Instant};

/// `mpirun -np 2` of this test binary running the named (ignored) test, as root where needed.
fn mpirun(test: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new("mpirun");
    c.args(["-np", "2", "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .envs(env.iter().copied())
        .arg(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", test, "--nocapture"]);
    c.output()
        .expect("mpirun runs (scripts/setup-mpi.sh installs it)")
}

#[test]
fn two_ranks_reduce_gather_and_broadcast() {
    let out = mpirun("rank_checks", &[]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("rank checks passed").count(), 2, "{text}");
}

#[test]
fn a_rank_that_never_joins_ends_the_other_within_the_timeout() {
    let started = Instant::now();
    let out = mpirun("rank_hangs", &[]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("waited") && text.contains("a rank died or hangs"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

#[test]
#[ignore = "a rank of two_ranks_reduce_gather_and_broadcast"]
fn rank_checks() {
    let ranks = MpiRanks::init(Duration::from_secs(60)).unwrap();
    let (rank, world) = (ranks.rank(), ranks.world_size());
    assert_eq!(world, 2);
    // 5 elements: not a multiple of the world size, so the reduce-scatter pads.
    let mut v: Vec<f32> = (0..5).map(|i| (i * (rank + 1)) as f32 + 0.25).collect();
    ranks.all_reduce_sum(&mut v);
    assert_eq!(v, [0.5, 3.5, 6.5, 9.5, 12.5]);
    // A reduce sums into its root only; the other rank keeps its own values.
    let mut r: Vec<f32> = (0..3).map(|i| (i * (rank + 1)) as f32 - 0.5).collect();
    ranks.reduce_sum(&mut r, 1);
    match rank {
        1 => assert_eq!(r, [-1.0, 2.0, 5.0]),
        _ => assert_eq!(r, [-0.5, 0.5, 1.5]),
    }
    let mut b = [rank as f32; 3];
    ranks.broadcast_f32(&mut b, 1);
    assert_eq!(b, [1.0; 3]);
    let mut d = [rank as f64 + 0.5];
    ranks.all_reduce_sum_f64(&mut d);
    assert_eq!(d, [2.0]);
    let mine = vec![rank as u8; rank + 2];
    assert_eq!(
        ranks.all_gather_bytes(&mine),
        vec![vec![0u8; 2], vec![1u8; 3]]
    );
    // Nothing from every rank (MPI itself refuses an empty receive buffer).
    assert_eq!(ranks.all_gather_bytes(&[]), vec![Vec::<u8>::new(); 2]);
    let sent = if rank == 1 {
        b"from one".to_vec()
    } else {
        Vec::new()
    };
    assert_eq!(ranks.broadcast_bytes(sent, 1), b"from one");
    let gathered = ranks.gather_bytes(vec![7 + rank as u8; 3 - rank], 1);
    match rank {
        1 => assert_eq!(gathered, vec![vec![7u8; 3], vec![8u8; 2]]),
        _ => assert!(gathered.is_empty()),
    }
    // Tensors (a transposed view here) go through the host on MPI.
    let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let t = (t * (rank + 1) as f64).unwrap().t().unwrap();
    let sum = ranks.all_reduce_sum_tensor(&t).unwrap();
    assert_eq!(sum.to_vec2::<f32>().unwrap(), [[3.0, 9.0], [6.0, 12.0]]);
    let reduced = ranks
        .reduce_sum_tensor(&t, 0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    match rank {
        0 => assert_eq!(reduced, [[3.0, 9.0], [6.0, 12.0]]),
        _ => assert_eq!(reduced, [[2.0, 6.0], [4.0, 8.0]]),
    }
    let from_one = ranks.broadcast_tensor(&t, 1).unwrap();
    assert_eq!(from_one.to_vec2::<f32>().unwrap(), [[2.0, 6.0], [4.0, 8.0]]);
    ranks.barrier();
    println!("rank checks passed");
}

#[test]
#[ignore = "a rank of a_rank_that_never_joins_ends_the_other_within_the_timeout"]
fn rank_hangs() {
    let ranks = MpiRanks::init(Duration::from_secs(2)).unwrap();
    if ranks.rank() == 1 {
        std::thread::sleep(Duration::from_secs(600));
    }
    ranks.barrier();
}
