//! smallm's Rust core: byte-level BPE training and encoding, and the reading of corpora.
//!
//! The pipeline reads top to bottom: [`corpus`] cuts files into documents, [`pretokenize`]
//! splits text into pieces, [`train`] learns merges from piece counts, [`bpe`] applies them,
//! and [`serialize`] writes what the Hugging Face and tiktoken ecosystems read. The algorithms
//! are plain Rust; the PyO3 bindings live in `python` behind the `python` feature, so
//! `cargo test` and `cargo bench` never build them.

pub mod bpe;
pub mod corpus;
pub mod error;
pub mod pretokenize;
pub mod serialize;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use bpe::{SpecialPolicy, Tokenizer};
pub use error::{Error, Result};
