//! BERT and RoBERTa encoders in candle, built from differentiable operations: word, position and
//! token-type embeddings, LayerNorm, N × (attention over the unpadded keys, add & LayerNorm,
//! GELU feed-forward, add & LayerNorm), with Hugging Face names, and a classification head on
//! top ([`Classifier`]).

mod batch;
mod classifier;
mod config;

pub use batch::EncoderBatch;
pub use classifier::{Classifier, Pooling};
pub use config::EncoderConfig;

use crate::dropout::{maybe, Dropout};
use crate::error::{Error, Result};
use crate::ops::{add_bias, gelu_erf, key_masked_softmax, layer_norm, linear};
use candle_core::{DType, Device, Tensor, Var};
use frugal::Param;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// A linear layer y = x·Wᵀ + b.
struct Dense {
    w: Tensor,
    b: Tensor,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(add_bias(&linear(x, &self.w)?, &self.b)?)
    }
}

/// LayerNorm weight and bias.
struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(layer_norm(x, &self.w, &self.b, self.eps)?)
    }
}

/// One encoder layer.
struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

/// A BERT or RoBERTa encoder with trainable weights.
pub struct Encoder {
    pub config: EncoderConfig,
    /// The weights by name (without the model-type prefix), in Hugging Face order.
    vars: Vec<(String, Var)>,
    device: Device,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: Norm,
    layers: Vec<Layer>,
}

/// The tensors of a checkpoint under the names of [`EncoderConfig::parameter_shapes`]: without
/// a `bert.` or `roberta.` prefix, and with LayerNorm `gamma`/`beta` read as `weight`/`bias`.
/// Tensors outside the encoder (a pooler, heads) are returned in the second map.
fn canonical_names(
    tensors: HashMap<String, Tensor>,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let (mut encoder, mut other) = (HashMap::new(), HashMap::new());
    for (name, t) in tensors {
        let bare = ["bert.", "roberta."]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(&name);
        if bare.starts_with("embeddings.") || bare.starts_with("encoder.") {
            let bare = match bare.rsplit_once('.') {
                Some((stem, "gamma")) if stem.ends_with("LayerNorm") => format!("{stem}.weight"),
                Some((stem, "beta")) if stem.ends_with("LayerNorm") => format!("{stem}.bias"),
                _ => bare.to_string(),
            };
            encoder.insert(bare, t);
        } else {
            other.insert(name, t);
        }
    }
    (encoder, other)
}

impl Encoder {
    /// A freshly initialised encoder as `transformers` initialises one: N(0, 0.02²) weights,
    /// zero biases, unit LayerNorms, from `seed`.
    pub fn init(config: &EncoderConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let n = shape.iter().product();
            let data = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if name.contains("LayerNorm") {
                vec![1.0; n]
            } else {
                crate::init::normal(&mut rng, n, 0.02)
            };
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(config, tensors, device)
    }

    /// Loads a Hugging Face BERT or RoBERTa folder (`config.json` and safetensors weights,
    /// sharded or not) onto `device`. A pooler or task head in the weights is ignored.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config: EncoderConfig = crate::hf::read_config(dir)?;
        config.validate()?;
        let tensors = crate::hf::read_weights(dir)?;
        Self::from_checkpoint(&config, tensors, device)
            .map(|(e, _)| e)
            .map_err(|e| match e {
                Error::Weights(m) => Error::Weights(format!("{}: {m}", dir.display())),
                e => e,
            })
    }

    /// The encoder from a checkpoint's tensors (any prefix and LayerNorm naming), and the
    /// tensors that are not the encoder's.
    pub fn from_checkpoint(
        config: &EncoderConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<(Self, HashMap<String, Tensor>)> {
        let (encoder, other) = canonical_names(tensors);
        Ok((Self::from_tensors(config, encoder, device)?, other))
    }

    fn from_tensors(
        config: &EncoderConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut vars = Vec::new();
        let mut by_name = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let t = tensors.remove(&name).ok_or_else(|| {
                Error::Weights(format!(
                    "the weights have no tensor `{name}` (nor with a bert./roberta. prefix)"
                ))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Weights(format!(
                    "tensor `{name}` has shape {:?}, but config.json needs {shape:?}: the configuration and the weights disagree",
                    t.dims()
                )));
            }
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?;
            by_name.insert(name.clone(), var.as_tensor().clone());
            vars.push((name, var));
        }
        let get = |n: &str| by_name[n].clone();
        let eps = config.layer_norm_eps;
        let dense = |p: &str| Dense {
            w: get(&format!("{p}.weight")),
            b: get(&format!("{p}.bias")),
        };
        let norm = |p: &str| Norm {
            w: get(&format!("{p}.weight")),
            b: get(&format!("{p}.bias")),
            eps,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| format!("encoder.layer.{i}.{s}");
                Layer {
                    query: dense(&p("attention.self.query")),
                    key: dense(&p("attention.self.key")),
                    value: dense(&p("attention.self.value")),
                    attention_out: dense(&p("attention.output.dense")),
                    attention_norm: norm(&p("attention.output.LayerNorm")),
                    intermediate: dense(&p("intermediate.dense")),
                    output: dense(&p("output.dense")),
                    output_norm: norm(&p("output.LayerNorm")),
                }
            })
            .collect();
        Ok(Encoder {
            config: config.clone(),
            word: get("embeddings.word_embeddings.weight"),
            position: get("embeddings.position_embeddings.weight"),
            token_type: get("embeddings.token_type_embeddings.weight"),
            embedding_norm: norm("embeddings.LayerNorm"),
            layers,
            vars,
            device: device.clone(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The prefix of the encoder's weights in a task model (`bert.` or `roberta.`).
    pub fn prefix(&self) -> String {
        format!("{}.", self.config.model_type)
    }

    /// The last hidden states (batch, seq, hidden) of a batch. With a dropout stream (training)
    /// the embeddings, attention probabilities and both sublayer outputs drop out at the
    /// configuration's rates.
    pub fn forward(
        &self,
        batch: &EncoderBatch,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = batch.ids.dims2()?;
        let embed = |table: &Tensor, ids: &Tensor| -> Result<Tensor> {
            Ok(table.embedding(&ids.flatten_all()?)?)
        };
        let x = ((embed(&self.word, &batch.ids)? + embed(&self.position, &batch.positions)?)?
            + embed(&self.token_type, &batch.type_ids)?)?
        .reshape((b, t, c.hidden_size))?;
        let x = self.embedding_norm.forward(&x)?;
        let mut x = maybe(&mut dropout, &x, c.hidden_dropout_prob)?;
        for layer in &self.layers {
            x = self.layer(layer, &x, batch, &mut dropout)?;
        }
        Ok(x)
    }

    fn layer(
        &self,
        l: &Layer,
        x: &Tensor,
        batch: &EncoderBatch,
        dropout: &mut Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (heads, d) = (c.num_attention_heads, c.head_dim());
        let split = |dense: &Dense| -> Result<Tensor> {
            Ok(dense
                .forward(x)?
                .reshape((b, t, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(&l.query)?, split(&l.key)?, split(&l.value)?);
        let scores = q.matmul(&k.t()?)?;
        let probs = key_masked_softmax(&scores, 1.0 / (d as f64).sqrt(), batch.keep.clone())?;
        let probs = maybe(dropout, &probs, c.attention_probs_dropout_prob)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, c.hidden_size))?;
        let attended = maybe(
            dropout,
            &l.attention_out.forward(&context)?,
            c.hidden_dropout_prob,
        )?;
        let x = l.attention_norm.forward(&(attended + x)?)?;
        let h = l.intermediate.forward(&x)?;
        let h = match c.hidden_act.as_str() {
            "gelu" => gelu_erf(&h)?,
            "relu" => h.relu()?,
            _ => h.gelu()?,
        };
        let out = maybe(dropout, &l.output.forward(&h)?, c.hidden_dropout_prob)?;
        l.output_norm.forward(&(out + x)?)
    }

    /// The weights with their full names (`bert.` or `roberta.` prefix), in Hugging Face order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let prefix = self.prefix();
        self.vars
            .iter()
            .map(|(n, v)| (format!("{prefix}{n}"), v.as_tensor().clone()))
            .collect()
    }

    /// The parameters with their BERT labels, in model order.
    pub fn params(&self) -> Vec<Param> {
        let prefix = self.prefix();
        self.vars
            .iter()
            .map(|(n, v)| {
                let name = format!("{prefix}{n}");
                let label = crate::labels::bert(&name);
                Param::new(name, v.clone(), label)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
