//! Causal attention, forward and backward, fused (a block of query rows at a time) against
//! whole (the scores, causal softmax and products as three operations), at the shapes of
//! `60m` (8 heads of 64) for several sequence lengths.
//!
//! Prints, from one run: ms per forward + backward pass of each, their ratio, and the bytes
//! the whole attention keeps for its backward pass (the scores and probabilities) that the
//! fused one does not. The products of the whole attention run in the library `--matmul`
//! would pick (OpenBLAS where it is installed).
//!
//! Run: `cargo bench -p frugal-nn --bench attention` (add `-- --quick` for fewer repetitions).

mod common;

use candle_core::Tensor;
use common::{hashed_var, median_ms};
use frugal_nn::ops::{causal_attention, whole_causal_attention};

type Attention = fn(&Tensor, &Tensor, &Tensor, f64) -> candle_core::Result<Tensor>;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 7 };
    frugal_nn::matmul::use_library(frugal_nn::matmul::MatmulLibrary::Auto).unwrap();
    println!("{}", frugal_nn::ops::cpu_kernels());
    println!(
        "{:>6} {:>6} {:>10} {:>10} {:>8} {:>12}",
        "batch", "seq", "fused ms", "whole ms", "ratio", "kept MiB"
    );
    let (heads, d) = (8, 64);
    for (batch, seq) in [(8, 256), (2, 1024), (1, 2048)] {
        let var = |seed: u64| hashed_var(&[batch, heads, seq, d], seed, 1.0);
        let (q, k, v) = (var(1), var(2), var(3));
        let time = |attention: Attention| {
            median_ms(reps, &|| {
                attention(&q, &k, &v, 0.125).unwrap().sum_all().unwrap()
            })
        };
        let (fused, whole) = (time(causal_attention), time(whole_causal_attention));
        let kept = 2.0 * (batch * heads * seq * seq * 4) as f64 / (1 << 20) as f64;
        println!(
            "{batch:>6} {seq:>6} {fused:>10.1} {whole:>10.1} {:>8.2} {kept:>12.0}",
            whole / fused
        );
    }
    println!("ratio: whole ms / fused ms (> 1: fused is faster); kept: scores and probabilities of one layer");
}
