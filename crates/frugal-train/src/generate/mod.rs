//! `frugal generate`: text from a checkpoint or a Hugging Face LLaMA folder, token by token,
//! for one prompt or a file of them, with the keys and values of the tokens read kept
//! ([`frugal_nn::llama::KvCache`]).

mod generator;
mod output;
mod prompts;
mod sampling;
mod stops;

pub use generator::{Continuation, Decoding, Event, Generator, Stop};
pub use prompts::{read_prompts, Prompt};
pub use sampling::Sampling;
pub use stops::StopTexts;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use output::Output;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::Instant;

/// What `frugal generate` generates, and how it draws each token.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct GenerateSettings {
    /// A checkpoint directory, a run directory (its latest checkpoint), or a Hugging Face LLaMA
    /// folder (config.json, weights and tokenizer.json).
    #[cfg_attr(feature = "cli", arg(long))]
    pub checkpoint: PathBuf,
    /// The text to continue, read as the start of a document (repeatable; none: a document
    /// from its start).
    #[cfg_attr(feature = "cli", arg(long))]
    pub prompt: Vec<String>,
    /// A file of prompts, after those of --prompt: one per line (`-`: standard input), or
    /// JSON lines / a JSON array (.jsonl, .json) of strings or of records with a "prompt" (or
    /// "text") field; with --instruction, "instruction" and an optional "input".
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub prompts: Option<PathBuf>,
    /// The prompts are instructions: wrap them in the template of `train --instructions`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub instruction: bool,
    /// Tokens to generate at most (fewer where the model ends the text, or has no more
    /// positions).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub max_new_tokens: usize,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub sampling: Sampling,
    /// End a continuation where this text appears, cut before it (repeatable; `\n`, `\t`
    /// and `\\` stand for a new line, a tab and a backslash).
    #[cfg_attr(feature = "cli", arg(long, value_name = "TEXT"))]
    pub stop: Vec<String>,
    /// Seed of the draws.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Continuations to generate from each prompt.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub samples: usize,
    /// Continuations generated together, as one batch (each token reads the weights once for
    /// all of them; each keeps its own keys and values; when one ends, the next one joins).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
    /// Write the continuations to FILE as JSON lines (prompt_index, sample, prompt,
    /// continuation, tokens, stop), in order, instead of printing them; FILE appears when all
    /// are written (until then, FILE.partial).
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub output: Option<PathBuf>,
    /// After the prompts given, read one from each line of standard input and continue it at
    /// once, the model loaded once (each line a prompt on its own, blank ones skipped; end
    /// with Ctrl-D).
    #[cfg_attr(feature = "cli", arg(long, conflicts_with_all = ["prompts", "output"]))]
    pub interactive: bool,
    /// Worker threads and the matrix-product library.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub cpu: crate::threads::CpuSettings,
}

impl GenerateSettings {
    /// The prompts asked for: those of `--prompt`, then those of `--prompts`; none given (and
    /// not `--interactive`), an empty one.
    pub fn prompts(&self) -> Result<Vec<Prompt>> {
        let mut prompts: Vec<Prompt> = self
            .prompt
            .iter()
            .map(|p| Prompt::new(p, self.instruction))
            .collect();
        if let Some(file) = &self.prompts {
            prompts.extend(read_prompts(file, self.instruction)?);
        }
        if prompts.is_empty() && !self.interactive {
            prompts.push(Prompt::new("", self.instruction));
        }
        Ok(prompts)
    }
}

/// Runs `frugal generate`: loads the model, reads every prompt, and generates `--samples`
/// continuations of each, `--batch-size` at a time. Without `--output` it writes each prompt
/// and its continuation to `out` (continuations apart by a line `---`), the first as it is
/// generated, the others in order as they end; with it, JSON lines to that file. A line per
/// continuation (or a count per reason to stop) and the speed go to standard error. With
/// `--interactive`, each line of standard input is then a prompt of its own.
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
    let prompts = settings.prompts()?;
    let decoding = Decoding {
        max_new: settings.max_new_tokens,
        sampling: settings.sampling,
        stops: StopTexts::new(
            settings
                .stop
                .iter()
                .map(|s| StopTexts::unescape(s))
                .collect(),
        )?,
        batch_size: settings.batch_size,
    };
    let generator = Generator::load(&settings.checkpoint, device)
        .with_context(|| format!("--checkpoint {}", settings.checkpoint.display()))?;
    let mut all = Vec::new();
    if !prompts.is_empty() {
        all = continue_prompts(&generator, settings, &decoding, &prompts, out)?;
    }
    if settings.interactive {
        let mut line = String::new();
        loop {
            eprint!("> ");
            line.clear();
            if std::io::stdin().read_line(&mut line)? == 0 {
                break;
            }
            let text = line.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            let prompt = [Prompt::new(text, settings.instruction)];
            // A prompt the model cannot read is reported; the next line is read.
            match continue_prompts(&generator, settings, &decoding, &prompt, out) {
                Ok(these) => all.extend(these),
                Err(e) => eprintln!("error: {e:#}"),
            }
        }
    }
    Ok(all)
}

/// Generates the continuations of `prompts` and writes them (see [`generate`]).
fn continue_prompts(
    generator: &Generator,
    settings: &GenerateSettings,
    decoding: &Decoding,
    prompts: &[Prompt],
    out: &mut impl std::io::Write,
) -> Result<Vec<Continuation>> {
    let name = |p: usize| match prompts.len() {
        1 => "the prompt".to_string(),
        _ => format!("prompt {}", p + 1),
    };
    let ids = prompts
        .iter()
        .enumerate()
        .map(|(p, prompt)| {
            let ids = generator.prompt_ids(prompt)?;
            generator.check_prompt(&ids).with_context(|| name(p))?;
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    // Continuation p · samples + s continues prompt p with stream s of the seed's generator:
    // a prompt's continuations are those of a run with that prompt alone.
    let samples = settings.samples;
    let rows: Vec<&[u32]> = ids
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.as_slice(), samples))
        .collect();
    let mut rngs: Vec<ChaCha8Rng> = (0..rows.len())
        .map(|r| {
            let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
            rng.set_stream((r % samples) as u64);
            rng
        })
        .collect();
    let shown: Vec<String> = prompts.iter().map(Prompt::shown).collect();
    let mut output = Output::new(settings.output.as_deref(), out, &shown, samples)?;
    let started = Instant::now();
    let all = generator.continue_each(&rows, &mut rngs, decoding, |event| output.event(event))?;
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    output.finish()?;
    report(&all, prompts.len(), samples, settings.batch_size, seconds);
    Ok(all)
}

/// Writes what was generated to standard error: a line per continuation (up to 32, else a
/// count per reason to stop), and the speed.
fn report(all: &[Continuation], prompts: usize, samples: usize, batch: usize, seconds: f64) {
    let tokens: usize = all.iter().map(|c| c.ids.len()).sum();
    let speed = format!(
        "{tokens} tokens in {seconds:.2}s ({:.1} tokens/s)",
        tokens as f64 / seconds
    );
    if let [one] = all {
        eprintln!("{speed}; stopped: {}", one.stop);
        return;
    }
    if all.len() <= 32 {
        for (r, c) in all.iter().enumerate() {
            let name = match (prompts, samples) {
                (1, _) => format!("sample {}", r + 1),
                (_, 1) => format!("prompt {}", r + 1),
                _ => format!("prompt {}, sample {}", r / samples + 1, r % samples + 1),
            };
            eprintln!("{name}: {} tokens; stopped: {}", c.ids.len(), c.stop);
        }
    } else {
        for stop in [
            Stop::EndOfText,
            Stop::StopText,
            Stop::MaxTokens,
            Stop::Positions,
        ] {
            let n = all.iter().filter(|c| c.stop == stop).count();
            if n > 0 {
                eprintln!("{n} stopped: {stop}");
            }
        }
    }
    let together = match batch {
        b if b >= all.len() => "together".to_string(),
        b => format!("{b} at a time"),
    };
    let what = match prompts {
        1 => format!("{} samples", all.len()),
        p => format!("{} continuations of {p} prompts,", all.len()),
    };
    eprintln!("{what} {together}: {speed}");
}
