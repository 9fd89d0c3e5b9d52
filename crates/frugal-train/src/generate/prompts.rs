//! The prompts of `frugal generate`: `--prompt` texts, and files of them (`--prompts`).

use crate::data::corpus::json_records;
use crate::data::instructions::{INPUT_KEYS, PROMPT_KEYS};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// What a continuation starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Text read as the start of a document (empty: a document from its start).
    Text(String),
    /// An instruction, with an optional input (empty when none), wrapped in the template of
    /// `train --instructions`.
    Instruction { instruction: String, input: String },
}

/// Fields a record's text to continue may have, in order of preference.
const TEXT_KEYS: &[&str] = &["prompt", "text", "instruction", "question"];

impl Prompt {
    /// The text printed before the prompt's continuation: the text, or the instruction (and its
    /// input on the next line).
    pub fn shown(&self) -> String {
        match self {
            Prompt::Text(text) => text.clone(),
            Prompt::Instruction { instruction, input } if input.is_empty() => instruction.clone(),
            Prompt::Instruction { instruction, input } => format!("{instruction}\n{input}"),
        }
    }

    /// `text` as a prompt: an instruction without input, or text to continue.
    pub fn new(text: &str, instruction: bool) -> Prompt {
        if instruction {
            Prompt::Instruction {
                instruction: text.to_string(),
                input: String::new(),
            }
        } else {
            Prompt::Text(text.to_string())
        }
    }
}

/// The prompts of a file: records of a JSON array or of JSON lines (`.json`, `.jsonl`), or one
/// prompt per line of text (any other name, and `-`, standard input; blank lines skipped). A
/// record is a JSON string, or an object whose text is its `prompt` (or `text`,
/// `instruction`, `question`) field; as instructions, its `instruction` (or `prompt`,
/// `question`) and optional `input` (or `context`).
pub fn read_prompts(path: &Path, instruction: bool) -> Result<Vec<Prompt>> {
    let label = path.display().to_string();
    let bytes = if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read --prompts - (standard input)")?;
        bytes
    } else {
        std::fs::read(path).with_context(|| format!("cannot read --prompts {label}"))?
    };
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| anyhow::anyhow!("--prompts {label} is not valid UTF-8: {e}"))?;
    let name = label.to_ascii_lowercase();
    let prompts = if name.ends_with(".jsonl") || name.ends_with(".json") {
        json_records(&label, text, 0, |v, place| {
            record(v, instruction, &label, place)
        })?
    } else {
        text.lines()
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .filter(|l| !l.trim().is_empty())
            .map(|l| Prompt::new(l, instruction))
            .collect()
    };
    if prompts.is_empty() {
        bail!("--prompts {label} holds no prompt: give one per line, or JSON records with a \"prompt\" field");
    }
    Ok(prompts)
}

/// The prompt of one JSON record (or of a JSON string).
fn record(v: &serde_json::Value, instruction: bool, label: &str, place: &str) -> Result<Prompt> {
    if let Some(text) = v.as_str() {
        return Ok(Prompt::new(text, instruction));
    }
    let field = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str()))
            .map(str::to_string)
    };
    let keys = if instruction { PROMPT_KEYS } else { TEXT_KEYS };
    let Some(text) = field(keys) else {
        bail!(
            "{label}{place}: a prompt record needs a string field {}",
            keys.join(" / ")
        );
    };
    let input = field(INPUT_KEYS).unwrap_or_default();
    match (instruction, input.is_empty()) {
        (true, _) => Ok(Prompt::Instruction {
            instruction: text,
            input,
        }),
        (false, true) => Ok(Prompt::Text(text)),
        (false, false) => bail!(
            "{label}{place}: the record has an input ({}), which only instructions read: add --instruction",
            INPUT_KEYS.join(" / ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch folder of this test process, removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("frugal-prompts-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn lines_and_records_become_prompts() {
        let scratch = Scratch::new("read");
        let txt = scratch.file("p.txt", "The whale\r\n\n  \nCall me Ishmael.\n");
        assert_eq!(
            read_prompts(&txt, false).unwrap(),
            [
                Prompt::Text("The whale".into()),
                Prompt::Text("Call me Ishmael.".into())
            ]
        );
        let records = "{\"prompt\": \"a\\nb\"}\n\n{\"text\": \"c\", \"id\": 4}\n";
        let jsonl = scratch.file("p.jsonl", records);
        assert_eq!(
            read_prompts(&jsonl, false).unwrap(),
            [Prompt::Text("a\nb".into()), Prompt::Text("c".into())]
        );
        let records = r#"[{"instruction": "Add.", "input": "2 and 3", "output": "5"}, "Why?"]"#;
        let json = scratch.file("p.json", records);
        let prompts = read_prompts(&json, true).unwrap();
        assert_eq!(
            prompts,
            [
                Prompt::Instruction {
                    instruction: "Add.".into(),
                    input: "2 and 3".into()
                },
                Prompt::new("Why?", true)
            ]
        );
        assert_eq!(prompts[0].shown(), "Add.\n2 and 3");
        assert_eq!(prompts[1].shown(), "Why?");
    }

    #[test]
    fn bad_prompt_files_are_named() {
        let scratch = Scratch::new("bad");
        let empty = scratch.file("p.txt", "\n \n");
        let err = read_prompts(&empty, false).unwrap_err().to_string();
        assert!(err.contains("holds no prompt"), "{err}");
        let nameless = scratch.file("p.jsonl", "{\"prompt\": \"a\"}\n{\"title\": \"b\"}\n");
        let err = read_prompts(&nameless, false).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("prompt / text"),
            "{err}"
        );
        let input = scratch.file("p.jsonl", "{\"instruction\": \"a\", \"input\": \"b\"}\n");
        let err = read_prompts(&input, false).unwrap_err().to_string();
        assert!(err.contains("add --instruction"), "{err}");
        let bad = scratch.file("p.jsonl", "{\"prompt\": \"a\"\n");
        let err = read_prompts(&bad, false).unwrap_err().to_string();
        assert!(err.contains("line 1: not valid JSON"), "{err}");
        let err = read_prompts(Path::new("/nonexistent/p.txt"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read --prompts /nonexistent/p.txt"),
            "{err}"
        );
    }
}
