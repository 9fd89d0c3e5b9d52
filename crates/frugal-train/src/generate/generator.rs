//! A model and its tokenizer continuing prompts token by token: continuations decoded together
//! as one batch, each with its own keys and values ([`frugal_nn::llama::KvCache`]), a new one
//! joining as soon as another ends.

use super::prompts::Prompt;
use super::sampling::Sampling;
use super::stops::StopTexts;
use crate::checkpoint;
use crate::data::instructions::Instruction;
use crate::data::TextTokenizer;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use frugal_nn::llama::{KvCache, Llama};
use rand::Rng;
use std::path::{Path, PathBuf};

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
    /// A stop text appeared (the text ends before it).
    StopText,
}

impl Stop {
    /// A short name (`end_of_text`, `max_tokens`, `positions`).
    pub fn name(self) -> &'static str {
        match self {
            Stop::EndOfText => "end_of_text",
            Stop::MaxTokens => "max_tokens",
            Stop::Positions => "positions",
            Stop::StopText => "stop_text",
        }
    }
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::EndOfText => "the model ended the text",
            Stop::MaxTokens => "--max-new-tokens reached",
            Stop::Positions => "the model's positions are used up",
            Stop::StopText => "a --stop text appeared",
        })
    }
}

/// What [`Generator::continue_each`] reports while it generates.
#[derive(Debug)]
pub enum Event<'a> {
    /// A new piece of continuation `i`'s text, as soon as it decodes.
    Piece(usize, &'a str),
    /// Continuation `i` has ended (after all its pieces). Continuations end in any order.
    Done(usize, &'a Continuation),
}

/// How continuations are generated.
#[derive(Clone, Debug)]
pub struct Decoding {
    /// Tokens to generate at most.
    pub max_new: usize,
    /// How each token is drawn.
    pub sampling: Sampling,
    /// Texts that end a continuation, cut before them.
    pub stops: StopTexts,
    /// Continuations decoded together.
    pub batch_size: usize,
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
struct Row<'t> {
    /// Its place among the continuations asked for.
    index: usize,
    ids: Vec<u32>,
    /// The text decoded so far, as it streamed.
    text: String,
    /// The text emitted so far (all of `text` but the start of a stop text it may end in).
    shown: String,
    /// Decodes the latest tokens into new text; `None` once the decoder's text stopped growing
    /// as a prefix.
    stream: Option<DecodeStream<'t>>,
    /// The logits of its next token.
    logits: Vec<f32>,
    /// The distinct tokens of its prompt and text, in order, under a repetition penalty.
    seen: Vec<u32>,
    stop: Option<Stop>,
}

impl Generator {
    /// Loads the model and tokenizer of `path` (a checkpoint, a run directory or a Hugging Face
    /// LLaMA folder) onto `device`.
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
    /// the start of a document: after the tokens the tokenizer's template puts before a text
    /// (a Hugging Face LLaMA's beginning-of-text token), or, where it puts none, after an
    /// end-of-text token, as in a packed corpus.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let encode = |text: String, special: bool| -> Result<Vec<u32>> {
            Ok(self
                .tokenizer
                .inner
                .encode(text, special)
                .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
                .get_ids()
                .to_vec())
        };
        Ok(match prompt {
            Prompt::Instruction { instruction, input } => {
                let record = Instruction {
                    instruction: instruction.clone(),
                    input: input.clone(),
                    response: String::new(),
                };
                encode(record.prompt(), true)?
            }
            Prompt::Text(text) => {
                let (plain, templated) =
                    (encode(text.clone(), false)?, encode(text.clone(), true)?);
                if templated.len() > plain.len() && templated.ends_with(&plain) {
                    templated
                } else {
                    let mut ids = vec![self.tokenizer.eos];
                    ids.extend(plain);
                    ids
                }
            }
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
        let decoding = Decoding {
            max_new,
            sampling: *sampling,
            stops: StopTexts::default(),
            batch_size: 1,
        };
        let mut all = self.continue_each(
            &[prompt],
            std::slice::from_mut(rng),
            &decoding,
            |event| match event {
                Event::Piece(_, piece) => emit(piece),
                Event::Done(..) => Ok(()),
            },
        )?;
        Ok(all.remove(0))
    }

    /// Continues each of `prompts` (token ids; continuation i draws with `rngs[i]`) as
    /// `decoding` says, `batch_size` continuations at a time as one batch: each token reads
    /// the weights once for all of them, and when one ends the next one joins. A prompt that
    /// continuations next to each other share is read once. `event` hears of each piece of
    /// text as soon as it decodes (text that may start a stop text waits for the tokens that
    /// tell), and of each continuation as it ends. A continuation does not depend on the
    /// others generated with it.
    pub fn continue_each<R: Rng>(
        &self,
        prompts: &[&[u32]],
        rngs: &mut [R],
        decoding: &Decoding,
        mut event: impl FnMut(Event<'_>) -> Result<()>,
    ) -> Result<Vec<Continuation>> {
        let Decoding {
            max_new,
            sampling,
            ref stops,
            batch_size,
        } = *decoding;
        if prompts.len() != rngs.len() || batch_size == 0 {
            bail!(
                "continue_each: {} prompts for {} random generators, {batch_size} at a time; give one generator per prompt and a batch of at least 1",
                prompts.len(),
                rngs.len()
            );
        }
        for prompt in prompts {
            self.check_prompt(prompt)?;
        }
        let positions = self.model.config.max_position_embeddings;
        let eos = self.tokenizer.eos;
        let mut done: Vec<Option<Continuation>> = vec![None; prompts.len()];
        let (mut rows, mut caches) = (Vec::<Row>::new(), Vec::<KvCache>::new());
        // The latest prompt read, while the next continuation shares it.
        let mut read: Option<(&[u32], KvCache, Vec<f32>)> = None;
        let mut next = 0;
        loop {
            while max_new > 0 && rows.len() < batch_size && next < prompts.len() {
                let prompt = prompts[next];
                let (cache, logits) = match read.take() {
                    Some((p, cache, logits)) if p == prompt => (cache, logits),
                    _ => self.read_prompt(prompt)?,
                };
                if prompts.get(next + 1) == Some(&prompt) {
                    read = Some((prompt, cache.repeat(1)?, logits.clone()));
                }
                rows.push(Row {
                    index: next,
                    ids: Vec::new(),
                    text: String::new(),
                    shown: String::new(),
                    stream: Some(self.tokenizer.inner.decode_stream(true)),
                    logits,
                    seen: if sampling.penalizes() {
                        distinct(prompt)
                    } else {
                        Vec::new()
                    },
                    stop: None,
                });
                caches.push(cache);
                next += 1;
            }
            if rows.is_empty() {
                break;
            }
            for (row, cache) in rows.iter_mut().zip(&caches) {
                if sampling.penalizes() {
                    sampling.penalize(&mut row.logits, &row.seen);
                }
                let id = sampling.draw(&row.logits, &mut rngs[row.index]);
                if let (true, Err(at)) = (sampling.penalizes(), row.seen.binary_search(&id)) {
                    row.seen.insert(at, id);
                }
                if id == eos {
                    row.stop = Some(Stop::EndOfText);
                    continue;
                }
                row.ids.push(id);
                if let Some(piece) = self.read_token(row, id, stops)? {
                    event(Event::Piece(row.index, &piece))?;
                }
                if row.stop.is_none() {
                    if row.ids.len() == max_new {
                        row.stop = Some(Stop::MaxTokens);
                    } else if cache.len() == positions {
                        row.stop = Some(Stop::Positions);
                    }
                }
            }
            let (mut going, mut their_caches) = (Vec::new(), Vec::new());
            for (row, cache) in rows.into_iter().zip(caches) {
                let Some(stop) = row.stop else {
                    going.push(row);
                    their_caches.push(cache);
                    continue;
                };
                let continuation = self.finish(row.ids, &row.shown, stop, stops, |rest| {
                    event(Event::Piece(row.index, rest))
                })?;
                event(Event::Done(row.index, &continuation))?;
                done[row.index] = Some(continuation);
            }
            (rows, caches) = (going, their_caches);
            if !rows.is_empty() {
                let tokens: Vec<u32> = rows.iter().map(|r| r.ids[r.ids.len() - 1]).collect();
                let logits = self.model.next_logits_each(&tokens, &mut caches)?;
                for (row, logits) in rows.iter_mut().zip(rows_of(&logits)?) {
                    row.logits = logits;
                }
            }
        }
        // Without new tokens to generate, every continuation is empty.
        let empty = || self.finish(Vec::new(), "", Stop::MaxTokens, stops, |_| Ok(()));
        done.into_iter().map(|c| c.map_or_else(empty, Ok)).collect()
    }

    /// Takes token `id` into `row`'s text: the new text that can be shown, if any. Pieces of
    /// text come as they decode (each from a short window of the latest tokens); a piece
    /// ending inside a multi-byte character waits for the next token. A decoder whose text is
    /// not a prefix of the next one's ends the streaming: the rest comes at the end, and stop
    /// texts are looked for in the whole decoding. A stop text ends the row.
    fn read_token(&self, row: &mut Row, id: u32, stops: &StopTexts) -> Result<Option<String>> {
        match row.stream.as_mut().map(|stream| stream.step(id)) {
            Some(Ok(Some(piece))) => row.text.push_str(&piece),
            Some(Err(_)) => row.stream = None,
            _ => {}
        }
        if !stops.is_empty() {
            if row.stream.is_none() {
                if stops.find(&self.decode(&row.ids)?).is_some() {
                    row.stop = Some(Stop::StopText);
                }
                return Ok(None);
            }
            if let Some(at) = stops.find(&row.text) {
                row.text.truncate(at);
                row.stop = Some(Stop::StopText);
            }
        }
        let shown = match row.stop {
            Some(_) => row.text.len(),
            None => row.text.len() - stops.held(&row.text),
        };
        if row.stream.is_none() || shown <= row.shown.len() {
            return Ok(None);
        }
        let piece = row.text[row.shown.len()..shown].to_string();
        row.shown.push_str(&piece);
        Ok(Some(piece))
    }

    /// Reads `prompt` into a new key-value cache: the cache and the logits of the next token.
    fn read_prompt(&self, prompt: &[u32]) -> Result<(KvCache, Vec<f32>)> {
        let mut cache = KvCache::new();
        let ids = Tensor::new(prompt, self.model.device())?.unsqueeze(0)?;
        let logits = self.model.next_logits(&ids, &mut cache)?;
        let logits = rows_of(&logits)?.into_iter().next().unwrap_or_default();
        Ok((cache, logits))
    }

    /// The continuation of `ids` (its text cut before a stop text), handing `emit` the end of
    /// its text that was not `shown`.
    fn finish(
        &self,
        ids: Vec<u32>,
        shown: &str,
        stop: Stop,
        stops: &StopTexts,
        mut emit: impl FnMut(&str) -> Result<()>,
    ) -> Result<Continuation> {
        let mut text = self.decode(&ids)?;
        if let Some(at) = stops.find(&text) {
            text.truncate(at);
        }
        if let Some(rest) = text.strip_prefix(shown) {
            if !rest.is_empty() {
                emit(rest)?;
            }
        }
        Ok(Continuation { ids, text, stop })
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode generated tokens: {e}"))
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
}

/// The distinct ids of `ids`, in order.
fn distinct(ids: &[u32]) -> Vec<u32> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The rows of logits (rows, vocab) as f32 vectors.
fn rows_of(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use frugal_nn::llama::LlamaConfig;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A random model (96 positions) with a tokenizer of byte pieces that are not UTF-8 alone.
    fn generator() -> Generator {
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
        Generator {
            model: Llama::init(&config, 1, &Device::Cpu, DType::F32).unwrap(),
            tokenizer,
            dir: PathBuf::new(),
        }
    }

    /// The token ids of `text` as a prompt.
    fn ids(generator: &Generator, text: &str) -> Vec<u32> {
        generator.prompt_ids(&Prompt::new(text, false)).unwrap()
    }

    const SAMPLED: Sampling = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
    };

    fn rngs(n: u64) -> Vec<ChaCha8Rng> {
        (0..n).map(ChaCha8Rng::seed_from_u64).collect()
    }

    fn decoding(max_new: usize, batch_size: usize, stops: &[&str]) -> Decoding {
        Decoding {
            max_new,
            sampling: SAMPLED,
            stops: StopTexts::new(stops.iter().map(|s| s.to_string()).collect()).unwrap(),
            batch_size,
        }
    }

    /// Continues `prompts` as `decoding` says: the continuations, each one's streamed pieces,
    /// and the order in which they ended.
    fn generate(
        generator: &Generator,
        prompts: &[&[u32]],
        decoding: &Decoding,
    ) -> (Vec<Continuation>, Vec<Vec<String>>, Vec<usize>) {
        let mut pieces = vec![Vec::new(); prompts.len()];
        let mut ended = Vec::new();
        let all = generator
            .continue_each(
                prompts,
                &mut rngs(prompts.len() as u64),
                decoding,
                |event| {
                    match event {
                        Event::Piece(i, piece) => pieces[i].push(piece.to_string()),
                        Event::Done(i, c) => {
                            assert_eq!(pieces[i].concat(), c.text, "pieces before the end");
                            ended.push(i);
                        }
                    }
                    Ok(())
                },
            )
            .unwrap();
        (all, pieces, ended)
    }

    /// Continuations drawn at random from a random model (bytes that are not UTF-8 among
    /// them), six of one prompt in one batch: each one's streamed pieces add up to its text,
    /// the decoding of its ids, and it is the continuation drawn alone with the same generator.
    #[test]
    fn streamed_pieces_add_up_to_the_continuation() {
        let generator = generator();
        let prompt = ids(&generator, "the whale");
        let (batch, pieces, _) =
            generate(&generator, &[prompt.as_slice(); 6], &decoding(80, 6, &[]));
        let mut lengths = Vec::new();
        for ((c, pieces), mut rng) in batch.iter().zip(&pieces).zip(rngs(6)) {
            assert_eq!(&pieces.concat(), &c.text, "{pieces:?}");
            let decoded = generator.tokenizer.inner.decode(&c.ids, true).unwrap();
            assert_eq!(c.text, decoded);
            // Read alone, a sample draws the same tokens.
            let alone = generator
                .continue_ids(&prompt, 80, &SAMPLED, &mut rng, |_| Ok(()))
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

    /// Prompts of different lengths (one that leaves 7 positions), two continuations at a
    /// time, each joining when another ends: every continuation is the one drawn alone, and
    /// each is reported once, as it ends.
    #[test]
    fn continuations_of_different_prompts_join_as_others_end() {
        let generator = generator();
        let (a, b) = (
            ids(&generator, "the whale"),
            ids(&generator, "the sea was grey, and the ship"),
        );
        let long: Vec<u32> = b.iter().copied().cycle().take(90).collect();
        let prompts: Vec<&[u32]> = vec![&a, &b, &a, &long, &b, &a, &a];
        let (all, _, mut ended) = generate(&generator, &prompts, &decoding(40, 2, &[]));
        for (i, (c, mut rng)) in all.iter().zip(rngs(prompts.len() as u64)).enumerate() {
            let alone = generator
                .continue_ids(prompts[i], 40, &SAMPLED, &mut rng, |_| Ok(()))
                .unwrap();
            assert_eq!(&alone, c, "continuation {i}");
        }
        assert_eq!(all[3].stop == Stop::Positions, all[3].ids.len() == 7);
        let stops: Vec<Stop> = all.iter().map(|c| c.stop).collect();
        assert!(stops.contains(&Stop::MaxTokens), "{stops:?}");
        // The short one ended first; the next joined while the one before it went on.
        let place = |i: usize| ended.iter().position(|&e| e == i);
        assert!(place(3) < place(2), "{ended:?}");
        ended.sort_unstable();
        assert_eq!(ended, (0..prompts.len()).collect::<Vec<_>>());
        // Nothing to generate: empty continuations, the prompts not read.
        let (none, _, ended) = generate(&generator, &prompts, &decoding(0, 2, &[]));
        assert!(none
            .iter()
            .all(|c| c.ids.is_empty() && c.stop == Stop::MaxTokens));
        assert!(ended.is_empty());
        // Every prompt is checked before any is read.
        let too_long = vec![1; 97];
        let err = generator
            .continue_each(&[&a, &too_long], &mut rngs(2), &decoding(4, 2, &[]), |_| {
                Ok(())
            })
            .unwrap_err();
        assert!(err.to_string().contains("97 tokens"), "{err}");
    }

    /// A stop text cuts each continuation it appears in before its first appearance, as
    /// streamed and as returned, after the same draws; the others are unchanged.
    #[test]
    fn a_stop_text_ends_the_continuations_it_appears_in() {
        let generator = generator();
        let prompt = ids(&generator, "the whale");
        let prompts = [prompt.as_slice(); 6];
        let (free, _, _) = generate(&generator, &prompts, &decoding(80, 6, &[]));
        // Six characters from the middle of the first continuation (over several tokens, so
        // that its start streams before the tokens that complete it).
        let chars: Vec<char> = free[0].text.chars().collect();
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 6].iter().collect();
        let (cut, pieces, _) = generate(&generator, &prompts, &decoding(80, 3, &[&stop]));
        let mut stopped = 0;
        for ((c, f), pieces) in cut.iter().zip(&free).zip(&pieces) {
            assert_eq!(&pieces.concat(), &c.text, "{pieces:?}");
            match f.text.find(&stop) {
                Some(at) => {
                    stopped += 1;
                    assert_eq!(c.text, f.text[..at], "stop {stop:?}");
                    assert_eq!(c.stop, Stop::StopText);
                    assert!(f.ids.starts_with(&c.ids) && c.ids.len() < f.ids.len());
                }
                None => assert_eq!(c, f),
            }
        }
        assert!(stopped >= 1);
    }

    /// Under a repetition penalty every draw is the draw from penalized logits: greedy with a
    /// large penalty takes no token twice while unseen ones remain likelier, and the text
    /// differs from the unpenalized one.
    #[test]
    fn a_repetition_penalty_steers_away_from_tokens_seen() {
        let generator = generator();
        let prompt = ids(&generator, "the whale");
        let greedy = |penalty: f64| {
            let decoding = Decoding {
                sampling: Sampling {
                    repetition_penalty: penalty,
                    ..Sampling::GREEDY
                },
                ..decoding(30, 1, &[])
            };
            let (all, _, _) = generate(&generator, &[prompt.as_slice()], &decoding);
            all[0].clone()
        };
        let (plain, penalized) = (greedy(1.0), greedy(1e6));
        assert_ne!(plain.ids, penalized.ids);
        // A penalty of 10⁶ takes every seen token's logit to about 0 or far below it, under
        // the best unseen one (some of this random model's logits are positive at every step).
        let mut seen = distinct(&prompt);
        for &id in &penalized.ids {
            assert!(seen.binary_search(&id).is_err(), "{id} drawn again");
            seen.insert(seen.binary_search(&id).unwrap_err(), id);
        }
    }

    /// Text starts after the beginning-of-text token a tokenizer's template puts before it,
    /// and after the end-of-text token where the template puts nothing before it (or only
    /// something after it).
    #[test]
    fn a_text_prompt_starts_as_the_tokenizer_starts_a_text() {
        use tokenizers::processors::template::TemplateProcessing;
        let mut generator = generator();
        let plain = ids(&generator, "the whale");
        let eos = generator.tokenizer.eos;
        assert_eq!(plain[0], eos);
        let with = |template: &str| {
            TemplateProcessing::builder()
                .try_single(template)
                .unwrap()
                .special_tokens(vec![("<|endoftext|>", eos)])
                .build()
                .unwrap()
        };
        let inner = &mut generator.tokenizer.inner;
        inner.with_post_processor(Some(with("<|endoftext|> <|endoftext|> $A")));
        let mut twice = vec![eos];
        twice.extend(&plain);
        assert_eq!(ids(&generator, "the whale"), twice);
        let inner = &mut generator.tokenizer.inner;
        inner.with_post_processor(Some(with("$A <|endoftext|>")));
        assert_eq!(ids(&generator, "the whale"), plain);
    }
}
