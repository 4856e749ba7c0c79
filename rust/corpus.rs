//! Reading corpus files as a stream of documents.
//!
//! A document is the unit that never shares a pre-tokenized piece with another one and, once
//! shards are packed, the unit that starts with `<|endoftext|>`. Text files (`.txt` and anything
//! not recognised as JSON Lines) are cut according to a [`DocMode`]; in JSON Lines files
//! (`.jsonl`) every record is a document whose text is one string field. Either may be
//! gzip-compressed (`.gz`). Files are read in batches, so a file may be far larger than memory
//! (except in [`DocMode::File`], where the file is the document).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use flate2::read::MultiGzDecoder;
use serde_json::Value;

use crate::{Error, Result};

/// What counts as one document in a text file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DocMode {
    /// The whole file is one document.
    #[default]
    File,
    /// Every non-empty line is a document (the line break is not part of it).
    Line,
    /// Runs of non-blank lines separated by blank (empty or whitespace-only) lines.
    Paragraph,
}

impl FromStr for DocMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "file" => Ok(DocMode::File),
            "line" => Ok(DocMode::Line),
            "paragraph" => Ok(DocMode::Paragraph),
            _ => Err(Error::Config(format!(
                "unknown document mode {s:?}: expected one of file, line, paragraph"
            ))),
        }
    }
}

/// The layout of a corpus file, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Plain text, cut into documents by a [`DocMode`].
    Text,
    /// One JSON object per line; the document is one string field of it.
    JsonLines,
}

impl Format {
    /// The format and whether the file is gzip-compressed, from the file name.
    pub fn of(path: &Path) -> Result<(Format, bool)> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let (stem, gzip) = match name.strip_suffix(".gz") {
            Some(stem) => (stem.to_string(), true),
            None => (name, false),
        };
        if stem.ends_with(".parquet") {
            return Err(Error::Config(format!(
                "{}: parquet files are read by the Python package (smallm.corpus), not the core",
                path.display()
            )));
        }
        let format = if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") {
            Format::JsonLines
        } else {
            Format::Text
        };
        Ok((format, gzip))
    }
}

/// How to read documents out of a file.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// What a document is in a text file (JSON Lines files ignore it).
    pub mode: DocMode,
    /// The field of a JSON Lines record that holds the text.
    pub text_field: String,
    /// Replace invalid UTF-8 with U+FFFD instead of failing.
    pub lossy: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            mode: DocMode::File,
            text_field: "text".into(),
            lossy: false,
        }
    }
}

/// Streams the documents of one file.
pub struct DocReader {
    path: PathBuf,
    input: Box<dyn BufRead + Send>,
    format: Format,
    options: ReadOptions,
    /// Lines read so far (1-based number of the last line read).
    line: u64,
    /// Bytes read so far, after decompression.
    offset: u64,
    /// The paragraph being gathered in [`DocMode::Paragraph`], line breaks included.
    paragraph: String,
    done: bool,
}

impl DocReader {
    /// Opens `path`, choosing the format from its name.
    pub fn open(path: &Path, options: &ReadOptions) -> Result<Self> {
        let (format, gzip) = Format::of(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let input: Box<dyn BufRead + Send> = if gzip {
            Box::new(BufReader::with_capacity(1 << 20, MultiGzDecoder::new(file)))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, file))
        };
        Ok(Self::from_reader(path, input, format, options))
    }

    /// Reads documents from any buffered reader; `path` only names the source in errors.
    pub fn from_reader(
        path: &Path,
        input: Box<dyn BufRead + Send>,
        format: Format,
        options: &ReadOptions,
    ) -> Self {
        DocReader {
            path: path.to_path_buf(),
            input,
            format,
            options: options.clone(),
            line: 0,
            offset: 0,
            paragraph: String::new(),
            done: false,
        }
    }

    /// Bytes read so far, after decompression.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    /// The next documents, about `max_bytes` of text in all; empty once the file is exhausted.
    /// Empty documents are left out.
    pub fn next_batch(&mut self, max_bytes: usize) -> Result<Vec<String>> {
        let mut docs = Vec::new();
        if self.done {
            return Ok(docs);
        }
        if self.format == Format::Text && self.options.mode == DocMode::File {
            let mut bytes = Vec::new();
            self.input
                .read_to_end(&mut bytes)
                .map_err(|e| Error::io(&self.path, e))?;
            self.offset = bytes.len() as u64;
            self.done = true;
            let text = self.decode(bytes, 0, None)?;
            let text = text
                .strip_prefix('\u{feff}')
                .map(str::to_owned)
                .unwrap_or(text);
            if !text.is_empty() {
                docs.push(text);
            }
            return Ok(docs);
        }
        let mut size = 0;
        let mut raw = Vec::new();
        while size < max_bytes {
            raw.clear();
            let n = self
                .input
                .read_until(b'\n', &mut raw)
                .map_err(|e| Error::io(&self.path, e))?;
            if n == 0 {
                self.done = true;
                if let Some(p) = self.take_paragraph() {
                    docs.push(p);
                }
                break;
            }
            let start = self.offset;
            self.offset += n as u64;
            self.line += 1;
            let mut line = self.decode(std::mem::take(&mut raw), start, Some(self.line))?;
            if self.line == 1 && line.starts_with('\u{feff}') {
                line.drain(..'\u{feff}'.len_utf8());
            }
            if let Some(doc) = self.document_from_line(line)? {
                size += doc.len();
                docs.push(doc);
            }
        }
        Ok(docs)
    }

    /// Handles one line (with its terminator) and returns the document it completes, if any.
    fn document_from_line(&mut self, line: String) -> Result<Option<String>> {
        match (self.format, self.options.mode) {
            (Format::JsonLines, _) => self.json_record(&line),
            (Format::Text, DocMode::Line) => {
                let text = strip_newline(&line);
                Ok((!text.is_empty()).then(|| text.to_owned()))
            }
            (Format::Text, DocMode::Paragraph) => {
                if line.trim().is_empty() {
                    Ok(self.take_paragraph())
                } else {
                    self.paragraph.push_str(&line);
                    Ok(None)
                }
            }
            (Format::Text, DocMode::File) => unreachable!("whole files are read at once"),
        }
    }

    fn take_paragraph(&mut self) -> Option<String> {
        if self.paragraph.is_empty() {
            return None;
        }
        let mut p = std::mem::take(&mut self.paragraph);
        let keep = strip_newline(&p).len();
        p.truncate(keep);
        Some(p)
    }

    fn json_record(&self, line: &str) -> Result<Option<String>> {
        if line.trim().is_empty() {
            return Ok(None);
        }
        let bad = |reason: String| Error::Format {
            path: self.path.clone(),
            reason: format!("line {}: {reason}", self.line),
        };
        let record: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(fields) = record else {
            return Err(bad("not a JSON object".into()));
        };
        let field = &self.options.text_field;
        match fields.get(field) {
            Some(Value::String(s)) => Ok((!s.is_empty()).then(|| s.clone())),
            Some(other) => Err(bad(format!(
                "field {field:?} is not a string: {}",
                kind(other)
            ))),
            None => {
                let names: Vec<&str> = fields.keys().map(String::as_str).collect();
                Err(bad(format!(
                    "no field {field:?} (the record has {names:?}); choose the text field with --text-field"
                )))
            }
        }
    }

    fn decode(&self, bytes: Vec<u8>, start: u64, line: Option<u64>) -> Result<String> {
        match String::from_utf8(bytes) {
            Ok(s) => Ok(s),
            Err(e) if self.options.lossy => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
            Err(e) => Err(Error::Utf8 {
                path: self.path.clone(),
                offset: start + e.utf8_error().valid_up_to() as u64,
                line,
            }),
        }
    }
}

fn strip_newline(s: &str) -> &str {
    let s = s.strip_suffix('\n').unwrap_or(s);
    s.strip_suffix('\r').unwrap_or(s)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Where a document comes from: the index of its source (file) and its number within it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Position {
    pub source: u32,
    pub document: u64,
}

/// Documents read from files, with their positions.
#[derive(Default)]
pub struct FileBatch {
    pub docs: Vec<String>,
    pub positions: Vec<Position>,
    /// File bytes read once this batch is done (for progress; compressed files count their
    /// decompressed bytes up to their size).
    pub bytes_done: u64,
}

/// The size of every file, or an error naming the first that cannot be read.
pub fn file_sizes(paths: &[PathBuf]) -> Result<Vec<u64>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(|e| Error::io(p, e))
        })
        .collect()
}

/// Reads `paths` (file `i` is source `first_source + i`) in batches of about `batch_bytes` of text,
/// gathering the documents of small files together, and calls `consume` on each batch in order. A
/// reader thread reads the next batch while `consume` works on this one. An error from either side
/// stops both and is returned.
pub fn for_each_batch(
    paths: &[PathBuf],
    first_source: u32,
    options: &ReadOptions,
    batch_bytes: usize,
    mut consume: impl FnMut(FileBatch) -> Result<()>,
) -> Result<()> {
    let sizes = file_sizes(paths)?;
    std::thread::scope(|scope| {
        let (sender, batches) = std::sync::mpsc::sync_channel(1);
        let sizes = &sizes;
        scope.spawn(move || {
            let result = read_batches(paths, sizes, first_source, options, batch_bytes, &sender);
            if let Err(e) = result {
                let _ = sender.send(Err(e));
            }
        });
        // Returning early drops `batches`, which stops the reader at its next send.
        for batch in batches {
            consume(batch?)?;
        }
        Ok(())
    })
}

fn read_batches(
    paths: &[PathBuf],
    sizes: &[u64],
    first_source: u32,
    options: &ReadOptions,
    batch_bytes: usize,
    sender: &std::sync::mpsc::SyncSender<Result<FileBatch>>,
) -> Result<()> {
    let mut batch = FileBatch::default();
    let mut size = 0;
    let mut finished = 0;
    for (i, (path, file_size)) in paths.iter().zip(sizes).enumerate() {
        let source = first_source + i as u32;
        let mut reader = DocReader::open(path, options)?;
        let mut document = 0;
        loop {
            let docs = reader.next_batch(batch_bytes)?;
            if docs.is_empty() {
                break;
            }
            for doc in docs {
                size += doc.len();
                batch.docs.push(doc);
                batch.positions.push(Position { source, document });
                document += 1;
            }
            if size >= batch_bytes {
                batch.bytes_done = finished + reader.bytes_read().min(*file_size);
                size = 0;
                if sender.send(Ok(std::mem::take(&mut batch))).is_err() {
                    return Ok(()); // the consumer stopped
                }
            }
        }
        finished += file_size;
    }
    batch.bytes_done = finished;
    let _ = sender.send(Ok(batch));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every document of a file.
    fn read_all(path: &Path, options: &ReadOptions) -> Result<Vec<String>> {
        let mut reader = DocReader::open(path, options)?;
        let mut docs = Vec::new();
        loop {
            let batch = reader.next_batch(64 << 20)?;
            if batch.is_empty() {
                return Ok(docs);
            }
            docs.extend(batch);
        }
    }
    use std::io::Cursor;

    fn read_str(text: &str, format: Format, mode: DocMode, batch: usize) -> Result<Vec<String>> {
        let options = ReadOptions {
            mode,
            ..ReadOptions::default()
        };
        let input = Box::new(Cursor::new(text.as_bytes().to_vec()));
        let mut reader = DocReader::from_reader(Path::new("mem.txt"), input, format, &options);
        let mut docs = Vec::new();
        loop {
            let b = reader.next_batch(batch)?;
            if b.is_empty() {
                return Ok(docs);
            }
            docs.extend(b);
        }
    }

    #[test]
    fn doc_modes_cut_where_documented() {
        let text = "\u{feff}first line\r\nsecond\n\n  \nthird para\nstill third\n";
        let body = &text['\u{feff}'.len_utf8()..];
        for batch in [1, 7, 1 << 20] {
            assert_eq!(
                read_str(text, Format::Text, DocMode::File, batch).unwrap(),
                vec![body]
            );
            assert_eq!(
                read_str(text, Format::Text, DocMode::Line, batch).unwrap(),
                vec!["first line", "second", "  ", "third para", "still third"]
            );
            assert_eq!(
                read_str(text, Format::Text, DocMode::Paragraph, batch).unwrap(),
                vec!["first line\r\nsecond", "third para\nstill third"]
            );
        }
        assert!(read_str("", Format::Text, DocMode::File, 10)
            .unwrap()
            .is_empty());
        assert_eq!("line".parse::<DocMode>().unwrap(), DocMode::Line);
        assert!("lines".parse::<DocMode>().is_err());
    }

    #[test]
    fn json_lines_take_the_text_field_and_name_bad_lines() {
        let ok = "{\"text\": \"안녕\\n하세요\", \"id\": 1}\n\n{\"text\": \"two\"}\n";
        assert_eq!(
            read_str(ok, Format::JsonLines, DocMode::File, 100).unwrap(),
            vec!["안녕\n하세요", "two"]
        );
        let err = read_str(
            "{\"text\": \"a\"}\n{\"body\": \"b\"}\n",
            Format::JsonLines,
            DocMode::File,
            100,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("mem.txt: line 2")
                && err.contains("\"body\"")
                && err.contains("--text-field"),
            "{err}"
        );
        let err = read_str("{\"text\": 3}\n", Format::JsonLines, DocMode::File, 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("a number"), "{err}");
        let err = read_str("{\"text\": \"a\"\n", Format::JsonLines, DocMode::File, 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1: not valid JSON"), "{err}");
    }

    #[test]
    fn formats_follow_the_file_name() {
        assert_eq!(
            Format::of(Path::new("a/b.jsonl.gz")).unwrap(),
            (Format::JsonLines, true)
        );
        assert_eq!(
            Format::of(Path::new("b.txt")).unwrap(),
            (Format::Text, false)
        );
        assert_eq!(
            Format::of(Path::new("b.txt.gz")).unwrap(),
            (Format::Text, true)
        );
        assert!(Format::of(Path::new("b.parquet")).is_err());
    }

    #[test]
    fn invalid_utf8_names_the_offset_and_line_unless_lossy() {
        let dir = std::env::temp_dir().join(format!("smallm-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.txt");
        std::fs::write(&path, b"\xef\xbb\xbfok\nsecond \xff rest").unwrap();
        let file = ReadOptions::default();
        match read_all(&path, &file) {
            Err(Error::Utf8 {
                offset, line: None, ..
            }) => assert_eq!(offset, 13),
            other => panic!("expected a UTF-8 error, got {other:?}"),
        }
        let lines = ReadOptions {
            mode: DocMode::Line,
            ..ReadOptions::default()
        };
        match read_all(&path, &lines) {
            Err(
                e @ Error::Utf8 {
                    offset: 13,
                    line: Some(2),
                    ..
                },
            ) => {
                assert!(e.to_string().contains("line 2"), "{e}")
            }
            other => panic!("expected a UTF-8 error on line 2, got {other:?}"),
        }
        let lossy = ReadOptions {
            lossy: true,
            ..ReadOptions::default()
        };
        assert_eq!(
            read_all(&path, &lossy).unwrap(),
            vec!["ok\nsecond \u{fffd} rest"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gzip_files_are_decompressed() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("smallm-gz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docs.jsonl.gz");
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"{\"text\": \"one\"}\n{\"text\": \"two\"}\n")
            .unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        assert_eq!(
            read_all(&path, &ReadOptions::default()).unwrap(),
            vec!["one", "two"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
