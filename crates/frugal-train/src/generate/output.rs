//! Where `frugal generate` writes its continuations, in order: as text to a stream (the first
//! as it is generated), or as JSON lines to a file that appears once complete.

use super::{Continuation, Event};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes continuation r (of prompt r / samples) once every one before it is written.
pub(super) struct Output<'a, W: Write> {
    sink: Sink<'a, W>,
    /// Each prompt as shown.
    shown: &'a [String],
    samples: usize,
    /// Continuations that ended before one ahead of them.
    pending: BTreeMap<usize, Continuation>,
    written: usize,
}

/// One line of `--output`.
#[derive(serde::Serialize)]
struct Record<'a> {
    prompt_index: usize,
    sample: usize,
    prompt: &'a str,
    continuation: &'a str,
    tokens: usize,
    stop: &'static str,
}

enum Sink<'a, W: Write> {
    /// Text: each prompt and its continuation, apart by a line `---`.
    Text(&'a mut W),
    /// JSON lines written to `partial`, renamed to `path` when all are written.
    Json {
        file: BufWriter<File>,
        partial: PathBuf,
        path: PathBuf,
    },
}

impl<'a, W: Write> Output<'a, W> {
    /// Text to `out` unless `file` is given. Text starts with the first prompt at once.
    pub(super) fn new(
        file: Option<&Path>,
        out: &'a mut W,
        shown: &'a [String],
        samples: usize,
    ) -> Result<Self> {
        let sink = match file {
            None => {
                write!(out, "{}", shown.first().map_or("", String::as_str))?;
                out.flush()?;
                Sink::Text(out)
            }
            Some(path) => {
                let mut partial = path.as_os_str().to_owned();
                partial.push(".partial");
                let partial = PathBuf::from(partial);
                let file = File::create(&partial).with_context(|| {
                    format!(
                        "--output {}: cannot create {} (does its folder exist?)",
                        path.display(),
                        partial.display()
                    )
                })?;
                Sink::Json {
                    file: BufWriter::new(file),
                    partial,
                    path: path.to_path_buf(),
                }
            }
        };
        Ok(Output {
            sink,
            shown,
            samples,
            pending: BTreeMap::new(),
            written: 0,
        })
    }

    /// Writes what `event` brings that can be written now: the first continuation's pieces
    /// as text, and each ended continuation in its turn.
    pub(super) fn event(&mut self, event: Event<'_>) -> Result<()> {
        match event {
            Event::Piece(0, piece) => {
                if let Sink::Text(out) = &mut self.sink {
                    write!(out, "{piece}")?;
                    out.flush()?;
                }
            }
            Event::Piece(..) => {}
            Event::Done(r, continuation) => {
                self.pending.insert(r, continuation.clone());
                while let Some(c) = self.pending.remove(&self.written) {
                    self.write(self.written, &c)?;
                    self.written += 1;
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, r: usize, c: &Continuation) -> Result<()> {
        let (p, shown) = (r / self.samples, &self.shown[r / self.samples]);
        match &mut self.sink {
            // The first continuation streamed after its prompt.
            Sink::Text(out) if r == 0 => writeln!(out)?,
            Sink::Text(out) => {
                writeln!(out, "\n---\n{shown}{}", c.text)?;
                out.flush()?;
            }
            Sink::Json { file, partial, .. } => {
                let record = serde_json::to_string(&Record {
                    prompt_index: p,
                    sample: r % self.samples,
                    prompt: shown,
                    continuation: &c.text,
                    tokens: c.ids.len(),
                    stop: c.stop.name(),
                })?;
                writeln!(file, "{record}")
                    .with_context(|| format!("cannot write {}", partial.display()))?;
            }
        }
        Ok(())
    }

    /// Ends the output: flushes the text, or completes the file under its name.
    pub(super) fn finish(self) -> Result<()> {
        match self.sink {
            Sink::Text(out) => out.flush()?,
            Sink::Json {
                file,
                partial,
                path,
            } => {
                let file = file
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("cannot write {}", partial.display()))?;
                file.sync_all()
                    .with_context(|| format!("cannot write {}", partial.display()))?;
                std::fs::rename(&partial, &path).with_context(|| {
                    format!("cannot rename {} to {}", partial.display(), path.display())
                })?;
                eprintln!("continuations written to {}", path.display());
            }
        }
        Ok(())
    }
}
