//! `frugal generate`: text from a checkpoint or a Hugging Face LLaMA folder, token by token,
//! with the keys and values of the tokens read kept ([`frugal_nn::llama::KvCache`]).

use crate::checkpoint;
use crate::data::instructions::Instruction;
use crate::data::TextTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use frugal_nn::llama::{KvCache, Llama};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `frugal generate` generates, and how it draws each token.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct GenerateSettings {
    /// A checkpoint directory, a run directory (its latest checkpoint), or a Hugging Face LLaMA
    /// folder (config.json, weights and tokenizer.json).
    #[cfg_attr(feature = "cli", arg(long))]
    pub checkpoint: PathBuf,
    /// The text to continue, read as the start of a document (empty: a document from its
    /// start).
    #[cfg_attr(feature = "cli", arg(long, default_value = ""))]
    pub prompt: String,
    /// The prompt is an instruction: wrap it in the template of `train --instructions`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub instruction: bool,
    /// Tokens to generate at most (fewer where the model ends the text, or has no more
    /// positions).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub max_new_tokens: usize,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub sampling: Sampling,
    /// Seed of the draws.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Continuations to generate, each from the prompt.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub samples: usize,
    /// Samples generated together, as one batch (each token reads the weights once for all of
    /// them; each keeps its own keys and values).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
    /// Worker threads [default: the physical cores].
    #[cfg_attr(feature = "cli", arg(long))]
    pub threads: Option<usize>,
    /// Library of the CPU's f32 matrix products: auto (OpenBLAS where it is installed, found as
    /// $FRUGAL_OPENBLAS or libopenblas.so.0, else gemm), gemm or openblas.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = frugal_nn::matmul::MatmulLibrary::Auto))]
    pub matmul: frugal_nn::matmul::MatmulLibrary,
}

/// How the next token is drawn from the model's logits.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Sampling {
    /// Temperature the logits are divided by; 0 takes the most likely token (greedy).
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative, default_value_t = 0.8))]
    pub temperature: f64,
    /// Draw among the K most likely tokens only (0: all of them).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 50))]
    pub top_k: usize,
    /// Draw among the most likely tokens whose probabilities sum to at least P (nucleus
    /// sampling; 1: all of them).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.95))]
    pub top_p: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
        }
    }
}

impl Sampling {
    /// Greedy decoding: always the most likely token.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "--temperature {} must be a number ≥ 0 (0 takes the most likely token)",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!(
                "--top-p {} must be in (0, 1] (1 keeps every token)",
                self.top_p
            );
        }
        Ok(())
    }

    /// A token id drawn from `logits` (one per vocabulary entry) with `rng`. Greedy decoding
    /// draws nothing from `rng`; ties go to the lowest id.
    pub fn draw(&self, logits: &[f32], rng: &mut impl Rng) -> u32 {
        let better = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.temperature == 0.0 {
            let best = logits.iter().copied().enumerate().min_by(better);
            return best.map_or(0, |(i, _)| i as u32);
        }
        let mut ranked: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
        let k = match self.top_k {
            0 => ranked.len(),
            k => k.min(ranked.len()),
        };
        if k < ranked.len() {
            ranked.select_nth_unstable_by(k - 1, better);
            ranked.truncate(k);
        }
        ranked.sort_unstable_by(better);
        let top = ranked.first().map_or(0.0, |&(_, l)| l as f64);
        let weights: Vec<f64> = ranked
            .iter()
            .map(|&(_, l)| ((l as f64 - top) / self.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // The nucleus: the fewest most likely tokens whose share reaches top_p.
        let mut kept = 0.0;
        let mut n = 0;
        while n < weights.len() && (n == 0 || kept < self.top_p * total) {
            kept += weights[n];
            n += 1;
        }
        let mut u = rng.random::<f64>() * kept;
        for (&(id, _), w) in ranked.iter().zip(&weights[..n]) {
            if u < *w {
                return id as u32;
            }
            u -= w;
        }
        ranked[n - 1].0 as u32
    }
}

/// One generated continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Continuation {
    /// Its token ids (the end-of-text token not included).
    pub ids: Vec<u32>,
    /// Its text.
    pub text: String,
    /// Why it stopped.
    pub stop: Stop,
}

/// Why a continuation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The model drew the end-of-text token.
    EndOfText,
    /// `--max-new-tokens` were generated.
    MaxTokens,
    /// The model has no more positions.
    Positions,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::EndOfText => "the model ended the text",
            Stop::MaxTokens => "--max-new-tokens reached",
            Stop::Positions => "the model's positions are used up",
        })
    }
}

/// A model and its tokenizer, ready to continue prompts.
pub struct Generator {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    /// Where they were read from.
    pub dir: PathBuf,
}

/// The tokenizer's incremental decoder.
type DecodeStream<'t> = tokenizers::DecodeStream<
    't,
    tokenizers::models::ModelWrapper,
    tokenizers::normalizers::NormalizerWrapper,
    tokenizers::pre_tokenizers::PreTokenizerWrapper,
    tokenizers::processors::PostProcessorWrapper,
    tokenizers::decoders::DecoderWrapper,
>;

/// A continuation being generated.
struct Sample<'t> {
    ids: Vec<u32>,
    /// The text emitted so far.
    shown: String,
    /// Decodes the latest tokens into new text; `None` once the decoder's text stopped growing
    /// as a prefix.
    stream: Option<DecodeStream<'t>>,
    stop: Option<Stop>,
}

impl Generator {
    /// Loads the model and tokenizer of `path` (see [`GenerateSettings::checkpoint`]) onto
    /// `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let dir = if path.join("model.safetensors.index.json").exists() {
            path.to_path_buf()
        } else {
            checkpoint::locate(path)?
        };
        let (_, model) = Llama::from_hf(&dir, device, DType::F32)?;
        let tokenizer = TextTokenizer::load(&dir.join(checkpoint::TOKENIZER))?;
        if tokenizer.vocab_size() > model.config.vocab_size {
            bail!(
                "{}: the tokenizer has {} ids but the model's vocabulary {}; the folder's tokenizer.json belongs to another model",
                dir.display(),
                tokenizer.vocab_size(),
                model.config.vocab_size
            );
        }
        Ok(Generator {
            model,
            tokenizer,
            dir,
        })
    }

    /// The token ids the model reads first: an instruction in the template of `train
    /// --instructions` (with the tokenizer's special tokens, as training read it), or text as
    /// the start of a document (after an end-of-text token, as in a packed corpus).
    pub fn prompt_ids(&self, prompt: &str, instruction: bool) -> Result<Vec<u32>> {
        let encode = |text: String, special: bool| -> Result<Vec<u32>> {
            Ok(self
                .tokenizer
                .inner
                .encode(text, special)
                .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
                .get_ids()
                .to_vec())
        };
        Ok(if instruction {
            let record = Instruction {
                instruction: prompt.to_string(),
                input: String::new(),
                response: String::new(),
            };
            encode(record.prompt(), true)?
        } else {
            let mut ids = vec![self.tokenizer.eos];
            ids.extend(encode(prompt.to_string(), false)?);
            ids
        })
    }

    /// Continues `prompt` (token ids) by at most `max_new` tokens drawn by `sampling` with
    /// `rng`, handing each new piece of text to `emit` as soon as it decodes.
    pub fn continue_ids(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampling: &Sampling,
        rng: &mut impl Rng,
        mut emit: impl FnMut(&str) -> Result<()>,
    ) -> Result<Continuation> {
        let mut all = self.continue_batch(
            prompt,
            max_new,
            sampling,
            std::slice::from_mut(rng),
            |_, piece| emit(piece),
        )?;
        Ok(all.remove(0))
    }

    /// Continues `prompt` once for each generator of `rngs` (sample i draws with `rngs[i]`):
    /// the prompt is read once, then the samples together as one batch, each token reading
    /// the weights once for all of them. `emit(i, piece)` gets each new piece of sample i's text as soon as it decodes. A
    /// sample that has ended waits (its rows are computed, not drawn from) until all have.
    pub fn continue_batch<R: Rng>(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampling: &Sampling,
        rngs: &mut [R],
        mut emit: impl FnMut(usize, &str) -> Result<()>,
    ) -> Result<Vec<Continuation>> {
        self.check_prompt(prompt)?;
        let positions = self.model.config.max_position_embeddings;
        let device = self.model.device().clone();
        let eos = self.tokenizer.eos;
        let mut cache = KvCache::new();
        let mut next = Tensor::new(prompt, &device)?.unsqueeze(0)?;
        let mut samples: Vec<Sample<'_>> = rngs
            .iter()
            .map(|_| Sample {
                ids: Vec::new(),
                shown: String::new(),
                stream: Some(self.tokenizer.inner.decode_stream(true)),
                stop: None,
            })
            .collect();
        loop {
            for s in samples.iter_mut().filter(|s| s.stop.is_none()) {
                if s.ids.len() == max_new {
                    s.stop = Some(Stop::MaxTokens);
                }
            }
            if samples.iter().all(|s| s.stop.is_some()) {
                break;
            }
            if cache.len() + next.dim(1)? > positions {
                for s in samples.iter_mut().filter(|s| s.stop.is_none()) {
                    s.stop = Some(Stop::Positions);
                }
                break;
            }
            let logits = self.model.next_logits(&next, &mut cache)?;
            let (rows, vocab) = (next.dim(0)?, logits.dims().last().copied().unwrap_or(0));
            let logits = logits
                .reshape((rows, vocab))?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            if rows < samples.len() {
                // The prompt was read once: every sample draws from its logits and continues
                // from a copy of its keys and values.
                cache = cache.repeat(samples.len())?;
            }
            let mut drawn = Vec::with_capacity(samples.len());
            for (i, (s, rng)) in samples.iter_mut().zip(&mut *rngs).enumerate() {
                let logits = &logits[if rows == 1 { 0 } else { i }];
                if s.stop.is_some() {
                    drawn.push(eos);
                    continue;
                }
                let id = sampling.draw(logits, rng);
                drawn.push(id);
                if id == eos {
                    s.stop = Some(Stop::EndOfText);
                    continue;
                }
                s.ids.push(id);
                // Pieces of text as they decode (each from a short window of the latest
                // tokens); a piece ending inside a multi-byte character waits for the next
                // token. A decoder whose text is not a prefix of the next one's ends the
                // streaming: the rest comes at the end.
                match s.stream.as_mut().map(|stream| stream.step(id)) {
                    Some(Ok(Some(piece))) => {
                        emit(i, &piece)?;
                        s.shown.push_str(&piece);
                    }
                    Some(Err(_)) => s.stream = None,
                    _ => {}
                }
            }
            next = Tensor::new(drawn, &device)?.unsqueeze(1)?;
        }
        samples
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let text = self.decode(&s.ids)?;
                if let Some(rest) = text.strip_prefix(s.shown.as_str()) {
                    if !rest.is_empty() {
                        emit(i, rest)?;
                    }
                }
                Ok(Continuation {
                    ids: s.ids,
                    text,
                    stop: s.stop.unwrap_or(Stop::MaxTokens),
                })
            })
            .collect()
    }

    /// Fails unless the model can read `prompt` (1 to max_position_embeddings token ids).
    pub fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        let positions = self.model.config.max_position_embeddings;
        if prompt.is_empty() || prompt.len() > positions {
            bail!(
                "the prompt is {} tokens; the model reads 1 to {positions} (max_position_embeddings): shorten it",
                prompt.len()
            );
        }
        Ok(())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode generated tokens: {e}"))
    }
}

/// Runs `frugal generate`: loads the model, generates the samples `--batch-size` at a time,
/// and writes the prompt and the first continuation to `out` as it is generated, then the
/// others of each batch once all of it has ended (continuations apart by a line `---`), and a
/// line per continuation to standard error.
pub fn generate(
    settings: &GenerateSettings,
    device: &Device,
    out: &mut impl std::io::Write,
) -> Result<Vec<Continuation>> {
    settings.sampling.validate()?;
    if settings.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if settings.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let generator = Generator::load(&settings.checkpoint, device)
        .with_context(|| format!("--checkpoint {}", settings.checkpoint.display()))?;
    let prompt = generator.prompt_ids(&settings.prompt, settings.instruction)?;
    generator.check_prompt(&prompt)?;
    // Sample i draws from stream i of the seed's generator: the first sample's draws are
    // those of a run with one sample.
    let mut rngs: Vec<ChaCha8Rng> = (0..settings.samples)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
            rng.set_stream(i as u64);
            rng
        })
        .collect();
    // The first sample streams; the others of each batch are written once all have ended.
    write!(out, "{}", settings.prompt)?;
    out.flush()?;
    let started = Instant::now();
    let mut all = Vec::new();
    for rngs in rngs.chunks_mut(settings.batch_size) {
        let first = all.is_empty();
        let batch = generator.continue_batch(
            &prompt,
            settings.max_new_tokens,
            &settings.sampling,
            rngs,
            |sample, piece| {
                if first && sample == 0 {
                    write!(out, "{piece}")?;
                    out.flush()?;
                }
                Ok(())
            },
        )?;
        if first {
            writeln!(out)?;
        }
        for continuation in &batch[usize::from(first)..] {
            writeln!(out, "\n---")?;
            writeln!(out, "{}{}", settings.prompt, continuation.text)?;
        }
        out.flush()?;
        all.extend(batch);
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let tokens: usize = all.iter().map(|c| c.ids.len()).sum();
    if let [one] = all.as_slice() {
        eprintln!(
            "{tokens} tokens in {seconds:.2}s ({:.1} tokens/s); stopped: {}",
            tokens as f64 / seconds,
            one.stop
        );
    } else {
        for (i, c) in all.iter().enumerate() {
            eprintln!(
                "sample {}: {} tokens; stopped: {}",
                i + 1,
                c.ids.len(),
                c.stop
            );
        }
        let together = match settings.batch_size {
            b if b >= all.len() => "together".to_string(),
            b => format!("{b} at a time"),
        };
        eprintln!(
            "{} samples {together}: {tokens} tokens in {seconds:.2}s ({:.1} tokens/s)",
            all.len(),
            tokens as f64 / seconds
        );
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(3)
    }

    #[test]
    fn greedy_and_a_single_candidate_take_the_most_likely_token() {
        let logits = [0.5, 2.0, -1.0, 2.0, 1.9];
        assert_eq!(Sampling::GREEDY.draw(&logits, &mut rng()), 1);
        for sampling in [
            Sampling {
                top_k: 1,
                ..Sampling::default()
            },
            Sampling {
                top_p: 1e-6,
                temperature: 5.0,
                top_k: 0,
            },
        ] {
            let mut r = rng();
            assert!((0..50).all(|_| sampling.draw(&logits, &mut r) == 1));
        }
    }

    /// Frequencies of 20 000 draws.
    fn frequencies(sampling: Sampling, logits: &[f32]) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        let mut r = rng();
        for _ in 0..20_000 {
            counts[sampling.draw(logits, &mut r) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / 20_000.0).collect()
    }

    #[test]
    fn draws_follow_the_tempered_and_truncated_distribution() {
        // Probabilities 0.1, 0.2, 0.3, 0.4 at temperature 1.
        let p = [0.1f32, 0.2, 0.3, 0.4];
        let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        let all = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let close = |got: Vec<f64>, want: [f64; 4]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 0.015, "{got:?} against {want:?}");
            }
        };
        close(frequencies(all, &logits), [0.1, 0.2, 0.3, 0.4]);
        // Temperature 0.5 squares the probabilities: 1, 4, 9, 16 over 30.
        let half = Sampling {
            temperature: 0.5,
            ..all
        };
        close(
            frequencies(half, &logits),
            [1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0],
        );
        // Top 2: 0.3 and 0.4 renormalised.
        let top2 = Sampling { top_k: 2, ..all };
        close(frequencies(top2, &logits), [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
        // Nucleus 0.65: 0.4 + 0.3 reach it, 0.4 alone does not.
        let nucleus = Sampling { top_p: 0.65, ..all };
        close(
            frequencies(nucleus, &logits),
            [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0],
        );
        // The same seed draws the same tokens.
        assert_eq!(frequencies(all, &logits), frequencies(all, &logits));
    }

    /// Continuations drawn at random from a random model (bytes that are not UTF-8 among
    /// them), six in one batch: each one's streamed pieces add up to its text, the decoding of
    /// its ids, and it is the continuation drawn alone with the same generator.
    #[test]
    fn streamed_pieces_add_up_to_the_continuation() {
        use frugal_nn::llama::LlamaConfig;
        let docs = ["the whale swam under the ship, and the sea was grey — “so”"; 8];
        let tokenizer = TextTokenizer::train(docs.iter(), 300).unwrap();
        let config = LlamaConfig {
            vocab_size: tokenizer.vocab_size(),
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: Some(2),
            max_position_embeddings: 96,
            ..LlamaConfig::builtin("tiny").unwrap()
        };
        let generator = Generator {
            model: Llama::init(&config, 1, &Device::Cpu, DType::F32).unwrap(),
            tokenizer,
            dir: PathBuf::new(),
        };
        let prompt = generator.prompt_ids("the whale", false).unwrap();
        let sampling = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let rngs = |n: u64| (0..n).map(ChaCha8Rng::seed_from_u64).collect::<Vec<_>>();
        let mut pieces = vec![Vec::new(); 6];
        let batch = generator
            .continue_batch(&prompt, 80, &sampling, &mut rngs(6), |i, piece| {
                pieces[i].push(piece.to_string());
                Ok(())
            })
            .unwrap();
        let mut lengths = Vec::new();
        for ((c, pieces), mut rng) in batch.iter().zip(&pieces).zip(rngs(6)) {
            assert_eq!(&pieces.concat(), &c.text, "{pieces:?}");
            let decoded = generator.tokenizer.inner.decode(&c.ids, true).unwrap();
            assert_eq!(c.text, decoded);
            // Read alone, a sample draws the same tokens.
            let alone = generator
                .continue_ids(&prompt, 80, &sampling, &mut rng, |_| Ok(()))
                .unwrap();
            assert_eq!(&alone, c);
            lengths.push((c.ids.len(), pieces.len()));
        }
        // Most draws run long and stream in many pieces.
        assert!(
            lengths.iter().any(|&(ids, pieces)| ids > 20 && pieces > 5),
            "{lengths:?}"
        );
    }

    #[test]
    fn bad_sampling_settings_are_named() {
        for (sampling, named) in [
            (
                Sampling {
                    temperature: -1.0,
                    ..Sampling::default()
                },
                "--temperature",
            ),
            (
                Sampling {
                    top_p: 0.0,
                    ..Sampling::default()
                },
                "--top-p",
            ),
            (
                Sampling {
                    top_p: 1.5,
                    ..Sampling::default()
                },
                "--top-p",
            ),
        ] {
            let err = sampling.validate().unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
        assert!(Sampling::default().validate().is_ok());
    }
}
