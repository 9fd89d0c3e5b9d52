//! NCCL collectives on a GPU (the `nccl` feature, on a machine with one; scripts/gpu-check.sh
//! runs it): one rank joined as a torchrun-style launch joins it gives every collective's
//! result of a single process, for host buffers and for GPU tensors of any layout.
#![cfg(feature = "nccl")]

use candle_core::{Device, Tensor};
use frugal_dist::{join, Collectives, Launch, Solo};
use std::time::Duration;

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
}

#[test]
fn one_nccl_rank_gives_a_single_processs_results() {
    let device = Device::new_cuda(0).expect("a CUDA GPU");
    let launch = Launch::Torchrun {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master: None,
    };
    let nccl = join(&launch, &device, Duration::from_secs(120)).expect("NCCL joins one rank");
    assert_eq!(
        (nccl.engine(), nccl.rank(), nccl.world_size()),
        ("NCCL", 0, 1)
    );
    let solo = Solo;

    // Host buffers, staged through the GPU.
    let (mut a, mut b) = (values(100_003, 0.5), values(100_003, 0.5));
    nccl.all_reduce_sum(&mut a);
    solo.all_reduce_sum(&mut b);
    assert_eq!(a, b);
    let mut x = [1.0f64 / 3.0, -2.5e300, 0.0];
    nccl.all_reduce_sum_f64(&mut x);
    assert_eq!(x, [1.0 / 3.0, -2.5e300, 0.0]);
    nccl.all_reduce_sum(&mut []);
    let (mut a, mut b) = (values(70_001, 0.25), values(70_001, 0.25));
    nccl.reduce_sum(&mut a, 0);
    solo.reduce_sum(&mut b, 0);
    assert_eq!(a, b);
    nccl.reduce_sum(&mut [], 0);
    nccl.broadcast_f32(&mut a, 0);
    assert_eq!(a, b);
    nccl.broadcast_f32(&mut [], 0);
    let settings = br#"{"optimizer":"frugal"}"#;
    assert_eq!(
        nccl.all_gather_bytes(settings),
        solo.all_gather_bytes(settings)
    );
    assert_eq!(nccl.all_gather_bytes(b""), vec![Vec::<u8>::new()]);
    let state: Vec<u8> = (0..3_000_001u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(nccl.broadcast_bytes(state.clone(), 0), state);
    assert_eq!(nccl.broadcast_bytes(Vec::new(), 0), Vec::<u8>::new());
    assert_eq!(nccl.gather_bytes(state.clone(), 0), vec![state]);
    nccl.barrier();

    // Tensors on the GPU: contiguous, a transposed view, a narrowed one, and bf16.
    let t = Tensor::from_vec(values(64 * 48, 1.5), (64, 48), &device).unwrap();
    for view in [
        t.clone(),
        t.t().unwrap(),
        t.narrow(0, 5, 17).unwrap(),
        t.to_dtype(candle_core::DType::BF16).unwrap(),
    ] {
        let want = view
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for got in [
            nccl.all_reduce_sum_tensor(&view).unwrap(),
            nccl.reduce_sum_tensor(&view, 0).unwrap(),
            nccl.broadcast_tensor(&view, 0).unwrap(),
        ] {
            assert!(got.device().same_device(&device));
            assert_eq!(got.dims(), view.dims());
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        }
    }
    // A CPU tensor goes through the host.
    let cpu = Tensor::from_vec(values(10, 2.5), (2, 5), &Device::Cpu).unwrap();
    let sum = nccl.all_reduce_sum_tensor(&cpu).unwrap();
    assert!(sum.device().is_cpu());
    assert_eq!(sum.to_vec2::<f32>().unwrap(), cpu.to_vec2::<f32>().unwrap());
}
