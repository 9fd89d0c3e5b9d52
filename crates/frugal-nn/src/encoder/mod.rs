//! BERT and RoBERTa encoders in candle, built from differentiable operations: word, position and
//! token-type embeddings, LayerNorm, N × (attention over the unpadded keys, add & LayerNorm,
//! GELU feed-forward, add & LayerNorm), with Hugging Face names, and a classification head on
//! top ([`Classifier`]).

mod batch;
mod classifier;
mod config;
mod memory;

pub use crate::lora::{LoraConfig, LoraTargets};
pub use batch::EncoderBatch;
pub use classifier::{Classifier, Pooling};
pub use config::EncoderConfig;

use crate::lora::Adapter;

use crate::dropout::{maybe, Dropout};
use crate::error::{Error, Result};
use crate::ops::{
    add_bias, frozen_linear, gelu_erf, layer_norm, linear, padded_attention, whole_padded_attention,
};
use crate::Attention;
use candle_core::{DType, Device, Tensor, Var};
use frugal::Param;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// A linear layer y = x·Wᵀ + b, with a LoRA adapter or not.
struct Dense {
    /// The name without `.weight` (`encoder.layer.0.attention.self.query`).
    name: String,
    w: Tensor,
    b: Tensor,
    lora: Option<Adapter>,
}

impl Dense {
    fn forward(&self, x: &Tensor, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
        let xw = if self.w.is_variable() {
            linear(x, &self.w)?
        } else {
            frozen_linear(x, &self.w)?
        };
        let y = add_bias(&xw, &self.b)?;
        match &self.lora {
            Some(adapter) => Ok((y + adapter.forward(x, dropout)?)?),
            None => Ok(y),
        }
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

impl Layer {
    /// The linears, in model order.
    fn dense(&self) -> [&Dense; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_out,
            &self.intermediate,
            &self.output,
        ]
    }

    /// The layer's trained tensors: its weights, or under LoRA its adapters.
    fn trainables(&self) -> Vec<&Tensor> {
        let norms = [&self.attention_norm, &self.output_norm];
        self.dense()
            .into_iter()
            .flat_map(|d| {
                let adapter = d
                    .lora
                    .iter()
                    .flat_map(|a| [a.a.as_tensor(), a.b.as_tensor()]);
                [&d.w, &d.b].into_iter().chain(adapter)
            })
            .chain(norms.iter().flat_map(|n| [&n.w, &n.b]))
            .filter(|t| t.is_variable())
            .collect()
    }
}

/// A BERT or RoBERTa encoder: trainable weights, or frozen weights with trainable LoRA adapters.
pub struct Encoder {
    pub config: EncoderConfig,
    /// The weights by name (without the model-type prefix), in Hugging Face order.
    weights: Vec<(String, Tensor)>,
    /// The trainable weights (all of them, or none under LoRA).
    vars: Vec<(String, Var)>,
    /// The adapters' settings, when the encoder has them.
    lora: Option<LoraConfig>,
    device: Device,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    /// How attention runs on the CPU (see [`Encoder::set_attention`]).
    attention: Attention,
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
        Self::from_tensors(config, tensors, device, None)
    }

    /// Loads a Hugging Face BERT or RoBERTa folder (`config.json` and safetensors weights,
    /// sharded or not) onto `device`. A pooler or task head in the weights is ignored.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config: EncoderConfig = crate::hf::read_config(dir)?;
        config.validate()?;
        let tensors = crate::hf::read_weights(dir)?;
        Self::from_checkpoint(&config, tensors, device, None)
            .map(|(e, _)| e)
            .map_err(|e| match e {
                Error::Weights(m) => Error::Weights(format!("{}: {m}", dir.display())),
                e => e,
            })
    }

    /// The encoder from a checkpoint's tensors (any prefix and LayerNorm naming), and the
    /// tensors that are not the encoder's. With `lora`, the weights are frozen and the
    /// checkpoint's adapters (`….lora_A.weight`, `….lora_B.weight`) are trained.
    pub fn from_checkpoint(
        config: &EncoderConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
        lora: Option<&LoraConfig>,
    ) -> Result<(Self, HashMap<String, Tensor>)> {
        let (encoder, other) = canonical_names(tensors);
        Ok((Self::from_tensors(config, encoder, device, lora)?, other))
    }

    /// The encoder with its weights frozen and new LoRA adapters (B = 0: the output is
    /// unchanged until they train), drawn from `seed`.
    pub fn with_lora(self, lora: &LoraConfig, seed: u64) -> Result<Self> {
        lora.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors: HashMap<String, Tensor> = self.weights.into_iter().collect();
        for (name, shape) in self.config.parameter_shapes() {
            if let Some(module) = lora.module(&name) {
                let adapter = Adapter::new(lora, shape[1], shape[0], &mut rng, &self.device)?;
                tensors.insert(
                    format!("{module}.lora_A.weight"),
                    adapter.a.as_tensor().clone(),
                );
                tensors.insert(
                    format!("{module}.lora_B.weight"),
                    adapter.b.as_tensor().clone(),
                );
            }
        }
        Self::from_tensors(&self.config, tensors, &self.device, Some(lora))
    }

    fn from_tensors(
        config: &EncoderConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
        lora: Option<&LoraConfig>,
    ) -> Result<Self> {
        let (mut weights, mut vars) = (Vec::new(), Vec::new());
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
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            // Frozen weights are plain tensors: the backward pass computes no gradient for them.
            let t = if lora.is_some() {
                t.detach()
            } else {
                let var = Var::from_tensor(&t)?;
                vars.push((name.clone(), var.clone()));
                var.as_tensor().clone()
            };
            by_name.insert(name.clone(), t.clone());
            weights.push((name, t));
        }
        let mut adapters = HashMap::new();
        if let Some(lora) = lora {
            for (name, _) in config.parameter_shapes() {
                if let Some(module) = lora.module(&name) {
                    let mut take = |part: &str| {
                        let key = format!("{module}.{part}.weight");
                        tensors.remove(&key).ok_or_else(|| {
                            Error::Weights(format!("the weights have no LoRA tensor `{key}`"))
                        })
                    };
                    let (a, b) = (take("lora_A")?, take("lora_B")?);
                    let (a, b) = (a.to_device(device)?, b.to_device(device)?);
                    adapters.insert(module.to_string(), Adapter::from_tensors(lora, a, b)?);
                }
            }
        }
        let get = |n: &str| by_name[n].clone();
        let eps = config.layer_norm_eps;
        let mut dense = |p: &str| Dense {
            name: p.to_string(),
            w: get(&format!("{p}.weight")),
            b: get(&format!("{p}.bias")),
            lora: adapters.remove(p),
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
            weights,
            vars,
            lora: lora.copied(),
            device: device.clone(),
            attention: Attention::default(),
        })
    }

    /// Runs attention as `attention` asks: [`Attention::Fused`] (the default) keeps no t × t
    /// tensor of f32 on the CPU, only the dropout mask's bits. Off the CPU both run the same
    /// tensor operations.
    pub fn set_attention(&mut self, attention: Attention) {
        self.attention = attention;
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
        let mut x = self.embed(batch, &mut dropout)?;
        for layer in &self.layers {
            x = self.layer(layer, &x, batch, &mut dropout)?;
        }
        Ok(x)
    }

    /// The embeddings of a batch, normalised, with dropout: the first layer's input.
    fn embed(&self, batch: &EncoderBatch, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = batch.ids.dims2()?;
        let embed = |table: &Tensor, ids: &Tensor| -> Result<Tensor> {
            Ok(table.embedding(&ids.flatten_all()?)?)
        };
        let x = ((embed(&self.word, &batch.ids)? + embed(&self.position, &batch.positions)?)?
            + embed(&self.token_type, &batch.type_ids)?)?
        .reshape((b, t, c.hidden_size))?;
        let x = self.embedding_norm.forward(&x)?;
        Ok(maybe(dropout, &x, c.hidden_dropout_prob)?)
    }

    /// The trained tensors of the embeddings (none under LoRA).
    fn embedding_trainables(&self) -> Vec<&Tensor> {
        let n = &self.embedding_norm;
        [&self.word, &self.position, &self.token_type, &n.w, &n.b]
            .into_iter()
            .filter(|t| t.is_variable())
            .collect()
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
        let mut split = |dense: &Dense| -> Result<Tensor> {
            Ok(dense
                .forward(x, dropout)?
                .reshape((b, t, heads, d))?
                .transpose(1, 2)?)
        };
        let (q, k, v) = (split(&l.query)?, split(&l.key)?, split(&l.value)?);
        let attention = match self.attention {
            Attention::Fused => padded_attention,
            Attention::Whole => whole_padded_attention,
        };
        let context = attention(
            (&q, &k, &v),
            1.0 / (d as f64).sqrt(),
            batch.keep.clone(),
            dropout,
            c.attention_probs_dropout_prob,
        )?;
        let attended = l.attention_out.forward(&context, dropout)?;
        let attended = maybe(dropout, &attended, c.hidden_dropout_prob)?;
        let x = l.attention_norm.forward(&(attended + x)?)?;
        let h = l.intermediate.forward(&x, dropout)?;
        let h = match c.hidden_act.as_str() {
            "gelu" => gelu_erf(&h)?,
            "relu" => h.relu()?,
            _ => h.gelu()?,
        };
        let out = l.output.forward(&h, dropout)?;
        let out = maybe(dropout, &out, c.hidden_dropout_prob)?;
        l.output_norm.forward(&(out + x)?)
    }

    fn dense_layers(&self) -> impl Iterator<Item = &Dense> {
        self.layers.iter().flat_map(|l| l.dense())
    }

    /// The LoRA settings, when the encoder has adapters.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The adapters (A, B) by full name, in model order.
    fn adapters(&self) -> Vec<(String, &Var)> {
        let prefix = self.prefix();
        self.dense_layers()
            .filter_map(|d| d.lora.as_ref().map(|a| (d, a)))
            .flat_map(|(d, a)| {
                [
                    (format!("{prefix}{}.lora_A.weight", d.name), &a.a),
                    (format!("{prefix}{}.lora_B.weight", d.name), &a.b),
                ]
            })
            .collect()
    }

    /// The weights with their full names (`bert.` or `roberta.` prefix), in Hugging Face order,
    /// then the adapters.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let prefix = self.prefix();
        let mut out: Vec<(String, Tensor)> = self
            .weights
            .iter()
            .map(|(n, t)| (format!("{prefix}{n}"), t.clone()))
            .collect();
        out.extend(
            self.adapters()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone())),
        );
        out
    }

    /// The weights with the adapters merged into them (W + (α/r)·B·A): a plain encoder's.
    pub fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let deltas: HashMap<String, Tensor> = self
            .dense_layers()
            .filter_map(|d| {
                d.lora
                    .as_ref()
                    .map(|a| Ok((format!("{}.weight", d.name), a.delta()?)))
            })
            .collect::<Result<_>>()?;
        let prefix = self.prefix();
        self.weights
            .iter()
            .map(|(n, t)| {
                let t = match deltas.get(n) {
                    Some(d) => (t + d)?,
                    None => t.clone(),
                };
                Ok((format!("{prefix}{n}"), t))
            })
            .collect()
    }

    /// The parameters the optimizer trains, with their BERT labels, in model order: every
    /// weight, or under LoRA the adapters alone.
    pub fn params(&self) -> Vec<Param> {
        if self.lora.is_some() {
            return self
                .adapters()
                .into_iter()
                .map(|(name, v)| {
                    let label = crate::labels::bert(&name).with_weight_decay(false);
                    Param::new(name, v.clone(), label)
                })
                .collect();
        }
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
