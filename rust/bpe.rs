//! A trained byte-level BPE vocabulary and the encoder/decoder that applies it.
//!
//! In smallm's own layout ids `0..256` are the raw bytes, merge `i` creates id `256 + i`, and
//! special tokens take the ids after the last merge. A vocabulary trained elsewhere
//! ([`Tokenizer::foreign`]) keeps its file's ids: each byte, each merge's result and each added
//! token has the id the file gives it, and the engine below is the same. Encoding follows the merge list (the Hugging Face `tokenizers` BPE
//! semantics): inside each pre-tokenized piece the adjacent pair with the lowest merge index is
//! merged first, leftmost first among equals, until no adjacent pair is in the merge list.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use aho_corasick::{AhoCorasick, MatchKind};
use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use crate::pretokenize::{PreTokenizer, GPT4_PATTERN};
use crate::sentencepiece::{token_text_bytes, Parts as SpParts, SentencePiece, Spaces};
use crate::{Error, Result};

/// Documents are cut into units of about this size so that one big document uses every core.
const CHUNK_BYTES: usize = 1 << 20;

/// Pieces longer than this (in bytes) use the heap-based merge, which is O(n log n); shorter
/// ones use a plain scan, which is faster for the short pieces that make up almost all text.
const LONG_PIECE: usize = 64;

/// A pair of adjacent token ids packed into one hash key; the numeric order of the key is the
/// lexicographic order of the pair.
#[inline]
pub(crate) fn pair_key(left: u32, right: u32) -> u64 {
    ((left as u64) << 32) | right as u64
}

/// Which special-token strings `encode` turns into special ids and which make it fail.
/// This is tiktoken's policy: a special string that is disallowed is an error, one that is
/// allowed becomes its id, and one that is neither is encoded as plain text.
#[derive(Clone, Debug)]
pub struct SpecialPolicy {
    /// Special token strings encoded as their ids. `None` means all of them.
    pub allowed: Option<Vec<String>>,
    /// Special token strings that make encoding fail. `None` means all that are not allowed.
    pub disallowed: Option<Vec<String>>,
}

impl Default for SpecialPolicy {
    /// tiktoken's default: no special token is allowed, so any special token string is an error.
    fn default() -> Self {
        SpecialPolicy {
            allowed: Some(Vec::new()),
            disallowed: None,
        }
    }
}

impl SpecialPolicy {
    /// Every special token string becomes its id (what Hugging Face `tokenizers` does).
    pub fn allow_all() -> Self {
        SpecialPolicy {
            allowed: None,
            disallowed: Some(Vec::new()),
        }
    }
}

/// An id no token has: a byte that a vocabulary trained elsewhere lacks becomes it, and is dropped
/// from the output (what the `tokenizers` library does when there is no unknown token).
pub(crate) const NO_ID: u32 = u32::MAX;

/// A trained tokenizer: the pre-tokenizer, the merge list and the special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    pretokenizer: PreTokenizer,
    merges: Vec<(u32, u32)>,
    /// Pair key -> merge index (the rank: lower merges first).
    merge_index: FxHashMap<u64, u32>,
    /// The same for pairs of two bytes, as a dense table: every piece starts as bytes, so the
    /// first look-ups of each piece skip hashing.
    byte_pair_index: Box<[u32]>,
    /// Bytes of every non-special id (smallm's own layout) or of every id below the vocabulary
    /// size (a foreign one, where specials hold their strings and unused ids are empty).
    token_bytes: Vec<Vec<u8>>,
    /// Special token strings; `special_ids` gives their ids (after the merges in smallm's layout).
    specials: Vec<String>,
    special_ids: Vec<u32>,
    special_matcher: Option<AhoCorasick>,
    /// The id of each byte and the id each merge creates: `b` and `256 + i` in smallm's layout.
    byte_ids: Box<[u32; 256]>,
    merge_result: Vec<u32>,
    /// Set for a vocabulary trained elsewhere (a Hugging Face `tokenizer.json`).
    foreign: Option<Box<Foreign>>,
}

/// What [`Tokenizer::assemble`] builds a tokenizer from, in either layout.
struct Parts {
    merges: Vec<(u32, u32)>,
    merge_index: FxHashMap<u64, u32>,
    merge_result: Vec<u32>,
    byte_ids: Box<[u32; 256]>,
    token_bytes: Vec<Vec<u8>>,
    specials: Vec<String>,
    special_ids: Vec<u32>,
}

/// What a byte-level BPE vocabulary trained elsewhere adds to the encoder (see
/// [`Tokenizer::foreign`]).
#[derive(Clone)]
pub struct Foreign {
    /// `ignore_merges`: a piece that is a whole token of the vocabulary is that token.
    pub whole: Option<FxHashMap<Vec<u8>, u32>>,
    /// Text is put in Unicode normal form C before pre-tokenization (Qwen's tokenizers).
    pub nfc: bool,
    /// One more than the largest id.
    pub vocab_size: usize,
    /// Which ids are special tokens.
    pub is_special: Vec<bool>,
    /// The file it was read from, written back as it was.
    pub source: String,
    /// A SentencePiece-style BPE (Llama 2, Mistral...): encoded by it instead of the byte-level merges.
    pub sentencepiece: Option<SentencePiece>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("pattern", &self.pattern())
            .field("merges", &self.merges.len())
            .field("specials", &self.specials)
            .finish()
    }
}

impl Tokenizer {
    /// Builds a tokenizer from its parts, checking that the merges are well formed.
    pub fn new(pattern: &str, merges: Vec<(u32, u32)>, specials: Vec<String>) -> Result<Self> {
        let pretokenizer = PreTokenizer::new(pattern)?;
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut merge_index = FxHashMap::default();
        let mut seen: FxHashSet<Vec<u8>> = token_bytes.iter().cloned().collect();
        for (i, &(left, right)) in merges.iter().enumerate() {
            let known = token_bytes.len() as u32;
            if left >= known || right >= known {
                return Err(Error::Config(format!(
                    "merge {i} ({left}, {right}) refers to an id that does not exist yet (ids so far: 0..{known})"
                )));
            }
            let mut bytes = token_bytes[left as usize].clone();
            bytes.extend_from_slice(&token_bytes[right as usize]);
            if !seen.insert(bytes.clone()) {
                return Err(Error::Config(format!(
                    "merge {i} ({left}, {right}) makes a token whose bytes another token already has"
                )));
            }
            if merge_index
                .insert(pair_key(left, right), i as u32)
                .is_some()
            {
                return Err(Error::Config(format!(
                    "merge {i} ({left}, {right}) appears twice"
                )));
            }
            token_bytes.push(bytes);
        }
        let mut unique = FxHashSet::default();
        for s in &specials {
            if s.is_empty() {
                return Err(Error::Config(
                    "a special token cannot be the empty string".into(),
                ));
            }
            if !unique.insert(s.as_str()) {
                return Err(Error::Config(format!("special token {s:?} is given twice")));
            }
        }
        let n = token_bytes.len() as u32;
        let special_ids = (n..n + specials.len() as u32).collect();
        let byte_ids = Box::new(std::array::from_fn(|b| b as u32));
        let parts = Parts {
            merges,
            merge_index,
            merge_result: (256..n).collect(),
            byte_ids,
            token_bytes,
            specials,
            special_ids,
        };
        Self::assemble(pretokenizer, parts, None).map_err(Error::Config)
    }

    /// The tokenizer of `parts`, with the tables derived from them: the dense index of the merges of
    /// two bytes and the matcher of the special tokens.
    fn assemble(
        pretokenizer: PreTokenizer,
        parts: Parts,
        foreign: Option<Box<Foreign>>,
    ) -> std::result::Result<Self, String> {
        let byte_of: FxHashMap<u32, u32> = (0..256u32)
            .map(|b| (parts.byte_ids[b as usize], b))
            .filter(|&(id, _)| id != NO_ID)
            .collect();
        let mut byte_pair_index = vec![u32::MAX; 1 << 16].into_boxed_slice();
        for (i, (left, right)) in parts.merges.iter().enumerate() {
            if let (Some(&a), Some(&b)) = (byte_of.get(left), byte_of.get(right)) {
                byte_pair_index[((a << 8) | b) as usize] = i as u32; // a later duplicate wins
            }
        }
        let special_matcher = if parts.specials.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&parts.specials)
                    .map_err(|e| format!("special tokens: {e}"))?,
            )
        };
        Ok(Tokenizer {
            pretokenizer,
            merges: parts.merges,
            merge_index: parts.merge_index,
            byte_pair_index,
            token_bytes: parts.token_bytes,
            specials: parts.specials,
            special_ids: parts.special_ids,
            special_matcher,
            byte_ids: parts.byte_ids,
            merge_result: parts.merge_result,
            foreign,
        })
    }

    /// A byte-level BPE vocabulary trained elsewhere, with its own ids: `vocab` maps each token's
    /// bytes to its id, `merges` are pairs of token bytes in priority order (the result is the
    /// vocabulary's id of the two joined), and `added` the added tokens with their ids. Encoding
    /// follows the `tokenizers` library: added tokens are cut out first (leftmost, longest), the rest
    /// is normalised (`nfc`) and pre-tokenized, and each piece is looked up whole first when
    /// `ignore_merges` is set, else merged; a byte the vocabulary lacks is dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn foreign(
        pattern: &str,
        vocab: Vec<(Vec<u8>, u32)>,
        merges: &[(Vec<u8>, Vec<u8>)],
        added: Vec<(String, u32)>,
        ignore_merges: bool,
        nfc: bool,
        source: String,
    ) -> std::result::Result<Self, String> {
        let pretokenizer = PreTokenizer::new(pattern).map_err(|e| e.to_string())?;
        let mut id_of: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        let mut vocab_size = 0usize;
        for (bytes, id) in &vocab {
            vocab_size = vocab_size.max(*id as usize + 1);
            id_of.insert(bytes.clone(), *id);
        }
        for (_, id) in &added {
            vocab_size = vocab_size.max(*id as usize + 1);
        }
        let mut token_bytes = vec![Vec::new(); vocab_size];
        for (bytes, id) in &vocab {
            token_bytes[*id as usize] = bytes.clone();
        }
        let byte_ids: Box<[u32; 256]> = Box::new(std::array::from_fn(|b| {
            id_of.get(&[b as u8][..]).copied().unwrap_or(NO_ID)
        }));
        let mut pairs = Vec::with_capacity(merges.len());
        let mut merge_result = Vec::with_capacity(merges.len());
        let mut merge_index = FxHashMap::default();
        for (i, (left, right)) in merges.iter().enumerate() {
            let find = |t: &[u8]| id_of.get(t).copied();
            let joined = [left.as_slice(), right.as_slice()].concat();
            let (Some(l), Some(r), Some(m)) = (find(left), find(right), find(&joined)) else {
                return Err(format!(
                    "merges[{i}]: a part or the joined token is not in the vocabulary"
                ));
            };
            // A pair listed twice takes its later place, as in `tokenizers`.
            merge_index.insert(pair_key(l, r), i as u32);
            pairs.push((l, r));
            merge_result.push(m);
        }
        let Added {
            is_special,
            specials,
            special_ids,
        } = place_added(added, &mut token_bytes, vocab_size)?;
        let foreign = Foreign {
            whole: ignore_merges.then_some(id_of),
            nfc,
            vocab_size,
            is_special,
            source,
            sentencepiece: None,
        };
        let parts = Parts {
            merges: pairs,
            merge_index,
            merge_result,
            byte_ids,
            token_bytes,
            specials,
            special_ids,
        };
        Self::assemble(pretokenizer, parts, Some(Box::new(foreign)))
    }

    /// A SentencePiece-style BPE vocabulary trained elsewhere (see [`crate::sentencepiece`]), with its own
    /// ids: `vocab` maps each token to its id, `merges` are pairs of tokens in priority order, `added` the
    /// added tokens with their ids.
    pub fn sentencepiece(
        vocab: Vec<(String, u32)>,
        merges: &[(String, String)],
        added: Vec<(String, u32)>,
        sp_options: (Option<&str>, bool, bool, Spaces),
        source: String,
    ) -> std::result::Result<Self, String> {
        let (unk, fuse_unk, byte_fallback, spaces) = sp_options;
        let sp = SentencePiece::new(&SpParts {
            vocab: &vocab,
            merges,
            unk,
            fuse_unk,
            byte_fallback,
            spaces,
        })?;
        let id_of: FxHashMap<&str, u32> = vocab.iter().map(|(t, id)| (t.as_str(), *id)).collect();
        let vocab_size = vocab
            .iter()
            .chain(added.iter())
            .map(|(_, id)| *id as usize + 1)
            .max()
            .unwrap_or(0);
        let mut token_bytes = vec![Vec::new(); vocab_size];
        for (token, id) in &vocab {
            token_bytes[*id as usize] = token_text_bytes(token, byte_fallback);
        }
        let mut pairs = Vec::with_capacity(merges.len());
        let mut merge_result = Vec::with_capacity(merges.len());
        for (left, right) in merges {
            pairs.push((id_of[left.as_str()], id_of[right.as_str()]));
            merge_result.push(id_of[format!("{left}{right}").as_str()]);
        }
        let Added {
            is_special,
            specials,
            special_ids,
        } = place_added(added, &mut token_bytes, vocab_size)?;
        let foreign = Foreign {
            whole: None,
            nfc: false,
            vocab_size,
            is_special,
            source,
            sentencepiece: Some(sp),
        };
        let parts = Parts {
            merges: pairs,
            merge_index: FxHashMap::default(),
            merge_result,
            byte_ids: Box::new([NO_ID; 256]),
            token_bytes,
            specials,
            special_ids,
        };
        let unused = PreTokenizer::new(GPT4_PATTERN).map_err(|e| e.to_string())?;
        Self::assemble(unused, parts, Some(Box::new(foreign)))
    }

    /// The SentencePiece-style encoder of such a vocabulary; None for a byte-level one.
    pub fn sentencepiece_parts(&self) -> Option<&SentencePiece> {
        self.foreign.as_ref().and_then(|f| f.sentencepiece.as_ref())
    }

    /// The parts a vocabulary trained elsewhere adds; None for smallm's own.
    pub fn foreign_parts(&self) -> Option<&Foreign> {
        self.foreign.as_deref()
    }

    /// Whether `id` is a special (added) token.
    pub fn is_special(&self, id: u32) -> bool {
        match &self.foreign {
            None => id as usize >= self.token_bytes.len() && (id as usize) < self.vocab_size(),
            Some(f) => f.is_special.get(id as usize).copied().unwrap_or(false),
        }
    }

    /// The pre-tokenization regex (empty for a SentencePiece-style BPE, which splits no text by one).
    pub fn pattern(&self) -> &str {
        if self.sentencepiece_parts().is_some() {
            return "";
        }
        self.pretokenizer.pattern()
    }

    /// The pre-tokenizer.
    pub fn pretokenizer(&self) -> &PreTokenizer {
        &self.pretokenizer
    }

    /// The merge list, as pairs of ids; merge `i` creates id `256 + i` in smallm's layout (see
    /// [`Tokenizer::merge_results`] for a vocabulary trained elsewhere).
    pub fn merges(&self) -> &[(u32, u32)] {
        &self.merges
    }

    /// The id each merge creates.
    pub fn merge_results(&self) -> &[u32] {
        &self.merge_result
    }

    /// Special token strings in id order.
    pub fn specials(&self) -> &[String] {
        &self.specials
    }

    /// Number of ids that are bytes or merges: in smallm's layout the ids before the first special
    /// token; in a foreign one the ids that are not special tokens.
    pub fn n_ordinary(&self) -> usize {
        match &self.foreign {
            None => self.token_bytes.len(),
            Some(f) => f.vocab_size - self.specials.len(),
        }
    }

    /// Total number of ids, special tokens included (one more than the largest id).
    pub fn vocab_size(&self) -> usize {
        match &self.foreign {
            None => self.token_bytes.len() + self.specials.len(),
            Some(f) => f.vocab_size,
        }
    }

    /// The id of a special token string.
    pub fn special_id(&self, token: &str) -> Option<u32> {
        self.specials
            .iter()
            .position(|s| s == token)
            .map(|i| self.special_ids[i])
    }

    /// The bytes a token decodes to (a special token decodes to its string).
    pub fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        let i = id as usize;
        let unknown = || Error::UnknownId {
            id,
            vocab_size: self.vocab_size(),
        };
        if self.foreign.is_some() {
            return self
                .token_bytes
                .get(i)
                .map(Vec::as_slice)
                .ok_or_else(unknown);
        }
        if let Some(bytes) = self.token_bytes.get(i) {
            Ok(bytes)
        } else if let Some(s) = self.specials.get(i - self.token_bytes.len()) {
            Ok(s.as_bytes())
        } else {
            Err(unknown())
        }
    }

    /// Concatenated bytes of `ids` (for a SentencePiece-style BPE, without the one space encoding put in
    /// front, as `tokenizers` decodes).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id)?);
        }
        if self
            .sentencepiece_parts()
            .is_some_and(SentencePiece::strips_first_space)
            && out.first() == Some(&b' ')
        {
            out.remove(0);
        }
        Ok(out)
    }

    /// Encodes `text` as plain text: special token strings in it are ordinary characters.
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut cache = PieceCache::default();
        self.encode_ordinary_into(text, true, &mut cache, &mut out)?;
        Ok(out)
    }

    /// Encodes `text`, turning the special token strings the policy allows into their ids.
    pub fn encode(&self, text: &str, policy: &SpecialPolicy) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut cache = PieceCache::default();
        self.encode_into(text, policy, &mut cache, &mut out)?;
        Ok(out)
    }

    /// Encodes many documents in parallel and returns the ids of all of them, one after the
    /// other, with `offsets[i]..offsets[i + 1]` the ids of document `i`.
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        policy: Option<&SpecialPolicy>,
    ) -> Result<(Vec<u32>, Vec<usize>)> {
        // Units of work: whole documents, except that big ones are cut where the pre-tokenizer
        // allows (same pieces, so the same ids) so a single large document uses every core.
        // Special tokens are split out before pre-tokenization, so only plain text is cut.
        let units: Vec<(usize, &str)> = texts
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                match policy {
                    // A SentencePiece-style text is not cut: where a `▁` goes depends on the text's start.
                    None if self.sentencepiece_parts().is_none() => {
                        self.pretokenizer.chunks(t.as_ref(), CHUNK_BYTES)
                    }
                    _ => vec![t.as_ref()],
                }
                .into_iter()
                .map(move |c| (i, c))
            })
            .collect();
        // Work in groups of units of similar byte size, several per thread for balance; each task
        // amortises its piece cache over the many small documents a group may hold.
        let total: usize = units.iter().map(|u| u.1.len()).sum();
        let target = (total / (rayon::current_num_threads() * 2)).max(1 << 16);
        let mut groups: Vec<&[(usize, &str)]> = Vec::new();
        let (mut start, mut size) = (0, 0);
        for (i, unit) in units.iter().enumerate() {
            size += unit.1.len();
            if size >= target || i + 1 == units.len() {
                groups.push(&units[start..=i]);
                (start, size) = (i + 1, 0);
            }
        }
        let parts: Vec<Result<(Vec<u32>, Vec<usize>)>> = groups
            .into_par_iter()
            .map(|group| {
                let mut cache = PieceCache::default();
                let mut ids = Vec::new();
                let mut ends = Vec::with_capacity(group.len());
                for &(_, text) in group {
                    match policy {
                        None => self.encode_ordinary_into(text, true, &mut cache, &mut ids)?,
                        Some(p) => self.encode_into(text, p, &mut cache, &mut ids)?,
                    }
                    ends.push(ids.len());
                }
                Ok((ids, ends))
            })
            .collect();
        let mut all = Vec::with_capacity(
            parts
                .iter()
                .map(|p| p.as_ref().map_or(0, |p| p.0.len()))
                .sum(),
        );
        // offsets[i + 1] is where document i ends: the end of its last unit.
        let mut offsets = vec![0; texts.len() + 1];
        let mut unit = 0;
        for part in parts {
            let (ids, ends) = part?;
            let base = all.len();
            for end in ends {
                offsets[units[unit].0 + 1] = base + end;
                unit += 1;
            }
            all.extend_from_slice(&ids);
        }
        debug_assert_eq!(unit, units.len(), "every document has at least one unit");
        Ok((all, offsets))
    }

    fn encode_into<'t>(
        &self,
        text: &'t str,
        policy: &SpecialPolicy,
        cache: &mut PieceCache<'t>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let Some(matcher) = &self.special_matcher else {
            return self.encode_ordinary_into(text, true, cache, out);
        };
        let listed = |list: &Option<Vec<String>>, token: &str, default: bool| match list {
            None => default,
            Some(l) => l.iter().any(|s| s == token),
        };
        let mut start = 0;
        for m in matcher.find_iter(text) {
            let token = &self.specials[m.pattern().as_usize()];
            let allowed = listed(&policy.allowed, token, true);
            let disallowed = !allowed && listed(&policy.disallowed, token, true);
            if disallowed {
                return Err(Error::DisallowedSpecial {
                    token: token.clone(),
                    offset: m.start(),
                });
            }
            if allowed {
                self.encode_ordinary_into(&text[start..m.start()], start == 0, cache, out)?;
                out.push(self.special_ids[m.pattern().as_usize()]);
                start = m.end();
            }
        }
        self.encode_ordinary_into(&text[start..], start == 0, cache, out)
    }

    /// Encodes plain text; `at_start`: it begins the input (a SentencePiece-style BPE puts its `▁` in front
    /// of the first text only, with `prepend_scheme` "first").
    fn encode_ordinary_into<'t>(
        &self,
        text: &'t str,
        at_start: bool,
        cache: &mut PieceCache<'t>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if let Some(sp) = self.sentencepiece_parts() {
            sp.encode(text, at_start, &mut cache.words, out);
            return Ok(());
        }
        if let Some(f) = &self.foreign {
            if f.nfc && !matches!(is_nfc_quick(text.chars()), IsNormalized::Yes) {
                let normal: String = text.nfc().collect();
                let mut local = PieceCache::default();
                return self.pretokenizer.split(&normal, |piece| {
                    self.encode_piece_cached(piece.as_bytes(), &mut local, out)
                });
            }
        }
        self.pretokenizer.split(text, |piece| {
            self.encode_piece_cached(piece.as_bytes(), cache, out)
        })
    }

    #[inline]
    fn encode_piece_cached<'t>(
        &self,
        piece: &'t [u8],
        cache: &mut PieceCache<'t>,
        out: &mut Vec<u32>,
    ) {
        match piece.len() {
            0 => {}
            1 => {
                let id = self.byte_ids[piece[0] as usize];
                if id != NO_ID {
                    out.push(id);
                }
            }
            n if n <= SHORT_KEY_BYTES => {
                let key = short_key(piece);
                if let Some(hit) = cache.short.get(&key) {
                    out.extend_from_slice(&hit.ids[..hit.len as usize]);
                    return;
                }
                let start = out.len();
                self.encode_piece(piece, out);
                let ids = &out[start..];
                if ids.len() <= INLINE_IDS && cache.short.len() < PieceCache::MAX_ENTRIES {
                    let mut hit = InlineIds {
                        ids: [0; INLINE_IDS],
                        len: ids.len() as u32,
                    };
                    hit.ids[..ids.len()].copy_from_slice(ids);
                    cache.short.insert(key, hit);
                }
            }
            _ => {
                if let Some(&(start, len)) = cache.long.get(piece) {
                    out.extend_from_slice(&cache.arena[start as usize..(start + len) as usize]);
                    return;
                }
                let start = out.len();
                self.encode_piece(piece, out);
                if cache.long.len() < PieceCache::MAX_ENTRIES {
                    let at = cache.arena.len();
                    cache.arena.extend_from_slice(&out[start..]);
                    cache
                        .long
                        .insert(piece, (at as u32, (out.len() - start) as u32));
                }
            }
        }
    }

    #[inline]
    fn rank_or_max(&self, left: u32, right: u32) -> u32 {
        self.rank(left, right).unwrap_or(u32::MAX)
    }

    #[inline]
    fn rank(&self, left: u32, right: u32) -> Option<u32> {
        self.merge_index.get(&pair_key(left, right)).copied()
    }

    /// Applies the merges to one pre-tokenized piece and appends its ids to `out`.
    pub fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(whole) = self.foreign.as_ref().and_then(|f| f.whole.as_ref()) {
            if let Some(&id) = whole.get(piece) {
                out.push(id);
                return;
            }
        }
        if piece.len() > LONG_PIECE {
            self.encode_long_piece(piece, out);
            return;
        }
        // Fixed-size stack buffers: no allocation for the short pieces that dominate real text.
        let n = piece.len();
        let mut ids = [0u32; LONG_PIECE];
        // ranks[i] is the merge index of (ids[i], ids[i + 1]), u32::MAX when not a merge.
        let mut ranks = [u32::MAX; LONG_PIECE];
        for (id, &b) in ids.iter_mut().zip(piece) {
            *id = self.byte_ids[b as usize];
        }
        for (rank, pair) in ranks.iter_mut().zip(piece.windows(2)) {
            *rank = self.byte_pair_index[(pair[0] as usize) << 8 | pair[1] as usize];
        }
        let mut len = n;
        while len > 1 {
            let mut best = u32::MAX;
            let mut at = 0;
            for (i, &r) in ranks[..len - 1].iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == u32::MAX {
                break;
            }
            ids[at] = self.merge_result[best as usize];
            ids.copy_within(at + 2..len, at + 1);
            if at + 2 < len {
                ranks.copy_within(at + 2..len - 1, at + 1);
            }
            len -= 1;
            if at > 0 {
                ranks[at - 1] = self.rank_or_max(ids[at - 1], ids[at]);
            }
            if at + 1 < len {
                ranks[at] = self.rank_or_max(ids[at], ids[at + 1]);
            }
        }
        if self.foreign.is_some() {
            out.extend(ids[..len].iter().filter(|&&id| id != NO_ID));
        } else {
            out.extend_from_slice(&ids[..len]);
        }
    }

    /// The same merges as [`Tokenizer::encode_piece`] with a heap of candidate pairs over a
    /// linked list, so a piece of n bytes costs O(n log n) instead of O(n²).
    fn encode_long_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        const NONE: u32 = u32::MAX;
        let n = piece.len();
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<u32> = (1..=n as u32)
            .map(|i| if i as usize == n { NONE } else { i })
            .collect();
        // (merge index, position of the left node): the smallest pops first, so the lowest merge
        // wins and the leftmost occurrence among equal merges goes first.
        let mut heap: BinaryHeap<Reverse<(u32, u32)>> = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some(r) = self.rank(ids[i], ids[i + 1]) {
                heap.push(Reverse((r, i as u32)));
            }
        }
        while let Some(Reverse((r, pos))) = heap.pop() {
            let p = pos as usize;
            let q = next[p];
            // Entries go stale when a neighbour was merged first; skip them.
            if ids[p] == NONE || q == NONE || self.rank(ids[p], ids[q as usize]) != Some(r) {
                continue;
            }
            let q = q as usize;
            ids[p] = self.merge_result[r as usize];
            ids[q] = NONE;
            next[p] = next[q];
            if next[q] != NONE {
                prev[next[q] as usize] = pos;
            }
            if prev[p] != NONE {
                let l = prev[p] as usize;
                if let Some(r) = self.rank(ids[l], ids[p]) {
                    heap.push(Reverse((r, l as u32)));
                }
            }
            if next[p] != NONE {
                if let Some(r) = self.rank(ids[p], ids[next[p] as usize]) {
                    heap.push(Reverse((r, pos)));
                }
            }
        }
        out.extend(ids.into_iter().filter(|&id| id != NONE));
    }
}

/// Pieces up to this many bytes are cached under a 16-byte key holding the bytes and the length.
const SHORT_KEY_BYTES: usize = 15;
/// A cached short piece keeps up to this many ids inline.
const INLINE_IDS: usize = 3;

#[inline]
fn short_key(piece: &[u8]) -> u128 {
    let mut buf = [0u8; 16];
    buf[..piece.len()].copy_from_slice(piece);
    buf[15] = piece.len() as u8;
    u128::from_le_bytes(buf)
}

#[derive(Clone, Copy)]
struct InlineIds {
    ids: [u32; INLINE_IDS],
    len: u32,
}

/// Remembers the ids of pieces already encoded in one call: text repeats its words, and a hash
/// lookup is much cheaper than re-running the merges. Short pieces, almost all of them, are keyed
/// by value with their ids inline, so a hit touches one hash-table slot and nothing else.
#[derive(Default)]
struct PieceCache<'t> {
    short: FxHashMap<u128, InlineIds>,
    long: FxHashMap<&'t [u8], (u32, u32)>,
    arena: Vec<u32>,
    /// The words of a SentencePiece-style BPE.
    words: FxHashMap<String, Vec<u32>>,
}

impl PieceCache<'_> {
    /// Bounds the memory one encode call can spend on each map; past it, new pieces are not cached.
    const MAX_ENTRIES: usize = 1 << 20;
}

/// The added tokens of a vocabulary trained elsewhere: which ids are special, and the tokens with their ids.
struct Added {
    is_special: Vec<bool>,
    specials: Vec<String>,
    special_ids: Vec<u32>,
}

/// Puts the added tokens at their ids: their text as their bytes, marked special.
fn place_added(
    added: Vec<(String, u32)>,
    token_bytes: &mut [Vec<u8>],
    vocab_size: usize,
) -> std::result::Result<Added, String> {
    let mut is_special = vec![false; vocab_size];
    let (mut specials, mut special_ids) = (Vec::new(), Vec::new());
    for (content, id) in added {
        if content.is_empty() {
            return Err("an added token is the empty string".into());
        }
        is_special[id as usize] = true;
        token_bytes[id as usize] = content.as_bytes().to_vec();
        specials.push(content);
        special_ids.push(id);
    }
    Ok(Added {
        is_special,
        specials,
        special_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::GPT4_PATTERN;

    /// A small vocabulary over "aab" text: 256 = "aa", 257 = "aab", 258 = "ab".
    fn toy() -> Tokenizer {
        let a = b'a' as u32;
        let b = b'b' as u32;
        Tokenizer::new(
            GPT4_PATTERN,
            vec![(a, a), (256, b), (a, b)],
            vec!["<|endoftext|>".into()],
        )
        .unwrap()
    }

    #[test]
    fn merges_lowest_index_first_and_leftmost_on_ties() {
        let t = toy();
        assert_eq!(t.encode_ordinary("aaab").unwrap(), vec![256, 258]);
        assert_eq!(t.encode_ordinary("aab").unwrap(), vec![257]);
        assert_eq!(t.encode_ordinary("aaaa").unwrap(), vec![256, 256]);
        assert_eq!(t.encode_ordinary("aaa").unwrap(), vec![256, b'a' as u32]);
    }

    #[test]
    fn long_and_short_paths_match_a_plain_loop() {
        let t = toy();
        for n in (1..=70).chain([100, 257, 1000]) {
            let text: String = (0..n).map(|i| if i % 7 == 3 { 'b' } else { 'a' }).collect();
            let mut long = Vec::new();
            t.encode_long_piece(text.as_bytes(), &mut long);
            let mut short = Vec::new();
            t.encode_piece(text.as_bytes(), &mut short);
            assert_eq!(long, short, "n = {n}");
            // The short path's scan is the reference; call it on the same bytes directly.
            let mut ids: Vec<u32> = text.bytes().map(u32::from).collect();
            loop {
                let best = (0..ids.len().saturating_sub(1))
                    .filter_map(|i| t.rank(ids[i], ids[i + 1]).map(|r| (r, i)))
                    .min();
                let Some((r, i)) = best else { break };
                ids[i] = 256 + r;
                ids.remove(i + 1);
            }
            assert_eq!(long, ids, "n = {n}");
        }
    }

    #[test]
    fn special_policy_follows_tiktoken() {
        let t = toy();
        let text = "ab<|endoftext|>ab";
        let err = t.encode(text, &SpecialPolicy::default()).unwrap_err();
        assert!(
            matches!(err, Error::DisallowedSpecial { offset: 2, .. }),
            "{err}"
        );
        let ids = t.encode(text, &SpecialPolicy::allow_all()).unwrap();
        assert_eq!(ids, vec![258, 259, 258]);
        let plain = SpecialPolicy {
            allowed: Some(vec![]),
            disallowed: Some(vec![]),
        };
        assert_eq!(
            t.encode(text, &plain).unwrap(),
            t.encode_ordinary(text).unwrap()
        );
        assert!(t.encode_ordinary(text).unwrap().len() > 3);
    }

    #[test]
    fn decode_inverts_encode_and_rejects_unknown_ids() {
        let t = toy();
        let text = "aab ab <|endoftext|> 한국어 🙂";
        let ids = t.encode(text, &SpecialPolicy::allow_all()).unwrap();
        assert_eq!(t.decode_bytes(&ids).unwrap(), text.as_bytes());
        assert!(matches!(
            t.decode_bytes(&[260]),
            Err(Error::UnknownId {
                id: 260,
                vocab_size: 260
            })
        ));
    }

    #[test]
    fn batch_offsets_delimit_each_document() {
        let t = toy();
        let docs = vec!["aab", "", "aaa ab", "b"];
        let (ids, offsets) = t.encode_batch(&docs, None).unwrap();
        assert_eq!(offsets.len(), docs.len() + 1);
        for (i, d) in docs.iter().enumerate() {
            assert_eq!(
                ids[offsets[i]..offsets[i + 1]],
                t.encode_ordinary(d).unwrap()[..]
            );
        }
    }

    #[test]
    fn big_documents_cut_into_units_encode_the_same() {
        let t = toy();
        let line = "aab ab aaab\nbaa b\n  aa\tab\n";
        let big = line.repeat((3 << 20) / line.len());
        let docs = vec!["ab", big.as_str(), "", "aaab"];
        let (ids, offsets) = t.encode_batch(&docs, None).unwrap();
        for (i, d) in docs.iter().enumerate() {
            assert_eq!(
                ids[offsets[i]..offsets[i + 1]],
                t.encode_ordinary(d).unwrap()[..],
                "document {i}"
            );
        }
    }

    #[test]
    fn rejects_malformed_merges() {
        assert!(Tokenizer::new(GPT4_PATTERN, vec![(300, 1)], vec![]).is_err());
        assert!(Tokenizer::new(GPT4_PATTERN, vec![(1, 2), (1, 2)], vec![]).is_err());
        assert!(Tokenizer::new(GPT4_PATTERN, vec![], vec!["x".into(), "x".into()]).is_err());
    }

    /// A vocabulary trained elsewhere: "a", "b", "c" at ids 10-12 (no other byte), "ab" = 3,
    /// "abc" = 7 (a token no merge makes), one special at id 0.
    fn foreign(ignore_merges: bool) -> Tokenizer {
        let vocab = vec![
            (b"a".to_vec(), 10),
            (b"b".to_vec(), 11),
            (b"c".to_vec(), 12),
            (b"ab".to_vec(), 3),
            (b"abc".to_vec(), 7),
        ];
        let merges = vec![(b"a".to_vec(), b"b".to_vec())];
        let added = vec![("<s>".to_string(), 0)];
        Tokenizer::foreign(
            r"\S+|\s+",
            vocab,
            &merges,
            added,
            ignore_merges,
            false,
            String::new(),
        )
        .unwrap()
    }

    #[test]
    fn a_foreign_vocabulary_keeps_its_ids_and_drops_bytes_it_lacks() {
        let t = foreign(false);
        assert_eq!(t.vocab_size(), 13);
        assert_eq!(t.encode_ordinary("abc").unwrap(), vec![3, 12]);
        assert_eq!(t.encode_ordinary("abxab").unwrap(), vec![3, 3]); // no "x" (or space) id
        assert_eq!(
            t.encode("<s>ab", &SpecialPolicy::allow_all()).unwrap(),
            vec![0, 3]
        );
        assert_eq!(t.decode_bytes(&[0, 3, 12]).unwrap(), b"<s>abc");
        assert!(t.is_special(0) && !t.is_special(3));
        assert!(t.decode_bytes(&[13]).is_err());
        // ignore_merges: a piece that is a whole token is that token.
        assert_eq!(foreign(true).encode_ordinary("abc ab").unwrap(), vec![7, 3]);
        let long = "ab".repeat(100);
        assert_eq!(t.encode_ordinary(&long).unwrap(), vec![3; 100]);
    }
}
