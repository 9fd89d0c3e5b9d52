//! Fine-tuning memory by method, without loading weights: the model's weights, what the
//! optimizer trains (adapters included), its exact state and the trained weights' gradients.

use super::run::{method, Method};
use anyhow::Result;
use frugal::labels::ParamShape;
use frugal::StateBytes;
use frugal_nn::encoder::EncoderConfig;
use serde::Serialize;

/// The memory of one fine-tuning method.
#[derive(Clone, Debug, Serialize)]
pub struct MethodMemory {
    pub method: String,
    /// Weights of the model (the encoder, the head and any adapters).
    pub parameters: usize,
    /// Weights the optimizer trains.
    pub trainable: usize,
    /// Of those, LoRA adapter weights.
    pub adapters: usize,
    pub state: StateBytes,
    pub state_bytes: usize,
    /// Gradients of the trained weights (f32).
    pub gradient_bytes: usize,
}

/// Plans each method's memory for a classifier of `labels` classes on an encoder of `config`.
pub fn plan(
    config: &EncoderConfig,
    labels: usize,
    methods: &[String],
) -> Result<Vec<MethodMemory>> {
    let prefix = format!("{}.", config.model_type);
    let shape = |name: String, shape: Vec<usize>| ParamShape {
        label: frugal_nn::labels::bert(&name),
        name,
        shape,
    };
    let head = [
        shape("classifier.weight".into(), vec![labels, config.hidden_size]),
        shape("classifier.bias".into(), vec![labels]),
    ];
    let encoder: Vec<ParamShape> = config
        .parameter_shapes()
        .into_iter()
        .map(|(n, s)| shape(format!("{prefix}{n}"), s))
        .collect();
    let count = |s: &[ParamShape]| {
        s.iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum::<usize>()
    };
    methods
        .iter()
        .map(|m| {
            let Method { optimizer, lora } = method(m, config.hidden_size, 0, None, &[])?;
            let adapters: Vec<ParamShape> = lora
                .map(|l| {
                    l.adapter_shapes(config)
                        .into_iter()
                        .map(|(n, s)| shape(format!("{prefix}{n}"), s))
                        .collect()
                })
                .unwrap_or_default();
            let trained: Vec<ParamShape> = if lora.is_some() {
                adapters.iter().chain(&head).cloned().collect()
            } else {
                encoder.iter().chain(&head).cloned().collect()
            };
            let state = frugal::memory::plan(&optimizer, &trained)?.iter().fold(
                StateBytes::default(),
                |mut acc, (_, b)| {
                    acc += *b;
                    acc
                },
            );
            let trainable = count(&trained);
            Ok(MethodMemory {
                method: m.clone(),
                parameters: count(&encoder) + count(&head) + count(&adapters),
                trainable,
                adapters: count(&adapters),
                state,
                state_bytes: state.total(),
                gradient_bytes: 4 * trainable,
            })
        })
        .collect()
}

/// The plans as a table (MiB).
pub fn table(plans: &[MethodMemory]) -> String {
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let mut out = format!(
        "{:<24} {:>12} {:>12} {:>10} {:>10} {:>10}\n",
        "method", "parameters", "trainable", "adapters", "state", "gradients"
    );
    for p in plans {
        out += &format!(
            "{:<24} {:>12} {:>12} {:>10} {:>10.2} {:>10.2}\n",
            p.method,
            p.parameters,
            p.trainable,
            p.adapters,
            mib(p.state_bytes),
            mib(p.gradient_bytes)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minilm_methods_by_hand() {
        let c: EncoderConfig = serde_json::from_str(
            r#"{"hidden_size": 384, "intermediate_size": 1536, "max_position_embeddings": 512,
                "num_attention_heads": 12, "num_hidden_layers": 6, "vocab_size": 30522}"#,
        )
        .unwrap();
        let methods: Vec<String> = [
            "adamw",
            "lora",
            "frugal-ft",
            "frugal-ft:rank=0",
            "frugal-ft:embeddings=state-free",
        ]
        .map(String::from)
        .into();
        let p = plan(&c, 2, &methods).unwrap();
        let encoder = 22_565_376;
        let head = 2 * 384 + 2;
        // AdamW: two moments of every weight.
        assert_eq!(p[0].trainable, encoder + head);
        assert_eq!(p[0].state_bytes, 8 * (encoder + head));
        // LoRA rank 8 on query and value of 6 layers: A 8×384 and B 384×8 each.
        let adapters = 6 * 2 * 2 * 8 * 384;
        assert_eq!((p[1].adapters, p[1].trainable), (adapters, adapters + head));
        assert_eq!(p[1].state_bytes, 8 * (adapters + head));
        assert_eq!(p[1].parameters, encoder + head + adapters);
        // FRUGAL: 8 of 384 columns of query and value (moments and column indices), nothing for
        // the other linears, full state for embeddings, norms, biases and the head.
        let linears = 6 * (4 * 384 * 384 + 2 * 384 * 1536);
        let full = encoder + head - linears;
        let columns = 6 * 2 * 8 * 384;
        assert_eq!(p[2].state_bytes, 8 * (full + columns) + 4 * 6 * 2 * 8);
        assert_eq!(p[3].state_bytes, 8 * full);
        // State-free embedding tables leave the norms, biases and head.
        let embeddings = (30522 + 512 + 2) * 384;
        assert_eq!(
            p[4].state_bytes,
            8 * (full - embeddings + columns) + 4 * 6 * 2 * 8
        );
    }
}
