//! The memory plan of a training step against the bytes the step really allocates, counted by
//! the global allocator of this test binary, for every way of running the backward pass.

use candle_core::{DType, Device, Tensor};
use frugal::Frugal;
use frugal_nn::chunked_loss::LossChunks;
use frugal_nn::llama::{Llama, LlamaConfig, StepMode};
use frugal_nn::Attention;
use frugal_train::schedule::Schedule;
use frugal_train::trainer::{Backward, BatchSource, LoopSettings, Trainer, TrainerState};
use frugal_train::StopToken;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Sample i is a fixed pseudo-random token sequence.
struct Tokens {
    seq: usize,
    vocab: u64,
}

impl BatchSource for Tokens {
    fn batch(&mut self, position: u64, size: usize) -> anyhow::Result<(Tensor, Tensor)> {
        let t = self.seq as u64;
        let id = |i: u64, j: u64| ((i * 131 + j * 17 + i * j * 7) % self.vocab) as u32;
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for i in position..position + size as u64 {
            xs.extend((0..t).map(|j| id(i, j)));
            ys.extend((1..=t).map(|j| id(i, j)));
        }
        Ok((
            Tensor::from_vec(xs, (size, self.seq), &Device::Cpu)?,
            Tensor::from_vec(ys, (size, self.seq), &Device::Cpu)?,
        ))
    }
}

/// The peak of live bytes during a step above those before it (weights, optimizer state and
/// scratch kept between steps), measured on the second step.
fn measured_peak(c: &LlamaConfig, mode: StepMode, batch: usize, seq: usize) -> usize {
    let mut model = Llama::init(c, 0, &Device::Cpu, DType::F32).unwrap();
    model.set_loss_chunks(mode.loss_chunks);
    model.set_attention(mode.attention);
    let cfg = frugal::OptimizerConfig::parse_spec("frugal:update_gap=100").unwrap();
    let opt = Frugal::from_params(model.params(), cfg).unwrap();
    let settings = LoopSettings {
        steps: 2,
        stop_after: None,
        batch_size: batch / mode.grad_accum,
        grad_accum: mode.grad_accum,
        seq_len: seq,
        clip: 0.0,
        backward: Backward {
            checkpointing: mode.checkpointing,
            per_layer_updates: mode.per_layer_updates,
        },
        log_every: 1,
        eval_every: 2,
        save_every: 2,
    };
    let schedule = Schedule::new(1e-3, 0, 2, "constant", 1.0).unwrap();
    let state = TrainerState::default();
    let mut t = Trainer::new(model, opt, schedule, settings, state, StopToken::new()).unwrap();
    let mut data = Tokens {
        seq,
        vocab: c.vocab_size as u64,
    };
    t.step(&mut data).unwrap();
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    t.step(&mut data).unwrap();
    PEAK.load(Ordering::SeqCst) - before
}

#[test]
fn the_planned_peak_matches_counted_allocations_in_every_mode() {
    let small = LlamaConfig {
        vocab_size: 2048,
        hidden_size: 64,
        intermediate_size: 176,
        num_attention_heads: 4,
        num_hidden_layers: 3,
        num_key_value_heads: None,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
    };
    // Other proportions: grouped-query attention, a longer MLP, more layers, a smaller vocabulary.
    let grouped = LlamaConfig {
        vocab_size: 1000,
        hidden_size: 96,
        intermediate_size: 320,
        num_attention_heads: 6,
        num_hidden_layers: 4,
        num_key_value_heads: Some(2),
        max_position_embeddings: 48,
        ..small.clone()
    };
    let mode = |checkpointing, per_layer_updates, tokens, grad_accum| StepMode {
        checkpointing,
        per_layer_updates,
        loss_chunks: LossChunks { tokens, vocab: 1 },
        grad_accum,
        attention: Attention::Fused,
    };
    let whole = |mode: StepMode| StepMode {
        attention: Attention::Whole,
        ..mode
    };
    let modes = [
        ("normal", mode(false, false, 1, 1)),
        ("loss in chunks", mode(false, false, 4, 1)),
        ("checkpointing", mode(true, false, 1, 1)),
        ("per-layer updates", mode(false, true, 1, 1)),
        ("low", mode(true, true, 4, 1)),
        ("low, 2 micro-batches", mode(true, true, 4, 2)),
        (
            "low, vocabulary chunks",
            StepMode {
                loss_chunks: LossChunks {
                    tokens: 4,
                    vocab: 4,
                },
                ..mode(true, true, 4, 1)
            },
        ),
        ("normal, whole attention", whole(mode(false, false, 1, 1))),
        (
            "checkpointing, whole attention",
            whole(mode(true, false, 1, 1)),
        ),
    ];
    let (mut peaks, mut off) = (Vec::new(), Vec::new());
    for (c, batch, seq) in [(&small, 4, 64), (&grouped, 6, 48)] {
        for (name, mode) in modes {
            let plan = c.step_memory(batch / mode.grad_accum, seq, mode);
            let real = measured_peak(c, mode, batch, seq);
            let ratio = plan.peak as f64 / real as f64;
            eprintln!("{name}: planned {} counted {real} ({ratio:.3})", plan.peak);
            if !(0.85..1.15).contains(&ratio) {
                off.push(format!(
                    "{name}: planned {} bytes, counted {real}",
                    plan.peak
                ));
            }
            peaks.push(real);
        }
        // Each technique saves memory on its own, and together they save the most.
        let run = &peaks[peaks.len() - modes.len()..];
        assert!(run[1..5].iter().all(|p| *p < run[0]), "{run:?}");
        assert!(run[4] < run[1] && run[4] < run[2], "{run:?}");
    }
    assert!(off.is_empty(), "{off:#?}");
}
