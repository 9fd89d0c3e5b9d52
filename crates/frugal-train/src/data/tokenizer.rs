//! Tokenizers: a Hugging Face `tokenizer.json`, or a byte-level BPE trained on the training text.

use anyhow::{bail, Context, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Bytes of text tokenized at a time by [`TextTokenizer::encode_packed`] (at least one
/// document).
const ENCODE_BYTES: usize = 1 << 20;

/// The end-of-text token added to trained tokenizers and separating packed documents.
pub const EOS: &str = "<|endoftext|>";
const EOS_CANDIDATES: &[&str] = &[
    EOS,
    "</s>",
    "<|end_of_text|>",
    "<eos>",
    "<|eot_id|>",
    "[SEP]",
];

/// A tokenizer and its document separator.
pub struct TextTokenizer {
    pub inner: Tokenizer,
    pub eos: u32,
}

impl TextTokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("tokenizer file {} does not exist", path.display());
        }
        let inner = Tokenizer::from_file(path).map_err(|e| {
            anyhow::anyhow!("{} is not a valid tokenizer.json: {e}", path.display())
        })?;
        Self::with_eos(inner).with_context(|| format!("tokenizer {}", path.display()))
    }

    fn with_eos(inner: Tokenizer) -> Result<Self> {
        let eos = EOS_CANDIDATES
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .with_context(|| {
                format!(
                    "it has none of the end-of-text tokens {}",
                    EOS_CANDIDATES.join(", ")
                )
            })?;
        Ok(TextTokenizer { inner, eos })
    }

    /// Trains a byte-level BPE with `vocab_size` entries (including the end-of-text token) on
    /// `docs`.
    pub fn train<S: AsRef<str> + Send>(
        docs: impl Iterator<Item = S> + Send,
        vocab_size: usize,
    ) -> Result<Self> {
        if vocab_size < 257 + 1 {
            bail!("--vocab-size {vocab_size} is too small for a byte-level BPE (at least 258)");
        }
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOS, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner
            .train(&mut trainer, docs)
            .map_err(|e| anyhow::anyhow!("tokenizer training failed: {e}"))?;
        Self::with_eos(inner)
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))
    }

    /// Number of ids the tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of each document followed by the end-of-text token, concatenated. The
    /// documents go through the tokenizer (in parallel) about 1 MiB of text at a time and only
    /// their ids are kept: the tokenizer's full encodings (tokens, offsets, masks) take many
    /// times the text's size.
    pub fn encode_packed(&self, docs: &[String]) -> Result<Vec<u32>> {
        self.encode_packed_by(docs, ENCODE_BYTES)
    }

    /// [`TextTokenizer::encode_packed`], `chunk` bytes of text at a time.
    fn encode_packed_by(&self, docs: &[String], chunk: usize) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < docs.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < docs.len() && (end == start || bytes < chunk) {
                bytes += docs[end].len();
                end += 1;
            }
            let texts: Vec<&str> = docs[start..end].iter().map(String::as_str).collect();
            let encodings = self
                .inner
                .encode_batch(texts, false)
                .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
            for e in encodings {
                out.extend_from_slice(e.get_ids());
                out.push(self.eos);
            }
            start = end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_tokenizer_round_trips_text() {
        let docs: Vec<String> = (0..50)
            .map(|i| format!("the whale number {i} swam past the ship"))
            .collect();
        let tok = TextTokenizer::train(docs.iter(), 300).unwrap();
        assert!(tok.vocab_size() <= 300);
        // A few documents at a time or all at once, the same ids.
        let whole = tok.encode_packed_by(&docs, usize::MAX).unwrap();
        assert_eq!(tok.encode_packed_by(&docs, 100).unwrap(), whole);
        assert_eq!(tok.encode_packed(&docs).unwrap(), whole);
        let ids = tok.encode_packed(&docs[..2]).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == tok.eos).count(), 2);
        let text = tok.inner.decode(&ids[..ids.len() / 2 - 1], true).unwrap();
        assert!(docs[0].starts_with(text.trim_end()), "{text}");
        let path = std::env::temp_dir().join(format!("frugal-tok-{}.json", std::process::id()));
        std::fs::write(&path, tok.to_json().unwrap()).unwrap();
        let again = TextTokenizer::load(&path).unwrap();
        assert_eq!(
            again.encode_packed(&docs).unwrap(),
            tok.encode_packed(&docs).unwrap()
        );
        std::fs::write(&path, "{\"nope\": 1}").unwrap();
        let err = TextTokenizer::load(&path).err().unwrap().to_string();
        assert!(err.contains("not a valid tokenizer.json"), "{err}");
        std::fs::remove_file(&path).ok();
    }
}
