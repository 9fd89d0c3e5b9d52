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
//!
//! The generic operations (CUDA, and bf16 on any device; [`crate::Kernels`]) keep more: each
//! candle operation keeps its inputs. Their activations are counted the same way, per
//! operation, and their working sets are modelled with coefficients measured on the CPU with
//! the fused kernels off, where the same operations run.

use super::{DecoderLora, LlamaConfig};
use crate::chunked_loss::LossChunks;
use crate::step_memory::{StepMemory, StepMode};
use crate::Attention;

/// Values a step trains (gradients it forms): of a layer, of the embeddings, of the head, of
/// the head and final norm, and in all.
struct Trained {
    layer: f64,
    vocab: f64,
    head: f64,
    top: f64,
    all: f64,
}

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
        let sizes = self.sizes(batch, seq, mode.loss_chunks);
        let Sizes { n, h, .. } = sizes;
        let layers = self.num_hidden_layers as f64;
        let Trained {
            layer: p_layer,
            vocab: p_vocab,
            head,
            top: p_top,
            all: p_all,
        } = self.trained(lora);
        let costs = match mode.kernels.generic_bytes() {
            Some(c) => self.generic_costs(&sizes, mode, (head, lora), c),
            None => self.fused_costs(&sizes, mode, head),
        };
        let Costs {
            a_layer,
            a_top,
            w_top,
            top_forward,
            state,
            ..
        } = costs;
        let w_embed = p_vocab + 2.0 * n * h;
        // Gradients held at each phase (head, a layer, the embeddings) besides the working set
        // (see `StepMode::held`).
        let accumulating = mode.grad_accum > 1;
        let accumulated = if accumulating { p_all } else { 0.0 };
        let held = |so_far: f64, left: f64| mode.held(so_far, left, p_all);
        let (activations, phases) = if mode.layered() {
            let saved = layers * state;
            // Frozen linears form no weight gradient in the recomputed layer's backward pass:
            // its working set is smaller by 1.5 times their values; under accumulation by 0.75
            // times where only the adapters train, else the sums' working set dominates
            // (measured).
            let frozen = match (lora, accumulating) {
                (None, _) => 0.0,
                (Some(_), false) => 1.5 * self.linear_values(),
                (Some(l), true) if !l.train_others => 0.75 * self.linear_values(),
                (Some(_), true) => 0.0,
            };
            let w_layer = costs.w_layered - frozen;
            let forward = saved + a_layer + accumulated;
            let top_forward = saved + state + top_forward + accumulated;
            let top = saved + state + a_top + w_top + held(0.0, p_all);
            let layer = saved + state + a_layer + w_layer + held(p_top, p_all - p_vocab);
            let embed = 2.0 * state + w_embed + held(p_all - p_vocab, p_vocab);
            (
                saved + state + a_top,
                vec![forward, top_forward, top, layer, embed],
            )
        } else {
            let before_top = state + layers * a_layer;
            let kept = before_top + a_top;
            let w_layer = costs.w_layer + 3.0 * p_layer;
            let top = kept + w_top + accumulated;
            let layer = kept + p_top + w_layer + accumulated;
            let embed = kept + p_all - p_vocab + w_embed + accumulated;
            let top_forward = before_top + top_forward + accumulated;
            (
                kept,
                vec![kept + accumulated, top_forward, top, layer, embed],
            )
        };
        let gradients = if mode.per_layer_updates && !accumulating {
            p_vocab.max(p_layer)
        } else {
            p_all
        };
        StepMemory::of_phases(activations, gradients, &phases)
    }
}

/// A step's sizes: tokens, hidden width, MLP width, key-value width, vocabulary, attention
/// scores, 2 for grouped queries (their keys and values repeated) else 0, and the tokens of a
/// loss chunk.
struct Sizes {
    n: f64,
    h: f64,
    f: f64,
    kv: f64,
    vocab: f64,
    scores: f64,
    grouped: f64,
    rows: f64,
}

/// What a step's pieces cost, in f32 values: the activations a layer keeps, those the top
/// (final norm and loss) keeps and the top's backward working set, the peak of the top's
/// forward pass beyond what the layers keep, a hidden state between layers, and a layer's
/// backward working set, whole and recomputed.
struct Costs {
    a_layer: f64,
    a_top: f64,
    w_top: f64,
    top_forward: f64,
    state: f64,
    w_layer: f64,
    w_layered: f64,
}

impl LlamaConfig {
    /// The costs of the fused CPU kernels, with attention as `mode` asks; `head` is the values
    /// the head trains.
    fn fused_costs(&self, sizes: &Sizes, mode: StepMode, head: f64) -> Costs {
        let Sizes {
            n,
            h,
            f,
            kv,
            vocab,
            scores,
            grouped,
            rows,
        } = *sizes;
        let chunks = mode.loss_chunks;
        // Kept by each layer: norms, projections and their rotated heads, the attention
        // output, the MLP's gate, up and gated products, and the two residual sums.
        // Attention computed whole also keeps the values' head-major copy, the key-value
        // heads repeated for grouped queries, the scores and probabilities, and the
        // output's row-major copy; fused, two numbers per query row.
        let a_layer = 9.0 * n * h
            + 3.0 * n * kv
            + 3.0 * n * f
            + match mode.attention {
                Attention::Whole => n * h + n * kv + grouped * n * h + 2.0 * scores,
                Attention::Fused => 2.0 * n * self.num_attention_heads as f64,
            };
        let (a_top, w_top) = if chunks.is_whole() {
            // The final norm and the logits; their gradient, and (when the head
            // trains) part of a second one while the head's matrix products run.
            let second = if head > 0.0 { 0.5 } else { 0.0 };
            (n * h + n * vocab, (1.0 + second) * n * vocab)
        } else if chunks.vocab <= 1 {
            // The final norm and the gradients the one pass made; a chunk's logits
            // and their gradient, and the head gradient's running sum.
            (2.0 * n * h + head, 2.0 * rows * vocab + head + 3.0 * n * h)
        } else {
            let chunk = rows * (vocab / chunks.vocab as f64).ceil();
            (n * h + n, head + 3.0 * n * h + 3.0 * chunk)
        };
        Costs {
            a_layer,
            a_top,
            w_top,
            top_forward: 0.0,
            state: n * h,
            w_layer: 3.5 * n * f + 3.0 * n * h,
            w_layered: 3.5 * n * f + 8.0 * n * h,
        }
    }

    /// The costs of the generic operations (candle's tensor operations, on CUDA or in bf16)
    /// computing in `c`-byte values (4: f32, 2: bf16 over f32 weights); attention is whole.
    /// Counted from the tensors each operation keeps: reductions (norms, softmax, the loss)
    /// widen 16-bit values to f32, and each linear's weight is cast to the compute dtype.
    fn generic_costs(
        &self,
        sizes: &Sizes,
        mode: StepMode,
        (head, lora): (f64, Option<&DecoderLora>),
        c: f64,
    ) -> Costs {
        let Sizes {
            n,
            h,
            f,
            kv,
            vocab,
            scores,
            grouped,
            rows,
        } = *sizes;
        let chunks = mode.loss_chunks;
        // 1 where 16-bit values are widened for reductions and weights cast, else 0.
        let up = if c < 4.0 { 1.0 } else { 0.0 };
        // An RMSNorm keeps the widened input, its square, the normed rows, their product with
        // the weight and the result narrowed; a causal softmax the widened scores, scaled,
        // masked, shifted, their exponentials, the probabilities and those narrowed.
        let norm = up * 4.0 + 12.0 + up * c;
        let softmax = up * 4.0 + 20.0 + up * c;
        // Per layer: two norms; q, its rotation (a head-major copy, the negated half, the
        // rotated copy, two products and their sum), the attention output, its row-major
        // copy, the output projection, the MLP's down projection and the two residual sums;
        // the same rotation of k, v and its head-major copy; for grouped queries the repeated
        // keys and values; the scores and softmax; gate, up, silu and their product; and the
        // weights cast.
        let bytes = 2.0 * norm * n * h
            + c * n * h * (12.5 + grouped)
            + c * n * kv * 8.5
            + (c + softmax) * scores
            + 4.0 * c * n * f
            + up * c * self.linear_values()
            + c * n * self.adapter_outputs(lora);
        let head_copy = up * c * vocab * h;
        let (a_top, w_top, top_forward) = if chunks.is_whole() {
            // The final norm, the logits, widened, shifted and their exponentials, and the
            // head cast; their gradients (measured).
            let a = norm * n * h + (c + up * 4.0 + 8.0) * n * vocab + head_copy;
            (a, 16.5 * n * vocab, a)
        } else {
            // The final norm and the gradients formed in the forward pass, which at a
            // chunk's peak also holds its logits, their exponentials, the one-hot rows and
            // the gradient, widened or not, and the head cast.
            let chunk = rows * (vocab / chunks.vocab as f64).ceil();
            let a = norm * n * h + c * n * h + 4.0 * head;
            (a, 2.0 * c * n * h, a + (24.0 + c) * chunk + head_copy)
        };
        // The working sets: the MLP's gradients in flight dominate, and in a recomputed layer
        // the softmax's too (measured coefficients).
        Costs {
            a_layer: bytes / 4.0,
            a_top: a_top / 4.0,
            w_top: w_top / 4.0,
            top_forward: top_forward / 4.0,
            state: c * n * h / 4.0,
            w_layer: (23.0 + 7.5 * c) * n * f / 4.0,
            w_layered: (8.0 * scores + 14.25 * c * n * f + (8.0 + 4.0 * c) * n * h) / 4.0,
        }
    }

    /// The sizes of a step on micro-batches of `batch` sequences of `seq` tokens, with the loss
    /// split as `chunks` asks.
    fn sizes(&self, batch: usize, seq: usize, chunks: LossChunks) -> Sizes {
        let grouped = self.kv_heads() != self.num_attention_heads;
        let n = (batch * seq) as f64;
        Sizes {
            n,
            h: self.hidden_size as f64,
            f: self.intermediate_size as f64,
            kv: (self.kv_heads() * self.head_dim()) as f64,
            vocab: self.vocab_size as f64,
            scores: (batch * self.num_attention_heads * seq * seq) as f64,
            grouped: if grouped { 2.0 } else { 0.0 },
            rows: (n / chunks.tokens.max(1) as f64).ceil(),
        }
    }

    /// What a step trains: every weight, or what `lora` trains.
    fn trained(&self, lora: Option<&DecoderLora>) -> Trained {
        let h = self.hidden_size as f64;
        match lora {
            None => {
                let layer = self.linear_values() + 2.0 * h;
                let vocab = (self.vocab_size * self.hidden_size) as f64;
                let all = 2.0 * vocab + self.num_hidden_layers as f64 * layer + h;
                Trained {
                    layer,
                    vocab,
                    head: vocab,
                    top: vocab + h,
                    all,
                }
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
                let head = trained("lm_head.");
                Trained {
                    layer: trained("model.layers.0."),
                    vocab: trained("model.embed_tokens."),
                    head,
                    top: head + trained("model.norm."),
                    all: trained(""),
                }
            }
        }
    }

    /// What a layer's adapters keep per token through the generic operations, in values: for
    /// each adapted linear the frozen product, x·Aᵀ, its product with Bᵀ and that scaled
    /// (the sum is the linear's output).
    fn adapter_outputs(&self, lora: Option<&DecoderLora>) -> f64 {
        let Some(l) = lora else { return 0.0 };
        l.trained_shapes(self)
            .iter()
            .filter(|(name, _)| name.starts_with("model.layers.0."))
            .filter_map(|(name, shape)| match shape[..] {
                [out, rank] if name.contains("lora_B") => Some((3 * out + rank) as f64),
                _ => None,
            })
            .sum()
    }

    /// Values of a layer's seven linears.
    fn linear_values(&self) -> f64 {
        let h = self.hidden_size as f64;
        let kv = (self.kv_heads() * self.head_dim()) as f64;
        2.0 * h * h + 2.0 * kv * h + 3.0 * h * self.intermediate_size as f64
    }
}
