//! The memory a training step of the LLaMA model needs beyond its weights and optimizer state:
//! activations kept for the backward pass, parameter gradients, and the backward pass's
//! working set, for each way of running the backward pass.
//!
//! Activations are counted from the tensors each operation of [`super::Llama`] keeps for its
//! backward pass (checked against counted allocations to within a few percent). The working set
//! of the backward pass (gradients in flight, the accumulation of each node's gradient, the
//! matrix multiplications' packing buffers) is modelled per layer as a·n·f + b·n·h + c·P, with
//! coefficients measured on this implementation; the plan's test checks the resulting peak
//! against counted allocations.
//!
//! Under LoRA only the trained tensors get gradients (the adapters, and the embeddings, norms
//! and head where they train); an adapted linear is one operation that keeps what the linear
//! keeps (its input and output).

use super::{DecoderLora, LlamaConfig};
use crate::step_memory::{StepMemory, StepMode};
use crate::Attention;

impl LlamaConfig {
    /// Plans the memory of a training step on micro-batches of `batch` sequences of `seq`
    /// tokens (beyond weights and optimizer state), training every weight or, with `lora`,
    /// what it trains.
    pub fn step_memory(
        &self,
        batch: usize,
        seq: usize,
        mode: StepMode,
        lora: Option<&DecoderLora>,
    ) -> StepMemory {
        let n = (batch * seq) as f64;
        let h = self.hidden_size as f64;
        let f = self.intermediate_size as f64;
        let kv = (self.kv_heads() * self.head_dim()) as f64;
        let vocab = self.vocab_size as f64;
        let layers = self.num_hidden_layers as f64;
        let scores = (batch * self.num_attention_heads * seq * seq) as f64;
        let grouped = if self.kv_heads() != self.num_attention_heads {
            2.0
        } else {
            0.0
        };
        let chunks = mode.loss_chunks;
        // Trained values of a layer, of the embeddings, of the head, of the head and final
        // norm, and in all.
        let (p_layer, p_vocab, head, p_top, p_all) = match lora {
            None => {
                let p_layer = 2.0 * h * h + 2.0 * kv * h + 3.0 * h * f + 2.0 * h;
                let p_vocab = vocab * h;
                let p_all = 2.0 * p_vocab + layers * p_layer + h;
                (p_layer, p_vocab, p_vocab, p_vocab + h, p_all)
            }
            Some(l) => {
                let shapes = l.trained_shapes(self);
                let trained = |prefix: &str| -> f64 {
                    shapes
                        .iter()
                        .filter(|(name, _)| name.starts_with(prefix))
                        .map(|(_, s)| s.iter().product::<usize>() as f64)
                        .sum()
                };
                let p_layer = trained("model.layers.0.");
                let p_vocab = trained("model.embed_tokens.");
                let head = trained("lm_head.");
                let p_top = head + trained("model.norm.");
                (p_layer, p_vocab, head, p_top, trained(""))
            }
        };
        // Kept by each layer: norms, projections and their rotated heads, the attention
        // output, the MLP's gate, up and gated products, and the two residual sums. Attention
        // computed whole also keeps the values' head-major copy, the key-value heads repeated
        // for grouped queries, the scores and probabilities, and the output's row-major copy;
        // fused, two numbers per query row.
        let a_layer = 9.0 * n * h
            + 3.0 * n * kv
            + 3.0 * n * f
            + match mode.attention {
                Attention::Whole => n * h + n * kv + grouped * n * h + 2.0 * scores,
                Attention::Fused => 2.0 * n * self.num_attention_heads as f64,
            };
        let rows = (n / chunks.tokens.max(1) as f64).ceil();
        let (a_top, w_top) = if chunks.is_whole() {
            // The final norm and the logits; their gradient, and (when the head trains) part
            // of a second one while the head's matrix products run.
            let second = if head > 0.0 { 0.5 } else { 0.0 };
            (n * h + n * vocab, (1.0 + second) * n * vocab)
        } else if chunks.vocab <= 1 {
            // The final norm and the gradients the one pass made; a chunk's logits and their
            // gradient, and the head gradient's running sum.
            (2.0 * n * h + head, 2.0 * rows * vocab + head + 3.0 * n * h)
        } else {
            let chunk = rows * (vocab / chunks.vocab as f64).ceil();
            (n * h + n, head + 3.0 * n * h + 3.0 * chunk)
        };
        let w_embed = p_vocab + 2.0 * n * h;
        // Gradients held at each phase (head, a layer, the embeddings) besides the working set
        // (see `StepMode::held`).
        let accumulating = mode.grad_accum > 1;
        let accumulated = if accumulating { p_all } else { 0.0 };
        let held = |so_far: f64, left: f64| mode.held(so_far, left, p_all);
        let (activations, phases) = if mode.layered() {
            let saved = layers * n * h;
            // Frozen linears form no weight gradient in the recomputed layer's backward pass
            // (measured without accumulation; with it the sums' working set dominates).
            let frozen = match lora {
                Some(_) if !accumulating => 2.0 * h * h + 2.0 * kv * h + 3.0 * h * f,
                _ => 0.0,
            };
            let w_layer = 3.5 * n * f + 10.0 * n * h - 1.5 * frozen;
            let forward = saved + a_layer + accumulated;
            let top = saved + n * h + a_top + w_top + held(0.0, p_all);
            let layer = saved + n * h + a_layer + w_layer + held(p_top, p_all - p_vocab);
            let embed = 2.0 * n * h + w_embed + held(p_all - p_vocab, p_vocab);
            (saved + n * h + a_top, [forward, top, layer, embed])
        } else {
            let kept = n * h + layers * a_layer + a_top;
            let w_layer = 3.5 * n * f + 3.0 * n * h + 3.0 * p_layer;
            let top = kept + w_top + accumulated;
            let layer = kept + p_top + w_layer + accumulated;
            let embed = kept + p_all - p_vocab + w_embed + accumulated;
            (kept, [kept + accumulated, top, layer, embed])
        };
        let gradients = if mode.per_layer_updates && !accumulating {
            p_vocab.max(p_layer)
        } else {
            p_all
        };
        StepMemory::of_phases(activations, gradients, &phases)
    }
}
