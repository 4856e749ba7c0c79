//! Vocabulary extension: more BPE training on top of a tokenizer, on a new corpus, without moving an id.
//!
//! Every piece of the new corpus (cut as the tokenizer cuts it, see [`WordCounts::for_tokenizer`])
//! starts as the tokenizer's own ids for it, and merging goes on from there as in training: the most
//! frequent adjacent pair becomes a new token on the next free id, after every existing one (added
//! tokens included). Since no existing merge involves a new token, and the new merges rank after all
//! existing ones, the extended tokenizer encodes a piece as the old one did and then applies the new
//! merges: what it learned here is what it will do.
//!
//! A SentencePiece-style BPE merges characters, so a character its vocabulary lacks (byte fallback
//! spells it as `<0xNN>` tokens, which nothing merges) first gets a token of its own: the most frequent
//! missing characters, until the vocabulary covers `character_coverage` of the corpus's characters
//! (SentencePiece's option of that name), within the budget of new tokens. The merges take the rest.

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::bpe::Tokenizer;
use crate::sentencepiece::{SentencePiece, SPACE};
use crate::serialize::byte_to_char;
use crate::train::{Merger, ProgressFn, WordCounts};
use crate::{Error, Result};

/// What an extension adds.
#[derive(Clone, Debug)]
pub struct ExtendOptions {
    /// New tokens wanted (characters and merges together).
    pub new_tokens: usize,
    /// Pairs (and missing characters) seen fewer times are never added; extension stops early instead.
    pub min_frequency: u64,
    /// SentencePiece-style only: the share of the corpus's characters the vocabulary should cover.
    pub character_coverage: f64,
}

/// The new tokens, in the spelling of the tokenizer's `tokenizer.json`, and what they do to the corpus.
#[derive(Clone, Debug)]
pub struct Extension {
    /// The id of the first new token; the others follow it.
    pub first_id: u32,
    /// The new tokens, by id.
    pub tokens: Vec<String>,
    /// The new merges, in rank order after the existing ones.
    pub merges: Vec<(String, String)>,
    /// How many of the new tokens are single characters (the others are merges).
    pub characters: usize,
    /// Characters of the corpus, and its tokens before and after the extension.
    pub chars: u64,
    pub tokens_before: u64,
    pub tokens_after: u64,
    pub documents: u64,
    pub unique_pieces: usize,
}

/// Learns up to `options.new_tokens` tokens on top of `tokenizer` from `counts` (made by
/// [`WordCounts::for_tokenizer`] for it).
pub fn extend(
    counts: WordCounts,
    tokenizer: &Tokenizer,
    options: &ExtendOptions,
    progress: &mut ProgressFn,
) -> Result<Extension> {
    if counts.total_chars == 0 {
        return Err(Error::Config(
            "the corpus is empty: there is no text to extend the vocabulary with".into(),
        ));
    }
    let first_id = tokenizer.vocab_size();
    if first_id + options.new_tokens > u32::MAX as usize {
        return Err(Error::Config(format!(
            "{} new tokens after {first_id} do not fit in 32-bit ids",
            options.new_tokens
        )));
    }
    let sp = tokenizer.sentencepiece_parts();
    let min_frequency = options.min_frequency.max(1);
    let pieces: Vec<(&str, u64)> = counts.counts.iter().map(|(p, &n)| (&**p, n)).collect();
    let new_chars = match sp {
        Some(sp) => missing_characters(sp, &pieces, options, first_id as u32),
        None => Vec::new(),
    };
    // Every id's spelling: a byte-level token's bytes, a SentencePiece one's text with its `▁`.
    let fixed = sp.map(SentencePiece::unmergeable).unwrap_or_default();
    let mut spelling: Vec<Vec<u8>> = (0..first_id as u32)
        .map(|id| {
            let bytes = tokenizer.token_bytes(id).unwrap_or(&[]);
            match sp {
                Some(_) if fixed.contains(&id) => Vec::new(), // a byte token, or the unknown one
                Some(_) => String::from_utf8_lossy(bytes)
                    .replace(' ', &SPACE.to_string())
                    .into_bytes(),
                None => bytes.to_vec(),
            }
        })
        .collect();
    spelling.extend(new_chars.iter().map(|(c, _)| c.to_string().into_bytes()));

    let (words, tokens_before, tokens_start) = match sp {
        Some(sp) => sentencepiece_words(sp, &new_chars, &pieces),
        None => byte_level_words(tokenizer, &pieces),
    };
    let mut merger = Merger::from_words(words);
    let unmerged = tokens_start - merger.total(); // tokens no merge can touch
    let wanted = options.new_tokens - new_chars.len();
    let (merges, spelling) = merger.run(wanted, min_frequency, spelling, progress)?;

    let table = byte_to_char();
    let key = |id: u32| -> String {
        let bytes = &spelling[id as usize];
        match sp {
            Some(_) => String::from_utf8_lossy(bytes).into_owned(),
            None => bytes.iter().map(|&b| table[b as usize]).collect(),
        }
    };
    Ok(Extension {
        first_id: first_id as u32,
        tokens: (first_id as u32..spelling.len() as u32).map(key).collect(),
        merges: merges.iter().map(|&(l, r)| (key(l), key(r))).collect(),
        characters: new_chars.len(),
        chars: counts.total_chars,
        tokens_before,
        tokens_after: unmerged + merger.total(),
        documents: counts.documents,
        unique_pieces: pieces.len(),
    })
}

/// The characters a SentencePiece-style vocabulary lacks that it should cover, most frequent first, with
/// the ids they get from `first_id` on.
fn missing_characters(
    sp: &SentencePiece,
    pieces: &[(&str, u64)],
    options: &ExtendOptions,
    first_id: u32,
) -> Vec<(char, u32)> {
    let mut counts: FxHashMap<char, u64> = FxHashMap::default();
    let mut total = 0u64;
    for &(piece, n) in pieces {
        for c in piece.chars() {
            *counts.entry(c).or_insert(0) += n;
            total += n;
        }
    }
    let mut missing: Vec<(char, u64)> = counts
        .into_iter()
        .filter(|(c, _)| !sp.has_char(*c))
        .collect();
    let mut covered = total - missing.iter().map(|m| m.1).sum::<u64>();
    missing.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut chosen = Vec::new();
    for (c, n) in missing {
        let enough = covered as f64 >= options.character_coverage * total as f64;
        if enough || n < options.min_frequency.max(1) || chosen.len() == options.new_tokens {
            break;
        }
        chosen.push((c, first_id + chosen.len() as u32));
        covered += n;
    }
    chosen
}

/// The words to merge, each as the ids the tokenizer with the new characters gives it, cut at the
/// tokens nothing merges; the corpus's tokens before any new token, and with the new characters.
fn sentencepiece_words(
    sp: &SentencePiece,
    new_chars: &[(char, u32)],
    pieces: &[(&str, u64)],
) -> (Vec<(Vec<u32>, u64)>, u64, u64) {
    let grown = sp.with_chars(new_chars);
    let fixed = grown.unmergeable();
    let encoded: Vec<(Vec<u32>, usize, u64)> = pieces
        .par_iter()
        .map(|&(piece, n)| {
            let mut before = Vec::new();
            sp.encode_word(piece, &mut before);
            let mut ids = Vec::new();
            grown.encode_word(piece, &mut ids);
            (ids, before.len(), n)
        })
        .collect();
    let before = encoded.iter().map(|(_, b, n)| *b as u64 * n).sum();
    let start = encoded.iter().map(|(ids, _, n)| ids.len() as u64 * n).sum();
    let mut words = Vec::new();
    for (ids, _, n) in encoded {
        for run in ids.split(|id| fixed.contains(id)) {
            words.push((run.to_vec(), n));
        }
    }
    (words, before, start)
}

/// The words to merge, each as the byte-level tokenizer's ids for it; the corpus's tokens (twice: no
/// characters are added to a byte-level vocabulary).
fn byte_level_words(
    tokenizer: &Tokenizer,
    pieces: &[(&str, u64)],
) -> (Vec<(Vec<u32>, u64)>, u64, u64) {
    let words: Vec<(Vec<u32>, u64)> = pieces
        .par_iter()
        .map(|&(piece, n)| {
            let mut ids = Vec::new();
            tokenizer.encode_piece(piece.as_bytes(), &mut ids);
            (ids, n)
        })
        .collect();
    let tokens = words.iter().map(|(ids, n)| ids.len() as u64 * n).sum();
    (words, tokens, tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::GPT4_PATTERN;
    use crate::train::TrainOptions;

    fn trained(docs: &[&str], vocab_size: usize) -> Tokenizer {
        let mut counts = WordCounts::new(GPT4_PATTERN).unwrap();
        counts.add_documents(docs).unwrap();
        let options = TrainOptions {
            vocab_size,
            special_tokens: vec!["<|endoftext|>".into()],
            min_frequency: 1,
        };
        counts.train(&options, &mut |_| true).unwrap().0
    }

    #[test]
    fn new_ids_follow_every_old_one_and_shorten_the_new_corpus() {
        let old = trained(&["the cat sat on the mat", "the dog ate the hat"], 300);
        let korean = [
            "고양이가 매트 위에 앉았다",
            "고양이가 모자를 먹었다",
            "고양이 고양이",
        ];
        let mut counts = WordCounts::for_tokenizer(&old);
        counts.add_documents(&korean).unwrap();
        let options = ExtendOptions {
            new_tokens: 20,
            min_frequency: 2,
            character_coverage: 0.9995,
        };
        let ext = extend(counts, &old, &options, &mut |_| true).unwrap();
        assert_eq!(ext.first_id as usize, old.vocab_size());
        assert_eq!(ext.characters, 0);
        assert_eq!(ext.tokens.len(), ext.merges.len());
        assert!(!ext.tokens.is_empty() && ext.tokens.len() <= 20);
        assert!(ext.tokens_after < ext.tokens_before);
        let chars: u64 = korean.iter().map(|d| d.chars().count() as u64).sum();
        assert_eq!(ext.chars, chars);
    }

    #[test]
    fn an_empty_corpus_is_refused() {
        let old = trained(&["the cat sat on the mat"], 270);
        let counts = WordCounts::for_tokenizer(&old);
        let options = ExtendOptions {
            new_tokens: 5,
            min_frequency: 2,
            character_coverage: 1.0,
        };
        let err = extend(counts, &old, &options, &mut |_| true).unwrap_err();
        assert!(err.to_string().contains("the corpus is empty"), "{err}");
    }
}
