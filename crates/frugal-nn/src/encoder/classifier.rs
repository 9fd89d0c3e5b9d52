//! A sequence classifier: an encoder, pooling, dropout and a linear head.

use super::{Dense, Encoder, EncoderBatch};
use crate::dropout::{maybe, Dropout};
use crate::error::{Error, Result};
use crate::layered::{backward_from, only, take, top_backward};
use crate::ops::cross_entropy;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var, D};
use frugal::Param;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How the hidden states of a sequence become one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The first token's hidden state (`[CLS]` / `<s>`).
    Cls,
    /// The mean over the real (unpadded) tokens.
    #[default]
    Mean,
}

impl std::str::FromStr for Pooling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            _ => Err(Error::Config(format!(
                "pooling `{s}` is not known; use cls or mean"
            ))),
        }
    }
}

/// Names of the head's weight and bias.
const HEAD: [&str; 2] = ["classifier.weight", "classifier.bias"];

/// An encoder with a classification head: pooled output → dropout → linear.
pub struct Classifier {
    pub encoder: Encoder,
    pub pooling: Pooling,
    /// Dropout before the head.
    pub dropout: f64,
    head: Dense,
    head_vars: [Var; 2],
}

impl Classifier {
    /// A new head of `labels` classes on `encoder`: N(0, 0.02²) weights from `seed`, zero bias.
    pub fn new(
        encoder: Encoder,
        labels: usize,
        pooling: Pooling,
        dropout: f64,
        seed: u64,
    ) -> Result<Self> {
        if labels < 2 {
            return Err(Error::Config(format!(
                "a classifier needs at least 2 classes, got {labels}"
            )));
        }
        let h = encoder.config.hidden_size;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let device = encoder.device().clone();
        let w = Tensor::from_vec(
            crate::init::normal(&mut rng, labels * h, 0.02),
            (labels, h),
            &device,
        )?;
        let b = Tensor::zeros(labels, candle_core::DType::F32, &device)?;
        Self::with_head(encoder, w, b, pooling, dropout)
    }

    /// The classifier with the head in `tensors` (`classifier.weight`, `classifier.bias`), as
    /// [`Encoder::from_checkpoint`] leaves them.
    pub fn from_head(
        encoder: Encoder,
        mut tensors: HashMap<String, Tensor>,
        pooling: Pooling,
        dropout: f64,
    ) -> Result<Self> {
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| Error::Weights(format!("the weights have no tensor `{name}`")))
        };
        let (w, b) = (take(HEAD[0])?, take(HEAD[1])?);
        let h = encoder.config.hidden_size;
        if w.rank() != 2 || w.dim(1)? != h || b.dims() != [w.dim(0)?] {
            return Err(Error::Weights(format!(
                "the head has weight {:?} and bias {:?}; hidden size {h} needs (labels, {h}) and (labels)",
                w.dims(),
                b.dims()
            )));
        }
        let device = encoder.device().clone();
        Self::with_head(
            encoder,
            w.to_device(&device)?,
            b.to_device(&device)?,
            pooling,
            dropout,
        )
    }

    fn with_head(
        encoder: Encoder,
        w: Tensor,
        b: Tensor,
        pooling: Pooling,
        dropout: f64,
    ) -> Result<Self> {
        let head_vars = [Var::from_tensor(&w)?, Var::from_tensor(&b)?];
        Ok(Self {
            encoder,
            pooling,
            dropout,
            head: Dense {
                name: "classifier".into(),
                w: head_vars[0].as_tensor().clone(),
                b: head_vars[1].as_tensor().clone(),
                lora: None,
            },
            head_vars,
        })
    }

    /// Number of classes.
    pub fn labels(&self) -> usize {
        self.head.w.dims()[0]
    }

    /// Class scores (batch, labels). Dropout runs when the batch has a dropout seed.
    pub fn logits(&self, batch: &EncoderBatch) -> Result<Tensor> {
        let mut stream = batch.dropout_seed.map(Dropout::new);
        let mut dropout = stream.as_mut();
        let hidden = self.encoder.forward(batch, dropout.as_deref_mut())?;
        self.head_logits(&hidden, batch, &mut dropout)
    }

    /// Class scores for evaluation: no dropout, and no backward graph kept, so that each
    /// layer's intermediates are freed when the next layer starts (a training forward keeps
    /// every layer's until its loss is dropped). The values are [`Classifier::logits`]'.
    pub fn eval_logits(&self, batch: &EncoderBatch) -> Result<Tensor> {
        let encoder = &self.encoder;
        let mut x = encoder.embed(batch, &mut None)?.detach();
        for l in &encoder.layers {
            x = encoder.layer(l, &x, batch, &mut None)?.detach();
        }
        Ok(self.head_logits(&x, batch, &mut None)?.detach())
    }

    /// Class scores from the last hidden states: pooling, dropout, the head.
    fn head_logits(
        &self,
        hidden: &Tensor,
        batch: &EncoderBatch,
        dropout: &mut Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let mask = batch.mask.unsqueeze(D::Minus1)?;
                let counts = batch.mask.sum_keepdim(1)?;
                hidden
                    .broadcast_mul(&mask)?
                    .sum(1)?
                    .broadcast_div(&counts)?
            }
        };
        let pooled = maybe(dropout, &pooled, self.dropout)?;
        self.head.forward(&pooled, &mut None)
    }

    /// Mean cross-entropy of the batch against `labels` (batch, u32).
    pub fn loss(&self, batch: &EncoderBatch, labels: &Tensor) -> Result<Tensor> {
        Ok(cross_entropy(&self.logits(batch)?, labels)?)
    }

    /// The loss of a batch, with its gradients handed to `sink` one part at a time as a
    /// layer-by-layer backward pass makes them: the forward keeps only each layer's input (and
    /// where its dropout masks start), and the backward recomputes each layer from it, drawing
    /// the same masks. The head's gradients come first, then each layer's from the top, the
    /// embeddings' last; a part without trained tensors (frozen under LoRA) is not sent, and
    /// frozen embeddings are not recomputed. `scale` multiplies the loss before the backward
    /// pass. The gradients equal those of `loss(..).backward()`, bit for bit. Returns the
    /// unscaled loss; a non-finite loss is an error before any gradient reaches `sink`.
    pub fn backward_by_layers<E: From<Error> + From<candle_core::Error>>(
        &self,
        batch: &EncoderBatch,
        labels: &Tensor,
        scale: f64,
        mut sink: impl FnMut(GradStore) -> std::result::Result<(), E>,
    ) -> std::result::Result<f32, E> {
        let encoder = &self.encoder;
        let mut stream = batch.dropout_seed.map(Dropout::new);
        let embedding_stream = stream.clone();
        let mut x = encoder.embed(batch, &mut stream.as_mut())?.detach();
        let mut inputs = Vec::with_capacity(encoder.layers.len());
        for l in &encoder.layers {
            let at = stream.clone();
            let next = encoder.layer(l, &x, batch, &mut stream.as_mut())?.detach();
            inputs.push((x, at));
            x = next;
        }
        let top = Var::from_tensor(&x)?;
        drop(x);
        let logits = self.head_logits(top.as_tensor(), batch, &mut stream.as_mut())?;
        let loss = cross_entropy(&logits, labels)?;
        drop(logits);
        let (value, mut dy, grads) = top_backward(loss, top.as_tensor(), scale)?;
        let head: Vec<&Tensor> = self.head_vars.iter().map(|v| v.as_tensor()).collect();
        sink(only(grads, &head))?;
        let embeddings = encoder.embedding_trainables();
        for (k, (l, (x, mut at))) in encoder.layers.iter().zip(inputs).enumerate().rev() {
            // The bottom layer's input needs no gradient when the embeddings are frozen.
            let below = k > 0 || !embeddings.is_empty();
            let input = match below {
                true => Var::from_tensor(&x)?.as_tensor().clone(),
                false => x,
            };
            let y = encoder.layer(l, &input, batch, &mut at.as_mut())?;
            let mut grads = backward_from(&y, &dy)?;
            let trained = l.trainables();
            if below {
                dy = take(&mut grads, &input)?;
            }
            if !trained.is_empty() {
                sink(only(grads, &trained))?;
            }
        }
        if !embeddings.is_empty() {
            let mut at = embedding_stream;
            let grads = backward_from(&encoder.embed(batch, &mut at.as_mut())?, &dy)?;
            sink(only(grads, &embeddings))?;
        }
        Ok(value)
    }

    /// The most likely class of each input (no dropout).
    pub fn predict(&self, batch: &EncoderBatch) -> Result<Vec<u32>> {
        Ok(self
            .eval_logits(batch)?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?)
    }

    /// Every weight with its Hugging Face name: the encoder's (`bert.…` / `roberta.…`), then
    /// `classifier.weight` and `classifier.bias`.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = self.encoder.named_tensors();
        out.extend(
            HEAD.iter()
                .zip(&self.head_vars)
                .map(|(n, v)| (n.to_string(), v.as_tensor().clone())),
        );
        out
    }

    /// Every weight with the LoRA adapters merged in: a plain classifier's weights.
    pub fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.encoder.merged_tensors()?;
        out.extend(
            self.named_tensors()
                .into_iter()
                .filter(|(n, _)| HEAD.contains(&n.as_str())),
        );
        Ok(out)
    }

    /// The parameters in model order with their BERT labels: the encoder's, then the head's
    /// (state-full).
    pub fn params(&self) -> Vec<Param> {
        let mut out = self.encoder.params();
        for (name, var) in HEAD.iter().zip(&self.head_vars) {
            out.push(Param::new(*name, var.clone(), crate::labels::bert(name)));
        }
        out
    }
}
