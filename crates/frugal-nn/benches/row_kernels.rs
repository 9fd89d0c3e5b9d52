//! The fused operations built on the row kernels, forward and backward, with the row kernels at
//! each width this CPU runs (SSE2, AVX2, AVX-512: the same bits at every width), at the shapes
//! of a training step: the cross-entropy of `tiny`'s 8 × 128 tokens over its 4096-token
//! vocabulary, and `60m`'s SwiGLU (8 × 256 tokens of 1376) and causal attention (8 heads of 64,
//! 256 tokens, batch 8).
//!
//! Prints, from one run: ms per forward + backward pass at each width (each pass ends in a sum,
//! whose gradient the operations copy out of a broadcast: the same work at every width), and
//! each width's speed-up over AVX2 (or over the baseline where the CPU has no AVX2).
//!
//! Run: `cargo bench -p frugal-nn --bench row_kernels` (add `-- --quick` for fewer repetitions).

mod common;

use candle_core::{Device, Tensor};
use common::{hashed_var, median_ms, Pass};
use frugal_nn::ops::{causal_attention, cross_entropy, limit_row_kernels, swiglu, RowKernels};

/// Values in [−4, 4).
fn var(shape: &[usize], seed: u64) -> candle_core::Var {
    hashed_var(shape, seed, 4.0)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 5 } else { 15 };
    frugal_nn::matmul::use_library(frugal_nn::matmul::MatmulLibrary::Auto).unwrap();
    let logits = var(&[1024, 4096], 1);
    let targets: Vec<u32> = (0..1024u32).map(|i| i * 31 % 4096).collect();
    let targets = Tensor::new(targets, &Device::Cpu).unwrap();
    let (g, u) = (var(&[2048, 1376], 2), var(&[2048, 1376], 3));
    let (q, k, v) = (
        var(&[8, 8, 256, 64], 4),
        var(&[8, 8, 256, 64], 5),
        var(&[8, 8, 256, 64], 6),
    );
    let ops: [(&str, Box<Pass<'_>>); 3] = [
        (
            "cross-entropy 1024 x 4096",
            Box::new(|| cross_entropy(&logits, &targets).unwrap()),
        ),
        (
            "SwiGLU 2048 x 1376",
            Box::new(|| swiglu(&g, &u).unwrap().sum_all().unwrap()),
        ),
        (
            "causal attention 8 x 8 x 256 x 64",
            Box::new(|| {
                causal_attention(&q, &k, &v, 0.125)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
    ];
    let widths = RowKernels::available();
    let reference = *widths
        .iter()
        .find(|&&w| w == RowKernels::Avx2)
        .unwrap_or(&widths[0]);
    println!("{}", frugal_nn::ops::cpu_kernels());
    print!("{:<36}", "operation (ms, forward + backward)");
    for w in &widths {
        print!(" {:>9}", w.name());
    }
    for w in &widths {
        print!(" {:>12}", format!("{} ×", w.name()));
    }
    println!();
    for (name, pass) in &ops {
        // Alternating widths, twice, keeping each width's faster median.
        let mut ms = vec![f64::INFINITY; widths.len()];
        for _ in 0..2 {
            for (i, &w) in widths.iter().enumerate() {
                limit_row_kernels(w);
                ms[i] = ms[i].min(median_ms(reps, pass.as_ref()));
            }
        }
        let base = ms[widths.iter().position(|&w| w == reference).unwrap()];
        print!("{name:<36}");
        for m in &ms {
            print!(" {m:>9.2}");
        }
        for m in &ms {
            print!(" {:>12.2}", base / m);
        }
        println!();
    }
    limit_row_kernels(RowKernels::Avx512);
    println!(
        "×: speed-up over {} (> 1: faster); every width gives the same bits",
        reference.name()
    );
}
