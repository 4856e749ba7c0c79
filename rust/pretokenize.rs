//! Regex pre-tokenization: cutting text into the pieces that byte-level BPE then merges within.
//!
//! A [`PreTokenizer`] is built from a regex pattern. Any pattern is run with `fancy-regex`
//! (needed for the lookahead `(?!\S)` and the possessive quantifiers of the usual patterns), but
//! that backtracking VM is the slowest step of encoding large corpora. The two patterns almost
//! everyone uses, [`GPT4_PATTERN`] (cl100k) and [`GPT2_PATTERN`], are therefore recognised by exact
//! string equality and run by hand-written matchers instead. Those matchers must give exactly the
//! pieces that `fancy-regex`'s `find_iter` gives, or a tokenizer trained with one would encode
//! differently with the other. To make that hold:
//!
//! * the character classes `\p{L}`, `\p{N}` and `\s` are read from `regex-syntax`'s Unicode tables
//!   (the very tables `fancy-regex` delegates to) rather than from `char` methods, whose Unicode
//!   version and definitions differ (`char::is_alphabetic` is not `\p{L}`);
//! * the case-insensitive contractions of the GPT-4 pattern take their case variants from
//!   `regex-syntax`'s simple case folding, so `'ſ` (U+017F, long s) is a contraction like `'s`;
//! * each matcher walks the pattern's alternatives in order, with the backtracking each one would
//!   do worked out by hand (see `Tables::gpt4_next` and `Tables::gpt2_next`);
//! * the unit tests compare both matchers with `fancy-regex` on hand-picked strings, on every
//!   Unicode scalar value in context (all of the BMP by default, all planes in an ignored test),
//!   and on pseudo-random strings.
//!
//! [`PreTokenizer::chunks`] cuts a text into pieces that can be pre-tokenized independently (for
//! example on several threads) with the same result as pre-tokenizing the whole.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

use crate::{Error, Result};

/// The cl100k (GPT-4) pre-tokenization pattern.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The GPT-2 pre-tokenization pattern.
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// A compiled pre-tokenization pattern.
#[derive(Clone, Debug)]
pub struct PreTokenizer {
    pattern: String,
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    Gpt4,
    Gpt2,
    Custom(fancy_regex::Regex),
}

impl PreTokenizer {
    /// Compiles `pattern`. The two built-in pattern strings (exact string equality) get the
    /// hand-written matcher; any other string is compiled with fancy-regex.
    ///
    /// A pattern that does not compile gives [`Error::Pattern`] with the regex error text.
    pub fn new(pattern: &str) -> Result<Self> {
        let kind = if pattern == GPT4_PATTERN {
            Kind::Gpt4
        } else if pattern == GPT2_PATTERN {
            Kind::Gpt2
        } else {
            let re = fancy_regex::Regex::new(pattern)
                .map_err(|e| Error::Pattern(format!("{pattern:?}: {e}")))?;
            Kind::Custom(re)
        };
        Ok(PreTokenizer {
            pattern: pattern.to_owned(),
            kind,
        })
    }

    /// The pattern string this was built from.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the hand-written matcher is used (the pattern is one of the two built-ins).
    pub fn is_builtin(&self) -> bool {
        !matches!(self.kind, Kind::Custom(_))
    }

    /// Calls `f` on each piece of `text` in order.
    ///
    /// The pieces tile `text`: concatenated they give `text` back, and none is empty. They are
    /// exactly the matches of `fancy-regex`'s `find_iter` for the pattern. The built-in patterns
    /// match at every position, so for them that is the whole story. A custom pattern may leave
    /// text between matches unmatched; each such gap is also passed to `f`, as a piece of its own
    /// between the matches around it, so that no text is silently lost from the encoding. Empty
    /// matches of a custom pattern are not passed (they hold no bytes to encode).
    ///
    /// A runtime error of `fancy-regex` (for example its backtrack limit) gives
    /// [`Error::Pattern`]; `f` has then seen the pieces before the failing match. The built-in
    /// matchers never fail, not even where `fancy-regex` itself would give up: on a whitespace
    /// run of a couple of million chars its backtracking stack overflows its limit, and there
    /// they return the pieces the pattern defines.
    pub fn split<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<()> {
        match &self.kind {
            Kind::Gpt4 => {
                let t = tables();
                drive(text, f, |b, p| t.gpt4_next(b, p));
            }
            Kind::Gpt2 => {
                let t = tables();
                drive(text, f, |b, p| t.gpt2_next(b, p));
            }
            Kind::Custom(re) => {
                let mut done = 0;
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| Error::Pattern(format!("{:?}: {e}", self.pattern)))?;
                    if m.start() == m.end() {
                        continue;
                    }
                    if m.start() > done {
                        f(&text[done..m.start()]);
                    }
                    f(m.as_str());
                    done = m.end();
                }
                if done < text.len() {
                    f(&text[done..]);
                }
            }
        }
        Ok(())
    }

    /// Cuts `text` into chunks of at least `target_bytes` bytes each (the last may be shorter),
    /// at points where splitting each chunk on its own gives exactly the pieces that splitting
    /// the whole text gives. Concatenated, the chunks give `text`; there is always at least one
    /// chunk (an empty text gives one empty chunk).
    ///
    /// For the built-in patterns a cut is made before byte `i` only when the char before `i` is
    /// `'\n'`, the char before that exists and is not whitespace (`\s`), and the char at `i` is a
    /// letter (`\p{L}`); a text with no such point is one chunk. For a custom pattern no safe cut
    /// is known, and the whole text is one chunk.
    //
    // Why such a cut is safe for both built-in patterns. Neither pattern looks behind, so matching
    // from `i` onwards cannot see the text before `i`; it remains to show that (1) some piece of
    // the whole text ends exactly at `i`, and (2) every match attempt started before `i` behaves
    // the same whether the text goes on with a letter at `i` or ends at `i`.
    //  * Only whitespace alternatives (`\s*[\r\n]`, `\s+(?!\S)`, `\s+`) and the GPT-4 `[\r\n]*`
    //    tail can consume the '\n' at `i-1`: every other class excludes `\n` (`\s`, `\r\n`) and
    //    the contractions are letters. A whitespace run cannot start before `i-1`, since the char
    //    at `i-2` is not whitespace, so only attempts starting at `i-1` itself, or the `[\r\n]*`
    //    tail, ever look at the char at `i`.
    //  * `[\r\n]*` stops at `i` both when a letter follows and at the end of the text.
    //  * At `i-1` GPT-4 reaches `\s*[\r\n]`, whose `\s*` stops at `i` either way and which then
    //    matches exactly the '\n'. GPT-2 reaches `\s+(?!\S)`: with the letter at `i` the lookahead
    //    fails and the attempt falls through to `\s+`, which matches the '\n'; at the end of the
    //    chunk the lookahead succeeds and matches the same '\n'. Both give the piece `[i-1, i)`,
    //    so a piece ends at `i` and the lookahead at the chunk end changes nothing.
    pub fn chunks<'t>(&self, text: &'t str, target_bytes: usize) -> Vec<&'t str> {
        if !self.is_builtin() {
            return vec![text];
        }
        let t = tables();
        let b = text.as_bytes();
        let mut out = Vec::new();
        let mut start: usize = 0;
        // `max(1)` keeps every chunk non-empty (and the loop finite) for a zero target.
        while let Some(cut) = t.next_cut(b, start.saturating_add(target_bytes.max(1))) {
            out.push(&text[start..cut]);
            start = cut;
        }
        out.push(&text[start..]);
        out
    }
}

/// Runs a hand-written matcher over `text`: `next(bytes, p)` returns the end of the piece that
/// starts at `p`, which is always past `p`, because the built-in patterns match at every position.
#[inline(always)]
fn drive<'t>(text: &'t str, mut f: impl FnMut(&'t str), next: impl Fn(&[u8], usize) -> usize) {
    let b = text.as_bytes();
    let mut p = 0;
    while p < b.len() {
        let e = next(b, p);
        debug_assert!(e > p && e <= b.len());
        f(&text[p..e]);
        p = e;
    }
}

/// Class bits. Every char has exactly one of them: Unicode makes letters, numbers and
/// White_Space disjoint (checked when the tables are built), and `OTHER` is the rest, i.e. the
/// `[^\s\p{L}\p{N}]` of both patterns (punctuation, symbols, marks, controls, ...).
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;
const OTHER: u8 = 8;

/// The character-class tables and contraction case variants, built once from `regex-syntax`.
struct Tables {
    /// Class bits of ASCII chars, the bulk of most corpora.
    ascii: [u8; 128],
    /// Class bits of every BMP code point (64 KiB), so that e.g. Hangul costs one lookup.
    bmp: Box<[u8; 0x10000]>,
    /// Sorted, disjoint, inclusive ranges above U+FFFF with their class bits; code points in
    /// none of them are `OTHER`.
    astral: Vec<(u32, u32, u8)>,
    /// Chars that `(?i:...)` lets stand for `s`, `d`, `m`, `t` (e.g. U+017F for `s`).
    fold_sdmt: Vec<u32>,
    fold_l: Vec<u32>,
    fold_v: Vec<u32>,
    fold_r: Vec<u32>,
    fold_e: Vec<u32>,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(Tables::build)
}

/// The chars (as inclusive code point ranges) that the single-char-class `pattern` matches,
/// according to `regex-syntax` with its default (Unicode) settings, as `fancy-regex` uses it.
fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(pattern)
        .unwrap_or_else(|e| panic!("regex-syntax rejects {pattern:?}: {e}"));
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        // A class of one char comes back as a literal.
        HirKind::Literal(lit) => {
            let s = std::str::from_utf8(&lit.0).expect("literal of a Unicode pattern is UTF-8");
            s.chars().map(|c| (c as u32, c as u32)).collect()
        }
        other => panic!("{pattern:?} is not a single char class: {other:?}"),
    }
}

fn class_chars(pattern: &str) -> Vec<u32> {
    class_ranges(pattern)
        .into_iter()
        .flat_map(|(lo, hi)| lo..=hi)
        .collect()
}

impl Tables {
    fn build() -> Tables {
        // One byte per code point while building (1.1 MB, dropped at the end): simple and exact.
        let mut all = vec![0u8; 0x11_0000];
        for (pattern, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in class_ranges(pattern) {
                for cls in &mut all[lo as usize..=hi as usize] {
                    assert!(
                        *cls == 0,
                        "{pattern} overlaps another class at U+{lo:04X}..U+{hi:04X}"
                    );
                    *cls = bit;
                }
            }
        }
        for cls in &mut all {
            if *cls == 0 {
                *cls = OTHER;
            }
        }
        let mut ascii = [0u8; 128];
        ascii.copy_from_slice(&all[..128]);
        let bmp: Box<[u8; 0x10000]> = all[..0x10000]
            .to_vec()
            .into_boxed_slice()
            .try_into()
            .expect("64 Ki entries");
        let mut astral: Vec<(u32, u32, u8)> = Vec::new();
        for (cp, &cls) in all.iter().enumerate().skip(0x10000) {
            let cp = cp as u32;
            if cls == OTHER {
                continue;
            }
            match astral.last_mut() {
                Some(last) if last.1 + 1 == cp && last.2 == cls => last.1 = cp,
                _ => astral.push((cp, cp, cls)),
            }
        }
        Tables {
            ascii,
            bmp,
            astral,
            fold_sdmt: class_chars("(?i:[sdmt])"),
            fold_l: class_chars("(?i:[l])"),
            fold_v: class_chars("(?i:[v])"),
            fold_r: class_chars("(?i:[r])"),
            fold_e: class_chars("(?i:[e])"),
        }
    }

    #[inline(always)]
    fn class(&self, cp: u32) -> u8 {
        if cp < 0x10000 {
            self.bmp[cp as usize & 0xFFFF]
        } else {
            self.astral_class(cp)
        }
    }

    #[cold]
    fn astral_class(&self, cp: u32) -> u8 {
        let i = self.astral.partition_point(|r| r.1 < cp);
        match self.astral.get(i) {
            Some(&(lo, _, cls)) if lo <= cp => cls,
            _ => OTHER,
        }
    }

    /// The char at byte `i` of valid UTF-8 `b`: (code point, class bits, length in bytes).
    #[inline(always)]
    fn at(&self, b: &[u8], i: usize) -> (u32, u8, usize) {
        let b0 = b[i];
        if b0 < 0x80 {
            return (b0 as u32, self.ascii[b0 as usize], 1);
        }
        let (cp, n) = decode_multibyte(b, i);
        (cp, self.class(cp), n)
    }

    /// The class bits of the char at byte `i`, or 0 at the end of the text (0 is in no class).
    #[inline(always)]
    fn class_at(&self, b: &[u8], i: usize) -> (u8, usize) {
        if i >= b.len() {
            return (0, 0);
        }
        let (_, cls, n) = self.at(b, i);
        (cls, n)
    }

    /// End of the run of chars whose class is in `mask`, starting at byte `i` (greedy `[...]+`
    /// and `[...]*`; the caller has checked the first char when it needs at least one).
    #[inline(always)]
    fn run_end(&self, b: &[u8], mut i: usize, mask: u8) -> usize {
        while i < b.len() {
            let b0 = b[i];
            if b0 < 0x80 {
                if self.ascii[b0 as usize] & mask == 0 {
                    break;
                }
                i += 1;
            } else {
                let (cp, n) = decode_multibyte(b, i);
                if self.class(cp) & mask == 0 {
                    break;
                }
                i += n;
            }
        }
        i
    }

    /// The end of the piece that starts at byte `p` (< len) under [`GPT4_PATTERN`]:
    ///
    /// 1. `'(?i:[sdmt]|ll|ve|re)`
    /// 2. `[^\r\n\p{L}\p{N}]?+\p{L}+`: a letter run, with one optional leading char that is
    ///    neither CR/LF, letter nor number. The possessive `?+` changes nothing here: if the
    ///    first char is not a letter, dropping it cannot make `\p{L}+` match.
    /// 3. `\p{N}{1,3}`
    /// 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*`: the optional space is taken only when an `OTHER` char
    ///    follows (a space is itself not `OTHER`, so without one there is nothing to match).
    /// 5. `\s*[\r\n]`: `\s*` takes the whole whitespace run, then backtracks to its last CR/LF.
    /// 6. `\s+(?!\S)`: the whole run if the text ends there, else the run minus its last char
    ///    (which is followed by whitespace), provided that leaves at least one char.
    /// 7. `\s+`: the whole run, here always one char.
    #[inline(always)]
    fn gpt4_next(&self, b: &[u8], p: usize) -> usize {
        let (c0, f0, n0) = self.at(b, p);
        let q = p + n0;
        if f0 == LETTER {
            return self.run_end(b, q, LETTER); // 2, no prefix
        }
        if f0 == NUMBER {
            // 3: up to two more numbers.
            let (f1, n1) = self.class_at(b, q);
            if f1 != NUMBER {
                return q;
            }
            let (f2, n2) = self.class_at(b, q + n1);
            return if f2 == NUMBER { q + n1 + n2 } else { q + n1 };
        }
        if c0 == '\r' as u32 || c0 == '\n' as u32 {
            return self.gpt4_space(b, p); // 1-4 cannot start with CR/LF
        }
        if c0 == '\'' as u32 {
            if let Some(e) = self.gpt4_contraction(b, q) {
                return e; // 1
            }
        }
        // `c0` is OTHER or whitespace other than CR/LF: it can prefix a letter run.
        let (f1, n1) = self.class_at(b, q);
        if f1 == LETTER {
            return self.run_end(b, q + n1, LETTER); // 2, with prefix
        }
        if f0 == OTHER {
            return crlf_end(b, self.run_end(b, q, OTHER)); // 4, no space
        }
        if c0 == ' ' as u32 && f1 == OTHER {
            return crlf_end(b, self.run_end(b, q + n1, OTHER)); // 4, with space
        }
        self.gpt4_space(b, p)
    }

    /// `(?i:[sdmt]|ll|ve|re)` at byte `i`, after an apostrophe. The first alternative wins when
    /// it matches; the others cannot then match anyway, as their first letters differ from it.
    #[inline]
    fn gpt4_contraction(&self, b: &[u8], i: usize) -> Option<usize> {
        if i >= b.len() {
            return None;
        }
        let (c1, _, n1) = self.at(b, i);
        if self.fold_sdmt.contains(&c1) {
            return Some(i + n1);
        }
        let second = if self.fold_l.contains(&c1) {
            &self.fold_l
        } else if self.fold_v.contains(&c1) || self.fold_r.contains(&c1) {
            &self.fold_e
        } else {
            return None;
        };
        let j = i + n1;
        if j >= b.len() {
            return None;
        }
        let (c2, _, n2) = self.at(b, j);
        second.contains(&c2).then_some(j + n2)
    }

    /// Alternatives 5-7 of [`GPT4_PATTERN`] at the whitespace char at byte `p`.
    fn gpt4_space(&self, b: &[u8], p: usize) -> usize {
        let mut i = p;
        let mut last_start = p;
        let mut after_crlf = None;
        while i < b.len() {
            let (c, cls, n) = self.at(b, i);
            if cls != SPACE {
                break;
            }
            if c == '\r' as u32 || c == '\n' as u32 {
                after_crlf = Some(i + n);
            }
            last_start = i;
            i += n;
        }
        match after_crlf {
            Some(e) => e, // 5
            None => space_end(b.len(), p, last_start, i),
        }
    }

    /// The end of the piece that starts at byte `p` (< len) under [`GPT2_PATTERN`]:
    /// `'s|'t|'re|'ve|'m|'ll|'d` (case-sensitive), then ` ?\p{L}+`, ` ?\p{N}+` and
    /// ` ?[^\s\p{L}\p{N}]+`, each of which takes a leading space only when a char of its class
    /// follows it (a space is in none of the classes), then `\s+(?!\S)` and `\s+` as for GPT-4.
    #[inline(always)]
    fn gpt2_next(&self, b: &[u8], p: usize) -> usize {
        let (c0, f0, n0) = self.at(b, p);
        let q = p + n0;
        if c0 == '\'' as u32 && q < b.len() {
            match (b[q], b.get(q + 1)) {
                (b's' | b't' | b'm' | b'd', _) => return q + 1,
                (b'r' | b'v', Some(b'e')) | (b'l', Some(b'l')) => return q + 2,
                _ => {}
            }
        }
        if f0 != SPACE {
            return self.run_end(b, q, f0);
        }
        if c0 == ' ' as u32 {
            let (f1, n1) = self.class_at(b, q);
            if f1 != SPACE && f1 != 0 {
                return self.run_end(b, q + n1, f1);
            }
        }
        let mut i = p;
        let mut last_start = p;
        while i < b.len() {
            let (_, cls, n) = self.at(b, i);
            if cls != SPACE {
                break;
            }
            last_start = i;
            i += n;
        }
        space_end(b.len(), p, last_start, i)
    }

    /// The first cut at or after byte `from` that [`PreTokenizer::chunks`] allows, if any.
    fn next_cut(&self, b: &[u8], from: usize) -> Option<usize> {
        // A cut at `i` needs '\n' at `i-1`; search from there.
        let mut j = from.checked_sub(1)?;
        loop {
            j += b.get(j..)?.iter().position(|&c| c == b'\n')?;
            let i = j + 1;
            if i >= b.len() {
                return None;
            }
            if j > 0 && self.class_at(b, i).0 == LETTER {
                // Back up over UTF-8 continuation bytes to the start of the char before '\n'.
                let mut k = j - 1;
                while b[k] & 0xC0 == 0x80 {
                    k -= 1;
                }
                if self.class_at(b, k).0 != SPACE {
                    return Some(i);
                }
            }
            j = i;
        }
    }
}

/// `\s+(?!\S)|\s+` for the whitespace run `[p, end)` whose last char starts at `last_start`.
#[inline(always)]
fn space_end(len: usize, p: usize, last_start: usize, end: usize) -> usize {
    if end == len || last_start == p {
        // At the end of the text the lookahead holds for the whole run; a single char followed
        // by a non-space fails the lookahead and is matched by the plain `\s+`.
        end
    } else {
        // Followed by a non-space: backtrack one char, whose whitespace satisfies `(?!\S)`.
        last_start
    }
}

/// `[\r\n]*` from byte `i`.
#[inline(always)]
fn crlf_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i] == b'\r' || b[i] == b'\n') {
        i += 1;
    }
    i
}

/// Decodes the multi-byte char whose lead byte is at `b[i]` (`b` is valid UTF-8).
#[inline(always)]
fn decode_multibyte(b: &[u8], i: usize) -> (u32, usize) {
    let b0 = b[i] as u32;
    let cont = |k: usize| (b[i + k] & 0x3F) as u32;
    if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | cont(1), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | (cont(1) << 6) | cont(2), 3)
    } else {
        (
            ((b0 & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3),
            4,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn ours(pt: &PreTokenizer, text: &str) -> Vec<String> {
        let mut v = Vec::new();
        pt.split(text, |s| v.push(s.to_owned())).unwrap();
        v
    }

    fn reference(re: &fancy_regex::Regex, text: &str) -> Vec<String> {
        re.find_iter(text)
            .map(|m| m.unwrap().as_str().to_owned())
            .collect()
    }

    struct Pair {
        pt: PreTokenizer,
        re: fancy_regex::Regex,
    }

    impl Pair {
        fn new(pattern: &str) -> Pair {
            let pt = PreTokenizer::new(pattern).unwrap();
            assert!(pt.is_builtin());
            Pair {
                pt,
                re: fancy_regex::Regex::new(pattern).unwrap(),
            }
        }

        fn check(&self, text: &str) {
            let got = ours(&self.pt, text);
            let want = reference(&self.re, text);
            assert_eq!(got, want, "pieces differ on {text:?}");
        }
    }

    fn both() -> [Pair; 2] {
        [Pair::new(GPT4_PATTERN), Pair::new(GPT2_PATTERN)]
    }

    const TRICKY: &[&str] = &[
        "",
        "a",
        " ",
        "\n",
        "'",
        "''",
        "'s",
        "'S",
        "'ſ",
        "'ſx",
        "'LL",
        "'lL",
        "'ll",
        "'ve",
        "'VE",
        "'vE",
        "'re",
        "'Re",
        "'d",
        "'D",
        "'m",
        "'t",
        "'T",
        "'x",
        "'l",
        "'v",
        "'r",
        "'la",
        "'K",
        "'\u{212A}",
        "'’s",
        "’s",
        "' s",
        "'1",
        "'.",
        "''s",
        "'\n",
        "don't you're we've I'll she'd I'm it's DON'T YOU'RE I'LL",
        "rock'n'roll 'tis '90s ''quoted'' 'Twas",
        "1",
        "12",
        "123",
        "1234",
        "12345",
        "123456",
        "1234567",
        "12345678",
        "a1b22c333d4444",
        " 12345 ",
        "٣٤٥٦",
        "²³¹",
        "Ⅻ1",
        "3.14159",
        "$1,000,000.00",
        "Hello, world!",
        "Hello world",
        "hello   world",
        "hello \t world",
        "hello\tworld",
        "  leading",
        "trailing  ",
        "trailing \n",
        "   ",
        " \n ",
        "\n\n",
        "\r\n",
        "\r\n\r\n",
        "a\r\nb",
        "a\r\n\r\nb",
        "\r",
        "a\rb",
        "a\r",
        "\r\r\n\n\r",
        "x  \n  y",
        "x \n\t \r y",
        "x\n \ny",
        "...\n\n\nfoo",
        "!!!\r\n",
        " !!!\r\n\r\nx",
        " .\n",
        "\t.",
        "\t1",
        " 1",
        "  1",
        " (a)",
        "(hello)",
        "a.b.c",
        "--flag=value",
        "x = [1, 2, 3];",
        "def f(x):\n    return x + 1\n",
        "\u{A0}nbsp\u{A0}\u{A0}x\u{A0}",
        "a\u{3000}b\u{3000}\u{3000}c",
        "a\u{2028}b\u{2028}",
        "a\u{85}b\u{85}\u{85}",
        "\u{B}\u{C}\u{1C}\u{1F}x",
        "\u{0}\u{1}\u{7F}",
        "\u{FEFF}bom",
        "\u{200B}zwsp",
        "한국어 텍스트입니다. 정말 재밌어요!!",
        "한 글 ㄱㄴㄷ ㅋㅋㅋ",
        "日本語のテキスト、漢字。",
        "中文，标点。",
        "Привет, мир!",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "ภาษาไทย",
        "café naïve",
        "cafe\u{301} nai\u{308}ve",
        "e\u{301}\u{302}",
        " \u{301}x",
        "😀",
        "a😀b",
        " 😀😀 ",
        "👨\u{200D}👩\u{200D}👧",
        "❤\u{FE0F}",
        "👍🏽ok",
        "🇰🇷🇺🇸",
        "𝐀𝐁𝐂 𝟙𝟚𝟛",
        "\u{10FFFF}\u{E0001}",
        "mixed한국어English123😀",
    ];

    #[test]
    fn tricky_strings_match_fancy_regex() {
        for pair in both() {
            for text in TRICKY {
                pair.check(text);
            }
            // Each string also after and before a letter, a space, a newline.
            for text in TRICKY {
                for (pre, post) in [("x", "y"), (" ", " "), ("\n", "\n"), ("", "'s")] {
                    pair.check(&format!("{pre}{text}{post}"));
                }
            }
        }
    }

    #[test]
    fn known_pieces() {
        let gpt4 = PreTokenizer::new(GPT4_PATTERN).unwrap();
        let gpt2 = PreTokenizer::new(GPT2_PATTERN).unwrap();
        let text = "I'LL pay $12345 'ſ\n\n  hi";
        assert_eq!(
            ours(&gpt4, text),
            ["I", "'LL", " pay", " $", "123", "45", " '", "ſ", "\n\n", " ", " hi"]
        );
        assert_eq!(
            ours(&gpt2, text),
            ["I", "'", "LL", " pay", " $", "12345", " '", "ſ", "\n\n ", " hi"]
        );
        // The case-insensitive contraction accepts U+017F for 's'.
        assert_eq!(ours(&gpt4, "x'ſ"), ["x", "'ſ"]);
    }

    #[test]
    fn contraction_case_variants_come_from_regex_syntax() {
        let t = tables();
        let mut sdmt = t.fold_sdmt.clone();
        sdmt.sort_unstable();
        let expected: Vec<u32> = "DMSTdmstſ".chars().map(|c| c as u32).collect();
        assert_eq!(sdmt, expected);
        for (set, chars) in [
            (&t.fold_l, "Ll"),
            (&t.fold_v, "Vv"),
            (&t.fold_r, "Rr"),
            (&t.fold_e, "Ee"),
        ] {
            let mut set = set.clone();
            set.sort_unstable();
            assert_eq!(set, chars.chars().map(|c| c as u32).collect::<Vec<_>>());
        }
    }

    /// The chars `cps` each in a few contexts (after an apostrophe, as the second letter of a
    /// contraction, between letters, numbers, spaces and CR), in one text.
    fn chars_in_context(cps: impl Iterator<Item = u32>) -> String {
        let mut text = String::new();
        for c in cps.filter_map(char::from_u32) {
            text.push_str(&format!("'{c}e {c}a1{c}\r{c}'l{c}'V{c}\n"));
        }
        text
    }

    /// Checks the class tables and contraction sets against fancy-regex on every BMP char and
    /// on both sides of every boundary of the classes above it (the full sweep over all of
    /// Unicode is `every_char_matches_fancy_regex`, too slow for a debug build).
    #[test]
    fn bmp_chars_and_class_boundaries_match_fancy_regex() {
        let mut astral: Vec<u32> = [r"\p{L}", r"\p{N}", r"\s"]
            .iter()
            .flat_map(|p| class_ranges(p))
            .flat_map(|(lo, hi)| [lo - 1, lo, hi, hi + 1])
            .filter(|&cp| cp >= 0x10000)
            .collect();
        astral.extend([0x10000, 0x10FFFF]);
        astral.sort_unstable();
        astral.dedup();
        let text = chars_in_context((0..0x10000).chain(astral));
        for pair in both() {
            pair.check(&text);
        }
    }

    #[test]
    #[ignore = "slow in a debug build; run with --release --ignored"]
    fn every_char_matches_fancy_regex() {
        let text = chars_in_context(0..=0x10FFFF);
        for pair in both() {
            pair.check(&text);
        }
    }

    /// xorshift64*: a tiny deterministic generator, so that failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const ALPHABET: &[&str] = &[
        "a",
        "b",
        "Z",
        "s",
        "S",
        "d",
        "D",
        "m",
        "M",
        "t",
        "T",
        "l",
        "L",
        "v",
        "V",
        "e",
        "E",
        "r",
        "R",
        "x",
        "ſ",
        "\u{212A}",
        "é",
        "ß",
        "Ж",
        "ω",
        "ا",
        "中",
        "한",
        "국",
        "ᄀ",
        "ᅡ",
        "ᆨ",
        "ㄱ",
        "𝐀",
        "'",
        "'",
        "'",
        "’",
        "\"",
        ".",
        ",",
        "!",
        "?",
        "-",
        "(",
        "$",
        "_",
        "0",
        "1",
        "9",
        "²",
        "٣",
        "Ⅻ",
        "𝟙",
        " ",
        " ",
        " ",
        " ",
        "  ",
        "\t",
        "\n",
        "\n",
        "\r",
        "\r\n",
        "\u{A0}",
        "\u{3000}",
        "\u{2028}",
        "\u{85}",
        "\u{B}",
        "\u{1F}",
        "\u{0}",
        "\u{301}",
        "\u{200D}",
        "\u{FE0F}",
        "😀",
        "👍",
        "🏽",
        "\u{E0001}",
    ];

    fn random_text(rng: &mut Rng, max_len: usize) -> String {
        let n = rng.below(max_len + 1);
        (0..n)
            .map(|_| ALPHABET[rng.below(ALPHABET.len())])
            .collect()
    }

    #[test]
    fn fuzz_matches_fancy_regex() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for pair in both() {
            for _ in 0..20_000 {
                let text = random_text(&mut rng, 24);
                pair.check(&text);
            }
        }
    }

    fn check_chunks(pt: &PreTokenizer, text: &str, target: usize) -> usize {
        let chunks = pt.chunks(text, target);
        assert!(!chunks.is_empty());
        assert_eq!(chunks.concat(), text);
        for c in &chunks[..chunks.len() - 1] {
            assert!(
                c.len() >= target.max(1),
                "chunk {c:?} shorter than {target}"
            );
        }
        let whole = ours(pt, text);
        let pieces: Vec<String> = chunks.iter().flat_map(|c| ours(pt, c)).collect();
        assert_eq!(
            pieces, whole,
            "chunks {chunks:?} of {text:?} split differently"
        );
        chunks.len() - 1
    }

    #[test]
    fn chunks_split_like_the_whole() {
        // Extra newlines and letters, so that cuts are frequent, and whitespace and CR/LF right
        // around them, so that unsafe cuts would show.
        let alphabet: Vec<&str> = ALPHABET
            .iter()
            .copied()
            .chain(["\n", "\na", "a\n", " \n", "\n\n", "x\r\n"])
            .collect();
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        for pt in [
            PreTokenizer::new(GPT4_PATTERN).unwrap(),
            PreTokenizer::new(GPT2_PATTERN).unwrap(),
        ] {
            let mut cuts = 0;
            for _ in 0..3_000 {
                let n = rng.below(80);
                let text: String = (0..n)
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect();
                let target = rng.below(64);
                cuts += check_chunks(&pt, &text, target);
            }
            assert!(cuts > 1_000, "only {cuts} cuts: the test is too weak");
            for text in TRICKY {
                check_chunks(&pt, text, 0);
            }
            assert_eq!(pt.chunks("", 8), [""]);
            assert_eq!(pt.chunks("ab.\nCd\ne", 0), ["ab.\n", "Cd\n", "e"]);
            assert_eq!(pt.chunks("ab \nCd\n1", 0), ["ab \nCd\n1"]);
        }
    }

    #[test]
    fn custom_pattern_passes_gaps_and_reports_errors() {
        let pt = PreTokenizer::new(r"\d+").unwrap();
        assert!(!pt.is_builtin());
        assert_eq!(pt.pattern(), r"\d+");
        assert_eq!(ours(&pt, "ab12cd3"), ["ab", "12", "cd", "3"]);
        assert_eq!(ours(&pt, ""), Vec::<String>::new());
        assert_eq!(pt.chunks("a\nb", 1), ["a\nb"]);
        // Empty matches are dropped, the gaps between them kept.
        let pt = PreTokenizer::new(r"x*").unwrap();
        assert_eq!(ours(&pt, "abxxc"), ["ab", "xx", "c"]);

        assert!(matches!(
            PreTokenizer::new(r"(unclosed"),
            Err(Error::Pattern(_))
        ));
        // Catastrophic backtracking (the backreference keeps it in fancy-regex's own VM) hits
        // the backtrack limit, which must come back as an error rather than a panic.
        let pt = PreTokenizer::new(r"(a*)*\1b").unwrap();
        let text = "a".repeat(64);
        let err = pt.split(&text, |_| {}).unwrap_err();
        assert!(
            matches!(err, Error::Pattern(ref m) if m.contains("acktrack")),
            "{err}"
        );
    }

    /// The folder of the shared corpora (tinyshakespeare.txt, nsmc_reviews_ko.txt):
    /// `SMALLM_SHARED_DATA`, else `../shared/data` beside the crate.
    fn shared_data() -> PathBuf {
        std::env::var_os("SMALLM_SHARED_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
    }

    /// What to tell the user when `missing` (a folder or file of the shared corpora) is absent.
    fn no_shared_data(missing: &Path) -> String {
        format!(
            "{} not found: set SMALLM_SHARED_DATA to the folder holding tinyshakespeare.txt and \
             nsmc_reviews_ko.txt (default: ../shared/data beside the crate)",
            missing.display()
        )
    }

    /// Pieces of the `.txt` files of [`shared_data`] and of the Python standard library.
    fn real_files() -> Vec<(String, String)> {
        let mut files = Vec::new();
        let shared = shared_data();
        if let Ok(dir) = std::fs::read_dir(&shared) {
            for entry in dir.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "txt") {
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        files.push((path.display().to_string(), text));
                    }
                }
            }
        } else {
            let why = no_shared_data(&shared);
            eprintln!("{why}; reading the standard library only");
        }
        let stdlib = std::process::Command::new("python3")
            .args([
                "-c",
                "import sysconfig;print(sysconfig.get_paths()['stdlib'])",
            ])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok());
        if let Some(stdlib) = stdlib {
            let mut stack = vec![PathBuf::from(stdlib.trim())];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.is_dir() && !path.ends_with("site-packages") {
                        stack.push(path);
                    } else if path.extension().is_some_and(|e| e == "py") {
                        if let Ok(text) = std::fs::read_to_string(&path) {
                            files.push((path.display().to_string(), text));
                        }
                    }
                }
            }
        }
        files.sort();
        files
    }

    #[test]
    #[ignore = "reads corpora from outside the repository; run with --release --ignored"]
    fn real_files_match_fancy_regex() {
        let files = real_files();
        if files.is_empty() {
            eprintln!("no real files found; skipping");
            return;
        }
        let total: usize = files.iter().map(|(_, t)| t.len()).sum();
        eprintln!("{} files, {} bytes", files.len(), total);
        for pair in both() {
            for (path, text) in &files {
                let got = ours(&pair.pt, text);
                let want = reference(&pair.re, text);
                if got != want {
                    let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                    panic!(
                        "{path}: piece {i} differs: {:?} vs fancy-regex {:?}",
                        got.get(i..i + 3),
                        want.get(i..i + 3)
                    );
                }
                for target in [1 << 12, 1 << 16] {
                    check_chunks(&pair.pt, text, target);
                }
            }
        }
    }

    #[test]
    #[ignore = "timing; run with --release --ignored --nocapture"]
    fn throughput() {
        let shared = shared_data();
        for file in ["tinyshakespeare.txt", "nsmc_reviews_ko.txt"] {
            let path = shared.join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|_| panic!("{}", no_shared_data(&path)));
            let path = path.display();
            for (name, pattern) in [("gpt4", GPT4_PATTERN), ("gpt2", GPT2_PATTERN)] {
                let pt = PreTokenizer::new(pattern).unwrap();
                let re = fancy_regex::Regex::new(pattern).unwrap();
                let mb = text.len() as f64 / 1e6;
                let mut best = f64::INFINITY;
                let mut pieces = 0usize;
                for _ in 0..5 {
                    let t0 = std::time::Instant::now();
                    let mut n = 0usize;
                    pt.split(&text, |s| n += s.len() & 1).unwrap();
                    best = best.min(t0.elapsed().as_secs_f64());
                    pieces = std::hint::black_box(n);
                }
                let t0 = std::time::Instant::now();
                let mut n = 0usize;
                for m in re.find_iter(&text) {
                    n += m.unwrap().as_str().len() & 1;
                }
                let slow = t0.elapsed().as_secs_f64();
                assert_eq!(std::hint::black_box(n), pieces);
                eprintln!(
                    "{path} {name}: built-in {:.0} MB/s, fancy-regex {:.1} MB/s ({:.0}x)",
                    mb / best,
                    mb / slow,
                    slow / best
                );
            }
        }
    }
}
