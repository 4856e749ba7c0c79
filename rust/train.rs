//! Byte-level BPE training.
//!
//! Two phases. Counting: documents are pre-tokenized in parallel and every distinct piece is
//! counted (u64). Merging: starting from the 256 byte symbols, the most frequent adjacent pair
//! is merged into a new symbol, over and over. Pair counts are updated incrementally: a merge
//! only visits the pieces that contain its pair (an index kept per pair) and adjusts the counts
//! of the pairs around each occurrence, and a max-heap with lazily refreshed entries finds the
//! next best pair.
//!
//! Tie-breaking: among pairs with the same count, the pair with the smaller (left id, right id)
//! wins. Counts and ties do not depend on the order pieces are visited, so the result is the
//! same for any number of threads.
//!
//! A pair whose merged bytes equal an existing token's (possible in rare overlapping cases) is
//! never merged: two ids with the same bytes cannot be written in the Hugging Face or tiktoken
//! formats.

use std::collections::BinaryHeap;
use std::path::PathBuf;

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use unicode_normalization::UnicodeNormalization;

use crate::bpe::{pair_key, Tokenizer};
use crate::corpus::{file_sizes, for_each_batch, ReadOptions};
use crate::pretokenize::PreTokenizer;
use crate::sentencepiece::{cut_words, SentencePiece};
use crate::{Error, Result};

/// Files are read and counted in batches of about this many bytes of text, which bounds memory.
const BATCH_BYTES: usize = 16 << 20;

/// Calls the merge-phase progress callback this often.
const PROGRESS_EVERY_MERGES: usize = 256;

/// What a long-running step reports to its progress callback.
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    /// Counting pieces: bytes done out of the total (0 when the total is unknown).
    Counting { bytes: u64, total: u64 },
    /// Merging: merges done out of the number wanted.
    Merging { done: usize, total: usize },
}

/// A progress callback; returning `false` cancels the work with [`Error::Cancelled`].
pub type ProgressFn<'a> = dyn FnMut(Progress) -> bool + 'a;

/// Options of the merge phase.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Wanted vocabulary size: 256 bytes + merges + special tokens.
    pub vocab_size: usize,
    /// Special token strings; they take the ids after the merges, in this order.
    pub special_tokens: Vec<String>,
    /// Pairs seen fewer times than this are never merged; training stops early instead.
    pub min_frequency: u64,
}

/// The outcome of training besides the tokenizer.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// Vocabulary size that was asked for.
    pub requested_vocab_size: usize,
    /// Vocabulary size reached (smaller when the corpus ran out of pairs).
    pub vocab_size: usize,
    /// Number of distinct pre-tokenized pieces.
    pub unique_pieces: usize,
    /// Number of pre-tokenized pieces in the corpus.
    pub total_pieces: u64,
    /// Bytes of text counted.
    pub total_bytes: u64,
    /// Number of documents counted.
    pub documents: u64,
}

/// Counts of the distinct pre-tokenized pieces of a corpus, fed in as documents or files.
pub struct WordCounts {
    pretokenizer: PreTokenizer,
    normalize: Normalize,
    pub(crate) counts: FxHashMap<Box<str>, u64>,
    total_pieces: u64,
    total_bytes: u64,
    pub(crate) total_chars: u64,
    pub(crate) documents: u64,
}

/// How text is prepared before it is cut into pieces: as it is, in Unicode normal form C (Qwen's
/// tokenizers), or as a SentencePiece-style BPE writes it (spaces as `▁`), cut into its words.
enum Normalize {
    None,
    Nfc,
    SentencePiece(Box<SentencePiece>),
}

impl WordCounts {
    /// An empty count for the pre-tokenization `pattern`.
    pub fn new(pattern: &str) -> Result<Self> {
        Ok(WordCounts {
            pretokenizer: PreTokenizer::new(pattern)?,
            normalize: Normalize::None,
            counts: FxHashMap::default(),
            total_pieces: 0,
            total_bytes: 0,
            total_chars: 0,
            documents: 0,
        })
    }

    /// An empty count that cuts text into the pieces `tokenizer` merges within: its pre-tokenizer's (after
    /// its normalisation), or a SentencePiece-style BPE's words.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Self {
        let normalize = match (tokenizer.sentencepiece_parts(), tokenizer.foreign_parts()) {
            (Some(sp), _) => Normalize::SentencePiece(Box::new(sp.clone())),
            (None, Some(f)) if f.nfc => Normalize::Nfc,
            _ => Normalize::None,
        };
        WordCounts {
            pretokenizer: tokenizer.pretokenizer().clone(),
            normalize,
            counts: FxHashMap::default(),
            total_pieces: 0,
            total_bytes: 0,
            total_chars: 0,
            documents: 0,
        }
    }

    /// Calls `f` with the pieces of one unit of (normalised) text.
    fn split<'t>(&self, unit: &'t str, f: impl FnMut(&'t str)) -> Result<()> {
        match &self.normalize {
            Normalize::SentencePiece(sp) => {
                cut_words(unit, sp.spaces().split, f);
                Ok(())
            }
            _ => self.pretokenizer.split(unit, f),
        }
    }

    /// Number of distinct pieces so far.
    pub fn unique_pieces(&self) -> usize {
        self.counts.len()
    }

    /// Bytes of text counted so far.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Counts the pieces of each document (in parallel).
    pub fn add_documents<S: AsRef<str> + Sync>(&mut self, docs: &[S]) -> Result<()> {
        let normal: Vec<String> = match &self.normalize {
            Normalize::None => Vec::new(),
            Normalize::Nfc => docs
                .par_iter()
                .map(|d| d.as_ref().nfc().collect())
                .collect(),
            Normalize::SentencePiece(sp) => docs
                .par_iter()
                .map(|d| sp.normalize(d.as_ref(), true))
                .collect(),
        };
        let texts: Vec<&str> = match &self.normalize {
            Normalize::None => docs.iter().map(AsRef::as_ref).collect(),
            _ => normal.iter().map(String::as_str).collect(),
        };
        // Big documents are cut where the pre-tokenizer allows, so one file can use every core.
        let units: Vec<&str> = match &self.normalize {
            Normalize::SentencePiece(_) => texts,
            _ => texts
                .iter()
                .flat_map(|d| self.pretokenizer.chunks(d, 1 << 20))
                .collect(),
        };
        let local = units
            .par_iter()
            .try_fold(FxHashMap::<&str, u64>::default, |mut m, unit| {
                self.split(unit, |piece| *m.entry(piece).or_insert(0) += 1)?;
                Ok::<_, Error>(m)
            })
            .try_reduce(FxHashMap::default, |a, b| {
                let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                for (k, v) in small {
                    *big.entry(k).or_insert(0) += v;
                }
                Ok(big)
            })?;
        self.counts.reserve(
            local
                .len()
                .saturating_sub(self.counts.capacity() - self.counts.len()),
        );
        for (piece, n) in local {
            self.total_pieces += n;
            match self.counts.get_mut(piece) {
                Some(c) => *c += n,
                None => {
                    self.counts.insert(piece.into(), n);
                }
            }
        }
        self.total_bytes += docs.iter().map(|d| d.as_ref().len() as u64).sum::<u64>();
        self.total_chars += docs
            .par_iter()
            .map(|d| d.as_ref().chars().count() as u64)
            .sum::<u64>();
        self.documents += docs.len() as u64;
        Ok(())
    }

    /// Reads and counts corpus files directly (see [`crate::corpus`] for the formats). Documents
    /// of many small files are counted together so that small files still use every core.
    pub fn add_files(
        &mut self,
        paths: &[PathBuf],
        options: &ReadOptions,
        progress: &mut ProgressFn,
    ) -> Result<()> {
        let total: u64 = file_sizes(paths)?.iter().sum();
        for_each_batch(paths, 0, options, BATCH_BYTES, |batch| {
            self.add_documents(&batch.docs)?;
            match progress(Progress::Counting {
                bytes: batch.bytes_done,
                total,
            }) {
                true => Ok(()),
                false => Err(Error::Cancelled),
            }
        })
    }

    /// Learns the merges and returns the tokenizer with a report.
    pub fn train(
        self,
        options: &TrainOptions,
        progress: &mut ProgressFn,
    ) -> Result<(Tokenizer, TrainReport)> {
        let n_special = options.special_tokens.len();
        let smallest = 256 + n_special;
        if options.vocab_size < smallest {
            return Err(Error::Config(format!(
                "vocab_size {} is too small: it must be at least 256 (the bytes) + {n_special} special tokens = {smallest}",
                options.vocab_size
            )));
        }
        if options.vocab_size > u32::MAX as usize {
            return Err(Error::Config(format!(
                "vocab_size {} does not fit in 32-bit ids",
                options.vocab_size
            )));
        }
        if self.total_bytes == 0 {
            return Err(Error::Config(
                "the corpus is empty: there is no text to train on".into(),
            ));
        }
        let unique_pieces = self.counts.len();
        let wanted = options.vocab_size - smallest;
        let mut merger = Merger::new(self.counts);
        let bytes = (0..=255u8).map(|b| vec![b]).collect();
        let (merges, _) = merger.run(wanted, options.min_frequency.max(1), bytes, progress)?;
        let vocab_size = smallest + merges.len();
        let tokenizer = Tokenizer::new(
            self.pretokenizer.pattern(),
            merges,
            options.special_tokens.clone(),
        )?;
        let report = TrainReport {
            requested_vocab_size: options.vocab_size,
            vocab_size,
            unique_pieces,
            total_pieces: self.total_pieces,
            total_bytes: self.total_bytes,
            documents: self.documents,
        };
        Ok((tokenizer, report))
    }
}

/// The merges made, in order, and the bytes of every id after them.
pub(crate) type Merged = (Vec<(u32, u32)>, Vec<Vec<u8>>);

/// The state of the merge phase: every distinct piece of two or more symbols, stored flat.
pub(crate) struct Merger {
    /// Symbols of all words, word `w` at `start[w]..start[w] + len[w]`; merges shrink words in place.
    symbols: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    /// How often each word occurs in the corpus.
    count: Vec<u64>,
    /// Current count of every adjacent pair (weighted by word counts).
    pair_count: FxHashMap<u64, i64>,
    /// Words that contain (or once contained) each pair; stale entries are skipped when used.
    pair_words: FxHashMap<u64, Vec<u32>>,
}

impl Merger {
    fn new(counts: FxHashMap<Box<str>, u64>) -> Self {
        let mut symbols = Vec::new();
        let mut start = Vec::new();
        let mut len = Vec::new();
        let mut count = Vec::new();
        for (piece, n) in counts {
            // A single byte has no pair and can never change.
            if piece.len() < 2 {
                continue;
            }
            start.push(symbols.len());
            len.push(piece.len() as u32);
            count.push(n);
            symbols.extend(piece.bytes().map(u32::from));
        }
        // All initial pairs are byte pairs, so dense tables indexed by (a << 8 | b) suffice.
        let mut dense_count = vec![0i64; 1 << 16];
        let mut dense_words: Vec<Vec<u32>> = vec![Vec::new(); 1 << 16];
        for w in 0..start.len() {
            let word = &symbols[start[w]..start[w] + len[w] as usize];
            for pair in word.windows(2) {
                let k = (pair[0] << 8 | pair[1]) as usize;
                dense_count[k] += count[w] as i64;
                let list = &mut dense_words[k];
                if list.last() != Some(&(w as u32)) {
                    list.push(w as u32);
                }
            }
        }
        let mut pair_count = FxHashMap::default();
        let mut pair_words = FxHashMap::default();
        for (k, (c, words)) in dense_count.into_iter().zip(dense_words).enumerate() {
            if c > 0 {
                let key = pair_key((k >> 8) as u32, (k & 0xff) as u32);
                pair_count.insert(key, c);
                pair_words.insert(key, words);
            }
        }
        Merger {
            symbols,
            start,
            len,
            count,
            pair_count,
            pair_words,
        }
    }

    /// The symbols of all its words, weighted by their counts (words of fewer than two symbols are not
    /// kept).
    pub(crate) fn total(&self) -> u64 {
        self.len
            .iter()
            .zip(&self.count)
            .map(|(&l, &n)| u64::from(l) * n)
            .sum()
    }

    /// The merge state of words that start as any symbols: `(symbols, count)`.
    pub(crate) fn from_words(words: impl IntoIterator<Item = (Vec<u32>, u64)>) -> Self {
        let mut merger = Merger {
            symbols: Vec::new(),
            start: Vec::new(),
            len: Vec::new(),
            count: Vec::new(),
            pair_count: FxHashMap::default(),
            pair_words: FxHashMap::default(),
        };
        for (word, n) in words {
            if word.len() < 2 {
                continue;
            }
            let w = merger.start.len() as u32;
            merger.start.push(merger.symbols.len());
            merger.len.push(word.len() as u32);
            merger.count.push(n);
            for pair in word.windows(2) {
                let key = pair_key(pair[0], pair[1]);
                *merger.pair_count.entry(key).or_insert(0) += n as i64;
                let list = merger.pair_words.entry(key).or_default();
                if list.last() != Some(&w) {
                    list.push(w);
                }
            }
            merger.symbols.extend(word);
        }
        merger
    }

    /// Performs up to `wanted` merges and returns them in order, with the bytes of every id: those of
    /// the ids there are (`token_bytes`, indexed by id; empty for an id no merge may make), then one new
    /// id per merge. A merge whose bytes are an existing token's is never made.
    pub(crate) fn run(
        &mut self,
        wanted: usize,
        min_frequency: u64,
        mut token_bytes: Vec<Vec<u8>>,
        progress: &mut ProgressFn,
    ) -> Result<Merged> {
        let mut merges: Vec<(u32, u32)> = Vec::with_capacity(wanted);
        let mut known: FxHashSet<Vec<u8>> = token_bytes
            .iter()
            .filter(|b| !b.is_empty())
            .cloned()
            .collect();
        let mut banned: FxHashSet<u64> = FxHashSet::default();
        // Max-heap of (count, Reverse(pair)): highest count first, then the smaller pair.
        let mut heap: BinaryHeap<(i64, std::cmp::Reverse<u64>)> = self
            .pair_count
            .iter()
            .map(|(&k, &c)| (c, std::cmp::Reverse(k)))
            .collect();
        let mut delta: FxHashMap<u64, i64> = FxHashMap::default();
        while merges.len() < wanted {
            let Some((stored, std::cmp::Reverse(key))) = heap.pop() else {
                break;
            };
            let current = self.pair_count.get(&key).copied().unwrap_or(0);
            if current != stored {
                // Counts of existing pairs only fall, so a refreshed entry is still an upper bound.
                if current > 0 {
                    heap.push((current, std::cmp::Reverse(key)));
                }
                continue;
            }
            if (current as u64) < min_frequency {
                break;
            }
            let (left, right) = ((key >> 32) as u32, key as u32);
            let mut bytes = token_bytes[left as usize].clone();
            bytes.extend_from_slice(&token_bytes[right as usize]);
            if known.contains(&bytes) {
                banned.insert(key);
                self.pair_count.remove(&key);
                self.pair_words.remove(&key);
                continue;
            }
            let new_id = token_bytes.len() as u32;
            known.insert(bytes.clone());
            token_bytes.push(bytes);
            merges.push((left, right));

            let words = self.pair_words.remove(&key).unwrap_or_default();
            self.pair_count.remove(&key);
            delta.clear();
            for &w in &words {
                self.merge_in_word(w as usize, left, right, new_id, &mut delta);
            }
            for (&k, &d) in &delta {
                if k == key || d == 0 || banned.contains(&k) {
                    continue;
                }
                let c = self.pair_count.entry(k).or_insert(0);
                *c += d;
                let c = *c;
                if c <= 0 {
                    self.pair_count.remove(&k);
                } else if (k >> 32) as u32 == new_id || k as u32 == new_id {
                    heap.push((c, std::cmp::Reverse(k)));
                }
            }
            if merges.len() % PROGRESS_EVERY_MERGES == 0
                && !progress(Progress::Merging {
                    done: merges.len(),
                    total: wanted,
                })
            {
                return Err(Error::Cancelled);
            }
        }
        if !progress(Progress::Merging {
            done: merges.len(),
            total: wanted,
        }) {
            return Err(Error::Cancelled);
        }
        Ok((merges, token_bytes))
    }

    /// Replaces every (left, right) in word `w` by `new_id`, left to right, recording the change
    /// of each neighbouring pair's count in `delta` and indexing the new pairs.
    fn merge_in_word(
        &mut self,
        w: usize,
        left: u32,
        right: u32,
        new_id: u32,
        delta: &mut FxHashMap<u64, i64>,
    ) {
        let s = self.start[w];
        let end = s + self.len[w] as usize;
        let n = self.count[w] as i64;
        let syms = &mut self.symbols;
        let mut read = s;
        let mut write = s;
        let mut changed = false;
        while read < end {
            if read + 1 < end && syms[read] == left && syms[read + 1] == right {
                changed = true;
                if write > s {
                    let before = syms[write - 1];
                    *delta.entry(pair_key(before, left)).or_insert(0) -= n;
                    *delta.entry(pair_key(before, new_id)).or_insert(0) += n;
                }
                if read + 2 < end {
                    let after = syms[read + 2];
                    *delta.entry(pair_key(right, after)).or_insert(0) -= n;
                    *delta.entry(pair_key(new_id, after)).or_insert(0) += n;
                }
                syms[write] = new_id;
                read += 2;
            } else {
                syms[write] = syms[read];
                read += 1;
            }
            write += 1;
        }
        if !changed {
            return;
        }
        self.len[w] = (write - s) as u32;
        // Index the word under every pair it now has that involves the new symbol.
        for i in s..write.saturating_sub(1) {
            let (a, b) = (syms[i], syms[i + 1]);
            if a == new_id || b == new_id {
                let list = self.pair_words.entry(pair_key(a, b)).or_default();
                if list.last() != Some(&(w as u32)) {
                    list.push(w as u32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::{GPT2_PATTERN, GPT4_PATTERN};

    fn no_progress() -> impl FnMut(Progress) -> bool {
        |_| true
    }

    fn train_on(docs: &[&str], vocab_size: usize) -> (Tokenizer, TrainReport) {
        let mut counts = WordCounts::new(GPT4_PATTERN).unwrap();
        counts.add_documents(docs).unwrap();
        let options = TrainOptions {
            vocab_size,
            special_tokens: vec!["<|endoftext|>".into()],
            min_frequency: 1,
        };
        counts.train(&options, &mut no_progress()).unwrap()
    }

    /// Recounts all pairs from scratch at every step: slow, obviously right.
    fn reference_merges(docs: &[&str], pattern: &str, wanted: usize) -> Vec<(u32, u32)> {
        let pre = PreTokenizer::new(pattern).unwrap();
        let mut words: FxHashMap<Vec<u32>, u64> = FxHashMap::default();
        for d in docs {
            pre.split(d, |p| {
                *words.entry(p.bytes().map(u32::from).collect()).or_insert(0) += 1
            })
            .unwrap();
        }
        let mut merges = Vec::new();
        while merges.len() < wanted {
            let mut pairs: FxHashMap<(u32, u32), u64> = FxHashMap::default();
            for (w, n) in &words {
                for p in w.windows(2) {
                    *pairs.entry((p[0], p[1])).or_insert(0) += n;
                }
            }
            let Some((&best, _)) = pairs
                .iter()
                .max_by_key(|&(&p, &c)| (c, std::cmp::Reverse(p)))
            else {
                break;
            };
            let new_id = 256 + merges.len() as u32;
            merges.push(best);
            words = words
                .into_iter()
                .map(|(w, n)| {
                    let mut out = Vec::with_capacity(w.len());
                    let mut i = 0;
                    while i < w.len() {
                        if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                            out.push(new_id);
                            i += 2;
                        } else {
                            out.push(w[i]);
                            i += 1;
                        }
                    }
                    (out, n)
                })
                .fold(FxHashMap::default(), |mut m, (w, n)| {
                    *m.entry(w).or_insert(0) += n;
                    m
                });
        }
        merges
    }

    const TEXT: &[&str] = &[
        "the cat sat on the mat; the cat ate the rat.",
        "aaaa aaa aa a abab ababab bbbb",
        "영화 정말 재밌어요 ㅋㅋㅋ 영화관에서 봤어요 🙂🙂",
        "def f(x):\n    return x + 1\n\n\nprint(f(41))  \n",
    ];

    #[test]
    fn incremental_merges_equal_full_recount() {
        let (tok, report) = train_on(TEXT, 256 + 1 + 60);
        assert_eq!(report.vocab_size, 317);
        assert_eq!(tok.merges(), &reference_merges(TEXT, GPT4_PATTERN, 60)[..]);
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let docs: Vec<String> = (0..200)
            .map(|i| format!("{} number {i} {}", TEXT[i % 4], TEXT[(i + 1) % 4]))
            .collect();
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut c = WordCounts::new(GPT2_PATTERN).unwrap();
                c.add_documents(&docs).unwrap();
                let options = TrainOptions {
                    vocab_size: 400,
                    special_tokens: vec![],
                    min_frequency: 2,
                };
                c.train(&options, &mut no_progress())
                    .unwrap()
                    .0
                    .merges()
                    .to_vec()
            })
        };
        assert_eq!(run(1), run(4));
    }

    #[test]
    fn small_corpus_stops_early_and_reports_it() {
        let (tok, report) = train_on(&["abc abc"], 1000);
        assert!(report.vocab_size < 1000);
        assert_eq!(tok.vocab_size(), report.vocab_size);
        assert_eq!(
            tok.special_id("<|endoftext|>"),
            Some(report.vocab_size as u32 - 1)
        );
    }

    #[test]
    fn rejects_vocab_below_bytes_plus_specials_and_empty_corpus() {
        let mut c = WordCounts::new(GPT4_PATTERN).unwrap();
        c.add_documents(&["hello"]).unwrap();
        let options = TrainOptions {
            vocab_size: 256,
            special_tokens: vec!["<|x|>".into()],
            min_frequency: 1,
        };
        assert!(matches!(
            c.train(&options, &mut no_progress()),
            Err(Error::Config(_))
        ));
        let empty = WordCounts::new(GPT4_PATTERN).unwrap();
        let options = TrainOptions {
            vocab_size: 300,
            special_tokens: vec![],
            min_frequency: 1,
        };
        assert!(matches!(
            empty.train(&options, &mut no_progress()),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn trained_tokenizer_round_trips() {
        let (tok, _) = train_on(TEXT, 400);
        for d in TEXT {
            let ids = tok.encode_ordinary(d).unwrap();
            assert_eq!(tok.decode_bytes(&ids).unwrap(), d.as_bytes());
        }
    }

    #[test]
    fn cancel_from_progress_stops_training() {
        let mut c = WordCounts::new(GPT4_PATTERN).unwrap();
        c.add_documents(TEXT).unwrap();
        let options = TrainOptions {
            vocab_size: 400,
            special_tokens: vec![],
            min_frequency: 1,
        };
        assert!(matches!(
            c.train(&options, &mut |_| false),
            Err(Error::Cancelled)
        ));
    }
}
