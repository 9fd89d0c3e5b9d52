//! Training data: corpora, tokenizers, the token cache and batching.

pub mod batches;
pub mod corpus;
pub mod instructions;
pub mod shard;
pub mod tokenizer;

use anyhow::{Context, Result};
pub use batches::Batches;
use corpus::Documents;
pub use corpus::{Holdout, Source};
use instructions::Instruction;
use shard::{fnv1a, TokenShard, FNV_OFFSET};
use std::path::{Path, PathBuf};
pub use tokenizer::TextTokenizer;

/// Where the tokenizer comes from.
#[derive(Clone, Copy, Debug)]
pub enum TokenizerChoice<'a> {
    /// A `tokenizer.json` file.
    File(&'a Path),
    /// A byte-level BPE of this size trained on the training split.
    Train(usize),
}

/// How documents become token sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Documents packed end to end, each followed by the end-of-text token.
    Packed,
    /// Instruction records (see [`instructions`]), one per window of `seq_len` tokens; only
    /// the responses are predicted.
    Instructions { seq_len: usize },
}

/// The documents or records of a corpus, by split.
enum Parts {
    Text(Documents),
    /// Instruction records, laid out in windows of this many tokens.
    Records(Documents<Instruction>, usize),
}

impl Parts {
    fn load(source: &Source, holdout: Holdout, format: Format) -> Result<Self> {
        Ok(match format {
            Format::Packed => Parts::Text(corpus::load_split(source, holdout)?),
            Format::Instructions { seq_len } => {
                let mut records = Vec::new();
                for (label, bytes) in source.contents()? {
                    records.extend(instructions::instructions(&label, &bytes)?);
                }
                Parts::Records(corpus::split(records, holdout)?, seq_len)
            }
        })
    }

    /// The training texts (to train a tokenizer on).
    fn training_texts(&self) -> Vec<String> {
        match self {
            Parts::Text(d) => d.train.clone(),
            Parts::Records(d, _) => d.train.iter().map(Instruction::text).collect(),
        }
    }

    /// The token streams of the training, validation and test parts, and notes on what did
    /// not fit.
    fn encode(&self, tok: &TextTokenizer) -> Result<([Vec<u32>; 3], Vec<String>)> {
        match self {
            Parts::Text(d) => Ok((
                [
                    tok.encode_packed(&d.train)?,
                    tok.encode_packed(&d.val)?,
                    tok.encode_packed(&d.test)?,
                ],
                Vec::new(),
            )),
            Parts::Records(d, seq_len) => {
                let seq_len = *seq_len;
                let mut notes = Vec::new();
                let mut streams: [Vec<u32>; 3] = Default::default();
                for (stream, (name, part)) in streams.iter_mut().zip([
                    ("training", &d.train),
                    ("validation", &d.val),
                    ("test", &d.test),
                ]) {
                    let e = instructions::encode(tok, part, seq_len)?;
                    if e.truncated + e.dropped > 0 {
                        notes.push(format!(
                            "{name} instructions longer than {seq_len} tokens: {} responses cut, {} records left out (the prompt alone fills the sequence)",
                            e.truncated, e.dropped
                        ));
                    }
                    if e.tokens.len() <= 1 && !part.is_empty() {
                        anyhow::bail!("every {name} instruction has a prompt of {seq_len} tokens or more; raise --seq-len");
                    }
                    *stream = e.tokens;
                }
                Ok((streams, notes))
            }
        }
    }
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
    /// What did not fit (instruction records too long), when the shards were written now.
    pub notes: Vec<String>,
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
    /// Reads, splits and tokenizes the corpus in `format`, or maps the cached shards of an
    /// earlier run with the same data, format, tokenizer and split.
    pub fn prepare(
        source: &Source,
        tokenizer: TokenizerChoice,
        holdout: Holdout,
        format: Format,
        cache: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(cache)
            .with_context(|| format!("cannot create cache directory {}", cache.display()))?;
        // The files are read again to be split: their bytes are not kept meanwhile.
        let mut data_key = FNV_OFFSET;
        for (label, bytes) in source.contents()? {
            data_key = fnv1a(fnv1a(data_key, label.as_bytes()), &bytes);
        }
        data_key = fnv1a(data_key, &holdout.val.to_le_bytes());
        if holdout.test > 0.0 {
            data_key = fnv1a(data_key, &holdout.test.to_le_bytes());
        }
        if let Format::Instructions { seq_len } = format {
            data_key = fnv1a(data_key, format!("instructions {seq_len}").as_bytes());
        }
        let mut split = None;
        let load_split = || Parts::load(source, holdout, format);
        let tokenizer = match tokenizer {
            TokenizerChoice::File(p) => TextTokenizer::load(p)?,
            TokenizerChoice::Train(vocab) => {
                let path = cache.join(format!("tokenizer-{data_key:016x}-{vocab}.json"));
                if path.exists() {
                    TextTokenizer::load(&path)?
                } else {
                    let docs = load_split()?;
                    let tok = TextTokenizer::train(&docs.training_texts(), vocab)?;
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
        let mut notes = Vec::new();
        if !cached {
            let docs = match split {
                Some(s) => s,
                None => load_split()?,
            };
            let (streams, why) = docs.encode(&tokenizer)?;
            notes = why;
            for (path, tokens) in paths.iter().zip(&streams) {
                TokenShard::write(path, tokens)?;
            }
        }
        Ok(Dataset {
            tokenizer,
            train: TokenShard::open(&paths[0])?,
            val: TokenShard::open(&paths[1])?,
            test: paths.get(2).map(|p| TokenShard::open(p)).transpose()?,
            cached,
            notes,
        })
    }
}
