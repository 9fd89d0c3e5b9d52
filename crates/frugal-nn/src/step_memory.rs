//! The memory a training step needs beyond weights and optimizer state, as the models plan it
//! ([`crate::llama::LlamaConfig::step_memory`], [`crate::encoder::EncoderConfig::step_memory`]):
//! activations kept for the backward pass, parameter gradients, and the backward pass's working
//! set, for each way of running the backward pass.

use crate::chunked_loss::LossChunks;
use crate::Attention;
use serde::Serialize;

/// The operations a step runs, which decide what its forward pass keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Kernels {
    /// The fused CPU kernels, in f32 (the CPU's default).
    #[default]
    Fused,
    /// candle's tensor operations computing in f32 (CUDA, or the CPU with its kernels off).
    GenericF32,
    /// candle's tensor operations computing in bf16 over f32 weights (mixed precision).
    GenericBf16,
}

impl Kernels {
    /// The operations a step computing in `dtype` runs on `device`: the fused kernels for f32
    /// on the CPU (unless [`crate::ops::use_fused_kernels`] turned them off), else the generic
    /// ones.
    pub fn on(device: &candle_core::Device, dtype: candle_core::DType) -> Kernels {
        match dtype {
            candle_core::DType::BF16 => Kernels::GenericBf16,
            _ if device.is_cpu() && crate::ops::fused_kernels() => Kernels::Fused,
            _ => Kernels::GenericF32,
        }
    }

    /// How a plan names these operations: "in f32 with the CPU's fused kernels", ….
    pub fn describe(self) -> &'static str {
        match self {
            Kernels::Fused => "in f32 with the CPU's fused kernels",
            Kernels::GenericF32 => "in f32 through tensor operations (as on CUDA)",
            Kernels::GenericBf16 => "in bf16 through tensor operations over f32 weights",
        }
    }

    /// Bytes of the compute dtype of the generic operations; none for the fused kernels.
    pub fn generic_bytes(self) -> Option<f64> {
        match self {
            Kernels::Fused => None,
            Kernels::GenericF32 => Some(4.0),
            Kernels::GenericBf16 => Some(2.0),
        }
    }
}

/// How a step runs its backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StepMode {
    /// Activation checkpointing: each layer is recomputed from its saved input.
    pub checkpointing: bool,
    /// Per-layer updates: each part's gradients are freed once the optimizer has used them.
    pub per_layer_updates: bool,
    /// How a decoder's loss is split (an encoder's classification loss is never split).
    pub loss_chunks: LossChunks,
    /// Micro-batches per step: with more than one, whole gradients are accumulated.
    pub grad_accum: usize,
    /// How attention runs: [`Attention::Whole`] keeps two t × t tensors per head and layer.
    pub attention: Attention,
    /// The operations that run (the generic ones always compute attention whole).
    pub kernels: Kernels,
}

impl StepMode {
    /// This mode with the operations that a step computing in `dtype` runs on `device`
    /// ([`Kernels::on`]).
    pub fn on(self, device: &candle_core::Device, dtype: candle_core::DType) -> StepMode {
        StepMode {
            kernels: Kernels::on(device, dtype),
            ..self
        }
    }

    /// True when the backward pass runs layer by layer (checkpointing or per-layer updates).
    pub fn layered(&self) -> bool {
        self.checkpointing || self.per_layer_updates
    }

    /// The gradients held beside a phase of the backward pass, in f32 values, given the most
    /// made before it in a micro-batch (`so_far`), the most still to be made (`left`) and all
    /// of them (`all`). One micro-batch holds the gradients made so far, or with per-layer
    /// updates none (each part is freed once used). Under accumulation a whole backward pass
    /// holds the earlier micro-batches' sums beside this one's gradients; a layered one adds
    /// each part into the sums as it comes; with per-layer updates the last micro-batch holds
    /// the sums not yet used, and with two micro-batches the first one holds the sums made so
    /// far.
    pub(crate) fn held(&self, so_far: f64, left: f64, all: f64) -> f64 {
        match (self.grad_accum, self.per_layer_updates, self.layered()) {
            (0 | 1, true, _) => 0.0,
            (0 | 1, false, _) => so_far,
            (2, true, _) => so_far.max(left),
            (_, _, true) => all,
            (_, _, false) => all + so_far,
        }
    }
}

/// Planned bytes of one training step beyond weights and optimizer state.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepMemory {
    /// Activations the forward pass keeps for the backward pass.
    pub activations: usize,
    /// Parameter gradients held at once, at most.
    pub gradients: usize,
    /// The rest of the peak: gradients in flight through the backward pass, a recomputed
    /// layer, the loss's logits and their gradient.
    pub working: usize,
    /// The planned peak of the step.
    pub peak: usize,
}

impl StepMemory {
    /// The plan of f32 `activations` and `gradients` whose step peaks at the largest of
    /// `phases` (each in f32 values).
    pub(crate) fn of_phases(activations: f64, gradients: f64, phases: &[f64]) -> Self {
        let peak = phases.iter().copied().fold(0.0, f64::max);
        let working = peak - activations - gradients;
        let bytes = |x: f64| (x * 4.0).round() as usize;
        StepMemory {
            activations: bytes(activations),
            gradients: bytes(gradients),
            working: bytes(working.max(0.0)),
            peak: bytes(peak),
        }
    }
}
