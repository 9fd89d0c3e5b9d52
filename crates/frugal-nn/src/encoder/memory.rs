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
//!
//! The generic operations (CUDA; [`crate::Kernels`]) keep about twice as much: each candle
//! operation keeps its inputs (a LayerNorm five tensors of the input's size, a dropout its f32
//! factors, attention six t × t tensors per head). They are counted the same way. Their working
//! set, dominated by the MLP's gradients in flight, is modelled as 15·n·f + 2·n·h (4.5·n·h in a
//! recomputed layer), measured on the CPU with the fused kernels off, where the same operations
//! run.

use super::{EncoderConfig, LoraConfig};
use crate::step_memory::{StepMemory, StepMode};
use crate::Attention;

impl EncoderConfig {
    /// Plans the memory of a fine-tuning step of a classifier of `labels` classes (mean
    /// pooling) on micro-batches of `batch` inputs padded to `seq` tokens, training every
    /// weight or, with `lora`, adapters on the frozen weights (beyond weights and optimizer
    /// state). The classification loss is never split: `mode.loss_chunks` does not apply. The
    /// generic operations compute in f32 (an encoder is fine-tuned in f32) and attention whole.
    pub fn step_memory(
        &self,
        batch: usize,
        seq: usize,
        labels: usize,
        lora: Option<&LoraConfig>,
        mode: StepMode,
    ) -> StepMemory {
        let Sizes { n, h, .. } = self.sizes(batch, seq);
        let layers = self.num_hidden_layers as f64;
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
        let Costs {
            a_layer,
            embeddings,
            pooled,
            w_layer,
            w_layered,
            w_embed,
            embed_extra,
        } = match mode.kernels.generic_bytes() {
            Some(_) => self.generic_costs(batch, seq, lora),
            None => self.fused_costs(batch, seq, lora, mode.attention),
        };
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
            let recomputed = a_layer + w_layered;
            let top = saved + held(p_head, above);
            let bottom = 2.0 * n * h + held(below, p_layer + p_embed);
            let layer = recomputed + top.max(bottom);
            let embed = embed_extra + w_embed + p_embed + held(p_all - p_embed, p_embed);
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

/// What a step's pieces cost, in f32 values: the activations a layer keeps, those the
/// embeddings keep (under LoRA, the first layer's input less what its frozen products free) and
/// the pooling and head keep; a layer's backward working set, whole and recomputed (with its
/// input's copy and the gradient it passes down), the embeddings' working set, and what their
/// recomputation holds besides.
struct Costs {
    a_layer: f64,
    embeddings: f64,
    pooled: f64,
    w_layer: f64,
    w_layered: f64,
    w_embed: f64,
    embed_extra: f64,
}

/// A step's sizes: tokens, hidden width, MLP width, query rows of all heads, attention scores.
struct Sizes {
    n: f64,
    h: f64,
    f: f64,
    rows: f64,
    scores: f64,
}

/// A dropped copy of x values and its mask, one bit per value (none without dropout).
fn dropped(p: f64, x: f64) -> f64 {
    if p > 0.0 {
        x + x / 32.0
    } else {
        0.0
    }
}

impl EncoderConfig {
    /// The costs of the fused CPU kernels, with attention as `attention` asks.
    fn fused_costs(
        &self,
        batch: usize,
        seq: usize,
        lora: Option<&LoraConfig>,
        attention: Attention,
    ) -> Costs {
        let Sizes {
            n,
            h,
            f,
            rows,
            scores,
        } = self.sizes(batch, seq);
        let hidden_p = self.hidden_dropout_prob;
        let mask = match self.attention_probs_dropout_prob > 0.0 {
            true => scores / 32.0,
            false => 0.0,
        };
        // Kept by each layer: the query, key and value products and their biased sums, the
        // attention output, the output projection's product and sum, its dropped copy, the
        // residual sum and LayerNorm; the MLP's two products, activation and the same four.
        // Attention computed whole also keeps the heads' copies of q, k and v, the scores,
        // the probabilities, their product with v and its row-major copy; fused, two numbers
        // per query row. Both keep the probabilities' dropout bits.
        let kept_attention = match attention {
            Attention::Fused => 2.0 * rows + mask,
            Attention::Whole => 4.0 * n * h + 2.0 * scores + mask,
        };
        let a_layer = 15.0 * n * h
            + 3.0 * n * f
            + 2.0 * dropped(hidden_p, n * h)
            + kept_attention
            + self.adapters_kept(batch * seq, lora, dropped);
        // The embeddings keep three lookups, two sums, the LayerNorm and its dropped copy;
        // frozen, only the first layer's input, whose products (q, k, v before their biases)
        // are freed too.
        let embeddings = match lora {
            None => 6.0 * n * h + dropped(hidden_p, n * h),
            Some(_) => n * h - 3.0 * n * h,
        };
        // Attention computed whole forms the gradients of the probabilities and the scores,
        // and with dropout those of the dropped probabilities too.
        let w_attention = match (attention, mask > 0.0) {
            (Attention::Fused, _) => 0.0,
            (Attention::Whole, false) => scores,
            (Attention::Whole, true) => 3.0 * scores,
        };
        let w_layer = 1.5 * n * f + 4.0 * n * h + w_attention;
        Costs {
            a_layer,
            embeddings,
            pooled: n * h + 3.0 * batch as f64 * h,
            w_layer,
            w_layered: w_layer + 3.0 * n * h,
            w_embed: self.vocab_size as f64 * h + 3.0 * n * h,
            embed_extra: 8.0 * n * h,
        }
    }

    /// The costs of the generic operations (candle's tensor operations, as on CUDA), where
    /// each operation keeps its inputs: a LayerNorm keeps the centred rows, their squares, the
    /// normed rows, their product with the weight and the sum with the bias (and five numbers
    /// per row); a dropout its factors and the product; attention the heads' copies of q, k
    /// and v, the scores, scaled, masked, shifted, their exponentials and the probabilities
    /// (and two numbers per row), their product with v and its row-major copy.
    fn generic_costs(&self, batch: usize, seq: usize, lora: Option<&LoraConfig>) -> Costs {
        let Sizes {
            n,
            h,
            f,
            rows,
            scores,
        } = self.sizes(batch, seq);
        let dropped = |p: f64, x: f64| if p > 0.0 { 2.0 * x } else { 0.0 };
        let hidden_p = self.hidden_dropout_prob;
        let norm = 5.0 * n * h + 5.0 * n;
        // Per layer: the six products with their biased sums (the MLP's with its activation),
        // the heads' copies of q, k and v, the attention output and its row-major copy, two
        // residual sums and norms, two dropped sublayer outputs, and the attention's scores and
        // probabilities.
        let a_layer = 10.0 * n * h
            + 3.0 * n * f
            + 5.0 * n * h
            + 2.0 * n * h
            + 2.0 * norm
            + 2.0 * dropped(hidden_p, n * h)
            + 6.0 * scores
            + 2.0 * rows
            + dropped(self.attention_probs_dropout_prob, scores)
            + self.adapters_kept(batch * seq, lora, dropped);
        // The embeddings keep three lookups, two sums, the LayerNorm and its dropped copy.
        // Frozen, they keep nothing but the first layer's input; there the frozen products of
        // q, k and v are not kept, nor their biased sums where not adapted, and the adapters'
        // dropout keeps no factors (its input is out of the graph).
        let embeddings = match lora {
            None => 5.0 * n * h + norm + dropped(hidden_p, n * h),
            Some(l) => {
                let qkv = [
                    "attention.self.query",
                    "attention.self.key",
                    "attention.self.value",
                ];
                let adapted = qkv.iter().filter(|m| l.targets(m)).count() as f64;
                let factors = if l.dropout > 0.0 { adapted } else { 0.0 };
                n * h - 3.0 * n * h - (3.0 - adapted) * n * h - factors * n * h
            }
        };
        Costs {
            a_layer,
            embeddings,
            pooled: n * h + n + 4.0 * batch as f64 * h,
            w_layer: 15.0 * n * f + 2.0 * n * h,
            w_layered: 15.0 * n * f + 4.5 * n * h,
            w_embed: self.vocab_size as f64 * h + 3.0 * n * h,
            embed_extra: 8.0 * n * h,
        }
    }

    /// The sizes of a step on micro-batches of `batch` inputs of `seq` tokens.
    fn sizes(&self, batch: usize, seq: usize) -> Sizes {
        let rows = (batch * self.num_attention_heads * seq) as f64;
        Sizes {
            n: (batch * seq) as f64,
            h: self.hidden_size as f64,
            f: self.intermediate_size as f64,
            rows,
            scores: rows * seq as f64,
        }
    }

    /// What a layer's adapters keep for `n` tokens, in values: for each adapted linear its
    /// input's dropped copy (as `dropped` counts it), x·Aᵀ, the product with Bᵀ, its scaled
    /// copy and the sum with the frozen linear.
    fn adapters_kept(
        &self,
        n: usize,
        lora: Option<&LoraConfig>,
        dropped: impl Fn(f64, f64) -> f64,
    ) -> f64 {
        let Some(l) = lora else { return 0.0 };
        let n = n as f64;
        let h = self.hidden_size as f64;
        let f = self.intermediate_size as f64;
        let linears = [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, f),
            ("output.dense", f, h),
        ];
        linears
            .iter()
            .filter(|(module, _, _)| l.targets(module))
            .map(|&(_, inputs, outputs)| {
                dropped(l.dropout, n * inputs) + n * l.rank as f64 + 3.0 * n * outputs
            })
            .sum()
    }
}
