//! LLaMA model configurations: built-in sizes and Hugging Face `config.json` files.

use crate::error::{Error, Result};
use frugal::ParamShape;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fields of a Hugging Face `LlamaConfig` that define the architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

/// Names of the built-in configurations.
pub const BUILTIN: &[&str] = &[
    "tiny", "9m", "20m", "35m", "60m", "130m", "350m", "1b", "3b", "7b",
];

impl LlamaConfig {
    fn shape(
        vocab: usize,
        hidden: usize,
        inter: usize,
        heads: usize,
        layers: usize,
        max_pos: usize,
    ) -> Self {
        LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_attention_heads: heads,
            num_hidden_layers: layers,
            num_key_value_heads: Some(heads),
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: max_pos,
        }
    }

    /// A built-in configuration by name (the paper's sizes; `tiny` is the embedded default).
    pub fn builtin(name: &str) -> Option<Self> {
        let v = 32000;
        Some(match name.to_ascii_lowercase().as_str() {
            "tiny" => Self::shape(4096, 256, 688, 4, 2, 128),
            "9m" => Self::shape(v, 128, 352, 4, 4, 1024),
            "20m" => Self::shape(v, 256, 688, 4, 4, 1024),
            "35m" => Self::shape(v, 384, 1024, 8, 6, 1024),
            "60m" => Self::shape(v, 512, 1376, 8, 8, 1024),
            "130m" => Self::shape(v, 768, 2048, 12, 12, 1024),
            "350m" => Self::shape(v, 1024, 2736, 16, 24, 1024),
            "1b" => Self::shape(v, 2048, 5461, 32, 24, 1024),
            "3b" => Self::shape(v, 2560, 6848, 32, 32, 1024),
            "7b" => Self::shape(v, 4096, 11008, 32, 32, 2048),
            _ => return None,
        })
    }

    /// A built-in name or a path to a Hugging Face `config.json` (unknown keys are ignored).
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        if let Some(c) = Self::builtin(name_or_path) {
            return Ok(c);
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            return Err(Error::Config(format!(
                "model `{name_or_path}` is neither a built-in configuration ({}) nor an existing config.json file",
                BUILTIN.join(", ")
            )));
        }
        Self::from_file(path)
    }

    /// Reads a Hugging Face `config.json` (the rotary base also from `rope_parameters`, as
    /// `transformers` 5 writes it). Architectures this model does not implement (biases, other
    /// activations, scaled rotary embeddings, a head size other than hidden / heads) are errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_file_with_json(path).map(|(c, _)| c)
    }

    /// [`LlamaConfig::from_file`], and the file's JSON for the keys outside the architecture.
    pub(crate) fn from_file_with_json(path: &Path) -> Result<(Self, serde_json::Value)> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::file(path, format!("cannot read model config: {e}")))?;
        let mut raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
        let unsupported = |why: String| Err(Error::file(path, why));
        match raw["model_type"].as_str() {
            Some("llama") | None => {}
            Some(other) => return unsupported(format!("model_type `{other}` is not llama")),
        }
        for key in ["attention_bias", "mlp_bias"] {
            if raw[key].as_bool() == Some(true) {
                return unsupported(format!("{key} is true; this LLaMA has no biases"));
            }
        }
        if let Some(act) = raw["hidden_act"].as_str().filter(|a| *a != "silu") {
            return unsupported(format!("hidden_act `{act}` is not silu"));
        }
        if !raw["rope_scaling"].is_null() {
            return unsupported(
                "rope_scaling is set; scaled rotary embeddings are not implemented".into(),
            );
        }
        let rope = raw["rope_parameters"].clone();
        if let Some(kind) = rope["rope_type"].as_str().filter(|k| *k != "default") {
            return unsupported(format!(
                "rope_type `{kind}`: scaled rotary embeddings are not implemented"
            ));
        }
        if let Some(theta) = rope["rope_theta"].as_f64() {
            raw["rope_theta"] = theta.into();
        }
        let c: LlamaConfig = serde_json::from_value(raw.clone())
            .map_err(|e| Error::file(path, format!("not a valid LlamaConfig: {e}")))?;
        if let Some(d) = raw["head_dim"].as_u64() {
            if c.num_attention_heads > 0 && d as usize * c.num_attention_heads != c.hidden_size {
                return unsupported(format!(
                    "head_dim {d} is not hidden_size / num_attention_heads ({} / {})",
                    c.hidden_size, c.num_attention_heads
                ));
            }
        }
        c.validate()
            .map_err(|e| Error::file(path, format!("model config: {e}")))?;
        Ok((c, raw))
    }

    /// Checks that the shapes fit together.
    pub fn validate(&self) -> Result<()> {
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.num_hidden_layers == 0
            || self.intermediate_size == 0
        {
            return Err(Error::Config("sizes must be positive".into()));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Config(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !(self.hidden_size / self.num_attention_heads).is_multiple_of(2) {
            return Err(Error::Config(
                "the head dimension must be even for rotary embeddings".into(),
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(Error::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            )));
        }
        Ok(())
    }

    /// Key/value heads (grouped-query attention), defaulting to the attention heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Parameter names and shapes in Hugging Face's layout and model order: the embedding; per
    /// layer the attention projections (keys and values with `num_key_value_heads` heads), the
    /// MLP and the two norms; the final norm; the untied LM head.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let kv = self.kv_heads() * self.head_dim();
        let mut p = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let layer =
                |m: &str, shape: Vec<usize>| (format!("model.layers.{l}.{m}.weight"), shape);
            p.extend([
                layer("self_attn.q_proj", vec![h, h]),
                layer("self_attn.k_proj", vec![kv, h]),
                layer("self_attn.v_proj", vec![kv, h]),
                layer("self_attn.o_proj", vec![h, h]),
                layer("mlp.gate_proj", vec![i, h]),
                layer("mlp.up_proj", vec![i, h]),
                layer("mlp.down_proj", vec![h, i]),
                layer("input_layernorm", vec![h]),
                layer("post_attention_layernorm", vec![h]),
            ]);
        }
        p.push(("model.norm.weight".to_string(), vec![h]));
        p.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        p
    }

    /// The parameters with their LLaMA labels, in model order: what the optimizer plans from.
    pub fn labelled_shapes(&self) -> Vec<ParamShape> {
        self.parameter_shapes()
            .into_iter()
            .map(|(name, shape)| ParamShape {
                label: crate::labels::llama(&name),
                name,
                shape,
            })
            .collect()
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The Hugging Face `config.json` for this model.
    pub fn to_hf_json(&self, eos_token_id: u32) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.kv_heads(),
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id,
            "torch_dtype": "float32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sizes_match_the_paper() {
        // The paper's "60M" has 58.1M parameters with a 32k vocabulary; "tiny" is 3.7M.
        assert_eq!(
            LlamaConfig::builtin("60m").unwrap().num_params(),
            58_073_600
        );
        let tiny = LlamaConfig::builtin("tiny").unwrap().num_params();
        assert!((3_600_000..3_800_000).contains(&tiny), "{tiny}");
    }

    #[test]
    fn grouped_query_attention_shrinks_keys_and_values() {
        let mut c = LlamaConfig::builtin("20m").unwrap();
        c.num_key_value_heads = Some(1);
        let shapes = c.labelled_shapes();
        let shape = |n: &str| shapes.iter().find(|p| p.name == n).unwrap().shape.clone();
        // 4 heads of 64: keys and values keep one head of 64.
        assert_eq!(shape("model.layers.0.self_attn.k_proj.weight"), [64, 256]);
        assert_eq!(shape("model.layers.0.self_attn.v_proj.weight"), [64, 256]);
        assert_eq!(shape("model.layers.0.self_attn.q_proj.weight"), [256, 256]);
        let full = LlamaConfig::builtin("20m").unwrap().num_params();
        assert_eq!(full - c.num_params(), 4 * 2 * (256 - 64) * 256);
        let plan =
            frugal::memory::plan(&frugal::OptimizerConfig::preset("adamw").unwrap(), &shapes)
                .unwrap();
        let state: usize = plan.iter().map(|(_, b)| b.total()).sum();
        assert_eq!(
            state,
            8 * c.num_params(),
            "AdamW keeps two moments per parameter"
        );
    }

    #[test]
    fn hf_config_files_parse_and_fail_clearly() {
        let dir = std::env::temp_dir().join(format!("frugal-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("ok.json");
        let mut json = LlamaConfig::builtin("20m").unwrap().to_hf_json(0);
        json["some_unknown_key"] = serde_json::json!(3);
        std::fs::write(&ok, json.to_string()).unwrap();
        assert_eq!(
            LlamaConfig::resolve(ok.to_str().unwrap()).unwrap(),
            LlamaConfig::builtin("20m").unwrap()
        );
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"vocab_size": 10, "hidden_size": 8}"#).unwrap();
        let err = LlamaConfig::resolve(bad.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("intermediate_size"), "{err}");
        assert!(LlamaConfig::resolve("13m").is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
