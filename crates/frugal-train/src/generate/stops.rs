//! Stop texts: a continuation ends where one of them appears, cut before it.

use anyhow::{bail, Result};

/// Texts that end a continuation where they appear (`--stop`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopTexts(Vec<String>);

impl StopTexts {
    /// The stop texts; an empty one is refused.
    pub fn new(texts: Vec<String>) -> Result<Self> {
        if texts.iter().any(String::is_empty) {
            bail!("--stop \"\" would end every continuation at once: give a non-empty text");
        }
        Ok(StopTexts(texts))
    }

    /// A stop text as written on the command line: `\n`, `\t` and `\\` stand for a new line,
    /// a tab and a backslash.
    pub fn unescape(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match (c, chars.clone().next()) {
                ('\\', Some(e @ ('n' | 't' | '\\'))) => {
                    chars.next();
                    out.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        _ => '\\',
                    });
                }
                _ => out.push(c),
            }
        }
        out
    }

    /// True without stop texts.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where the first stop text in `text` starts.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.0.iter().filter_map(|s| text.find(s.as_str())).min()
    }

    /// Bytes at the end of `text` that could be the start of a stop text: text that is held
    /// back until the next tokens show whether it is one.
    pub fn held(&self, text: &str) -> usize {
        self.0
            .iter()
            .filter_map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_texts_are_found_and_their_starts_held_back() {
        let stops = StopTexts::new(vec!["\n\n".into(), "###".into(), "é!".into()]).unwrap();
        assert_eq!(stops.find("one\n\ntwo ### three"), Some(3));
        assert_eq!(stops.find("a ### b\n\n"), Some(2));
        assert_eq!(stops.find("no stop here\n"), None);
        // A text ending in the start of a stop text holds that start back.
        assert_eq!(stops.held("line\n"), 1);
        assert_eq!(stops.held("so ##"), 2);
        assert_eq!(stops.held("café"), "é".len());
        assert_eq!(stops.held("plain"), 0);
        assert!(!stops.is_empty());
        assert!(StopTexts::default().is_empty());
        let err = StopTexts::new(vec![String::new()]).unwrap_err().to_string();
        assert!(err.contains("--stop"), "{err}");
    }

    #[test]
    fn escapes_stand_for_new_lines_tabs_and_backslashes() {
        assert_eq!(StopTexts::unescape(r"a\n\nb"), "a\n\nb");
        assert_eq!(StopTexts::unescape(r"\t|\\n|\x"), "\t|\\n|\\x");
        assert_eq!(StopTexts::unescape(r"end\"), "end\\");
    }
}
