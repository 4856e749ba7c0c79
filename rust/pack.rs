//! Packing documents into memory-mappable token shards.
//!
//! Layout (the llm.c / modded-nanogpt one, so their loaders read our shards too):
//!
//! * `{split}_{k:06}.bin`: a header of 256 little-endian int32 — magic 20240520, version, token
//!   count — then the tokens. Version 1 means uint16 tokens; version 2 (our extension, for
//!   vocabularies over 65536) means uint32 tokens.
//! * `{split}_{k:06}.idx`: the document index — 4 little-endian int64 (magic 20240521, version 1,
//!   document count, token count), then the int64 offset of every document's first token.
//!
//! Every document starts with the id of the tokenizer's document-start token ([`PackOptions::bos`]:
//! `<|endoftext|>` for smallm's tokenizers, the model's own BOS such as Llama 3's `<|begin_of_text|>`
//! for an imported one) and is encoded as ordinary text, so a special
//! token string inside a document stays text. Documents never span shards: a shard is closed when
//! the next document would not fit (a document longer than a shard gets a shard of its own).
//! Documents go to the validation split by a hash of their text, so the split does not depend on
//! thread count or file order, and duplicates land on the same side.
//!
//! Output is byte-identical for any thread count. Each shard is written atomically, then recorded
//! in a journal; a re-run with the same fingerprint (inputs, options, tokenizer) skips the
//! documents that finished shards hold and starts the next shard where the journal ends.

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::atomic::{write_atomic, write_atomic_with};
use crate::bpe::Tokenizer;
use crate::clean::{CleanOptions, Cleaner, Sample, SourceReport, Verdict};
pub use crate::corpus::Position;
use crate::corpus::{file_sizes, for_each_batch, ReadOptions};
use crate::{Error, Result};

/// Magic number of a token shard header.
pub const SHARD_MAGIC: i32 = 20240520;
/// Magic number of a document index header.
pub const INDEX_MAGIC: i64 = 20240521;
/// Number of int32 in a shard header.
pub const HEADER_INTS: usize = 256;
/// Name of the journal of finished shards, removed once the manifest is written.
pub const JOURNAL: &str = "pack-journal.json";
/// The special token that starts every document in smallm's own tokenizers.
pub const BOS: &str = "<|endoftext|>";

/// Documents are read and encoded in batches of about this many bytes of text.
const BATCH_BYTES: usize = 8 << 20;

/// Token storage width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// The narrowest width that holds every id of a vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// The header version that announces this width.
    pub fn version(self) -> i32 {
        match self {
            TokenDtype::U16 => 1,
            TokenDtype::U32 => 2,
        }
    }

    /// The numpy name of this width.
    pub fn name(self) -> &'static str {
        match self {
            TokenDtype::U16 => "uint16",
            TokenDtype::U32 => "uint32",
        }
    }
}

/// A finished shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name of the tokens, relative to the output directory.
    pub file: String,
    /// File name of the document index.
    pub index: String,
    pub tokens: u64,
    pub documents: u64,
    /// Bytes of UTF-8 text the shard's documents came from.
    pub text_bytes: u64,
    /// Position of the shard's last document.
    pub end: Position,
}

/// Packing options.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Output directory.
    pub dir: PathBuf,
    /// Most tokens in one shard.
    pub shard_tokens: u64,
    /// Fraction of documents for the validation split, in [0, 1).
    pub val_fraction: f64,
    /// Identifies inputs, options and tokenizer; a journal with another fingerprint is not resumed.
    pub fingerprint: String,
    /// The special token that starts every document ([`BOS`] for smallm's tokenizers).
    pub bos: String,
    /// Filters and deduplication ([`crate::clean`]); nothing is checked by default.
    pub clean: CleanOptions,
    /// Packed directories whose documents count as earlier ones for deduplication.
    pub dedup_against: Vec<PathBuf>,
    /// Judge the documents only: nothing is encoded or written, and the report keeps this many removed
    /// documents per rule as samples.
    pub dry_run: Option<usize>,
}

/// A filter of the caller's: its name in the report and a function from a batch of texts to whether each
/// is kept.
pub type ExternalFilter = (
    String,
    Box<dyn FnMut(&[&str]) -> Result<Vec<bool>> + Send + Sync>,
);

/// What cleaning did: per source, and samples of what each rule removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CleanReport {
    pub sources: std::collections::BTreeMap<u32, SourceReport>,
    pub samples: Vec<Sample>,
}

#[derive(Serialize, Deserialize)]
struct Journal {
    fingerprint: String,
    train: Vec<ShardInfo>,
    val: Vec<ShardInfo>,
}

/// Progress of [`Packer::add_files`].
#[derive(Clone, Copy, Debug)]
pub struct PackProgress {
    /// File bytes done and in all.
    pub bytes: u64,
    pub total: u64,
    /// Tokens written so far (both splits, resumed shards included).
    pub tokens: u64,
}

/// One encoded document on its way into a shard.
struct Document<'a> {
    bos: u32,
    ids: &'a [u32],
    text_bytes: usize,
    at: Position,
}

/// Writes one split's shards.
struct SplitWriter {
    name: &'static str,
    dtype: TokenDtype,
    /// Token bytes of the open shard, little-endian in `dtype`.
    tokens: Vec<u8>,
    starts: Vec<u64>,
    text_bytes: u64,
    last: Option<Position>,
    done: Vec<ShardInfo>,
    /// Documents at or before this position are in shards finished by an earlier run.
    skip_through: Option<Position>,
}

impl SplitWriter {
    fn new(name: &'static str, dtype: TokenDtype, done: Vec<ShardInfo>) -> Self {
        let skip_through = done.last().map(|s| s.end);
        SplitWriter {
            name,
            dtype,
            tokens: Vec::new(),
            starts: Vec::new(),
            text_bytes: 0,
            last: None,
            done,
            skip_through,
        }
    }

    fn width(&self) -> usize {
        match self.dtype {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    fn open_tokens(&self) -> u64 {
        (self.tokens.len() / self.width()) as u64
    }

    fn skips(&self, at: Position) -> bool {
        self.skip_through.is_some_and(|s| at <= s)
    }

    /// Appends a document (BOS + ids), first writing the open shard if the document would not
    /// fit in it. Returns whether a shard was written.
    fn push(&mut self, dir: &Path, doc: Document<'_>, shard_tokens: u64) -> Result<bool> {
        let len = doc.ids.len() as u64 + 1;
        let flushed = !self.starts.is_empty() && self.open_tokens() + len > shard_tokens;
        if flushed {
            self.flush(dir)?;
        }
        self.starts.push(self.open_tokens());
        match self.dtype {
            TokenDtype::U16 => {
                // Every id is below the vocabulary size, which fits in 16 bits for this width.
                self.tokens
                    .extend_from_slice(&(doc.bos as u16).to_le_bytes());
                self.tokens
                    .extend(doc.ids.iter().flat_map(|&id| (id as u16).to_le_bytes()));
            }
            TokenDtype::U32 => {
                self.tokens.extend_from_slice(&doc.bos.to_le_bytes());
                self.tokens
                    .extend(doc.ids.iter().flat_map(|&id| id.to_le_bytes()));
            }
        }
        self.text_bytes += doc.text_bytes as u64;
        self.last = Some(doc.at);
        Ok(flushed)
    }

    /// Writes the open shard, if any, and records it.
    fn flush(&mut self, dir: &Path) -> Result<()> {
        let Some(end) = self.last else { return Ok(()) };
        let k = self.done.len();
        let file = format!("{}_{k:06}.bin", self.name);
        let index = format!("{}_{k:06}.idx", self.name);
        let n = self.open_tokens();
        let count = i32::try_from(n).map_err(|_| {
            Error::Config(format!(
                "{file}: {n} tokens do not fit the shard header's int32 count; use smaller shards"
            ))
        })?;
        let mut header = vec![0i32; HEADER_INTS];
        header[0] = SHARD_MAGIC;
        header[1] = self.dtype.version();
        header[2] = count;
        write_atomic_with(&dir.join(&file), |out| {
            for h in &header {
                out.write_all(&h.to_le_bytes())?;
            }
            out.write_all(&self.tokens)
        })?;
        write_atomic_with(&dir.join(&index), |out| {
            for h in [INDEX_MAGIC, 1, self.starts.len() as i64, n as i64] {
                out.write_all(&h.to_le_bytes())?;
            }
            for &s in &self.starts {
                out.write_all(&(s as i64).to_le_bytes())?;
            }
            Ok(())
        })?;
        self.done.push(ShardInfo {
            file,
            index,
            tokens: n,
            documents: self.starts.len() as u64,
            text_bytes: self.text_bytes,
            end,
        });
        self.tokens.clear();
        self.starts.clear();
        self.text_bytes = 0;
        self.last = None;
        Ok(())
    }
}

/// Encodes documents and writes them into train and validation shards.
pub struct Packer {
    tokenizer: Tokenizer,
    options: PackOptions,
    bos: u32,
    train: SplitWriter,
    val: SplitWriter,
    cleaner: Option<Cleaner>,
    external: Option<ExternalFilter>,
}

impl Packer {
    /// Prepares to pack into `options.dir`, resuming from its journal when the fingerprint matches.
    pub fn new(tokenizer: Tokenizer, options: PackOptions) -> Result<Self> {
        let bos = tokenizer.special_id(&options.bos).ok_or_else(|| {
            Error::Config(format!(
                "the tokenizer has no {} special token; shards need it to mark where each document starts",
                options.bos
            ))
        })?;
        if options.shard_tokens == 0 || options.shard_tokens > i32::MAX as u64 {
            return Err(Error::Config(format!(
                "shard size {} is out of range: it must be between 1 and {} tokens",
                options.shard_tokens,
                i32::MAX
            )));
        }
        if !(0.0..1.0).contains(&options.val_fraction) {
            return Err(Error::Config(format!(
                "validation fraction {} is out of range: it must be in [0, 1)",
                options.val_fraction
            )));
        }
        let cleaner = if options.clean.active() || !options.dedup_against.is_empty() {
            let mut cleaner = Cleaner::new(options.clean.clone(), options.dry_run.unwrap_or(0))?;
            if !options.dedup_against.is_empty() && options.clean.dedup == crate::clean::Dedup::Off
            {
                return Err(Error::Config(
                    "--dedup-against needs --dedup exact or near: which duplicates of it to remove"
                        .into(),
                ));
            }
            for dir in &options.dedup_against {
                cleaner.load_against(dir)?;
            }
            Some(cleaner)
        } else {
            None
        };
        let dtype = TokenDtype::for_vocab(tokenizer.vocab_size());
        if options.dry_run.is_some() {
            return Ok(Packer {
                tokenizer,
                options,
                bos,
                train: SplitWriter::new("train", dtype, Vec::new()),
                val: SplitWriter::new("val", dtype, Vec::new()),
                cleaner,
                external: None,
            });
        }
        std::fs::create_dir_all(&options.dir).map_err(|e| Error::io(&options.dir, e))?;
        let journal_path = options.dir.join(JOURNAL);
        let (train, val) = match std::fs::read_to_string(&journal_path) {
            Ok(text) => {
                let journal: Journal = serde_json::from_str(&text).map_err(|e| Error::Format {
                    path: journal_path.clone(),
                    reason: format!("not a valid journal ({e}); start over with --force"),
                })?;
                if journal.fingerprint != options.fingerprint {
                    return Err(Error::Config(format!(
                        "{} holds an interrupted run with other inputs, options or tokenizer; pass --force to start over",
                        options.dir.display()
                    )));
                }
                (journal.train, journal.val)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), Vec::new()),
            Err(e) => return Err(Error::io(&journal_path, e)),
        };
        let packer = Packer {
            tokenizer,
            options,
            bos,
            train: SplitWriter::new("train", dtype, train),
            val: SplitWriter::new("val", dtype, val),
            cleaner,
            external: None,
        };
        // The journal exists from the start, so a run interrupted before its first shard is
        // still recognised as one to resume.
        packer.write_journal()?;
        Ok(packer)
    }

    /// Sets a filter of the caller's, applied after the built-in ones and before deduplication.
    pub fn set_external_filter(&mut self, filter: ExternalFilter) {
        if self.cleaner.is_none() {
            self.cleaner = Some(
                Cleaner::new(
                    self.options.clean.clone(),
                    self.options.dry_run.unwrap_or(0),
                )
                .expect("checked options"),
            );
        }
        self.external = Some(filter);
    }

    /// What cleaning did so far (empty when nothing is checked).
    pub fn clean_report(&self) -> CleanReport {
        match &self.cleaner {
            Some(c) => CleanReport {
                sources: c.reports().clone(),
                samples: c.samples().to_vec(),
            },
            None => CleanReport::default(),
        }
    }

    /// Numbers of train and validation shards finished by an earlier run.
    pub fn resumed_shards(&self) -> (usize, usize) {
        (self.train.done.len(), self.val.done.len())
    }

    /// The storage width of the tokens.
    pub fn dtype(&self) -> TokenDtype {
        self.train.dtype
    }

    /// The id every document starts with.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// Tokens written so far, both splits, open shards included.
    pub fn tokens_written(&self) -> u64 {
        [&self.train, &self.val]
            .iter()
            .map(|w| w.done.iter().map(|s| s.tokens).sum::<u64>() + w.open_tokens())
            .sum()
    }

    /// Encodes `docs`, the documents `first_document..` of source `source`, and appends each to
    /// its split. Documents that finished shards already hold are skipped without encoding.
    pub fn add_documents<S: AsRef<str> + Sync>(
        &mut self,
        docs: &[S],
        source: u32,
        first_document: u64,
    ) -> Result<()> {
        let positions: Vec<Position> = (0..docs.len() as u64)
            .map(|i| Position {
                source,
                document: first_document + i,
            })
            .collect();
        self.add_at(docs, &positions)
    }

    /// [`Packer::add_documents`] with the position of every document given.
    fn add_at<S: AsRef<str> + Sync>(&mut self, docs: &[S], positions: &[Position]) -> Result<()> {
        // Every document is judged, those of finished shards too: the cleaner remembers their keys.
        let verdicts = match self.cleaner.as_mut() {
            Some(cleaner) => {
                let all: Vec<&str> = docs.iter().map(|d| d.as_ref()).collect();
                let external = match self.external.as_mut() {
                    Some((name, filter)) => {
                        let keep = filter(&all)?;
                        if keep.len() != all.len() {
                            return Err(Error::Config(format!(
                                "the filter {name} returned {} verdicts for {} documents",
                                keep.len(),
                                all.len()
                            )));
                        }
                        Some((name.clone(), keep))
                    }
                    None => None,
                };
                let sources: Vec<u32> = positions.iter().map(|p| p.source).collect();
                let documents: Vec<u64> = positions.iter().map(|p| p.document).collect();
                let external = external
                    .as_ref()
                    .map(|(name, keep)| (name.as_str(), keep.as_slice()));
                Some(cleaner.judge(&all, &sources, &documents, external))
            }
            None => None,
        };
        if self.options.dry_run.is_some() {
            return Ok(());
        }
        let kept = |i: usize| verdicts.as_ref().map_or(true, |v| v[i] == Verdict::Keep);
        let fraction = self.options.val_fraction;
        let to_val: Vec<bool> = docs
            .par_iter()
            .map(|d| is_validation(d.as_ref(), fraction))
            .collect();
        let wanted: Vec<usize> = (0..docs.len())
            .filter(|&i| !docs[i].as_ref().is_empty() && kept(i))
            .filter(|&i| !(if to_val[i] { &self.val } else { &self.train }).skips(positions[i]))
            .collect();
        let texts: Vec<&str> = wanted.iter().map(|&i| docs[i].as_ref()).collect();
        let (ids, offsets) = self.tokenizer.encode_batch(&texts, None)?;
        for (k, &i) in wanted.iter().enumerate() {
            let doc = Document {
                bos: self.bos,
                ids: &ids[offsets[k]..offsets[k + 1]],
                text_bytes: texts[k].len(),
                at: positions[i],
            };
            let writer = if to_val[i] {
                &mut self.val
            } else {
                &mut self.train
            };
            if writer.push(&self.options.dir, doc, self.options.shard_tokens)? {
                self.write_journal()?;
            }
        }
        Ok(())
    }

    /// Reads and packs corpus files; file `i` is source `first_source + i`. Documents of many
    /// small files are encoded together so that small files still use every core, and a reader
    /// thread reads the next batch while this one is encoded.
    pub fn add_files(
        &mut self,
        paths: &[PathBuf],
        first_source: u32,
        read: &ReadOptions,
        progress: &mut dyn FnMut(PackProgress) -> bool,
    ) -> Result<()> {
        let total: u64 = file_sizes(paths)?.iter().sum();
        for_each_batch(paths, first_source, read, BATCH_BYTES, |batch| {
            self.add_at(&batch.docs, &batch.positions)?;
            let tokens = self.tokens_written();
            match progress(PackProgress {
                bytes: batch.bytes_done,
                total,
                tokens,
            }) {
                true => Ok(()),
                false => Err(Error::Cancelled),
            }
        })
    }

    /// Writes the open shards and returns every shard of each split, earlier runs' included.
    /// The journal stays until the caller has written the manifest and removes it.
    pub fn finish(mut self) -> Result<(Vec<ShardInfo>, Vec<ShardInfo>)> {
        if self.options.dry_run.is_some() {
            return Ok((Vec::new(), Vec::new()));
        }
        if let Some(cleaner) = &self.cleaner {
            if cleaner.options().dedup != crate::clean::Dedup::Off {
                cleaner.write_keys(&self.options.dir)?;
            }
        }
        self.train.flush(&self.options.dir)?;
        self.val.flush(&self.options.dir)?;
        self.write_journal()?;
        Ok((self.train.done, self.val.done))
    }

    fn write_journal(&self) -> Result<()> {
        let journal = Journal {
            fingerprint: self.options.fingerprint.clone(),
            train: self.train.done.clone(),
            val: self.val.done.clone(),
        };
        let text = serde_json::to_string_pretty(&journal).expect("the journal always serializes");
        write_atomic(&self.options.dir.join(JOURNAL), text.as_bytes())
    }
}

/// Whether a document belongs to the validation split: a stable 64-bit hash of its text (FNV-1a,
/// then the splitmix64 finaliser to spread the bits), read as a fraction of 2^64.
pub fn is_validation(text: &str, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let h = crate::clean::stable_hash(text.bytes());
    ((h >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < fraction
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::GPT4_PATTERN;
    use crate::train::{TrainOptions, WordCounts};

    fn tokenizer() -> Tokenizer {
        let mut c = WordCounts::new(GPT4_PATTERN).unwrap();
        c.add_documents(&["the cat sat on the mat. 고양이가 매트 위에 앉았다. <|endoftext|> 🙂"])
            .unwrap();
        let options = TrainOptions {
            vocab_size: 330,
            special_tokens: vec!["<|endoftext|>".into(), "<|im_start|>".into()],
            min_frequency: 1,
        };
        c.train(&options, &mut |_| true).unwrap().0
    }

    fn docs() -> Vec<String> {
        (0..300)
            .map(|i| match i % 4 {
                0 => format!("document {i}: the cat sat on the mat"),
                1 => format!("문서 {i}: 고양이가 매트 위에 앉았다 🙂"),
                2 => format!("<|im_start|>user {i}<|endoftext|> stays text"),
                _ => "x".repeat(i),
            })
            .collect()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("smallm-pack-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn options(dir: &Path) -> PackOptions {
        PackOptions {
            dir: dir.to_path_buf(),
            shard_tokens: 600,
            val_fraction: 0.1,
            fingerprint: "f1".into(),
            bos: BOS.into(),
            clean: CleanOptions::default(),
            dedup_against: Vec::new(),
            dry_run: None,
        }
    }

    fn pack(dir: &Path, docs: &[String]) -> (Vec<ShardInfo>, Vec<ShardInfo>) {
        let mut p = Packer::new(tokenizer(), options(dir)).unwrap();
        p.add_documents(&docs[..100], 0, 0).unwrap();
        p.add_documents(&docs[100..], 0, 100).unwrap();
        p.finish().unwrap()
    }

    /// The documents of one shard as token lists, read back from the files.
    fn read_shard(dir: &Path, info: &ShardInfo) -> Vec<Vec<u32>> {
        let bin = std::fs::read(dir.join(&info.file)).unwrap();
        let header: Vec<i32> = bin[..1024]
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&header[..3], &[SHARD_MAGIC, 1, info.tokens as i32]);
        assert!(header[3..].iter().all(|&h| h == 0));
        assert_eq!(bin.len(), 1024 + 2 * info.tokens as usize);
        let tokens: Vec<u32> = bin[1024..]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect();
        let idx = std::fs::read(dir.join(&info.index)).unwrap();
        let ints: Vec<i64> = idx
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            &ints[..4],
            &[INDEX_MAGIC, 1, info.documents as i64, info.tokens as i64]
        );
        let mut starts: Vec<usize> = ints[4..].iter().map(|&s| s as usize).collect();
        starts.push(tokens.len());
        starts
            .windows(2)
            .map(|w| tokens[w[0]..w[1]].to_vec())
            .collect()
    }

    #[test]
    fn shards_give_back_every_document_after_its_bos() {
        let dir = temp_dir("roundtrip");
        let docs = docs();
        let (train, val) = pack(&dir, &docs);
        let tok = tokenizer();
        let bos = tok.special_id(BOS).unwrap();
        assert!(train.len() > 1 && !val.is_empty());
        let mut seen = Vec::new();
        for info in train.iter().chain(&val) {
            assert!(
                info.tokens <= 600 || info.documents == 1,
                "documents never span shards"
            );
            for ids in read_shard(&dir, info) {
                assert_eq!(ids[0], bos);
                assert!(
                    !ids[1..].contains(&bos),
                    "special strings inside documents stay text"
                );
                seen.push(String::from_utf8(tok.decode_bytes(&ids[1..]).unwrap()).unwrap());
            }
        }
        let mut expected = docs.clone();
        expected.sort();
        seen.sort();
        assert_eq!(seen, expected);
        let n_val: u64 = val.iter().map(|s| s.documents).sum();
        assert!(
            (10..=60).contains(&n_val),
            "{n_val} validation documents of 300"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cleaning_keeps_duplicates_and_filtered_documents_out_of_the_shards() {
        use crate::clean::{Dedup, Filters};
        let mut docs = docs();
        let copies = docs[..50].to_vec();
        docs.extend(copies); // 50 exact copies
        docs.push("x".into()); // one word
        let clean = CleanOptions {
            dedup: Dedup::Near,
            filters: Filters {
                min_words: Some(2),
                ..Default::default()
            },
            ..Default::default()
        };
        let run = |threads: usize, dry_run: Option<usize>| {
            let dir = temp_dir(&format!("clean{threads}{}", dry_run.is_some()));
            let opts = PackOptions {
                clean: clean.clone(),
                dry_run,
                ..options(&dir)
            };
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (shards, report) = pool.install(|| {
                let mut p = Packer::new(tokenizer(), opts).unwrap();
                p.add_documents(&docs[..120], 0, 0).unwrap();
                p.add_documents(&docs[120..], 0, 120).unwrap();
                let report = p.clean_report();
                (p.finish().unwrap(), report)
            });
            let packed: u64 = shards.0.iter().chain(&shards.1).map(|s| s.documents).sum();
            let keys = std::fs::read(dir.join(crate::clean::KEYS_FILE)).ok();
            let _ = std::fs::remove_dir_all(&dir);
            (packed, report, keys)
        };
        let (packed, report, keys) = run(1, None);
        let source = &report.sources[&0];
        assert_eq!(source.read.documents, docs.len() as u64);
        // The filter comes first: the 12 one-word copies ("xxx...") go as too short, not as copies.
        let one_word = docs
            .iter()
            .filter(|d| d.split_whitespace().count() < 2)
            .count() as u64;
        assert_eq!(source.removed["min_words"].documents, one_word);
        assert_eq!(source.removed["exact"].documents, 50 - 12);
        let removed: u64 = source.removed.values().map(|t| t.documents).sum();
        assert_eq!(packed, source.kept.documents);
        assert_eq!(packed + removed, docs.len() as u64);
        let (packed3, report3, keys3) = run(3, None);
        assert_eq!((packed3, &keys3), (packed, &keys));
        assert_eq!(report3.sources, report.sources);
        let (dry, dry_report, dry_keys) = run(2, Some(3));
        assert_eq!((dry, dry_keys), (0, None));
        assert_eq!(dry_report.sources, report.sources);
        assert_eq!(
            dry_report
                .samples
                .iter()
                .filter(|s| s.rule == "exact")
                .count(),
            3
        );
    }

    #[test]
    fn output_is_identical_for_any_thread_count() {
        let docs = docs();
        let run = |threads| {
            let dir = temp_dir(&format!("threads{threads}"));
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (train, val) = pool.install(|| pack(&dir, &docs));
            let files: Vec<Vec<u8>> = train
                .iter()
                .chain(&val)
                .flat_map(|s| [&s.file, &s.index])
                .map(|f| std::fs::read(dir.join(f)).unwrap())
                .collect();
            std::fs::remove_dir_all(&dir).unwrap();
            files
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn interrupted_run_resumes_to_identical_shards() {
        let docs = docs();
        let whole = temp_dir("whole");
        let (train, val) = pack(&whole, &docs);

        let dir = temp_dir("resumed");
        let mut first = Packer::new(tokenizer(), options(&dir)).unwrap();
        first.add_documents(&docs[..150], 0, 0).unwrap();
        drop(first); // interrupted: the open shards are lost, the journal keeps the finished ones
        let mut second = Packer::new(tokenizer(), options(&dir)).unwrap();
        assert!(second.resumed_shards().0 > 0);
        second.add_documents(&docs[..100], 0, 0).unwrap();
        second.add_documents(&docs[100..], 0, 100).unwrap();
        let (train2, val2) = second.finish().unwrap();
        assert_eq!(train.len(), train2.len());
        assert_eq!(val.len(), val2.len());
        for s in train.iter().chain(&val) {
            for f in [&s.file, &s.index] {
                assert_eq!(
                    std::fs::read(whole.join(f)).unwrap(),
                    std::fs::read(dir.join(f)).unwrap(),
                    "{f}"
                );
            }
        }
        let other = PackOptions {
            fingerprint: "f2".into(),
            ..options(&dir)
        };
        let err = Packer::new(tokenizer(), other).err().unwrap().to_string();
        assert!(err.contains("--force"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&whole).unwrap();
    }

    #[test]
    fn packing_files_equals_packing_their_documents() {
        let docs = docs();
        let src = temp_dir("files-src");
        std::fs::create_dir_all(&src).unwrap();
        let paths: Vec<PathBuf> = docs
            .chunks(60)
            .enumerate()
            .map(|(i, chunk)| {
                let p = src.join(format!("part{i}.txt"));
                std::fs::write(
                    &p,
                    chunk.iter().map(|d| format!("{d}\n")).collect::<String>(),
                )
                .unwrap();
                p
            })
            .collect();
        let lines = ReadOptions {
            mode: crate::corpus::DocMode::Line,
            ..ReadOptions::default()
        };
        let from_files = temp_dir("from-files");
        let mut p = Packer::new(tokenizer(), options(&from_files)).unwrap();
        p.add_files(&paths, 0, &lines, &mut |_| true).unwrap();
        let (train, val) = p.finish().unwrap();
        let from_docs = temp_dir("from-docs");
        let mut p = Packer::new(tokenizer(), options(&from_docs)).unwrap();
        for (i, chunk) in docs.chunks(60).enumerate() {
            p.add_documents(chunk, i as u32, 0).unwrap();
        }
        p.finish().unwrap();
        for s in train.iter().chain(&val) {
            assert_eq!(
                std::fs::read(from_files.join(&s.file)).unwrap(),
                std::fs::read(from_docs.join(&s.file)).unwrap()
            );
        }
        let journal = |d: &Path| std::fs::read_to_string(d.join(JOURNAL)).unwrap();
        assert_eq!(
            journal(&from_files),
            journal(&from_docs),
            "same positions recorded"
        );
        for d in [&src, &from_files, &from_docs] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn bad_options_are_refused() {
        let dir = temp_dir("options");
        let zero = PackOptions {
            shard_tokens: 0,
            ..options(&dir)
        };
        assert!(Packer::new(tokenizer(), zero).is_err());
        let all_val = PackOptions {
            val_fraction: 1.0,
            ..options(&dir)
        };
        assert!(Packer::new(tokenizer(), all_val).is_err());
        let no_bos = Tokenizer::new(GPT4_PATTERN, vec![], vec!["<|im_end|>".into()]).unwrap();
        assert!(Packer::new(no_bos, options(&dir))
            .err()
            .unwrap()
            .to_string()
            .contains("<|endoftext|>"));
        let other = PackOptions {
            bos: "<|begin_of_text|>".into(),
            ..options(&dir)
        };
        let err = Packer::new(tokenizer(), other).err().unwrap().to_string();
        assert!(err.contains("<|begin_of_text|>"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn validation_choice_is_a_stable_function_of_the_text() {
        assert!(!is_validation("anything", 0.0));
        let picked = (0..10_000)
            .filter(|i| is_validation(&format!("doc {i}"), 0.05))
            .count();
        assert!((400..600).contains(&picked), "{picked}");
        assert_eq!(
            is_validation("same text", 0.5),
            is_validation("same text", 0.5)
        );
    }
}
