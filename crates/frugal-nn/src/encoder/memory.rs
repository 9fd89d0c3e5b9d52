//! The memory a fine-tuning step of a [`super::Classifier`] needs beyond its weights and
//! optimizer state (see [`crate::step_memory`]).
//!
//! Activations are counted from the tensors each operation of [`super::Encoder`] keeps for its
//! backward pass: every product, bias sum, residual sum, LayerNorm and activation output, the
//! dropped copies with their masks' bits, the attention output (and, computed whole, the scores,
//! the probabilities and the heads' copies), and under LoRA the adapters' paths; frozen
//! embeddings and the first layer's frozen products keep nothing. The working set of a layer's
//! backward pass is modelled as 1.5·n·f + 4·n·h (and, when attention is computed whole, one t × t
//! tensor per head, three with dropout), that of the embeddings as the word table's gradient formed once more and
//! 3·n·h, with coefficients measured on this implementation; the plan's test checks the
//! resulting peak against counted allocations.

use super::{EncoderConfig, LoraConfig};
use crate::step_memory::{StepMemory, StepMode};
use crate::Attention;

impl EncoderConfig {
    /// Plans the memory of a fine-tuning step of a classifier of `labels` classes (mean
    /// pooling) on micro-batches of `batch` inputs padded to `seq` tokens, training every
    /// weight or, with `lora`, adapters on the frozen weights (beyond weights and optimizer
    /// state). The classification loss is never split: `mode.loss_chunks` does not apply.
    pub fn step_memory(
        &self,
        batch: usize,
        seq: usize,
        labels: usize,
        lora: Option<&LoraConfig>,
        mode: StepMode,
    ) -> StepMemory {
        let n = (batch * seq) as f64;
        let h = self.hidden_size as f64;
        let f = self.intermediate_size as f64;
        let layers = self.num_hidden_layers as f64;
        let rows = (batch * self.num_attention_heads * seq) as f64;
        let scores = rows * seq as f64;
        // A dropped copy of x values and its mask (one bit per value); none without dropout.
        let dropped = |p: f64, x: f64| if p > 0.0 { x + x / 32.0 } else { 0.0 };
        let hidden_p = self.hidden_dropout_prob;
        let mask = match self.attention_probs_dropout_prob > 0.0 {
            true => scores / 32.0,
            false => 0.0,
        };
        // Parameters by part: the embeddings, one layer, the head (trained ones only).
        let count = |prefix: &str, shapes: Vec<(String, Vec<usize>)>| -> f64 {
            shapes
                .iter()
                .filter(|(name, _)| name.starts_with(prefix))
                .map(|(_, s)| s.iter().product::<usize>() as f64)
                .sum()
        };
        let (p_embed, p_layer) = match lora {
            None => (
                count("embeddings.", self.parameter_shapes()),
                count("encoder.layer.0.", self.parameter_shapes()),
            ),
            Some(l) => (
                0.0,
                count(
                    "encoder.layer.0.",
                    l.adapter_shapes(self.parameter_shapes()),
                ),
            ),
        };
        let p_head = labels as f64 * (h + 1.0);
        let p_all = p_embed + layers * p_layer + p_head;
        // Kept by each layer: the query, key and value products and their biased sums, the
        // attention output, the output projection's product and sum, its dropped copy, the
        // residual sum and LayerNorm; the MLP's two products, activation and the same four.
        // Attention computed whole also keeps the heads' copies of q, k and v, the scores,
        // the probabilities, their product with v and its row-major copy; fused, two numbers
        // per query row. Both keep the probabilities' dropout bits.
        let attention = match mode.attention {
            Attention::Fused => 2.0 * rows + mask,
            Attention::Whole => 4.0 * n * h + 2.0 * scores + mask,
        };
        let mut a_layer = 15.0 * n * h + 3.0 * n * f + 2.0 * dropped(hidden_p, n * h) + attention;
        // An adapter keeps its dropped input, x·Aᵀ, the product with Bᵀ, its scaled copy and
        // the sum with the frozen linear.
        if let Some(l) = lora {
            let linears = [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", h, f),
                ("output.dense", f, h),
            ];
            for (module, inputs, outputs) in linears {
                if l.targets(module) {
                    a_layer +=
                        dropped(l.dropout, n * inputs) + n * l.rank as f64 + 3.0 * n * outputs;
                }
            }
        }
        // The embeddings keep three lookups, two sums, the LayerNorm and its dropped copy;
        // frozen, only the first layer's input, whose products (q, k, v before their biases)
        // are freed too.
        let embeddings = match lora {
            None => 6.0 * n * h + dropped(hidden_p, n * h),
            Some(_) => n * h - 3.0 * n * h, // the input, less the three products
        };
        let pooled = n * h + 3.0 * (batch as f64) * h;
        // Attention computed whole forms the gradients of the probabilities and the scores,
        // and with dropout those of the dropped probabilities too.
        let w_attention = match (mode.attention, mask > 0.0) {
            (Attention::Fused, _) => 0.0,
            (Attention::Whole, false) => scores,
            (Attention::Whole, true) => 3.0 * scores,
        };
        let w_layer = 1.5 * n * f + 4.0 * n * h + w_attention;
        let w_embed = self.vocab_size as f64 * h + 3.0 * n * h;
        let trained_embeddings = lora.is_none();
        let held = |so_far: f64, left: f64| mode.held(so_far, left, p_all);
        // Gradients made before a layer's phase and still to be made at it: the most of each
        // is at the bottom layer and the top one.
        let below = p_head + (layers - 1.0) * p_layer;
        let above = layers * p_layer + p_embed;
        let (activations, mut phases) = if mode.layered() {
            // The layers' inputs and the top's, each input freed once its layer is done; a
            // recomputed layer with its input's copy, the gradient reaching it and the one it
            // passes down.
            let saved = (layers + 1.0) * n * h;
            let forward = saved + a_layer + held(0.0, p_all);
            let recomputed = 5.0 * n * h + a_layer + w_layer;
            let top = saved + held(p_head, above);
            let bottom = 2.0 * n * h + held(below, p_layer + p_embed);
            let layer = recomputed + top.max(bottom);
            let embed = 8.0 * n * h + w_embed + p_embed + held(p_all - p_embed, p_embed);
            (saved + pooled, vec![forward, layer, embed])
        } else {
            let kept = embeddings + layers * a_layer + pooled;
            let layer = kept + held(below, above) + w_layer;
            let embed = kept + held(p_all - p_embed, p_embed) + p_embed + w_embed;
            (kept, vec![kept + held(0.0, p_all), layer, embed])
        };
        if !trained_embeddings {
            phases.pop();
        }
        let gradients = if mode.per_layer_updates && mode.grad_accum <= 1 {
            p_embed.max(p_layer).max(p_head)
        } else {
            p_all
        };
        StepMemory::of_phases(activations, gradients, &phases)
    }
}
