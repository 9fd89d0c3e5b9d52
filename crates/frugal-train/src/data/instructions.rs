//! Instruction data: JSONL records of an instruction (with an optional input) and its
//! response. Each record becomes one sequence, the prompt then the response and the
//! end-of-text token, laid out in a token stream at a stride of one window so that the
//! [`super::Batches`] windows are the sequences; the prompt and the padding are marked
//! [`NOT_PREDICTED`], so only the response tokens count in the loss.

use super::TextTokenizer;
use anyhow::{bail, Result};

/// Set on a token of an instruction stream that is an input only, never a target (prompt,
/// padding, the first token of each sequence). Token ids stay below it.
pub const NOT_PREDICTED: u32 = 1 << 31;

/// An instruction and its response.
#[derive(Clone, Debug, PartialEq)]
pub struct Instruction {
    pub instruction: String,
    /// Context for the instruction (empty when none).
    pub input: String,
    pub response: String,
}

pub(crate) const PROMPT_KEYS: &[&str] = &["instruction", "prompt", "question"];
pub(crate) const INPUT_KEYS: &[&str] = &["input", "context"];
const RESPONSE_KEYS: &[&str] = &["output", "response", "completion", "answer"];

impl Instruction {
    /// The text the model reads before the response (the Alpaca template).
    pub fn prompt(&self) -> String {
        if self.input.is_empty() {
            format!("### Instruction:\n{}\n\n### Response:\n", self.instruction)
        } else {
            format!(
                "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n",
                self.instruction, self.input
            )
        }
    }

    /// Prompt and response as one text (for training a tokenizer).
    pub fn text(&self) -> String {
        self.prompt() + &self.response
    }
}

/// The instructions of one JSONL file (or JSON array): each record has `instruction`
/// (or `prompt`, `question`), optionally `input` (or `context`), and `output` (or `response`,
/// `completion`, `answer`).
pub fn instructions(label: &str, bytes: &[u8]) -> Result<Vec<Instruction>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("data file {label} is not valid UTF-8: {e}"))?;
    let record = |v: &serde_json::Value, place: &str| -> Result<Instruction> {
        let field = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| v.get(*k).and_then(|x| x.as_str()))
                .map(str::to_string)
        };
        match (field(PROMPT_KEYS), field(RESPONSE_KEYS)) {
            (Some(instruction), Some(response)) => Ok(Instruction {
                instruction,
                input: field(INPUT_KEYS).unwrap_or_default(),
                response,
            }),
            _ => bail!(
                "{label}{place}: an instruction record needs a string field {} and a string field {} (and may have {})",
                PROMPT_KEYS.join(" / "),
                RESPONSE_KEYS.join(" / "),
                INPUT_KEYS.join(" / ")
            ),
        }
    };
    if label.ends_with(".txt") {
        bail!("{label}: --instructions reads .jsonl or .json records, not text");
    }
    super::corpus::json_records(label, text, 0, record)
}

/// An instruction split as a token stream, and what did not fit.
#[derive(Debug, Default, PartialEq)]
pub struct Encoded {
    /// One window of `seq_len` tokens per kept record, then one closing token.
    pub tokens: Vec<u32>,
    /// Records whose response was cut to fit the window.
    pub truncated: usize,
    /// Records left out because their prompt fills the whole window.
    pub dropped: usize,
}

/// Lays out `records` as windows of `seq_len` tokens: prompt (with the tokenizer's special
/// tokens), response, end-of-text, padding.
pub fn encode(tok: &TextTokenizer, records: &[Instruction], seq_len: usize) -> Result<Encoded> {
    let ids = |text: String, special: bool| -> Result<Vec<u32>> {
        Ok(tok
            .inner
            .encode(text, special)
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?
            .get_ids()
            .to_vec())
    };
    let mut out = Encoded::default();
    for r in records {
        let prompt = ids(r.prompt(), true)?;
        let mut response = ids(r.response.clone(), false)?;
        response.push(tok.eos);
        if prompt.len() >= seq_len {
            out.dropped += 1;
            continue;
        }
        if prompt.len() + response.len() > seq_len {
            out.truncated += 1;
            response.truncate(seq_len - prompt.len());
        }
        if let Some(&big) = prompt
            .iter()
            .chain(&response)
            .find(|&&t| t >= NOT_PREDICTED)
        {
            bail!("token id {big} is too large for an instruction stream");
        }
        let start = out.tokens.len();
        out.tokens.extend(prompt.iter().map(|t| t | NOT_PREDICTED));
        out.tokens.extend(&response);
        // The first token of a sequence is never a target (its window's last target is the
        // next sequence's first token).
        out.tokens[start] |= NOT_PREDICTED;
        out.tokens.resize(start + seq_len, tok.eos | NOT_PREDICTED);
    }
    out.tokens.push(tok.eos | NOT_PREDICTED);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_every_field_name_and_bad_ones_are_named() {
        let jsonl = b"{\"instruction\": \"Add\", \"input\": \"2 2\", \"output\": \"4\"}\n\n{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n";
        let r = instructions("a.jsonl", jsonl).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0].prompt(),
            "### Instruction:\nAdd\n\n### Input:\n2 2\n\n### Response:\n"
        );
        assert_eq!(r[1].text(), "### Instruction:\nHi\n\n### Response:\nHello");
        let err = instructions("a.jsonl", b"{\"prompt\": \"Hi\"}\n").unwrap_err();
        assert!(err.to_string().contains("a.jsonl line 1") && err.to_string().contains("output"));
        assert!(instructions("a.txt", b"text").is_err());
    }

    #[test]
    fn only_responses_are_predicted_and_long_records_are_cut_or_dropped() {
        let docs: Vec<String> = (0..40)
            .map(|i| format!("### Instruction:\nsay {i}\n\n### Response:\nthe number {i}"))
            .collect();
        let tok = TextTokenizer::train(docs.iter(), 300).unwrap();
        let rec = |instruction: &str, response: &str| Instruction {
            instruction: instruction.into(),
            input: String::new(),
            response: response.into(),
        };
        let records = [
            rec("say 1", "the number 1"),
            rec(
                "say 2",
                "the number 2 the number 2 the number 2 the number 2",
            ),
            rec(&"say 3 ".repeat(20), "x"),
        ];
        let t = 24;
        let e = encode(&tok, &records, t).unwrap();
        assert_eq!((e.truncated, e.dropped), (1, 1));
        assert_eq!(e.tokens.len(), 2 * t + 1);
        let prompt_len = tok
            .inner
            .encode(records[0].prompt(), true)
            .unwrap()
            .get_ids()
            .len();
        let response = tok.inner.encode("the number 1", false).unwrap();
        let first = &e.tokens[..t];
        // The prompt is marked, the response and its end-of-text are not, the padding is.
        assert!(first[..prompt_len].iter().all(|&x| x & NOT_PREDICTED != 0));
        let n = response.get_ids().len();
        assert_eq!(&first[prompt_len..prompt_len + n], response.get_ids());
        assert_eq!(first[prompt_len + n], tok.eos);
        assert!(first[prompt_len + n + 1..]
            .iter()
            .all(|&x| x == tok.eos | NOT_PREDICTED));
        // As batches: the inputs carry no marks; the targets of the prompt and the padding are
        // ignored, the response's and its end-of-text are not.
        let path = std::env::temp_dir().join(format!("frugal-instr-{}.bin", std::process::id()));
        crate::data::shard::TokenShard::write(&path, &e.tokens).unwrap();
        let shard = crate::data::shard::TokenShard::open(&path).unwrap();
        let batches =
            crate::data::Batches::new(&shard, t, 0, "test", &candle_core::Device::Cpu).unwrap();
        let (x, y) = batches.sequential(0, 1).unwrap();
        let (x, y) = (x.to_vec2::<u32>().unwrap(), y.to_vec2::<u32>().unwrap());
        assert!(x[0].iter().all(|&i| i < NOT_PREDICTED));
        let predicted: Vec<usize> = (0..t)
            .filter(|&j| y[0][j] != frugal_nn::ops::IGNORE)
            .collect();
        assert_eq!(
            predicted,
            (prompt_len - 1..prompt_len + n).collect::<Vec<_>>()
        );
        assert_eq!(
            &y[0][prompt_len - 1..prompt_len - 1 + n],
            response.get_ids()
        );
        std::fs::remove_file(&path).ok();
        // The cut record fills its window and ends without its end-of-text.
        assert!(e.tokens[t..2 * t]
            .iter()
            .all(|&x| x & !NOT_PREDICTED != tok.eos));
    }
}
