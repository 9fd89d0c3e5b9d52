//! Configuration of a BERT or RoBERTa encoder, read from a Hugging Face `config.json`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

fn bert() -> String {
    "bert".into()
}
fn gelu() -> String {
    "gelu".into()
}
fn absolute() -> String {
    "absolute".into()
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn tenth() -> f64 {
    0.1
}

/// The fields of a Hugging Face BERT or RoBERTa `config.json` that the encoder uses (with the
/// defaults of `transformers`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// `bert` or `roberta`: RoBERTa numbers positions from `pad_token_id + 1`.
    #[serde(default = "bert")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// `gelu` (erf), `gelu_new` / `gelu_pytorch_tanh` (tanh approximation) or `relu`.
    #[serde(default = "gelu")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "tenth")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "tenth")]
    pub attention_probs_dropout_prob: f64,
    /// Only `absolute` is supported.
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

impl EncoderConfig {
    /// Checks that the encoder can be built from this configuration.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !matches!(self.model_type.as_str(), "bert" | "roberta") {
            return bad(format!(
                "model_type `{}` is not an encoder frugal can run; use a BERT or RoBERTa checkpoint",
                self.model_type
            ));
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type `{}` is not supported; only absolute position embeddings are",
                self.position_embedding_type
            ));
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            return bad(format!(
                "hidden_act `{}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)",
                self.hidden_act
            ));
        }
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("type_vocab_size", self.type_vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.max_tokens() == 0 {
            return bad(format!(
                "max_position_embeddings {} leaves no position for tokens",
                self.max_position_embeddings
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        Ok(())
    }

    /// The first position id (RoBERTa skips the positions up to its padding id).
    pub fn first_position(&self) -> usize {
        if self.model_type == "roberta" {
            self.pad_token_id as usize + 1
        } else {
            0
        }
    }

    /// The longest input, in tokens (special tokens included).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.first_position())
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Every parameter (name without the model-type prefix, shape) in Hugging Face order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut out = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![self.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![self.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![self.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            for (name, out_dim, in_dim) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("attention.output.LayerNorm", h, 0),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
                ("output.LayerNorm", h, 0),
            ] {
                let p = format!("encoder.layer.{l}.{name}");
                let weight = if in_dim == 0 {
                    vec![out_dim]
                } else {
                    vec![out_dim, in_dim]
                };
                out.push((format!("{p}.weight"), weight));
                out.push((format!("{p}.bias"), vec![out_dim]));
            }
        }
        out
    }

    /// Number of encoder parameters.
    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> EncoderConfig {
        serde_json::from_str(
            r#"{"hidden_size": 384, "intermediate_size": 1536, "max_position_embeddings": 512,
                "num_attention_heads": 12, "num_hidden_layers": 6, "vocab_size": 30522}"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_follow_transformers_and_the_parameter_count_is_minilms() {
        let c = minilm();
        c.validate().unwrap();
        assert_eq!((c.model_type.as_str(), c.type_vocab_size), ("bert", 2));
        assert_eq!((c.layer_norm_eps, c.hidden_dropout_prob), (1e-12, 0.1));
        // all-MiniLM-L6-v2's 22,713,216 parameters less its pooler's 384 × 384 + 384.
        assert_eq!(c.parameter_count(), 22_713_216 - 147_840);
        assert_eq!(c.max_tokens(), 512);
        let roberta = EncoderConfig {
            model_type: "roberta".into(),
            pad_token_id: 1,
            max_position_embeddings: 514,
            ..c
        };
        assert_eq!((roberta.first_position(), roberta.max_tokens()), (2, 512));
    }

    #[test]
    fn unsupported_configurations_are_named() {
        type Change = fn(&mut EncoderConfig);
        let cases: [(Change, &str); 4] = [
            (|c| c.model_type = "gpt2".into(), "model_type `gpt2`"),
            (|c| c.hidden_act = "swish".into(), "hidden_act `swish`"),
            (|c| c.num_attention_heads = 5, "not a multiple"),
            (
                |c| c.position_embedding_type = "relative_key".into(),
                "relative_key",
            ),
        ];
        for (change, message) in cases {
            let mut c = minilm();
            change(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(message), "{err}");
        }
    }
}
