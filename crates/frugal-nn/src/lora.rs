//! LoRA adapters on a model's frozen linears: y = x·Wᵀ + b + (α/r)·(dropout(x)·Aᵀ)·Bᵀ, with
//! A (r × in) uniform in ±1/√in and B (out × r) zero, so training starts from the model as it
//! was. Merging adds (α/r)·B·A into W. The encoders' linears (`encoder.layer.N.…`) and the
//! LLaMA's (`model.layers.N.…`) are named as Hugging Face names them.

use crate::dropout::{maybe, Dropout};
use crate::error::{Error, Result};
use crate::ops::linear;
use candle_core::{Device, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Which linears get adapters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTargets {
    /// Attention query and value (the LoRA paper's choice).
    #[default]
    Qv,
    /// Every linear of every layer (attention and MLP).
    All,
}

/// LoRA settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input.
    pub dropout: f64,
    pub targets: LoraTargets,
}

impl LoraConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Config("LoRA rank must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) || !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::Config(format!(
                "LoRA needs alpha > 0 and dropout in [0, 1), got alpha {} and dropout {}",
                self.alpha, self.dropout
            )));
        }
        Ok(())
    }

    /// Sets `key` (rank, alpha, dropout or targets) to `value`; false for another key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        let number = || {
            value
                .parse::<f64>()
                .map_err(|_| Error::Config(format!("LoRA {key} `{value}` is not a number")))
        };
        match key {
            "rank" => {
                self.rank = value.parse().map_err(|_| {
                    Error::Config(format!("LoRA rank `{value}` is not a whole number"))
                })?
            }
            "alpha" => self.alpha = number()?,
            "dropout" => self.dropout = number()?,
            "targets" => {
                self.targets = match value {
                    "qv" => LoraTargets::Qv,
                    "all" => LoraTargets::All,
                    _ => {
                        return Err(Error::Config(format!(
                            "LoRA targets `{value}` is not qv or all"
                        )))
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// True if the linear `module` of a layer (`attention.self.query`, `intermediate.dense`,
    /// `self_attn.q_proj`, `mlp.down_proj`, …) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        match self.targets {
            LoraTargets::Qv => matches!(
                module,
                "attention.self.query"
                    | "attention.self.value"
                    | "self_attn.q_proj"
                    | "self_attn.v_proj"
            ),
            LoraTargets::All => true,
        }
    }

    /// The module of a weight these settings adapt (`encoder.layer.0.attention.self.query` for
    /// `encoder.layer.0.attention.self.query.weight`, `model.layers.0.mlp.up_proj` for
    /// `model.layers.0.mlp.up_proj.weight`); norms are not adapted.
    pub fn module<'a>(&self, weight: &'a str) -> Option<&'a str> {
        let module = weight.strip_suffix(".weight")?;
        let layer = ["encoder.layer.", "model.layers."]
            .iter()
            .find_map(|prefix| module.strip_prefix(prefix))?;
        let (_, rest) = layer.split_once('.')?;
        let norm = rest.to_ascii_lowercase().contains("norm");
        (!norm && self.targets(rest)).then_some(module)
    }

    /// The adapters of a model whose weights have `shapes` (names without prefix, in model
    /// order): (name, shape), A then B of each adapted linear.
    pub fn adapter_shapes(&self, shapes: Vec<(String, Vec<usize>)>) -> Vec<(String, Vec<usize>)> {
        shapes
            .into_iter()
            .filter_map(|(name, shape)| {
                let module = self.module(&name)?.to_string();
                Some([
                    (format!("{module}.lora_A.weight"), vec![self.rank, shape[1]]),
                    (format!("{module}.lora_B.weight"), vec![shape[0], self.rank]),
                ])
            })
            .flatten()
            .collect()
    }
}

/// The trainable low-rank update of one linear.
pub(crate) struct Adapter {
    pub a: Var,
    pub b: Var,
    scale: f64,
    dropout: f64,
}

impl Adapter {
    /// A new adapter for a linear of `inputs` → `outputs` features.
    pub fn new(
        c: &LoraConfig,
        inputs: usize,
        outputs: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (inputs as f32).sqrt();
        let a: Vec<f32> = (0..c.rank * inputs)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(a, (c.rank, inputs), device)?;
        let b = Tensor::zeros((outputs, c.rank), candle_core::DType::F32, device)?;
        Self::from_tensors(c, a, b)
    }

    /// An adapter with the given A (r × in) and B (out × r).
    pub fn from_tensors(c: &LoraConfig, a: Tensor, b: Tensor) -> Result<Self> {
        if a.dim(0)? != c.rank || b.dim(1)? != c.rank {
            return Err(Error::Weights(format!(
                "LoRA tensors of shapes {:?} and {:?} do not have rank {}",
                a.dims(),
                b.dims(),
                c.rank
            )));
        }
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: c.alpha / c.rank as f64,
            dropout: c.dropout,
        })
    }

    /// (α/r)·(dropout(x)·Aᵀ)·Bᵀ.
    pub fn forward(&self, x: &Tensor, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
        let x = maybe(dropout, x, self.dropout)?;
        Ok((linear(&linear(&x, self.a.as_tensor())?, self.b.as_tensor())? * self.scale)?)
    }

    /// α/r, the adapter's scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// (α/r)·B·A, the update of W.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}
