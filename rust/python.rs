//! The PyO3 binding `smallm._core`: argument conversion, the GIL released around heavy work,
//! and core errors turned into Python exceptions. The user-facing API and its documentation
//! live in the Python package (`smallm.tokenizer`), which wraps these classes.

use std::path::PathBuf;

use numpy::IntoPyArray;
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::bpe::{SpecialPolicy, Tokenizer};
use crate::clean::CleanOptions;
use crate::corpus::{for_each_batch, ReadOptions};
use crate::extend::{extend, ExtendOptions};
use crate::pack::{PackOptions, PackProgress, Packer, ShardInfo, JOURNAL};
use crate::pretokenize::{GPT2_PATTERN, GPT4_PATTERN};
use crate::serialize;
use crate::threads;
use crate::train::{Progress, TrainOptions, WordCounts};
use crate::Error;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match &e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(e.to_string())
            }
            Error::Io { .. } => PyOSError::new_err(e.to_string()),
            Error::Cancelled => PyKeyboardInterrupt::new_err("cancelled"),
            _ => PyValueError::new_err(e.to_string()),
        }
    }
}

/// Bridges core progress reports to an optional Python callable (`progress(stage, done, total)`
/// when training, `progress(bytes, total, tokens)` when packing), and lets Ctrl-C (or an
/// exception in the callable) cancel the work.
struct ProgressBridge {
    callback: Option<Py<PyAny>>,
    error: Option<PyErr>,
}

impl ProgressBridge {
    fn new(callback: Option<Py<PyAny>>) -> Self {
        ProgressBridge {
            callback,
            error: None,
        }
    }

    /// Checks for Ctrl-C and calls the callback through `call`; false means stop.
    fn call(&mut self, call: impl FnOnce(Python<'_>, &Py<PyAny>) -> PyResult<()>) -> bool {
        Python::attach(|py| {
            let result = py.check_signals().and_then(|()| match &self.callback {
                None => Ok(()),
                Some(cb) => call(py, cb),
            });
            match result {
                Ok(()) => true,
                Err(e) => {
                    self.error = Some(e);
                    false
                }
            }
        })
    }

    /// A training report, as `progress(stage, done, total)`.
    fn report(&mut self, p: Progress) -> bool {
        let (stage, done, total) = match p {
            Progress::Counting { bytes, total } => ("count", bytes, total),
            Progress::Merging { done, total } => ("merge", done as u64, total as u64),
        };
        self.call(|py, cb| cb.call1(py, (stage, done, total)).map(drop))
    }

    /// A packing report, as `progress(bytes, total, tokens)`.
    fn report_pack(&mut self, p: PackProgress) -> bool {
        self.call(|py, cb| cb.call1(py, (p.bytes, p.total, p.tokens)).map(drop))
    }

    /// Runs `work` with the GIL released, on a pool of `num_threads` threads, handing it this
    /// bridge to report through.
    fn run<T: Send>(
        mut self,
        py: Python<'_>,
        num_threads: Option<usize>,
        work: impl FnOnce(&mut Self) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        let result = py.detach(|| threads::install(num_threads, || work(&mut self)))?;
        result.map_err(|e| self.error(e))
    }

    /// The callback's own exception when it caused the cancellation, else the core error.
    fn error(self, e: Error) -> PyErr {
        match (e, self.error) {
            (Error::Cancelled, Some(py_err)) => py_err,
            (e, _) => e.into(),
        }
    }
}

#[pyclass(module = "smallm._core", name = "Tokenizer", frozen)]
struct PyTokenizer {
    inner: Tokenizer,
}

/// Cuts `joined` into consecutive pieces of `char_lengths` code points each.
fn split_by_char_lengths<'a>(joined: &'a str, char_lengths: &[usize]) -> PyResult<Vec<&'a str>> {
    let mismatch =
        || PyValueError::new_err("the document lengths do not add up to the joined text");
    let ascii = joined.is_ascii();
    let mut texts = Vec::with_capacity(char_lengths.len());
    let mut rest = joined;
    for &n in char_lengths {
        let cut = if ascii {
            (n <= rest.len()).then_some(n)
        } else {
            match rest.char_indices().nth(n) {
                Some((i, _)) => Some(i),
                None => (rest.chars().count() == n).then_some(rest.len()),
            }
        };
        let (doc, tail) = rest.split_at(cut.ok_or_else(mismatch)?);
        texts.push(doc);
        rest = tail;
    }
    if rest.is_empty() {
        Ok(texts)
    } else {
        Err(mismatch())
    }
}

fn policy(allowed: Option<Vec<String>>, disallowed: Option<Vec<String>>) -> SpecialPolicy {
    SpecialPolicy {
        allowed,
        disallowed,
    }
}

#[pymethods]
impl PyTokenizer {
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        Ok(PyTokenizer {
            inner: serialize::load(&path)?,
        })
    }

    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        let inner = serialize::from_hf_json(text, std::path::Path::new("<tokenizer.json text>"))?;
        Ok(PyTokenizer { inner })
    }

    #[staticmethod]
    fn from_merges(
        pattern: &str,
        merges: Vec<(u32, u32)>,
        special_tokens: Vec<String>,
    ) -> PyResult<Self> {
        Ok(PyTokenizer {
            inner: Tokenizer::new(pattern, merges, special_tokens)?,
        })
    }

    fn to_json(&self) -> String {
        serialize::to_hf_json(&self.inner)
    }

    fn to_tiktoken(&self) -> String {
        serialize::to_tiktoken(&self.inner)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    #[getter]
    fn n_ordinary(&self) -> usize {
        self.inner.n_ordinary()
    }

    #[getter]
    fn pattern(&self) -> &str {
        self.inner.pattern()
    }

    #[getter]
    fn special_tokens(&self) -> Vec<String> {
        self.inner.specials().to_vec()
    }

    #[getter]
    fn merges(&self) -> Vec<(u32, u32)> {
        self.inner.merges().to_vec()
    }

    #[getter]
    fn merge_results(&self) -> Vec<u32> {
        self.inner.merge_results().to_vec()
    }

    /// Whether the vocabulary was trained elsewhere (its file's ids are kept).
    #[getter]
    fn foreign(&self) -> bool {
        self.inner.foreign_parts().is_some()
    }

    /// Whether it is a SentencePiece-style BPE (byte fallback, `▁` for spaces: Llama 2, Mistral...).
    #[getter]
    fn sentencepiece(&self) -> bool {
        self.inner.sentencepiece_parts().is_some()
    }

    fn special_id(&self, token: &str) -> Option<u32> {
        self.inner.special_id(token)
    }

    /// The ids of one piece as the merges leave it, with no normalisation or splitting: bytes for a
    /// byte-level BPE, the UTF-8 text of a word with `▁` for its spaces for a SentencePiece-style one.
    fn encode_piece(&self, piece: &[u8]) -> PyResult<Vec<u32>> {
        let mut out = Vec::new();
        match self.inner.sentencepiece_parts() {
            Some(sp) => {
                let word = std::str::from_utf8(piece).map_err(|e| {
                    PyValueError::new_err(format!(
                        "a SentencePiece-style piece must be UTF-8 text: {e}"
                    ))
                })?;
                sp.encode_word(word, &mut out);
            }
            None => self.inner.encode_piece(piece, &mut out),
        }
        Ok(out)
    }

    fn encode_ordinary(&self, py: Python<'_>, text: PyBackedStr) -> PyResult<Vec<u32>> {
        py.detach(|| self.inner.encode_ordinary(&text))
            .map_err(Into::into)
    }

    #[pyo3(signature = (text, allowed_special, disallowed_special))]
    fn encode(
        &self,
        py: Python<'_>,
        text: PyBackedStr,
        allowed_special: Option<Vec<String>>,
        disallowed_special: Option<Vec<String>>,
    ) -> PyResult<Vec<u32>> {
        let p = policy(allowed_special, disallowed_special);
        py.detach(|| self.inner.encode(&text, &p))
            .map_err(Into::into)
    }

    /// Encodes the documents of `joined`, the concatenation of documents whose lengths in code
    /// points are `char_lengths` (one string crosses into Rust far faster than many). Returns (ids,
    /// offsets) as numpy arrays: ids uint16 when the vocabulary fits, else uint32.
    #[pyo3(signature = (joined, char_lengths, ordinary, allowed_special, disallowed_special, num_threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        joined: PyBackedStr,
        char_lengths: Vec<usize>,
        ordinary: bool,
        allowed_special: Option<Vec<String>>,
        disallowed_special: Option<Vec<String>>,
        num_threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let p = policy(allowed_special, disallowed_special);
        let fits_u16 = self.inner.vocab_size() <= 1 << 16;
        let (ids, offsets) = py.detach(|| {
            let texts = split_by_char_lengths(&joined, &char_lengths)?;
            threads::install(num_threads, || {
                self.inner
                    .encode_batch(&texts, if ordinary { None } else { Some(&p) })
            })?
            .map_err(PyErr::from)
        })?;
        let offsets: Vec<i64> = offsets.into_iter().map(|o| o as i64).collect();
        let ids = if fits_u16 {
            let narrow: Vec<u16> = ids.into_iter().map(|i| i as u16).collect();
            narrow.into_pyarray(py).into_any()
        } else {
            ids.into_pyarray(py).into_any()
        };
        Ok((ids, offsets.into_pyarray(py).into_any()))
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = py.detach(|| self.inner.decode_bytes(&ids))?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn token_bytes<'py>(&self, py: Python<'py>, id: u32) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, self.inner.token_bytes(id)?))
    }

    /// Byte length of every id (special tokens count as 0 bytes of text), for bits per byte.
    fn token_byte_lengths<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        let lengths: Vec<i64> = (0..self.inner.vocab_size() as u32)
            .map(|id| {
                if self.inner.is_special(id) {
                    0
                } else {
                    self.inner.token_bytes(id).map_or(0, |b| b.len() as i64)
                }
            })
            .collect();
        lengths.into_pyarray(py).into_any()
    }
}

#[pyclass(module = "smallm._core", name = "Trainer")]
struct PyTrainer {
    counts: Option<WordCounts>,
}

impl PyTrainer {
    fn counts(&mut self) -> PyResult<&mut WordCounts> {
        self.counts.as_mut().ok_or_else(|| {
            PyValueError::new_err("this Trainer has already trained; make a new one")
        })
    }
}

#[pymethods]
impl PyTrainer {
    #[new]
    fn new(pattern: &str) -> PyResult<Self> {
        Ok(PyTrainer {
            counts: Some(WordCounts::new(pattern)?),
        })
    }

    /// A trainer that counts text as `tokenizer` cuts it, for [`PyTrainer::extend`].
    #[staticmethod]
    fn for_tokenizer(tokenizer: &PyTokenizer) -> Self {
        PyTrainer {
            counts: Some(WordCounts::for_tokenizer(&tokenizer.inner)),
        }
    }

    #[getter]
    fn unique_pieces(&self) -> usize {
        self.counts.as_ref().map_or(0, WordCounts::unique_pieces)
    }

    #[getter]
    fn total_bytes(&self) -> u64 {
        self.counts.as_ref().map_or(0, WordCounts::total_bytes)
    }

    #[pyo3(signature = (texts, num_threads=None))]
    fn add_texts(
        &mut self,
        py: Python<'_>,
        texts: Vec<PyBackedStr>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        let counts = self.counts()?;
        py.detach(|| threads::install(num_threads, || counts.add_documents(&texts)))??;
        Ok(())
    }

    #[pyo3(signature = (paths, doc_mode="file", text_field="text".to_string(), lossy=false, progress=None, num_threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_files(
        &mut self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        doc_mode: &str,
        text_field: String,
        lossy: bool,
        progress: Option<Py<PyAny>>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        let options = read_options(doc_mode, text_field, lossy)?;
        let counts = self.counts()?;
        ProgressBridge::new(progress).run(py, num_threads, |bridge| {
            counts.add_files(&paths, &options, &mut |p| bridge.report(p))
        })
    }

    #[pyo3(signature = (vocab_size, special_tokens, min_frequency=2, progress=None, num_threads=None))]
    fn train<'py>(
        &mut self,
        py: Python<'py>,
        vocab_size: usize,
        special_tokens: Vec<String>,
        min_frequency: u64,
        progress: Option<Py<PyAny>>,
        num_threads: Option<usize>,
    ) -> PyResult<(PyTokenizer, Bound<'py, PyDict>)> {
        let counts = self
            .counts
            .take()
            .ok_or_else(|| PyValueError::new_err("this Trainer has already trained"))?;
        let options = TrainOptions {
            vocab_size,
            special_tokens,
            min_frequency,
        };
        let (inner, report) = ProgressBridge::new(progress).run(py, num_threads, |bridge| {
            counts.train(&options, &mut |p| bridge.report(p))
        })?;
        let dict = PyDict::new(py);
        dict.set_item("requested_vocab_size", report.requested_vocab_size)?;
        dict.set_item("vocab_size", report.vocab_size)?;
        dict.set_item("unique_pieces", report.unique_pieces)?;
        dict.set_item("total_pieces", report.total_pieces)?;
        dict.set_item("total_bytes", report.total_bytes)?;
        dict.set_item("documents", report.documents)?;
        Ok((PyTokenizer { inner }, dict))
    }

    #[pyo3(signature = (tokenizer, new_tokens, min_frequency=2, character_coverage=0.9995, progress=None, num_threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn extend<'py>(
        &mut self,
        py: Python<'py>,
        tokenizer: &PyTokenizer,
        new_tokens: usize,
        min_frequency: u64,
        character_coverage: f64,
        progress: Option<Py<PyAny>>,
        num_threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let counts = self
            .counts
            .take()
            .ok_or_else(|| PyValueError::new_err("this Trainer has already trained"))?;
        let options = ExtendOptions {
            new_tokens,
            min_frequency,
            character_coverage,
        };
        let inner = &tokenizer.inner;
        let ext = ProgressBridge::new(progress).run(py, num_threads, |bridge| {
            extend(counts, inner, &options, &mut |p| bridge.report(p))
        })?;
        let dict = PyDict::new(py);
        dict.set_item("first_id", ext.first_id)?;
        dict.set_item("tokens", ext.tokens)?;
        dict.set_item("merges", ext.merges)?;
        dict.set_item("characters", ext.characters)?;
        dict.set_item("chars", ext.chars)?;
        dict.set_item("tokens_before", ext.tokens_before)?;
        dict.set_item("tokens_after", ext.tokens_after)?;
        dict.set_item("documents", ext.documents)?;
        dict.set_item("unique_pieces", ext.unique_pieces)?;
        Ok(dict)
    }
}

#[pyclass(module = "smallm._core", name = "Packer")]
struct PyPacker {
    inner: Option<Packer>,
}

impl PyPacker {
    fn packer(&mut self) -> PyResult<&mut Packer> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("this Packer has finished; make a new one"))
    }
}

fn shard_dicts<'py>(py: Python<'py>, shards: &[ShardInfo]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for s in shards {
        let d = PyDict::new(py);
        d.set_item("file", &s.file)?;
        d.set_item("index", &s.index)?;
        d.set_item("tokens", s.tokens)?;
        d.set_item("documents", s.documents)?;
        d.set_item("text_bytes", s.text_bytes)?;
        list.append(d)?;
    }
    Ok(list)
}

#[pymethods]
impl PyPacker {
    /// `clean`: the cleaning options as JSON (`clean::CleanOptions`); `dry_run`: judge only, keeping this
    /// many samples of what each rule removes.
    #[new]
    #[pyo3(signature = (tokenizer, dir, shard_tokens, val_fraction, fingerprint, bos, clean=None, dedup_against=Vec::new(), dry_run=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        tokenizer: &PyTokenizer,
        dir: PathBuf,
        shard_tokens: u64,
        val_fraction: f64,
        fingerprint: String,
        bos: String,
        clean: Option<&str>,
        dedup_against: Vec<PathBuf>,
        dry_run: Option<usize>,
    ) -> PyResult<Self> {
        let clean = match clean {
            Some(json) => serde_json::from_str::<CleanOptions>(json)
                .map_err(|e| PyValueError::new_err(format!("cleaning options: {e}")))?,
            None => CleanOptions::default(),
        };
        let options = PackOptions {
            dir,
            shard_tokens,
            val_fraction,
            fingerprint,
            bos,
            clean,
            dedup_against,
            dry_run,
        };
        Ok(PyPacker {
            inner: Some(Packer::new(tokenizer.inner.clone(), options)?),
        })
    }

    #[getter]
    fn resumed_shards(&mut self) -> PyResult<(usize, usize)> {
        Ok(self.packer()?.resumed_shards())
    }

    #[getter]
    fn dtype(&mut self) -> PyResult<&'static str> {
        Ok(self.packer()?.dtype().name())
    }

    #[getter]
    fn bos_id(&mut self) -> PyResult<u32> {
        Ok(self.packer()?.bos_id())
    }

    #[getter]
    fn tokens_written(&mut self) -> PyResult<u64> {
        Ok(self.packer()?.tokens_written())
    }

    #[pyo3(signature = (texts, source, first_document, num_threads=None))]
    fn add_texts(
        &mut self,
        py: Python<'_>,
        texts: Vec<PyBackedStr>,
        source: u32,
        first_document: u64,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        let packer = self.packer()?;
        py.detach(|| {
            threads::install(num_threads, || {
                packer.add_documents(&texts, source, first_document)
            })
        })??;
        Ok(())
    }

    #[pyo3(signature = (paths, first_source=0, doc_mode="file", text_field="text".to_string(), lossy=false, progress=None, num_threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_files(
        &mut self,
        py: Python<'_>,
        paths: Vec<PathBuf>,
        first_source: u32,
        doc_mode: &str,
        text_field: String,
        lossy: bool,
        progress: Option<Py<PyAny>>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        let options = read_options(doc_mode, text_field, lossy)?;
        let packer = self.packer()?;
        ProgressBridge::new(progress).run(py, num_threads, |bridge| {
            packer.add_files(&paths, first_source, &options, &mut |p| {
                bridge.report_pack(p)
            })
        })
    }

    /// Sets a filter of the caller's: `judge(texts)` returns whether to keep each text; `name` is its rule
    /// in the report. An exception it raises stops the packing with its message.
    fn set_filter(&mut self, name: String, judge: Py<PyAny>) -> PyResult<()> {
        let filter = move |texts: &[&str]| -> Result<Vec<bool>, Error> {
            Python::attach(|py| {
                judge
                    .call1(py, (texts.to_vec(),))
                    .and_then(|verdicts| verdicts.extract::<Vec<bool>>(py))
                    .map_err(|e| Error::Config(e.value(py).to_string()))
            })
        };
        self.packer()?.set_external_filter((name, Box::new(filter)));
        Ok(())
    }

    /// What cleaning did so far, as JSON: {"sources": {source: report}, "samples": [...]}.
    fn clean_report(&mut self) -> PyResult<String> {
        Ok(serde_json::to_string(&self.packer()?.clean_report())
            .expect("the report always serializes"))
    }

    /// Writes the open shards; returns {"train": [...], "val": [...]} with every shard's counts.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let packer = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err("this Packer has already finished"))?;
        let (train, val) = py.detach(|| packer.finish())?;
        let out = PyDict::new(py);
        out.set_item("train", shard_dicts(py, &train)?)?;
        out.set_item("val", shard_dicts(py, &val)?)?;
        Ok(out)
    }
}

fn read_options(doc_mode: &str, text_field: String, lossy: bool) -> PyResult<ReadOptions> {
    Ok(ReadOptions {
        mode: doc_mode.parse()?,
        text_field,
        lossy,
    })
}

/// Reads corpus files as the packer does and calls `consume(docs, sources)` with each batch of documents
/// and the source (file index, from `first_source`) of each, in order; an exception it raises stops the
/// reading and propagates.
#[pyfunction]
#[pyo3(signature = (paths, consume, doc_mode="file", text_field="text".to_string(), lossy=false, first_source=0))]
fn read_documents(
    paths: Vec<PathBuf>,
    consume: Bound<'_, PyAny>,
    doc_mode: &str,
    text_field: String,
    lossy: bool,
    first_source: u32,
) -> PyResult<()> {
    let options = read_options(doc_mode, text_field, lossy)?;
    let mut failure: Option<PyErr> = None;
    let result = for_each_batch(&paths, first_source, &options, 16 << 20, |batch| {
        let sources: Vec<u32> = batch.positions.iter().map(|p| p.source).collect();
        match consume.call1((batch.docs, sources)) {
            Ok(_) => Ok(()),
            Err(e) => {
                failure = Some(e);
                Err(Error::Cancelled)
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    result.map_err(Into::into)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyTrainer>()?;
    m.add_class::<PyPacker>()?;
    m.add_function(wrap_pyfunction!(read_documents, m)?)?;
    m.add("PACK_JOURNAL", JOURNAL)?;
    m.add("DEDUP_KEYS_FILE", crate::clean::KEYS_FILE)?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    m.add("GPT2_PATTERN", GPT2_PATTERN)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
