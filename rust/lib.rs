//! smallm's Rust core: byte-level BPE training and encoding, and the reading of corpora.
//!
//! The pipeline reads top to bottom: [`corpus`] cuts files into documents, [`pretokenize`]
//! splits text into pieces, [`train`] learns merges from piece counts ([`extend`] more of them on top
//! of an existing vocabulary), [`bpe`] applies them ([`sentencepiece`] SentencePiece-style ones),
//! [`serialize`] renders (and reads back) the text of the files the Hugging Face and tiktoken
//! ecosystems read, and [`pack`] turns a corpus into memory-mappable token shards; [`atomic`]
//! writes files and [`threads`] keeps the thread pools. The algorithms are plain Rust; the PyO3
//! bindings live in `python` behind the `python` feature, so `cargo test` and `cargo bench` never
//! build them.

pub mod atomic;
pub mod bpe;
pub mod clean;
pub mod corpus;
pub mod error;
pub mod extend;
pub mod filters;
pub mod pack;
pub mod pretokenize;
pub mod sentencepiece;
pub mod serialize;
pub mod threads;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use bpe::{SpecialPolicy, Tokenizer};
pub use error::{Error, Result};
