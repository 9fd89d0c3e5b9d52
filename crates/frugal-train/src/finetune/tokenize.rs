//! Tokenizing classification inputs with the pretrained model's own `tokenizer.json`: special
//! tokens added by its post-processor, sentence pairs, and truncation to the model's positions.

use super::task::Example;
use anyhow::{bail, Result};
use frugal_nn::encoder::EncoderConfig;
use std::path::Path;
use tokenizers::{
    EncodeInput, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// Token ids and token types of inputs, with their class ids.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pub inputs: Vec<(Vec<u32>, Vec<u32>)>,
    pub labels: Vec<u32>,
    /// Inputs longer than the limit, cut to it.
    pub truncated: usize,
}

/// The model's tokenizer, checked against the model.
pub struct ClassTokenizer {
    plain: Tokenizer,
    truncating: Tokenizer,
    max_len: usize,
    zero_types: bool,
}

impl ClassTokenizer {
    /// Loads `path` for a model of `config`; inputs are cut to `max_len` tokens (at most the
    /// model's positions). Fails when the tokenizer adds no special tokens (the model was trained
    /// with them) or produces ids beyond the model's vocabulary.
    pub fn load(path: &Path, config: &EncoderConfig, max_len: usize) -> Result<Self> {
        if !path.exists() {
            bail!(
                "{} does not exist: the model folder needs its tokenizer.json",
                path.display()
            );
        }
        let mut plain = Tokenizer::from_file(path).map_err(|e| {
            anyhow::anyhow!("{} is not a valid tokenizer.json: {e}", path.display())
        })?;
        plain.with_truncation(None).map_err(anyhow::Error::msg)?;
        plain.with_padding(None);
        let with = plain.encode("hello", true).map_err(anyhow::Error::msg)?;
        let without = plain.encode("hello", false).map_err(anyhow::Error::msg)?;
        if with.len() <= without.len() {
            bail!(
                "{} adds no special tokens ([CLS] … [SEP] or <s> … </s>), which the model was trained with; use the model's own tokenizer.json",
                path.display()
            );
        }
        if plain.get_vocab_size(true) > config.vocab_size {
            bail!(
                "{} has {} tokens but the model's vocabulary has {}: the tokenizer does not belong to the model",
                path.display(),
                plain.get_vocab_size(true),
                config.vocab_size
            );
        }
        let max_len = max_len.min(config.max_tokens());
        if max_len < with.len() {
            bail!("--max-len {max_len} leaves no room for text between the special tokens");
        }
        let mut truncating = plain.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            plain,
            truncating,
            max_len,
            zero_types: config.type_vocab_size == 1,
        })
    }

    /// The longest input, in tokens.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenizes labelled examples (in parallel), cutting long ones.
    pub fn encode(&self, examples: &[(Example, u32)]) -> Result<Encoded> {
        fn input(e: &Example) -> EncodeInput<'_> {
            match &e.pair {
                Some(p) => (e.text.as_str(), p.as_str()).into(),
                None => e.text.as_str().into(),
            }
        }
        let all: Vec<EncodeInput> = examples.iter().map(|(e, _)| input(e)).collect();
        let mut encodings = self
            .plain
            .encode_batch(all, true)
            .map_err(anyhow::Error::msg)?;
        let long: Vec<usize> = (0..encodings.len())
            .filter(|&i| encodings[i].len() > self.max_len)
            .collect();
        let cut = self
            .truncating
            .encode_batch(long.iter().map(|&i| input(&examples[i].0)).collect(), true)
            .map_err(anyhow::Error::msg)?;
        for (&i, e) in long.iter().zip(cut) {
            encodings[i] = e;
        }
        let inputs = encodings
            .iter()
            .map(|e| {
                let types = if self.zero_types {
                    vec![0; e.len()]
                } else {
                    e.get_type_ids().to_vec()
                };
                (e.get_ids().to_vec(), types)
            })
            .collect();
        Ok(Encoded {
            inputs,
            labels: examples.iter().map(|(_, c)| *c).collect(),
            truncated: long.len(),
        })
    }
}
