//! Quality filters: the heuristics of Gopher (Rae et al. 2021) and the pipelines that followed it.
//!
//! Each filter is off unless its threshold is set: word count bounds, mean word length bounds, the
//! ratio of `#` and ellipses to words, the share of lines that start with a bullet or end with an
//! ellipsis, the share of words holding a letter, the share of digits, the share of letters in one
//! script (Hangul for Korean text), and repetition: the share of duplicated lines (and of their
//! characters), the share of characters in the most frequent word n-gram (n = 2, 3, 4) and in
//! duplicated n-grams (n = 5 to 10). [`Filters::gopher`] sets them all at the paper's thresholds.

use std::collections::HashMap;

use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A script whose share of a document's letters a filter bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Script {
    Hangul,
    Latin,
    Han,
    Kana,
    Cyrillic,
}

impl Script {
    /// The script of a character, among these, if any.
    pub fn of(c: char) -> Option<Script> {
        match c {
            '\u{ac00}'..='\u{d7a3}' | '\u{1100}'..='\u{11ff}' | '\u{3130}'..='\u{318f}' => {
                Some(Script::Hangul)
            }
            'A'..='Z' | 'a'..='z' | '\u{c0}'..='\u{24f}' => Some(Script::Latin),
            '\u{3400}'..='\u{4dbf}' | '\u{4e00}'..='\u{9fff}' => Some(Script::Han),
            '\u{3040}'..='\u{30ff}' => Some(Script::Kana),
            '\u{400}'..='\u{4ff}' => Some(Script::Cyrillic),
            _ => None,
        }
    }
}

impl std::str::FromStr for Script {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "hangul" => Ok(Script::Hangul),
            "latin" => Ok(Script::Latin),
            "han" => Ok(Script::Han),
            "kana" => Ok(Script::Kana),
            "cyrillic" => Ok(Script::Cyrillic),
            _ => Err(Error::Config(format!(
                "unknown script {s:?}: one of hangul, latin, han, kana, cyrillic"
            ))),
        }
    }
}

/// The filters' thresholds; `None` turns a filter off.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filters {
    pub min_words: Option<usize>,
    pub max_words: Option<usize>,
    pub min_mean_word_length: Option<f64>,
    pub max_mean_word_length: Option<f64>,
    /// `#` and ellipses per word.
    pub max_symbol_ratio: Option<f64>,
    pub max_bullet_lines: Option<f64>,
    pub max_ellipsis_lines: Option<f64>,
    /// Least share of words with a letter in them.
    pub min_alpha_words: Option<f64>,
    /// Digits per character.
    pub max_digit_ratio: Option<f64>,
    /// Least share of the document's letters in this script.
    pub min_script: Option<(Script, f64)>,
    /// Share of lines that repeat an earlier line.
    pub max_dup_lines: Option<f64>,
    /// Share of characters in lines that repeat an earlier line.
    pub max_dup_line_chars: Option<f64>,
    /// (n, most): the share of word characters in the most frequent word n-gram.
    pub max_top_ngram_chars: Vec<(usize, f64)>,
    /// (n, most): the share of word characters in word n-grams that occur more than once.
    pub max_dup_ngram_chars: Vec<(usize, f64)>,
}

impl Filters {
    /// Gopher's thresholds for every filter it defines (the script filter stays off).
    pub fn gopher() -> Self {
        Filters {
            min_words: Some(50),
            max_words: Some(100_000),
            min_mean_word_length: Some(3.0),
            max_mean_word_length: Some(10.0),
            max_symbol_ratio: Some(0.1),
            max_bullet_lines: Some(0.9),
            max_ellipsis_lines: Some(0.3),
            min_alpha_words: Some(0.8),
            max_digit_ratio: None,
            min_script: None,
            max_dup_lines: Some(0.3),
            max_dup_line_chars: Some(0.2),
            max_top_ngram_chars: vec![(2, 0.2), (3, 0.18), (4, 0.16)],
            max_dup_ngram_chars: vec![
                (5, 0.15),
                (6, 0.14),
                (7, 0.13),
                (8, 0.12),
                (9, 0.11),
                (10, 0.10),
            ],
        }
    }

    /// The names of the filters that are on, in the order they are applied.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        let on = [
            ("min_words", self.min_words.is_some()),
            ("max_words", self.max_words.is_some()),
            ("min_mean_word_length", self.min_mean_word_length.is_some()),
            ("max_mean_word_length", self.max_mean_word_length.is_some()),
            ("max_symbol_ratio", self.max_symbol_ratio.is_some()),
            ("max_bullet_lines", self.max_bullet_lines.is_some()),
            ("max_ellipsis_lines", self.max_ellipsis_lines.is_some()),
            ("min_alpha_words", self.min_alpha_words.is_some()),
            ("max_digit_ratio", self.max_digit_ratio.is_some()),
            ("min_script", self.min_script.is_some()),
            ("max_dup_lines", self.max_dup_lines.is_some()),
            ("max_dup_line_chars", self.max_dup_line_chars.is_some()),
        ];
        out.extend(on.iter().filter(|(_, o)| *o).map(|(n, _)| n.to_string()));
        out.extend(
            self.max_top_ngram_chars
                .iter()
                .map(|(n, _)| format!("max_top_{n}gram_chars")),
        );
        out.extend(
            self.max_dup_ngram_chars
                .iter()
                .map(|(n, _)| format!("max_dup_{n}gram_chars")),
        );
        out
    }

    /// The first filter `text` fails, by name, or None when it passes them all.
    pub fn failed(&self, text: &str) -> Option<String> {
        if *self == Filters::default() {
            return None;
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        let n = words.len();
        let fail = |name: &str| Some(name.to_string());
        if self.min_words.is_some_and(|m| n < m) {
            return fail("min_words");
        }
        if self.max_words.is_some_and(|m| n > m) {
            return fail("max_words");
        }
        let mean = if n == 0 {
            0.0
        } else {
            words.iter().map(|w| w.chars().count()).sum::<usize>() as f64 / n as f64
        };
        if self.min_mean_word_length.is_some_and(|m| mean < m) {
            return fail("min_mean_word_length");
        }
        if self.max_mean_word_length.is_some_and(|m| mean > m) {
            return fail("max_mean_word_length");
        }
        if let Some(most) = self.max_symbol_ratio {
            let symbols =
                text.matches('#').count() + text.matches("...").count() + text.matches('…').count();
            if symbols as f64 > most * n.max(1) as f64 {
                return fail("max_symbol_ratio");
            }
        }
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let share = |count: usize| {
            if lines.is_empty() {
                0.0
            } else {
                count as f64 / lines.len() as f64
            }
        };
        if let Some(most) = self.max_bullet_lines {
            let bullets = lines
                .iter()
                .filter(|l| l.starts_with(['•', '●', '○', '■', '□', '▪', '▫', '*', '-', '‣', '–']))
                .count();
            if share(bullets) > most {
                return fail("max_bullet_lines");
            }
        }
        if let Some(most) = self.max_ellipsis_lines {
            let ellipses = lines
                .iter()
                .filter(|l| l.ends_with("...") || l.ends_with('…'))
                .count();
            if share(ellipses) > most {
                return fail("max_ellipsis_lines");
            }
        }
        if let Some(least) = self.min_alpha_words {
            let alpha = words
                .iter()
                .filter(|w| w.chars().any(char::is_alphabetic))
                .count();
            if n == 0 || (alpha as f64) < least * n as f64 {
                return fail("min_alpha_words");
            }
        }
        if let Some(most) = self.max_digit_ratio {
            let chars = text.chars().filter(|c| !c.is_whitespace()).count();
            let digits = text.chars().filter(char::is_ascii_digit).count();
            if chars > 0 && digits as f64 > most * chars as f64 {
                return fail("max_digit_ratio");
            }
        }
        if let Some((script, least)) = self.min_script {
            let (mut letters, mut ours) = (0usize, 0usize);
            for c in text.chars().filter(|c| c.is_alphabetic()) {
                letters += 1;
                ours += usize::from(Script::of(c) == Some(script));
            }
            if letters == 0 || (ours as f64) < least * letters as f64 {
                return fail("min_script");
            }
        }
        if self.max_dup_lines.is_some() || self.max_dup_line_chars.is_some() {
            let mut seen = FxHashSet::default();
            let (mut dup, mut dup_chars, mut chars) = (0usize, 0usize, 0usize);
            for line in &lines {
                chars += line.len();
                if !seen.insert(*line) {
                    dup += 1;
                    dup_chars += line.len();
                }
            }
            if self.max_dup_lines.is_some_and(|m| share(dup) > m) {
                return fail("max_dup_lines");
            }
            if self
                .max_dup_line_chars
                .is_some_and(|m| chars > 0 && dup_chars as f64 > m * chars as f64)
            {
                return fail("max_dup_line_chars");
            }
        }
        let word_chars: usize = words.iter().map(|w| w.len()).sum();
        for &(size, most) in &self.max_top_ngram_chars {
            if top_ngram_chars(&words, size) as f64 > most * word_chars.max(1) as f64 {
                return Some(format!("max_top_{size}gram_chars"));
            }
        }
        for &(size, most) in &self.max_dup_ngram_chars {
            if dup_ngram_chars(&words, size) as f64 > most * word_chars.max(1) as f64 {
                return Some(format!("max_dup_{size}gram_chars"));
            }
        }
        None
    }
}

/// Characters (bytes of the words) of the most frequent n-gram, times its count.
fn top_ngram_chars(words: &[&str], n: usize) -> usize {
    if words.len() < n || n == 0 {
        return 0;
    }
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for gram in words.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    counts
        .iter()
        .filter(|(_, &c)| c > 1)
        .map(|(g, &c)| g.iter().map(|w| w.len()).sum::<usize>() * c)
        .max()
        .unwrap_or(0)
}

/// Characters (bytes) of the words covered by n-grams that occur more than once, each word counted once.
fn dup_ngram_chars(words: &[&str], n: usize) -> usize {
    if words.len() < n || n == 0 {
        return 0;
    }
    let mut first: HashMap<&[&str], usize> = HashMap::new();
    let mut covered = vec![false; words.len()];
    for (i, gram) in words.windows(n).enumerate() {
        if let Some(&j) = first.get(gram) {
            for k in (i..i + n).chain(j..j + n) {
                covered[k] = true;
            }
        } else {
            first.insert(gram, i);
        }
    }
    words
        .iter()
        .zip(covered)
        .filter(|(_, c)| *c)
        .map(|(w, _)| w.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat \
                        and the bird sings a song about the morning sun rising over green hills far away";

    #[test]
    fn gopher_filters_name_the_rule() {
        let filters = Filters::gopher();
        assert_eq!(filters.failed("too short"), Some("min_words".into()));
        let repeated = "buy now ".repeat(60);
        assert!(filters.failed(&repeated).is_some());
        assert_eq!(filters.failed(TEXT), Some("min_words".into())); // 32 words
        let long = format!("{TEXT} {}", TEXT.replace("the", "a"));
        assert_eq!(
            Filters {
                min_words: Some(50),
                ..Default::default()
            }
            .failed(&long),
            None
        );
        let script = Filters {
            min_script: Some((Script::Hangul, 0.5)),
            ..Default::default()
        };
        assert_eq!(script.failed("정말 재미있는 영화였다 good"), None);
        assert_eq!(
            script.failed("a good movie 영화"),
            Some("min_script".into())
        );
    }
}
