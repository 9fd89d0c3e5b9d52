//! Optimizer-step benchmark on the paper's 60M LLaMA parameter set (58M parameters, 75 tensors).
//!
//! Prints, from one run: ms per step and effective GB/s of candle-nn's AdamW, our AdamW preset,
//! FRUGAL blockwise and FRUGAL SVD (steady-state and refresh steps separately), and a memcpy of
//! the same number of bytes as the reference for memory bandwidth.
//!
//! Run: `cargo bench -p frugal --bench step` (add `-- --quick` for fewer repetitions). With
//! `FRUGAL_BENCH_DEVICE=cuda` (a build with `--features cuda`) the parameters, gradients and state
//! live on GPU 0, the optimizer runs its tensor engine, and the reference is a device copy.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use frugal::projection::Subspace;
use frugal::{Frugal, OptimizerConfig, Param};
use rayon::prelude::*;
use std::time::Instant;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// Bytes a step must move: 28 per state-full element (read w, g, m, v; write w, m, v), 12 per
/// state-free element (read w, g; write w).
fn required_bytes(opt: &Frugal) -> f64 {
    opt.params()
        .map(|p| {
            let st = opt.param_state(&p.name).unwrap();
            let n = p.numel() as f64;
            match st.subspace {
                Subspace::All => 28.0 * n,
                Subspace::Nothing => 12.0 * n,
                // Low-rank moments plus full read of w, g and write of w.
                _ => 12.0 * n + 28.0 * st.m.len() as f64,
            }
        })
        .sum()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // Optional name filter: `cargo bench -p frugal --bench step -- svd` runs only matching rows.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let wanted = |label: &str| label.contains(filter.as_str());
    let reps = if quick { 3 } else { 9 };
    let device = match std::env::var("FRUGAL_BENCH_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("FRUGAL_BENCH_DEVICE=cuda: no CUDA device"),
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => panic!("FRUGAL_BENCH_DEVICE={other}: expected cpu or cuda"),
    };
    // Every timing ends when the device has finished its queued work.
    let sync = || device.synchronize().unwrap();
    let threads = rayon::current_num_threads();
    let shapes = frugal_nn::llama::LlamaConfig::builtin("60m")
        .expect("built-in")
        .labelled_shapes();
    let numel: usize = shapes
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    println!(
        "60M LLaMA parameter set: {numel} parameters in {} tensors, on {:?}, {threads} threads",
        shapes.len(),
        device.location()
    );

    let mut seed = 0x9E3779B97F4A7C15u64;
    let mut noise = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    };
    let params: Vec<Param> = shapes
        .iter()
        .map(|p| {
            let n = p.shape.iter().product();
            let t = Tensor::from_vec(noise(n), p.shape.as_slice(), &Device::Cpu)
                .and_then(|t| t.to_device(&device))
                .unwrap();
            Param::new(p.name.clone(), Var::from_tensor(&t).unwrap(), p.label)
        })
        .collect();
    let mut grads = GradStore::default();
    for Param { var: v, .. } in &params {
        let g = Tensor::from_vec(noise(v.elem_count()), v.dims(), &Device::Cpu)
            .and_then(|t| t.to_device(&device))
            .unwrap();
        grads.insert(v.as_tensor(), g);
    }

    // memcpy of the AdamW byte count (28 B/param): copy 14 B/param, which reads and writes it,
    // on all threads like the optimizer (on a GPU: a device copy of as many bytes).
    let copy_ms = if device.is_cpu() {
        let src = vec![1u8; numel * 14];
        let mut dst = vec![0u8; numel * 14];
        median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    dst.par_chunks_mut(1 << 20)
                        .zip(src.par_chunks(1 << 20))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                    std::hint::black_box(&dst);
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    } else {
        let src = Tensor::ones(numel * 14 / 4, candle_core::DType::F32, &device).unwrap();
        median(
            (0..reps + 1)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(src.copy().unwrap());
                    sync();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .skip(1)
                .collect(),
        )
    };
    let copy_gbs = 28.0 * numel as f64 / copy_ms / 1e6;
    println!(
        "\n{:<44} {:>10} {:>10} {:>12}",
        "step", "ms", "GB/s", "vs memcpy"
    );
    let row = |label: &str, ms: f64, bytes: f64| {
        let gbs = bytes / ms / 1e6;
        println!(
            "{label:<44} {ms:>10.1} {gbs:>10.2} {:>11.0}%",
            100.0 * gbs / copy_gbs
        );
    };
    row(
        if device.is_cpu() {
            "memcpy of 28 B/param (parallel)"
        } else {
            "device copy of 28 B/param"
        },
        copy_ms,
        28.0 * numel as f64,
    );

    let candle_ms = if !wanted("candle-nn AdamW") {
        f64::NAN
    } else {
        let adamw = ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        };
        let vars = params.iter().map(|p| p.var.clone()).collect();
        let mut opt = AdamW::new(vars, adamw).unwrap();
        opt.step(&grads).unwrap();
        sync();
        median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    opt.step(&grads).unwrap();
                    sync();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    if wanted("candle-nn AdamW") {
        row("candle-nn AdamW", candle_ms, 28.0 * numel as f64);
    }

    let measure = |spec: &str, gap: usize| -> (f64, f64, f64) {
        let mut cfg = OptimizerConfig::parse_spec(spec).unwrap();
        cfg.update_gap = gap;
        let mut opt = Frugal::from_params(params.clone(), cfg).unwrap();
        let (mut steady, mut refresh) = (Vec::new(), Vec::new());
        for step in 0..(reps + 1) * gap.min(reps + 1) {
            let t = Instant::now();
            opt.step_grads(&grads).unwrap();
            sync();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if step == 0 {
                continue; // first step also allocates the state
            }
            if step % gap == 0 {
                refresh.push(ms);
            } else {
                steady.push(ms);
            }
            if steady.len() >= reps && (refresh.len() >= reps.min(3) || gap > reps * 4) {
                break;
            }
        }
        let bytes = required_bytes(&opt);
        let refresh_ms = if refresh.is_empty() {
            f64::NAN
        } else {
            median(refresh)
        };
        (median(steady), refresh_ms, bytes)
    };

    let mut results: std::collections::HashMap<String, (f64, f64)> = Default::default();
    for (label, spec, gap) in [
        ("frugal adamw preset", "adamw", 1000),
        (
            "frugal adamw preset, no NaN check",
            "adamw:check_finite=false",
            1000,
        ),
        ("frugal blockwise rho=0.25", "frugal", 4),
        (
            "frugal blockwise rho=0.25, gradients known finite",
            "frugal:check_finite=false",
            1000,
        ),
        ("frugal-svd rho=0.25", "frugal-svd", 4),
        ("frugal columns rho=0.25", "frugal:projection=columns", 1000),
    ] {
        if !wanted(label) {
            continue;
        }
        let (steady, refresh, bytes) = measure(spec, gap);
        if gap < 1000 {
            row(&format!("{label}, steady"), steady, bytes);
            row(&format!("{label}, refresh step"), refresh, bytes);
            results.insert(format!("{label}, refresh"), (refresh, bytes));
        } else {
            row(label, steady, bytes);
        }
        results.insert(label.to_string(), (steady, bytes));
    }
    let (Some(&(adamw_ms, _)), Some(&(blocks_ms, blocks_bytes))) = (
        results.get("frugal adamw preset"),
        results.get("frugal blockwise rho=0.25"),
    ) else {
        return;
    };
    println!(
        "\nour AdamW vs candle-nn AdamW: {:.2}x faster; frugal blockwise moves {:.1} B/param at {:.0}% of memcpy bandwidth",
        candle_ms / adamw_ms,
        blocks_bytes / numel as f64,
        100.0 * (blocks_bytes / blocks_ms / 1e6) / copy_gbs
    );
    println!(
        "frugal blockwise steady step / fused AdamW step: {:.2} (target ≤ 0.75); refresh step / steady step: {:.2} (target ≤ 1.5)",
        blocks_ms / adamw_ms,
        results
            .get("frugal blockwise rho=0.25, refresh")
            .map_or(f64::NAN, |r| r.0 / blocks_ms)
    );
    if let Some(&(finite_ms, _)) = results.get("frugal blockwise rho=0.25, gradients known finite")
    {
        println!(
            "with gradients known finite (a clipped run's finite global norm): {:.2} of the fused AdamW step",
            finite_ms / adamw_ms
        );
    }
}
