//! Labelled text for classification: reading CSV / TSV / JSONL files or a folder of one
//! subfolder per class, choosing the classes, subsampling and splitting by a hash of the text.

use crate::data::shard::{fnv1a, FNV_OFFSET};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// One labelled input: a text, or a pair of texts.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text: String,
    pub pair: Option<String>,
    /// Its label (empty where the columns name none).
    pub label: String,
}

/// The columns of a task file that hold the inputs, as the command line names them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TextColumns {
    /// Column (or JSON field) with the text.
    #[cfg_attr(feature = "cli", arg(long, default_value = "text"))]
    pub text_column: String,
    /// Column with the second text of sentence pairs.
    #[cfg_attr(feature = "cli", arg(long))]
    pub text_pair_column: Option<String>,
}

impl Default for TextColumns {
    fn default() -> Self {
        TextColumns {
            text_column: "text".into(),
            text_pair_column: None,
        }
    }
}

impl TextColumns {
    /// These columns, with the labels in `label` (none: unlabelled inputs).
    pub fn with_label<'a>(&'a self, label: Option<&'a str>) -> Columns<'a> {
        Columns {
            text: &self.text_column,
            pair: self.text_pair_column.as_deref(),
            label,
        }
    }
}

/// The columns (or JSON fields) that hold the text, the optional second text and the label
/// (none: unlabelled inputs).
#[derive(Clone, Debug)]
pub struct Columns<'a> {
    pub text: &'a str,
    pub pair: Option<&'a str>,
    pub label: Option<&'a str>,
}

/// Reads every example of `path`: a `.csv`, `.tsv` or `.jsonl` file with a header / fields named
/// by `columns`, or a folder whose subfolders are the classes and whose files are the texts.
pub fn read_examples(path: &Path, columns: &Columns) -> Result<Vec<Example>> {
    if path.is_dir() {
        return read_folder(path);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "csv" => read_delimited(path, b',', columns),
        "tsv" => read_delimited(path, b'\t', columns),
        "jsonl" | "json" => read_jsonl(path, columns),
        _ => bail!(
            "{}: not a task file frugal reads; use .csv, .tsv, .jsonl, or a folder with one subfolder of text files per class",
            path.display()
        ),
    }
}

fn read_folder(dir: &Path) -> Result<Vec<Example>> {
    let mut classes: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for class in classes {
        let label = class
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let mut files: Vec<_> = std::fs::read_dir(&class)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            let bytes =
                std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
            out.push(Example {
                text: String::from_utf8_lossy(&bytes).trim().to_string(),
                pair: None,
                label: label.clone(),
            });
        }
    }
    if out.is_empty() {
        bail!(
            "{} holds no texts: a task folder has one subfolder per class, each with text files",
            dir.display()
        );
    }
    Ok(out)
}

fn read_delimited(path: &Path, delimiter: u8, columns: &Columns) -> Result<Vec<Example>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(false)
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let header = reader
        .byte_headers()
        .with_context(|| format!("{}: cannot read the header row", path.display()))?
        .clone();
    let find = |name: &str, flag: &str| -> Result<usize> {
        header
            .iter()
            .position(|h| h == name.as_bytes())
            .with_context(|| {
                format!(
                    "{}: no column `{name}` ({flag}); the columns are {}",
                    path.display(),
                    header
                        .iter()
                        .map(String::from_utf8_lossy)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    };
    let text = find(columns.text, "--text-column")?;
    let pair = columns
        .pair
        .map(|p| find(p, "--text-pair-column"))
        .transpose()?;
    let label = columns
        .label
        .map(|l| find(l, "--label-column"))
        .transpose()?;
    let mut out = Vec::new();
    // Bytes that are not UTF-8 (common in scraped text) become U+FFFD rather than an error.
    for (i, record) in reader.byte_records().enumerate() {
        let record = record.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        let field =
            |c: usize| String::from_utf8_lossy(record.get(c).unwrap_or_default()).to_string();
        out.push(Example {
            text: field(text),
            pair: pair.map(field),
            label: label.map(field).unwrap_or_default().trim().to_string(),
        });
    }
    Ok(out)
}

fn read_jsonl(path: &Path, columns: &Columns) -> Result<Vec<Example>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        let field = |name: &str, flag: &str| -> Result<String> {
            match value.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    Ok(v.to_string())
                }
                _ => bail!(
                    "{}: line {} has no text or number field `{name}` ({flag})",
                    path.display(),
                    i + 1
                ),
            }
        };
        out.push(Example {
            text: field(columns.text, "--text-column")?,
            pair: columns
                .pair
                .map(|p| field(p, "--text-pair-column"))
                .transpose()?,
            label: match columns.label {
                Some(l) => field(l, "--label-column")?.trim().to_string(),
                None => String::new(),
            },
        });
    }
    Ok(out)
}

/// A stable, well-mixed 64-bit hash of an example's text (and pair).
fn text_hash(e: &Example) -> u64 {
    let mut h = fnv1a(FNV_OFFSET, e.text.as_bytes());
    if let Some(p) = &e.pair {
        h = fnv1a(fnv1a(h, &[0x1f]), p.as_bytes());
    }
    mix(h)
}

/// The splitmix64 finaliser: every input bit moves every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// How a task is cut from the examples.
#[derive(Clone, Debug)]
pub struct TaskChoice<'a> {
    /// The classes to keep, in class-id order; the others' examples are dropped. Empty: every
    /// label, sorted.
    pub labels: &'a [String],
    /// Keep at most this many examples (those with the smallest hash: a subsample that does not
    /// depend on the file's order).
    pub max_examples: Option<usize>,
    pub val_fraction: f64,
    pub test_fraction: f64,
}

/// A classification task: its classes and the three splits, labels as class ids.
#[derive(Clone, Debug)]
pub struct Task {
    pub classes: Vec<String>,
    pub train: Vec<(Example, u32)>,
    pub val: Vec<(Example, u32)>,
    pub test: Vec<(Example, u32)>,
    /// Examples dropped because their label is not among the chosen classes.
    pub dropped: usize,
    /// Examples left out by `max_examples`.
    pub subsampled_out: usize,
}

impl Task {
    /// Cuts the task. Every example with the same text (and pair) lands in the same split, so a
    /// duplicate can never be both trained on and tested on.
    pub fn new(examples: Vec<Example>, choice: &TaskChoice) -> Result<Self> {
        let (v, t) = (choice.val_fraction, choice.test_fraction);
        if !(0.0..1.0).contains(&v) || !(0.0..1.0).contains(&t) || v + t >= 1.0 {
            bail!("--val-fraction {v} and --test-fraction {t} must each be in [0, 1) and leave examples for training");
        }
        if let Some(e) = examples.iter().find(|e| e.label.is_empty()) {
            bail!(
                "an example has an empty label (text `{}`); fix the label column",
                preview(&e.text)
            );
        }
        let classes: Vec<String> = if choice.labels.is_empty() {
            let mut all: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
            all.sort();
            all.dedup();
            all
        } else {
            choice.labels.to_vec()
        };
        if classes.len() < 2 {
            bail!(
                "the label column has {} class{} ({}); classification needs at least 2",
                classes.len(),
                if classes.len() == 1 { "" } else { "es" },
                classes.join(", ")
            );
        }
        let id: BTreeMap<&str, u32> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i as u32))
            .collect();
        let total = examples.len();
        let mut kept: Vec<(u64, Example, u32)> = examples
            .into_iter()
            .filter_map(|e| id.get(e.label.as_str()).map(|&c| (text_hash(&e), e, c)))
            .collect();
        let dropped = total - kept.len();
        if let Some(missing) = classes
            .iter()
            .find(|c| !kept.iter().any(|(_, e, _)| &e.label == *c))
        {
            bail!("--labels names `{missing}`, which no example has");
        }
        let mut subsampled_out = 0;
        if let Some(n) = choice.max_examples {
            if n < kept.len() {
                // A second hash, so that the subsample and the split are independent.
                kept.sort_by_key(|(h, _, _)| (mix(h ^ 0x5851f42d4c957f2d), *h));
                subsampled_out = kept.len() - n;
                kept.truncate(n);
            }
        }
        let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
        for (h, e, c) in kept {
            let u = (h >> 11) as f64 / (1u64 << 53) as f64;
            let split = if u < t {
                &mut test
            } else if u < t + v {
                &mut val
            } else {
                &mut train
            };
            split.push((e, c));
        }
        for (i, class) in classes.iter().enumerate() {
            if !train.iter().any(|(_, c)| *c == i as u32) {
                bail!(
                    "class `{class}` has no training example (only in the held-out splits); drop it with --labels or give more data"
                );
            }
        }
        if train.is_empty() || (v > 0.0 && val.is_empty()) {
            bail!("too few examples ({total}) to fill the training and validation splits");
        }
        Ok(Task {
            classes,
            train,
            val,
            test,
            dropped,
            subsampled_out,
        })
    }
}

fn preview(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(text: &str, label: &str) -> Example {
        Example {
            text: text.into(),
            pair: None,
            label: label.into(),
        }
    }

    fn choice(labels: &[String]) -> TaskChoice<'_> {
        TaskChoice {
            labels,
            max_examples: None,
            val_fraction: 0.2,
            test_fraction: 0.2,
        }
    }

    #[test]
    fn splits_follow_the_text_keep_duplicates_together_and_ignore_the_order() {
        let mut examples: Vec<Example> = (0..2000)
            .map(|i| ex(&format!("text {i}"), if i % 3 == 0 { "a" } else { "b" }))
            .collect();
        examples.extend((0..50).map(|_| ex("the same text", "a")));
        let task = Task::new(examples.clone(), &choice(&[])).unwrap();
        assert_eq!(task.classes, ["a", "b"]);
        let n = [task.train.len(), task.val.len(), task.test.len()];
        assert_eq!(n.iter().sum::<usize>(), 2050);
        // About 60 / 20 / 20 (the 50 duplicates move together).
        assert!(
            (1100..1350).contains(&n[0])
                && (300..500).contains(&n[1])
                && (300..500).contains(&n[2]),
            "{n:?}"
        );
        let holding = [&task.train, &task.val, &task.test]
            .iter()
            .filter(|s| s.iter().any(|(e, _)| e.text == "the same text"))
            .count();
        assert_eq!(holding, 1);
        examples.reverse();
        let again = Task::new(examples, &choice(&[])).unwrap();
        let texts = |s: &[(Example, u32)]| {
            let mut t: Vec<String> = s.iter().map(|(e, _)| e.text.clone()).collect();
            t.sort();
            t
        };
        assert_eq!(texts(&task.test), texts(&again.test));
    }

    #[test]
    fn chosen_labels_drop_the_rest_and_the_subsample_is_by_hash() {
        let examples: Vec<Example> = (0..900)
            .map(|i| ex(&format!("t{i}"), ["neg", "neu", "pos"][i % 3]))
            .collect();
        let labels = vec!["pos".to_string(), "neg".to_string()];
        let mut c = choice(&labels);
        c.max_examples = Some(300);
        let task = Task::new(examples.clone(), &c).unwrap();
        assert_eq!(task.classes, ["pos", "neg"]);
        assert_eq!((task.dropped, task.subsampled_out), (300, 300));
        assert!(task
            .train
            .iter()
            .all(|(e, c)| (e.label == "pos") == (*c == 0)));
        // Both classes survive the subsample in about their share (a positional cut would not).
        let pos = task
            .train
            .iter()
            .chain(&task.val)
            .chain(&task.test)
            .filter(|(_, c)| *c == 0)
            .count();
        assert!((110..190).contains(&pos), "{pos}");
    }

    #[test]
    fn one_class_missing_labels_and_empty_labels_are_errors() {
        let one: Vec<Example> = (0..50).map(|i| ex(&format!("t{i}"), "x")).collect();
        let err = Task::new(one, &choice(&[])).unwrap_err().to_string();
        assert!(err.contains("1 class (x)"), "{err}");
        let two: Vec<Example> = (0..50)
            .map(|i| ex(&format!("t{i}"), ["x", "y"][i % 2]))
            .collect();
        let labels = vec!["x".to_string(), "z".to_string()];
        let err = Task::new(two.clone(), &choice(&labels))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`z`, which no example has"), "{err}");
        let mut blank = two;
        blank[3].label.clear();
        assert!(Task::new(blank, &choice(&[]))
            .unwrap_err()
            .to_string()
            .contains("empty label"));
    }

    #[test]
    fn files_of_every_format_read_the_same_examples() {
        let dir = std::env::temp_dir().join(format!("frugal-task-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("folder/pos")).unwrap();
        std::fs::create_dir_all(dir.join("folder/neg")).unwrap();
        std::fs::write(
            dir.join("t.csv"),
            "label,text,other\npos,\"good, very\",1\nneg,bad,2\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("t.tsv"),
            "label\ttext\tother\npos\tgood, very\t1\nneg\tbad\t2\n",
        )
        .unwrap();
        std::fs::write(dir.join("t.jsonl"), "{\"label\": \"pos\", \"text\": \"good, very\"}\n\n{\"label\": \"neg\", \"text\": \"bad\"}\n").unwrap();
        std::fs::write(dir.join("folder/pos/1.txt"), "good, very\n").unwrap();
        std::fs::write(dir.join("folder/neg/1.txt"), "bad").unwrap();
        let cols = Columns {
            text: "text",
            pair: None,
            label: Some("label"),
        };
        let want = vec![ex("good, very", "pos"), ex("bad", "neg")];
        for f in ["t.csv", "t.tsv", "t.jsonl"] {
            assert_eq!(read_examples(&dir.join(f), &cols).unwrap(), want, "{f}");
        }
        // Without a label column: the texts, unlabelled.
        let unlabelled = Columns {
            label: None,
            ..cols.clone()
        };
        for f in ["t.csv", "t.jsonl"] {
            let read = read_examples(&dir.join(f), &unlabelled).unwrap();
            let texts: Vec<_> = read
                .iter()
                .map(|e| (e.text.as_str(), e.label.as_str()))
                .collect();
            assert_eq!(texts, [("good, very", ""), ("bad", "")], "{f}");
        }
        let mut folder = read_examples(&dir.join("folder"), &cols).unwrap();
        folder.reverse(); // classes in sorted order: neg, pos
        assert_eq!(folder, want);
        let bad = Columns {
            label: Some("sentiment"),
            ..cols.clone()
        };
        let err = read_examples(&dir.join("t.csv"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "no column `sentiment` (--label-column); the columns are label, text, other"
            ),
            "{err}"
        );
        let err = read_examples(&dir.join("t.jsonl"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1 has no text or number field `sentiment`"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
