//! Training data: corpora, tokenizers, the token cache and batching.

pub mod batches;
pub mod corpus;
pub mod instructions;
pub mod shard;
pub mod tokenizer;

use anyhow::{Context, Result};
pub use batches::Batches;
use corpus::{Documents, Part, StreamedDocuments};
pub use corpus::{Holdout, Source};
use instructions::Instruction;
use shard::{fnv1a, ShardWriter, TokenShard, FNV_OFFSET};
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

/// True when the corpus can be prepared a piece at a time: packed text whose documents all
/// stay where their positions put them (see [`corpus::Holdout::keeps_positions`]; the moves
/// for tiny corpora need the whole corpus, which is small then).
fn streams(source: &Source, holdout: Holdout, format: Format) -> Result<bool> {
    if format != Format::Packed {
        return Ok(false);
    }
    let mut docs = StreamedDocuments::new(source, holdout);
    let mut counts = [0; 3];
    while let Some(piece) = docs.next_piece() {
        for (part, _) in piece {
            counts[part as usize] += 1;
        }
    }
    match docs.error {
        Some(e) => Err(e),
        None => Ok(holdout.keeps_positions(counts)),
    }
}

/// A tokenizer trained on the training documents, read a piece at a time.
fn train_streamed(source: &Source, holdout: Holdout, vocab: usize) -> Result<TextTokenizer> {
    let mut docs = StreamedDocuments::new(source, holdout);
    let texts = std::iter::from_fn(|| docs.next_piece())
        .flatten()
        .filter(|(part, _)| *part == Part::Train)
        .map(|(_, text)| text);
    let tok = TextTokenizer::train(texts, vocab);
    match docs.error {
        Some(e) => Err(e),
        None => tok,
    }
}

/// Tokenizes the documents a piece at a time into the shards at `paths` (training,
/// validation, and test when held out), packed in corpus order.
fn encode_streamed(
    source: &Source,
    holdout: Holdout,
    tok: &TextTokenizer,
    paths: &[PathBuf],
) -> Result<()> {
    let mut shards = paths
        .iter()
        .map(|p| ShardWriter::create(p))
        .collect::<Result<Vec<_>>>()?;
    let mut docs = StreamedDocuments::new(source, holdout);
    while let Some(piece) = docs.next_piece() {
        let mut parts: [Vec<String>; 3] = Default::default();
        for (part, text) in piece {
            parts[part as usize].push(text);
        }
        for (shard, texts) in shards.iter_mut().zip(&parts) {
            shard.append(&tok.encode_packed(texts)?)?;
        }
    }
    if let Some(e) = docs.error {
        return Err(e);
    }
    shards.into_iter().try_for_each(ShardWriter::finish)
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
        // One file at a time: the corpus is never held whole for its key.
        let mut data_key = FNV_OFFSET;
        for i in 0..source.file_count() {
            let (label, bytes) = source.file(i)?;
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
        let mut streamed = None;
        let tokenizer = match tokenizer {
            TokenizerChoice::File(p) => TextTokenizer::load(p)?,
            TokenizerChoice::Train(vocab) => {
                let path = cache.join(format!("tokenizer-{data_key:016x}-{vocab}.json"));
                if path.exists() {
                    TextTokenizer::load(&path)?
                } else {
                    let tok = if *streamed.insert(streams(source, holdout, format)?) {
                        train_streamed(source, holdout, vocab)?
                    } else {
                        let docs = load_split()?;
                        let tok = TextTokenizer::train(docs.training_texts().iter(), vocab)?;
                        split = Some(docs);
                        tok
                    };
                    frugal::fs::write_atomically(&path, tok.to_json()?.as_bytes())?;
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
            let streamed = match streamed {
                Some(s) => s,
                None => streams(source, holdout, format)?,
            };
            if streamed {
                encode_streamed(source, holdout, &tokenizer, &paths)?;
            } else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A corpus of three JSON-lines files in a fresh folder under the system's temporary one.
    fn corpus(name: &str, docs_per_file: usize) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("frugal-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..3 {
            let lines: Vec<String> = (0..docs_per_file)
                .map(|d| {
                    let text = format!("file {f} tells story {d} of the whale and ship {}", d * f);
                    serde_json::json!({ "text": text }).to_string()
                })
                .collect();
            std::fs::write(dir.join(format!("part-{f}.jsonl")), lines.join("\n")).unwrap();
        }
        dir
    }

    #[test]
    fn a_corpus_read_one_file_at_a_time_gives_the_tokens_of_the_whole_corpus() {
        let dir = corpus("streamed", 80);
        let source = Source::resolve(dir.to_str().unwrap()).unwrap();
        let holdout = Holdout {
            val: 0.1,
            test: 0.1,
        };
        assert!(streams(&source, holdout, Format::Packed).unwrap());
        let whole = Parts::load(&source, holdout, Format::Packed).unwrap();
        let tok = TextTokenizer::train(whole.training_texts().iter(), 300).unwrap();
        let streamed = train_streamed(&source, holdout, 300).unwrap();
        assert_eq!(streamed.to_json().unwrap(), tok.to_json().unwrap());
        let paths: Vec<PathBuf> = ["train", "val", "test"]
            .iter()
            .map(|s| dir.join(format!("{s}.bin")))
            .collect();
        encode_streamed(&source, holdout, &tok, &paths).unwrap();
        let (streams, _) = whole.encode(&tok).unwrap();
        for (path, tokens) in paths.iter().zip(&streams) {
            let shard = TokenShard::open(path).unwrap();
            assert!(!tokens.is_empty());
            assert_eq!(&shard.range(0, shard.len()), tokens, "{}", path.display());
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn tiny_corpora_and_instructions_are_prepared_whole() {
        // Two documents a file: the tiny corpus' validation document is moved from training.
        let dir = corpus("tiny", 1);
        let source = Source::resolve(dir.to_str().unwrap()).unwrap();
        let holdout = Holdout::validation(0.01);
        assert!(!streams(&source, holdout, Format::Packed).unwrap());
        assert!(!streams(&source, holdout, Format::Instructions { seq_len: 8 }).unwrap());
        // A file that does not parse is named, whichever way the corpus is read.
        std::fs::write(dir.join("part-1.jsonl"), "{\"body\": 1}\n").unwrap();
        let err = streams(&source, holdout, Format::Packed)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("part-1.jsonl") && err.contains("text"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
