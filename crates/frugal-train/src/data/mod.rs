//! Training data: corpora, tokenizers, the token cache and batching.

pub mod batches;
pub mod corpus;
pub mod shard;
pub mod tokenizer;

use anyhow::{Context, Result};
pub use batches::Batches;
pub use corpus::Source;
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

/// A tokenized corpus: the tokenizer and memory-mapped train / validation token shards.
pub struct Dataset {
    pub tokenizer: TextTokenizer,
    pub train: TokenShard,
    pub val: TokenShard,
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
        val_fraction: f64,
        cache: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(cache)
            .with_context(|| format!("cannot create cache directory {}", cache.display()))?;
        let contents = source.contents()?;
        let mut data_key = FNV_OFFSET;
        for (label, bytes) in &contents {
            data_key = fnv1a(fnv1a(data_key, label.as_bytes()), bytes);
        }
        data_key = fnv1a(data_key, &val_fraction.to_le_bytes());
        let mut split = None;
        let load_split = || corpus::load_split(source, val_fraction);
        let tokenizer = match tokenizer {
            TokenizerChoice::File(p) => TextTokenizer::load(p)?,
            TokenizerChoice::Train(vocab) => {
                let path = cache.join(format!("tokenizer-{data_key:016x}-{vocab}.json"));
                if path.exists() {
                    TextTokenizer::load(&path)?
                } else {
                    let (train, val) = load_split()?;
                    let tok = TextTokenizer::train(&train, vocab)?;
                    frugal::fs::write_atomically(&path, tok.to_json()?.as_bytes())?;
                    split = Some((train, val));
                    tok
                }
            }
        };
        let key = fnv1a(data_key, tokenizer.to_json()?.as_bytes());
        let paths = ["train", "val"].map(|s| cache.join(format!("tokens-{key:016x}.{s}.bin")));
        let cached = paths.iter().all(|p| p.exists());
        if !cached {
            let (train, val) = match split {
                Some(s) => s,
                None => load_split()?,
            };
            TokenShard::write(&paths[0], &tokenizer.encode_packed(&train)?)?;
            TokenShard::write(&paths[1], &tokenizer.encode_packed(&val)?)?;
        }
        Ok(Dataset {
            tokenizer,
            train: TokenShard::open(&paths[0])?,
            val: TokenShard::open(&paths[1])?,
            cached,
        })
    }
}
