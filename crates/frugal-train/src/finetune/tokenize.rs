//! Tokenizing classification inputs with the pretrained model's own `tokenizer.json`: special
//! tokens added by its post-processor, sentence pairs, and truncation to the model's positions.

use super::task::Example;
use anyhow::{bail, Result};
use frugal_nn::encoder::EncoderConfig;
use std::path::Path;
use tokenizers::{
    EncodeInput, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// Examples tokenized at a time by [`ClassTokenizer::encode`].
const ENCODE_CHUNK: usize = 256;

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

    /// Tokenizes labelled examples (in parallel), cutting long ones. The examples go through
    /// the tokenizer 256 at a time and only their ids are kept, so that the tokenizer's full
    /// encodings of long texts (tokens, offsets, masks) never exist for all of them at once.
    pub fn encode(&self, examples: &[(Example, u32)]) -> Result<Encoded> {
        let mut inputs = Vec::with_capacity(examples.len());
        let mut truncated = 0;
        for chunk in examples.chunks(ENCODE_CHUNK) {
            truncated += self.encode_into(chunk, &mut inputs)?;
        }
        Ok(Encoded {
            inputs,
            labels: examples.iter().map(|(_, c)| *c).collect(),
            truncated,
        })
    }

    /// Appends the token ids and types of `examples` to `inputs`; returns how many were cut.
    fn encode_into(
        &self,
        examples: &[(Example, u32)],
        inputs: &mut Vec<(Vec<u32>, Vec<u32>)>,
    ) -> Result<usize> {
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
        inputs.extend(encodings.iter().map(|e| {
            let types = if self.zero_types {
                vec![0; e.len()]
            } else {
                e.get_type_ids().to_vec()
            };
            (e.get_ids().to_vec(), types)
        }));
        Ok(long.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// all-MiniLM-L6-v2's tokenizer (`scripts/fetch-finetune.sh`), when it has been installed;
    /// CI installs it.
    #[test]
    fn inputs_encode_alike_in_chunks_and_one_at_a_time() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/finetune/all-MiniLM-L6-v2");
        if !dir.join("tokenizer.json").exists() {
            eprintln!(
                "skipped: no tokenizer at {} (scripts/fetch-finetune.sh installs it)",
                dir.display()
            );
            return;
        }
        let config: EncoderConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let tokenizer = ClassTokenizer::load(&dir.join("tokenizer.json"), &config, 12).unwrap();
        // Lengths on both sides of the limit, pairs among them, over three chunks.
        let examples: Vec<(Example, u32)> = (0..2 * ENCODE_CHUNK + 7)
            .map(|i| {
                let example = Example {
                    text: "word ".repeat(i % 20 + 1),
                    pair: (i % 3 == 0).then(|| "a second text".to_string()),
                    label: String::new(),
                };
                (example, (i % 4) as u32)
            })
            .collect();
        let all = tokenizer.encode(&examples).unwrap();
        let single: Vec<Encoded> = examples
            .iter()
            .map(|e| tokenizer.encode(std::slice::from_ref(e)).unwrap())
            .collect();
        let inputs: Vec<_> = single.iter().flat_map(|e| e.inputs.clone()).collect();
        assert_eq!(all.inputs, inputs);
        assert_eq!(all.labels, examples.iter().map(|e| e.1).collect::<Vec<_>>());
        assert_eq!(
            all.truncated,
            single.iter().map(|e| e.truncated).sum::<usize>()
        );
        assert!(all.truncated > 0 && all.truncated < examples.len());
        assert!(all
            .inputs
            .iter()
            .all(|(ids, types)| ids.len() <= 12 && types.len() == ids.len()));
    }
}
