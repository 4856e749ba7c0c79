//! Typed errors of the core. The Python binding turns each into an exception whose message
//! names the file, line, id or field at fault.

use std::path::PathBuf;

/// Every way the core can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pre-tokenization regex does not compile, or fails while matching.
    #[error("pre-tokenization pattern: {0}")]
    Pattern(String),
    /// A corpus file is not valid UTF-8.
    #[error(
        "{}: {}not valid UTF-8 at byte offset {offset} (pass --lossy, or lossy=True, to replace invalid bytes with U+FFFD)",
        path.display(),
        line.map(|l| format!("line {l}: ")).unwrap_or_default()
    )]
    Utf8 {
        path: PathBuf,
        offset: u64,
        line: Option<u64>,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A training or encoding option is out of range.
    #[error("{0}")]
    Config(String),
    /// A tokenizer file is corrupt or was not written by smallm.
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    /// An id that is not in the vocabulary was given to decode.
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} ids (0 to {last})", last = vocab_size.saturating_sub(1))]
    UnknownId { id: u32, vocab_size: usize },
    /// The text contains a special token string that the caller did not allow.
    #[error("the text contains the special token {token:?} at byte offset {offset}, which is not allowed here; pass it in allowed_special to encode it as a special token, or use encode_ordinary to treat it as plain text")]
    DisallowedSpecial { token: String, offset: usize },
    /// The progress callback asked to stop (for example on Ctrl-C).
    #[error("cancelled")]
    Cancelled,
}

/// Result with the core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
