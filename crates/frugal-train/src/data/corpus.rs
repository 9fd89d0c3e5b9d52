//! Reading documents from text corpora: `.txt` (paragraphs separated by blank lines), `.jsonl` /
//! `.json` (one JSON object per line with a `text` field, like C4's shards, or a JSON array of
//! such objects), each optionally gzip-compressed; a file or a directory tree of them.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The corpus shipped inside the binary: Moby-Dick (public domain), one chapter per line.
pub const EMBEDDED_NAME: &str = "embedded:moby-dick";
const EMBEDDED: &str = include_str!("../../../../data/embedded/moby-dick.jsonl");

/// A corpus source: the embedded corpus or files on disk.
#[derive(Clone, Debug)]
pub enum Source {
    Embedded,
    Files(Vec<PathBuf>),
}

const EXTENSIONS: &[&str] = &[
    ".txt",
    ".jsonl",
    ".json",
    ".txt.gz",
    ".jsonl.gz",
    ".json.gz",
];

fn is_corpus_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    EXTENSIONS.iter().any(|e| name.ends_with(e))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_corpus_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl Source {
    /// Resolves `--data`: the embedded corpus name, a file, or a directory.
    pub fn resolve(data: &str) -> Result<Self> {
        if data == EMBEDDED_NAME {
            return Ok(Source::Embedded);
        }
        let path = Path::new(data);
        if !path.exists() {
            bail!(
                "data path {} does not exist (use a file, a directory, or `{EMBEDDED_NAME}`)",
                path.display()
            );
        }
        let mut files = Vec::new();
        if path.is_dir() {
            walk(path, &mut files)?;
            if files.is_empty() {
                bail!(
                    "directory {} holds no corpus files ({})",
                    path.display(),
                    EXTENSIONS.join(", ")
                );
            }
        } else {
            if !is_corpus_file(path) {
                bail!(
                    "data file {} is not one of {}",
                    path.display(),
                    EXTENSIONS.join(", ")
                );
            }
            files.push(path.to_path_buf());
        }
        Ok(Source::Files(files))
    }

    /// The raw bytes of every file, in order, with a label for messages.
    pub fn contents(&self) -> Result<Vec<(String, Vec<u8>)>> {
        (0..self.file_count()).map(|i| self.file(i)).collect()
    }

    /// Number of files.
    pub fn file_count(&self) -> usize {
        match self {
            Source::Embedded => 1,
            Source::Files(files) => files.len(),
        }
    }

    /// The raw bytes of file `i` (decompressed), with a label for messages.
    pub fn file(&self, i: usize) -> Result<(String, Vec<u8>)> {
        let mut file = self.open(i)?;
        let mut bytes = Vec::new();
        file.read_more(&mut bytes, usize::MAX)?;
        Ok((file.label, bytes))
    }

    /// File `i`, open for reading (decompressed).
    fn open(&self, i: usize) -> Result<OpenFile> {
        let p = match self {
            Source::Embedded => {
                return Ok(OpenFile {
                    label: format!("{EMBEDDED_NAME}.jsonl"),
                    path: None,
                    reader: Box::new(EMBEDDED.as_bytes()),
                })
            }
            Source::Files(files) => &files[i],
        };
        let file = std::fs::File::open(p)
            .with_context(|| format!("cannot read data file {}", p.display()))?;
        let file = std::io::BufReader::new(file);
        let gz = p.to_string_lossy().ends_with(".gz");
        Ok(OpenFile {
            label: p.display().to_string().trim_end_matches(".gz").to_string(),
            path: Some((p.clone(), gz)),
            reader: match gz {
                true => Box::new(flate2::read::MultiGzDecoder::new(file)),
                false => Box::new(file),
            },
        })
    }
}

/// A corpus file open for reading.
struct OpenFile {
    /// The file's name in messages (without `.gz`).
    label: String,
    /// The file on disk, and whether it is gzip-compressed (none: the embedded corpus).
    path: Option<(PathBuf, bool)>,
    reader: Box<dyn Read + Send>,
}

impl OpenFile {
    /// Appends up to `n` more bytes to `buf`; false once the file has ended.
    fn read_more(&mut self, buf: &mut Vec<u8>, n: usize) -> Result<bool> {
        let before = buf.len();
        let read = (&mut self.reader).take(n as u64).read_to_end(buf);
        read.with_context(|| match &self.path {
            Some((p, true)) => format!("data file {} is not valid gzip", p.display()),
            Some((p, false)) => format!("cannot read data file {}", p.display()),
            None => "cannot read the embedded corpus".into(),
        })?;
        Ok(n > 0 && buf.len() - before == n)
    }
}

/// Splits one file's contents into documents.
pub fn documents(label: &str, bytes: &[u8]) -> Result<Vec<String>> {
    documents_at(label, bytes, Place::default())
}

/// Where a piece of a file starts, for messages: lines and bytes before it.
#[derive(Clone, Copy, Debug, Default)]
struct Place {
    line: usize,
    byte: usize,
}

/// Splits a piece of a file (its contents from `place`, cut at a document boundary) into
/// documents.
fn documents_at(label: &str, bytes: &[u8], place: Place) -> Result<Vec<String>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        anyhow::anyhow!(
            "data file {label} is not valid UTF-8 (line {}, byte {}); convert it to UTF-8",
            place.line + line,
            place.byte + e.valid_up_to()
        )
    })?;
    if label.ends_with(".txt") {
        return Ok(text
            .replace("\r\n", "\n")
            .split("\n\n")
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect());
    }
    let field = |v: &serde_json::Value, place: &str| -> Result<String> {
        match v.get("text") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            _ => bail!("{label}{place}: expected a JSON object with a string field `text`"),
        }
    };
    let docs = json_records(label, text, place.line, field)?;
    Ok(docs.into_iter().filter(|d| !d.trim().is_empty()).collect())
}

/// The records of a JSON array or of JSON lines (blank lines skipped), each read by `record`
/// with its place in the file (` item 3`, ` line 4`; `text` starts after `first_line` lines)
/// for messages.
pub fn json_records<T>(
    label: &str,
    text: &str,
    first_line: usize,
    record: impl Fn(&serde_json::Value, &str) -> Result<T>,
) -> Result<Vec<T>> {
    if first_line == 0 && text.trim_start().starts_with('[') {
        let items: Vec<serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("{label} is not a valid JSON array: {e}"))?;
        return items
            .iter()
            .enumerate()
            .map(|(i, v)| record(v, &format!(" item {i}")))
            .collect();
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line = first_line + i + 1;
            let v: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| anyhow::anyhow!("{label} line {line}: not valid JSON ({e})"))?;
            record(&v, &format!(" line {line}"))
        })
        .collect()
}

/// Where document `index` falls in [0, 1): a fixed, well-mixed position independent of the
/// content (SplitMix64 of the index), so that splits are deterministic.
fn position(index: usize) -> f64 {
    let mut z = (index as u64).wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^= z >> 31;
    (z % 1_000_000) as f64 / 1_000_000.0
}

/// The shares of documents held out of training: ~`val` for validation, ~`test` for a test
/// split (0: none; the training and validation splits are then those of earlier versions).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Holdout {
    pub val: f64,
    pub test: f64,
}

impl Holdout {
    /// A validation split of `val` and no test split.
    pub fn validation(val: f64) -> Self {
        Holdout { val, test: 0.0 }
    }

    /// The part document `index` of a corpus goes to, by its position (before [`split`]'s
    /// guarantees for tiny corpora).
    pub fn part(&self, index: usize) -> Part {
        let u = position(index);
        if u < self.val {
            Part::Val
        } else if u < self.val + self.test {
            Part::Test
        } else {
            Part::Train
        }
    }

    /// True when documents counted by part (training, validation, test) need none of
    /// [`split`]'s moves for tiny corpora, so that each document stays where
    /// [`Holdout::part`] puts it.
    pub fn keeps_positions(&self, counts: [usize; 3]) -> bool {
        counts[0] > 0 && counts[1] > 0 && (self.test == 0.0 || counts[2] > 0)
    }
}

/// A part of a corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Train = 0,
    Val = 1,
    Test = 2,
}

/// Bytes of a file read at a time: a piece of the corpus ends at the last document boundary
/// within them (a longer document, or a JSON array, is read whole).
const PIECE_BYTES: usize = 32 << 20;

/// The documents of a source, read a piece at a time (a file, or about 32 MiB of a larger one,
/// cut between documents), with their parts: the corpus never exists whole in memory, and the
/// documents and their parts are those of the whole files. An error (a file that cannot be
/// read or parsed) ends the pieces and is kept in `error`.
pub struct StreamedDocuments<'a> {
    source: &'a Source,
    holdout: Holdout,
    next_file: usize,
    index: usize,
    /// The file being read.
    reading: Option<Reading>,
    piece_bytes: usize,
    pub error: Option<anyhow::Error>,
}

/// A file being read a piece at a time.
struct Reading {
    file: OpenFile,
    /// Bytes read and not yet handed out, from `place`.
    buf: Vec<u8>,
    place: Place,
    /// True once every byte of the file is in `buf` or handed out.
    ended: bool,
}

impl Reading {
    /// The next piece of the file (empty at its end), reading about `piece_bytes` at a time,
    /// with the place where it starts; `last` is true when it ends the file.
    fn next(&mut self, piece_bytes: usize) -> Result<(Vec<u8>, Place, bool)> {
        let json = !self.file.label.ends_with(".txt");
        let mut target = piece_bytes;
        loop {
            if !self.ended && self.buf.len() < target {
                let wanted = target - self.buf.len();
                self.ended = !self.file.read_more(&mut self.buf, wanted)?;
            }
            let first = self.buf.iter().find(|b| !b.is_ascii_whitespace());
            let cut = if self.ended {
                Some(self.buf.len())
            } else if json && self.place.byte == 0 && first.is_none_or(|&b| b == b'[') {
                // A JSON array is read whole (and blank space until the first record).
                None
            } else {
                boundary(&self.buf, json)
            };
            let Some(cut) = cut else {
                target = match first {
                    Some(b'[') if json && self.place.byte == 0 => usize::MAX,
                    _ => self.buf.len().max(1).saturating_mul(2),
                };
                continue;
            };
            let rest = self.buf.split_off(cut);
            let piece = std::mem::replace(&mut self.buf, rest);
            let at = self.place;
            self.place.line += piece.iter().filter(|&&b| b == b'\n').count();
            self.place.byte += piece.len();
            return Ok((piece, at, self.ended && self.buf.is_empty()));
        }
    }
}

/// The end of the last whole document in `buf`: after its last line break (JSON lines), or
/// after its last blank line (text: "\n\n", or "\n\r\n"); none if there is none.
fn boundary(buf: &[u8], json: bool) -> Option<usize> {
    let ends_document = |i: usize| {
        json || (i >= 1 && buf[i - 1] == b'\n')
            || (i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n')
    };
    (0..buf.len())
        .rev()
        .find(|&i| buf[i] == b'\n' && ends_document(i))
        .map(|i| i + 1)
}

impl<'a> StreamedDocuments<'a> {
    /// The documents of `source`, from the first file.
    pub fn new(source: &'a Source, holdout: Holdout) -> Self {
        StreamedDocuments {
            source,
            holdout,
            next_file: 0,
            index: 0,
            reading: None,
            piece_bytes: PIECE_BYTES,
            error: None,
        }
    }

    /// The documents of the next piece with their parts; none after the last file or an
    /// error.
    pub fn next_piece(&mut self) -> Option<Vec<(Part, String)>> {
        if self.error.is_some() {
            return None;
        }
        match self.read_piece() {
            Ok(Some(docs)) => {
                let first = self.index;
                self.index += docs.len();
                let holdout = self.holdout;
                Some(
                    docs.into_iter()
                        .enumerate()
                        .map(|(k, d)| (holdout.part(first + k), d))
                        .collect(),
                )
            }
            Ok(None) => None,
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }

    /// The documents of the next piece; none after the last file.
    fn read_piece(&mut self) -> Result<Option<Vec<String>>> {
        let reading = match &mut self.reading {
            Some(r) => r,
            None if self.next_file == self.source.file_count() => return Ok(None),
            None => {
                let file = self.source.open(self.next_file)?;
                self.next_file += 1;
                self.reading.insert(Reading {
                    file,
                    buf: Vec::new(),
                    place: Place::default(),
                    ended: false,
                })
            }
        };
        let (piece, place, last) = reading.next(self.piece_bytes)?;
        let docs = documents_at(&reading.file.label, &piece, place)?;
        if last {
            self.reading = None;
        }
        Ok(Some(docs))
    }
}

/// A corpus' documents (or records) by split.
#[derive(Debug)]
pub struct Documents<T = String> {
    pub train: Vec<T>,
    pub val: Vec<T>,
    /// Empty when no test split is held out.
    pub test: Vec<T>,
}

/// All documents of a source, split into training, validation and (optionally) test documents.
pub fn load_split(source: &Source, holdout: Holdout) -> Result<Documents> {
    let mut docs = Vec::new();
    for (label, bytes) in source.contents()? {
        docs.extend(documents(&label, &bytes)?);
    }
    split(docs, holdout)
}

/// Splits `docs` by their positions into training, validation and (optionally) test parts.
pub fn split<T>(docs: Vec<T>, holdout: Holdout) -> Result<Documents<T>> {
    if docs.is_empty() {
        bail!("the corpus holds no text (every file is empty)");
    }
    let needed = if holdout.test > 0.0 { 3 } else { 2 };
    if docs.len() < needed {
        bail!(
            "the corpus holds {} document(s); at least {needed} are needed for training, validation{} splits",
            docs.len(),
            if needed == 3 { " and test" } else { "" }
        );
    }
    let mut split = Documents {
        train: Vec::new(),
        val: Vec::new(),
        test: Vec::new(),
    };
    for (i, d) in docs.into_iter().enumerate() {
        match holdout.part(i) {
            Part::Val => split.val.push(d),
            Part::Test => split.test.push(d),
            Part::Train => split.train.push(d),
        }
    }
    // Tiny corpora: guarantee one document on each side.
    if split.val.is_empty() {
        split.val.push(split.train.pop().expect("enough documents"));
    }
    if holdout.test > 0.0 && split.test.is_empty() {
        split
            .test
            .push(split.train.pop().expect("enough documents"));
    }
    if split.train.is_empty() {
        split.train.push(split.val.pop().expect("enough documents"));
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_errors() {
        let docs = documents("a.txt", b"first para\nline two\n\n\nsecond\r\n\r\nthird\n").unwrap();
        assert_eq!(docs, ["first para\nline two", "second", "third"]);
        let docs = documents(
            "a.jsonl",
            b"{\"text\": \"x\", \"url\": 1}\n\n{\"text\": \"y\"}\n",
        )
        .unwrap();
        assert_eq!(docs, ["x", "y"]);
        let docs = documents("a.json", br#"[{"text": "x"}, {"text": "z"}]"#).unwrap();
        assert_eq!(docs, ["x", "z"]);
        let err = documents("a.jsonl", b"{\"text\": \"x\"}\n{\"body\": 1}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("text"), "{err}");
        let err = documents("a.txt", b"ok\n\xff\xfe bad")
            .unwrap_err()
            .to_string();
        assert!(err.contains("UTF-8") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn directories_and_gzip_files_are_read_in_order() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("frugal-corpus-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"{\"text\": \"from gzip\"}\n").unwrap();
        std::fs::write(dir.join("sub/b.jsonl.gz"), gz.finish().unwrap()).unwrap();
        std::fs::write(dir.join("a.txt"), "plain text").unwrap();
        std::fs::write(dir.join("notes.md"), "ignored").unwrap();
        let source = Source::resolve(dir.to_str().unwrap()).unwrap();
        let docs: Vec<String> = source
            .contents()
            .unwrap()
            .iter()
            .flat_map(|(label, bytes)| documents(label, bytes).unwrap())
            .collect();
        assert_eq!(docs, ["plain text", "from gzip"]);
        std::fs::write(dir.join("sub/b.jsonl.gz"), b"not gzip").unwrap();
        let err = format!(
            "{:#}",
            Source::resolve(dir.to_str().unwrap())
                .unwrap()
                .contents()
                .unwrap_err()
        );
        assert!(err.contains("not valid gzip"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Every document of `source` with its part, read a piece of `piece_bytes` at a time.
    fn streamed(source: &Source, piece_bytes: usize) -> Result<Vec<(Part, String)>> {
        let mut docs = StreamedDocuments::new(source, Holdout::validation(0.3));
        docs.piece_bytes = piece_bytes;
        let all = std::iter::from_fn(|| docs.next_piece()).flatten().collect();
        docs.error.map_or(Ok(all), Err)
    }

    #[test]
    fn files_read_in_pieces_give_the_documents_of_whole_files() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("frugal-pieces-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let long = "a long paragraph ".repeat(20);
        let text = format!(
            "first\r\nline\n\n\nsecond\r\n\r\n{long}\n\n\n\n  third \n\r\nfourth\n\nü and ß\n"
        );
        std::fs::write(dir.join("a.txt"), &text).unwrap();
        let lines: String = (0..40)
            .map(|i| {
                format!(
                    "{{\"text\": \"record {i}\"}}\n{}",
                    ["", "\n", "  \n"][i % 3]
                )
            })
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(lines.as_bytes()).unwrap();
        std::fs::write(dir.join("b.jsonl.gz"), gz.finish().unwrap()).unwrap();
        let array = format!(
            "\n  [{}]",
            vec![r#"{"text": "in an array"}"#; 30].join(",\n")
        );
        std::fs::write(dir.join("c.json"), array).unwrap();
        std::fs::write(dir.join("d.txt"), "").unwrap();
        let source = Source::resolve(dir.to_str().unwrap()).unwrap();
        let whole = streamed(&source, usize::MAX).unwrap();
        let count = |needle: &str| whole.iter().filter(|(_, d)| d.contains(needle)).count();
        assert_eq!(
            (whole.len(), count("record"), count("array")),
            (6 + 40 + 30, 40, 30)
        );
        assert_eq!(whole[2].1, long.trim());
        assert_eq!(whole[3].1, "third");
        for piece_bytes in [1, 7, 64, 1000] {
            assert_eq!(
                streamed(&source, piece_bytes).unwrap(),
                whole,
                "{piece_bytes}"
            );
        }
        // A bad record far into a file is named by its line in the file.
        let bad = format!("{lines}{{\"body\": 1}}\n");
        std::fs::remove_file(dir.join("b.jsonl.gz")).unwrap();
        std::fs::write(dir.join("e.jsonl"), &bad).unwrap();
        let source = Source::resolve(dir.to_str().unwrap()).unwrap();
        let line = bad.lines().count();
        for piece_bytes in [16, usize::MAX] {
            let err = streamed(&source, piece_bytes).unwrap_err().to_string();
            assert!(err.contains(&format!("e.jsonl line {line}:")), "{err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn validation_split_is_deterministic_and_disjoint() {
        let holdout = Holdout::validation(0.05);
        let a = load_split(&Source::Embedded, holdout).unwrap();
        let b = load_split(&Source::Embedded, holdout).unwrap();
        assert_eq!((a.train.len(), a.val.len()), (b.train.len(), b.val.len()));
        assert_eq!(a.val, b.val);
        assert!(a.test.is_empty());
        assert!(!a.val.is_empty() && a.train.len() > 10 * a.val.len());
        assert!(a.val.iter().all(|v| !a.train.contains(v)));
    }

    #[test]
    fn a_test_split_comes_out_of_training_and_leaves_validation_alone() {
        let without = load_split(&Source::Embedded, Holdout::validation(0.05)).unwrap();
        let with = load_split(
            &Source::Embedded,
            Holdout {
                val: 0.05,
                test: 0.1,
            },
        )
        .unwrap();
        assert_eq!(with.val, without.val);
        assert!(!with.test.is_empty());
        assert_eq!(with.train.len() + with.test.len(), without.train.len());
        assert!(with.test.iter().all(|t| without.train.contains(t)));
        assert!(with.test.iter().all(|t| !with.train.contains(t)));
        let share = with.test.len() as f64 / (without.train.len() + without.val.len()) as f64;
        assert!((0.03..0.2).contains(&share), "test share {share}");
    }
}
