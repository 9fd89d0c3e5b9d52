//! A padded batch of encoder inputs.

use super::EncoderConfig;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// Token ids, token types and positions (batch, seq) padded to the longest input, which keys
/// are real tokens, and the seed of the batch's dropout masks (training only).
#[derive(Clone)]
pub struct EncoderBatch {
    pub ids: Tensor,
    pub type_ids: Tensor,
    pub positions: Tensor,
    /// 1 for real tokens, 0 for padding, (batch, seq) f32.
    pub mask: Tensor,
    /// `mask` as booleans, batch-major.
    pub keep: Arc<[bool]>,
    /// The seed of the dropout masks; `None` runs without dropout.
    pub dropout_seed: Option<u64>,
}

impl EncoderBatch {
    /// Pads `inputs` (token ids, token type ids) to the longest with the configuration's padding
    /// id. Positions count from [`EncoderConfig::first_position`] over the real tokens.
    pub fn new(
        config: &EncoderConfig,
        inputs: &[(Vec<u32>, Vec<u32>)],
        device: &Device,
    ) -> Result<Self> {
        let len = inputs.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        if inputs.is_empty() || len == 0 {
            return Err(Error::Input(
                "an encoder batch needs at least one non-empty input".into(),
            ));
        }
        if len > config.max_tokens() {
            return Err(Error::Input(format!(
                "an input of {len} tokens exceeds the model's {} positions; truncate it",
                config.max_tokens()
            )));
        }
        let n = inputs.len() * len;
        let (mut ids, mut types, mut positions, mut keep) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let first = config.first_position() as u32;
        for (row, (tokens, token_types)) in inputs.iter().enumerate() {
            if tokens.len() != token_types.len() {
                return Err(Error::Input(format!(
                    "input {row} has {} tokens but {} token types",
                    tokens.len(),
                    token_types.len()
                )));
            }
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
                return Err(Error::Input(format!(
                    "token id {bad} is outside the model's vocabulary of {}: the tokenizer does not belong to the model",
                    config.vocab_size
                )));
            }
            if let Some(&bad) = token_types
                .iter()
                .find(|&&t| t as usize >= config.type_vocab_size)
            {
                return Err(Error::Input(format!(
                    "token type {bad} is outside the model's {} token types (a sentence pair needs type_vocab_size 2)",
                    config.type_vocab_size
                )));
            }
            let pad = len - tokens.len();
            ids.extend(
                tokens
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(config.pad_token_id, pad)),
            );
            types.extend(
                token_types
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            positions.extend((0..tokens.len() as u32).map(|p| first + p));
            // Padding takes the padding position (RoBERTa) or continues counting (BERT), as
            // `transformers` does; padded keys are masked either way.
            positions.extend((tokens.len() as u32..len as u32).map(|p| {
                if first > 0 {
                    first - 1
                } else {
                    p
                }
            }));
            keep.extend((0..len).map(|i| i < tokens.len()));
        }
        let shape = (inputs.len(), len);
        let mask: Vec<f32> = keep.iter().map(|&k| k as u8 as f32).collect();
        Ok(Self {
            ids: Tensor::from_vec(ids, shape, device)?,
            type_ids: Tensor::from_vec(types, shape, device)?,
            positions: Tensor::from_vec(positions, shape, device)?,
            mask: Tensor::from_vec(mask, shape, device)?,
            keep: keep.into(),
            dropout_seed: None,
        })
    }

    /// The batch with dropout masks drawn from `seed`.
    pub fn with_dropout(mut self, seed: u64) -> Self {
        self.dropout_seed = Some(seed);
        self
    }

    /// Number of inputs.
    pub fn len(&self) -> usize {
        self.keep.len() / self.ids.dims()[1]
    }

    /// True for a batch without inputs (never built by [`EncoderBatch::new`]).
    pub fn is_empty(&self) -> bool {
        self.keep.is_empty()
    }

    /// Real (unpadded) tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.keep.iter().filter(|&&k| k).count()
    }
}
