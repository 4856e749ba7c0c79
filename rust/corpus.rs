//! Reading corpus files and cutting them into documents.
//!
//! A document is the unit that never shares a pre-tokenized piece with another one (and, once
//! shards are packed, the unit that starts with `<|endoftext|>`). What a document is in a text
//! file is the caller's choice: the whole file, each line, or each paragraph.

use std::path::Path;
use std::str::FromStr;

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

/// Reads a UTF-8 text file. Invalid UTF-8 is an error naming the byte offset, unless `lossy`,
/// in which case invalid sequences become U+FFFD. A leading byte-order mark is dropped.
pub fn read_text(path: &Path, lossy: bool) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) if lossy => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        Err(e) => {
            return Err(Error::Utf8 {
                path: path.to_path_buf(),
                offset: e.utf8_error().valid_up_to(),
            })
        }
    };
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

/// Cuts `text` into documents according to `mode`; empty documents are left out.
pub fn documents(text: &str, mode: DocMode) -> Vec<&str> {
    match mode {
        DocMode::File => {
            if text.is_empty() {
                vec![]
            } else {
                vec![text]
            }
        }
        DocMode::Line => lines(text).filter(|l| !l.is_empty()).collect(),
        DocMode::Paragraph => {
            let mut docs = Vec::new();
            // Byte range of the paragraph being built, as offsets into `text`.
            let mut current: Option<(usize, usize)> = None;
            for line in lines(text) {
                let start = line.as_ptr() as usize - text.as_ptr() as usize;
                if line.trim().is_empty() {
                    if let Some((s, e)) = current.take() {
                        docs.push(&text[s..e]);
                    }
                } else {
                    let end = start + line.len();
                    current = Some(current.map_or((start, end), |(s, _)| (s, end)));
                }
            }
            if let Some((s, e)) = current {
                docs.push(&text[s..e]);
            }
            docs
        }
    }
}

/// Lines without their `\n` or `\r\n` terminator.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_terminator('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_modes_cut_where_documented() {
        let text = "first line\r\nsecond\n\n  \nthird para\nstill third\n";
        assert_eq!(documents(text, DocMode::File), vec![text]);
        assert_eq!(
            documents(text, DocMode::Line),
            vec!["first line", "second", "  ", "third para", "still third"]
        );
        assert_eq!(
            documents(text, DocMode::Paragraph),
            vec!["first line\r\nsecond", "third para\nstill third"]
        );
        assert!(documents("", DocMode::File).is_empty());
        assert_eq!("line".parse::<DocMode>().unwrap(), DocMode::Line);
        assert!("lines".parse::<DocMode>().is_err());
    }

    #[test]
    fn invalid_utf8_names_the_offset_unless_lossy() {
        let dir = std::env::temp_dir().join(format!("smallm-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.txt");
        std::fs::write(&path, b"\xef\xbb\xbfok \xff rest").unwrap();
        match read_text(&path, false) {
            Err(Error::Utf8 { offset, .. }) => assert_eq!(offset, 6),
            other => panic!("expected a UTF-8 error, got {other:?}"),
        }
        assert_eq!(read_text(&path, true).unwrap(), "ok \u{fffd} rest");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
