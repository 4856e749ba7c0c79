//! SentencePiece-style BPE, as the `tokenizers` library runs the `tokenizer.json` files transformers
//! writes for Llama 2, TinyLlama, Mistral and their kin: a BPE over characters rather than bytes, spaces
//! written as `▁` (U+2581) with one put in front of the text, a character the vocabulary lacks spelled as
//! its UTF-8 bytes (`<0xNN>` tokens, "byte fallback") or else the unknown token.
//!
//! The text between added tokens is normalised (every space becomes `▁`, and `▁` goes in front: always,
//! by the `Prepend` normalizer of Llama 2's files, or as the `Metaspace` pre-tokenizer's scheme says), cut
//! into words (at every `▁` with `Metaspace`'s `split`, else one word), and each word is merged: it
//! starts as its characters (a missing one as its bytes, or the unknown token, consecutive unknowns fused
//! into one when `fuse_unk`), and the lowest-ranked merge of two neighbours is applied first, the
//! leftmost among equals, until none applies. This is what `tokenizers` computes, id for id (the tests
//! compare both on arbitrary text).
//!
//! One word can be the whole text. When no token of the vocabulary has a `▁` after another character, no
//! token can span a place where a `▁` follows another character, so the word is cut there too and the
//! pieces are merged (and cached) one by one, with the same result.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::bpe::NO_ID;

/// The space marker.
pub const SPACE: char = '\u{2581}';

/// When a `▁` goes in front of a text (the `Metaspace` pre-tokenizer's `prepend_scheme`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepend {
    /// In front of every text between added tokens (Llama 2's `Prepend` normalizer does this too).
    Always,
    /// In front of the first text of an input only.
    First,
    /// Never.
    Never,
}

/// How spaces become `▁` and where the text is cut into words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spaces {
    pub prepend: Prepend,
    /// `Metaspace`'s `split`: every `▁` starts a word. Else the whole text is one word.
    pub split: bool,
    /// The `Prepend` normalizer (Llama 2's files): a `▁` goes in front even of a text that starts with one.
    pub prepend_always: bool,
}

/// The merges and vocabulary of a SentencePiece-style BPE (see the module docs).
#[derive(Clone, Debug)]
pub struct SentencePiece {
    /// The id of each token that is one character.
    char_ids: FxHashMap<char, u32>,
    /// The id of each `<0xNN>` token, [`NO_ID`] where the vocabulary lacks it.
    byte_ids: Box<[u32; 256]>,
    /// `(left, right)` pair key -> (rank, id of the joined token).
    merges: FxHashMap<u64, (u32, u32)>,
    unk: Option<u32>,
    fuse_unk: bool,
    byte_fallback: bool,
    spaces: Spaces,
    /// Whether a word may be cut before every `▁` that follows another character (see the module docs).
    cut_at_spaces: bool,
}

/// What [`SentencePiece::new`] takes: the vocabulary as `(token, id)`, the merges as pairs of tokens in
/// priority order, and the options of the file.
pub struct Parts<'a> {
    pub vocab: &'a [(String, u32)],
    pub merges: &'a [(String, String)],
    pub unk: Option<&'a str>,
    pub fuse_unk: bool,
    pub byte_fallback: bool,
    pub spaces: Spaces,
}

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

/// The byte of a `<0xNN>` token.
pub fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Calls `f` with the words of a normalised text: a word starts at every `▁` (`split`), or at every `▁` that
/// follows another character, so that runs of `▁` start the word after them. A merge never joins two words.
pub fn cut_words<'a>(normal: &'a str, split: bool, mut f: impl FnMut(&'a str)) {
    let mut start = 0;
    let mut previous: Option<char> = None;
    for (i, c) in normal.char_indices() {
        if c == SPACE && i > start && (split || previous.is_some_and(|p| p != SPACE)) {
            f(&normal[start..i]);
            start = i;
        }
        previous = Some(c);
    }
    if start < normal.len() {
        f(&normal[start..]);
    }
}

/// The bytes a token stands for in decoded text: a `<0xNN>` token its byte (with byte fallback), any
/// other its text with each `▁` a space.
pub fn token_text_bytes(token: &str, byte_fallback: bool) -> Vec<u8> {
    match byte_token(token) {
        Some(b) if byte_fallback => vec![b],
        _ => token.replace(SPACE, " ").into_bytes(),
    }
}

impl SentencePiece {
    /// The encoder of `parts`, or why the merges do not fit the vocabulary.
    pub fn new(parts: &Parts<'_>) -> std::result::Result<Self, String> {
        let id_of: FxHashMap<&str, u32> = parts
            .vocab
            .iter()
            .map(|(t, id)| (t.as_str(), *id))
            .collect();
        let mut char_ids = FxHashMap::default();
        let mut byte_ids = Box::new([NO_ID; 256]);
        let mut cut_at_spaces = true;
        for (token, id) in parts.vocab {
            let mut chars = token.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                char_ids.insert(c, *id);
            }
            if let Some(b) = byte_token(token) {
                byte_ids[b as usize] = *id;
            }
            let mut after_other = false;
            for c in token.chars() {
                if c == SPACE && after_other {
                    cut_at_spaces = false;
                }
                after_other = c != SPACE;
            }
        }
        cut_at_spaces &= char_ids.contains_key(&SPACE); // else unknowns around a `▁` could fuse across it
        let mut merges = FxHashMap::default();
        for (rank, (left, right)) in parts.merges.iter().enumerate() {
            let joined = format!("{left}{right}");
            let (Some(&l), Some(&r), Some(&m)) = (
                id_of.get(left.as_str()),
                id_of.get(right.as_str()),
                id_of.get(joined.as_str()),
            ) else {
                return Err(format!(
                    "model.merges[{rank}]: {left:?}, {right:?} or the two joined is not in the vocab"
                ));
            };
            merges.insert(pair_key(l, r), (rank as u32, m)); // a pair listed twice takes its later place
        }
        let unk = match parts.unk {
            None => None,
            Some(t) => Some(
                *id_of
                    .get(t)
                    .ok_or_else(|| format!("model.unk_token {t:?} is not in the vocab"))?,
            ),
        };
        Ok(SentencePiece {
            char_ids,
            byte_ids,
            merges,
            unk,
            fuse_unk: parts.fuse_unk,
            byte_fallback: parts.byte_fallback,
            spaces: parts.spaces,
            cut_at_spaces,
        })
    }

    /// How spaces are written and words cut.
    pub fn spaces(&self) -> Spaces {
        self.spaces
    }

    /// Whether decoded text loses the one space in front that encoding put there.
    pub fn strips_first_space(&self) -> bool {
        self.spaces.prepend != Prepend::Never
    }

    /// The normalised text: spaces as `▁`, and a `▁` in front where the scheme puts one (`at_start`: the
    /// text begins the input, not just after an added token).
    pub fn normalize(&self, text: &str, at_start: bool) -> String {
        if text.is_empty() {
            return String::new();
        }
        let replaced = text.replace(' ', "\u{2581}");
        let prepend = match self.spaces.prepend {
            _ if self.spaces.prepend_always => true,
            Prepend::Always => !replaced.starts_with(SPACE),
            Prepend::First => at_start && !replaced.starts_with(SPACE),
            Prepend::Never => false,
        };
        if prepend {
            format!("{SPACE}{replaced}")
        } else {
            replaced
        }
    }

    /// Encodes the text between two added tokens, appending its ids to `out`; `cache` keeps the ids of
    /// the words merged so far (shared across texts by the caller).
    pub fn encode(
        &self,
        text: &str,
        at_start: bool,
        cache: &mut FxHashMap<String, Vec<u32>>,
        out: &mut Vec<u32>,
    ) {
        let normal = self.normalize(text, at_start);
        if self.spaces.split || self.cut_at_spaces {
            cut_words(&normal, self.spaces.split, |word| {
                self.encode_word_cached(word, cache, out)
            });
        } else {
            self.encode_word_cached(&normal, cache, out);
        }
    }

    /// Whether the vocabulary has a token for the character `c`.
    pub fn has_char(&self, c: char) -> bool {
        self.char_ids.contains_key(&c)
    }

    /// This encoder with tokens for more characters (`(character, id)`), merged by nothing yet.
    pub fn with_chars(&self, chars: &[(char, u32)]) -> SentencePiece {
        let mut grown = self.clone();
        grown.char_ids.extend(chars.iter().copied());
        grown
    }

    /// The ids no merge may join: the `<0xNN>` byte tokens and the unknown token.
    pub fn unmergeable(&self) -> FxHashSet<u32> {
        let mut ids: FxHashSet<u32> = self
            .byte_ids
            .iter()
            .copied()
            .filter(|&id| id != NO_ID)
            .collect();
        ids.extend(self.unk);
        ids
    }

    fn encode_word_cached(
        &self,
        word: &str,
        cache: &mut FxHashMap<String, Vec<u32>>,
        out: &mut Vec<u32>,
    ) {
        if word.is_empty() {
            return;
        }
        if let Some(ids) = cache.get(word) {
            out.extend_from_slice(ids);
            return;
        }
        let start = out.len();
        self.encode_word(word, out);
        if word.len() <= 64 && cache.len() < 1 << 16 {
            cache.insert(word.to_owned(), out[start..].to_vec());
        }
    }

    /// The symbols a word starts as: its characters, a missing one as its bytes or the unknown token, as
    /// `tokenizers` builds them (a pending unknown is written when the next known character comes).
    fn symbols(&self, word: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(word.len());
        let mut pending_unk = false;
        for c in word.chars() {
            if let Some(&id) = self.char_ids.get(&c) {
                if pending_unk {
                    ids.push(self.unk.expect("a pending unknown has an id"));
                    pending_unk = false;
                }
                ids.push(id);
                continue;
            }
            if self.byte_fallback {
                let mut buffer = [0u8; 4];
                let bytes = c.encode_utf8(&mut buffer).as_bytes();
                if bytes.iter().all(|&b| self.byte_ids[b as usize] != NO_ID) {
                    ids.extend(bytes.iter().map(|&b| self.byte_ids[b as usize]));
                    continue;
                }
            }
            if let Some(unk) = self.unk {
                if pending_unk && !self.fuse_unk {
                    ids.push(unk);
                }
                pending_unk = true;
            }
        }
        if pending_unk {
            ids.push(self.unk.expect("a pending unknown has an id"));
        }
        ids
    }

    /// Merges one word (see the module docs) and appends its ids to `out`.
    pub fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        const NONE: u32 = u32::MAX;
        let mut ids = self.symbols(word);
        let n = ids.len();
        if n < 2 {
            out.extend_from_slice(&ids);
            return;
        }
        let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<u32> = (1..=n as u32)
            .map(|i| if i as usize == n { NONE } else { i })
            .collect();
        // (rank, position of the left symbol): the lowest rank pops first, the leftmost among equals.
        let mut heap: BinaryHeap<Reverse<(u32, u32)>> = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some(&(rank, _)) = self.merges.get(&pair_key(ids[i], ids[i + 1])) {
                heap.push(Reverse((rank, i as u32)));
            }
        }
        while let Some(Reverse((rank, pos))) = heap.pop() {
            let p = pos as usize;
            let q = next[p];
            if ids[p] == NONE || q == NONE {
                continue;
            }
            let q = q as usize;
            let Some(&(now, joined)) = self.merges.get(&pair_key(ids[p], ids[q])) else {
                continue;
            };
            if now != rank {
                continue; // a neighbour was merged first: the entry is stale
            }
            ids[p] = joined;
            ids[q] = NONE;
            next[p] = next[q];
            if next[q] != NONE {
                prev[next[q] as usize] = pos;
            }
            if prev[p] != NONE {
                let l = prev[p] as usize;
                if let Some(&(r, _)) = self.merges.get(&pair_key(ids[l], ids[p])) {
                    heap.push(Reverse((r, l as u32)));
                }
            }
            if next[p] != NONE {
                if let Some(&(r, _)) = self.merges.get(&pair_key(ids[p], ids[next[p] as usize])) {
                    heap.push(Reverse((r, pos)));
                }
            }
        }
        out.extend(ids.into_iter().filter(|&id| id != NONE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(vocab: &[&str], merges: &[(&str, &str)], spaces: Spaces) -> SentencePiece {
        let vocab: Vec<(String, u32)> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|(l, r)| (l.to_string(), r.to_string()))
            .collect();
        SentencePiece::new(&Parts {
            vocab: &vocab,
            merges: &merges,
            unk: Some("<unk>"),
            fuse_unk: true,
            byte_fallback: true,
            spaces,
        })
        .unwrap()
    }

    const LLAMA2: Spaces = Spaces {
        prepend: Prepend::Always,
        split: false,
        prepend_always: true,
    };

    #[test]
    fn spaces_become_the_marker_with_one_in_front() {
        let t = sp(&["<unk>"], &[], LLAMA2);
        assert_eq!(t.normalize("a b", true), "\u{2581}a\u{2581}b");
        assert_eq!(t.normalize(" a", false), "\u{2581}\u{2581}a");
        assert_eq!(t.normalize("", true), "");
        let first = sp(
            &["<unk>"],
            &[],
            Spaces {
                prepend: Prepend::First,
                split: false,
                prepend_always: false,
            },
        );
        assert_eq!(first.normalize("a", false), "a");
        assert_eq!(first.normalize(" a", true), "\u{2581}a");
    }

    #[test]
    fn merges_go_by_rank_and_missing_characters_by_their_bytes() {
        let mut vocab = vec!["<unk>", "\u{2581}", "a", "b", "ab", "\u{2581}ab"];
        let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        vocab.extend(bytes.iter().map(String::as_str));
        let t = sp(&vocab, &[("a", "b"), ("\u{2581}", "ab")], LLAMA2);
        let mut out = Vec::new();
        t.encode("ab ab", true, &mut FxHashMap::default(), &mut out);
        assert_eq!(out, vec![5, 5]);
        out.clear();
        t.encode("é", true, &mut FxHashMap::default(), &mut out);
        assert_eq!(out, vec![1, 6 + 0xC3, 6 + 0xA9]); // ▁ then é's two bytes
        assert!(t.cut_at_spaces);
    }

    #[test]
    fn unknown_characters_fuse_into_one_unknown_token() {
        let t = SentencePiece::new(&Parts {
            vocab: &[("<unk>".into(), 0), ("a".into(), 1)],
            merges: &[],
            unk: Some("<unk>"),
            fuse_unk: true,
            byte_fallback: false,
            spaces: Spaces {
                prepend: Prepend::Never,
                split: false,
                prepend_always: false,
            },
        })
        .unwrap();
        let mut out = Vec::new();
        t.encode("xyaxa", true, &mut FxHashMap::default(), &mut out);
        assert_eq!(out, vec![0, 1, 0, 1]);
    }
}
