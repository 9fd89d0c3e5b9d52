//! Training data: corpora, tokenizers, the token cache and batching.

pub mod batches;
pub mod corpus;
pub mod shard;
pub mod tokenizer;

use anyhow::{Context, Result};
pub use batches::Batches;
pub use corpus::{Holdout, Source};
use shard::{fnv1a, TokenShard, FNV_OFFSET};
use std::path::{Path, PathBuf};
pub use tokenizer::TextTokenizer;

/// Where the tokenizer comes from.
pub enum TokenizerChoice<'a> {
    /// A `tokenizer.json` file.
    File(&'a Path),
    /// A byte-level BPE of this size trained on the training split.
    Train(usize),
}

/// A tokenized corpus: the tokenizer and memory-mapped train / validation (/ test) token shards.
pub struct Dataset {
    pub tokenizer: TextTokenizer,
    pub train: TokenShard,
    pub val: TokenShard,
    /// The test split, when one is held out.
    pub test: Option<TokenShard>,
    /// True if the shards came from the cache.
    pub cached: bool,
}

/// Default cache directory: `$FRUGAL_CACHE`, else `$XDG_CACHE_HOME/frugal`, else `~/.cache/frugal`.
pub fn default_cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("FRUGAL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|_| std::env::temp_dir());
    base.join("frugal")
}

impl Dataset {
    /// Reads, splits and tokenizes the corpus, or maps the cached shards of an earlier run with
    /// the same data, tokenizer and split.
    pub fn prepare(
        source: &Source,
        tokenizer: TokenizerChoice,
        holdout: Holdout,
        cache: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(cache)
            .with_context(|| format!("cannot create cache directory {}", cache.display()))?;
        let contents = source.contents()?;
        let mut data_key = FNV_OFFSET;
        for (label, bytes) in &contents {
            data_key = fnv1a(fnv1a(data_key, label.as_bytes()), bytes);
        }
        data_key = fnv1a(data_key, &holdout.val.to_le_bytes());
        if holdout.test > 0.0 {
            data_key = fnv1a(data_key, &holdout.test.to_le_bytes());
        }
        let mut split = None;
        let load_split = || corpus::load_split(source, holdout);
        let tokenizer = match tokenizer {
            TokenizerChoice::File(p) => TextTokenizer::load(p)?,
            TokenizerChoice::Train(vocab) => {
                let path = cache.join(format!("tokenizer-{data_key:016x}-{vocab}.json"));
                if path.exists() {
                    TextTokenizer::load(&path)?
                } else {
                    let docs = load_split()?;
                    let tok = TextTokenizer::train(&docs.train, vocab)?;
                    frugal::fs::write_atomically(&path, tok.to_json()?.as_bytes())?;
                    split = Some(docs);
                    tok
                }
            }
        };
        let key = fnv1a(data_key, tokenizer.to_json()?.as_bytes());
        let names: &[&str] = if holdout.test > 0.0 {
            &["train", "val", "test"]
        } else {
            &["train", "val"]
        };
        let paths: Vec<PathBuf> = names
            .iter()
            .map(|s| cache.join(format!("tokens-{key:016x}.{s}.bin")))
            .collect();
        let cached = paths.iter().all(|p| p.exists());
        if !cached {
            let docs = match split {
                Some(s) => s,
                None => load_split()?,
            };
            for (path, part) in paths.iter().zip([&docs.train, &docs.val, &docs.test]) {
                TokenShard::write(path, &tokenizer.encode_packed(part)?)?;
            }
        }
        Ok(Dataset {
            tokenizer,
            train: TokenShard::open(&paths[0])?,
            val: TokenShard::open(&paths[1])?,
            test: paths.get(2).map(|p| TokenShard::open(p)).transpose()?,
            cached,
        })
    }
}
