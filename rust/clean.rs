//! Cleaning while packing: quality filters, exact and near-duplicate removal.
//!
//! Every document the packer reads gets a [`Verdict`] before it is encoded:
//!
//! 1. **Filters** ([`crate::filters`]; each off unless its threshold is set), the heuristics of Gopher (Rae et al. 2021)
//!    and the pipelines that followed it: word count bounds, mean word length bounds, the ratio of
//!    `#` and ellipses to words, the share of lines that start with a bullet or end with an ellipsis,
//!    the share of words holding a letter, the share of digits, the share of letters in one script
//!    (Hangul for Korean text), and repetition: the share of duplicated lines (and of their
//!    characters), the share of characters in the most frequent n-gram (n = 2, 3, 4) and in
//!    duplicated n-grams (n = 5 to 10).
//! 2. **Exact duplicates**: a document whose text, trimmed and with every run of white space made one
//!    space, hashes (64 bits) as an earlier document's did.
//! 3. **Near duplicates**: MinHash over shingles (word or character n-grams of the text lowercased
//!    with punctuation removed) with `bands x rows` hash functions; a document that shares a band
//!    with an earlier document is a near duplicate of it (locality-sensitive hashing: two texts of
//!    Jaccard similarity s share a band with probability 1 - (1 - s^rows)^bands, 0.5 at about
//!    (1/bands)^(1/rows)). Every document's bands are remembered, removed ones too, so a chain of
//!    near copies goes with its first.
//!
//! Verdicts are computed in parallel and decided in document order, so the result is the same for
//! any thread count. Memory: 8 bytes per document for exact keys and 8 per band for near keys, in
//! hash sets (about 16 and 16 x bands bytes per document with their overhead).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

use rayon::prelude::*;
use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic_with;
pub use crate::filters::{Filters, Script};
use crate::{Error, Result};

/// Name of the file of dedup keys a packed directory keeps for `--dedup-against`.
pub const KEYS_FILE: &str = "dedup-keys.bin";
const KEYS_MAGIC: &[u8; 8] = b"SMLMDDUP";

/// Which duplicates to remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dedup {
    Off,
    Exact,
    /// Exact, then near.
    Near,
}

/// What near-duplicate shingles are made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Words,
    Chars,
}

/// MinHash and LSH settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NearOptions {
    pub unit: Unit,
    /// Shingle length in units.
    pub shingle: usize,
    pub bands: usize,
    pub rows: usize,
    pub seed: u64,
}

impl Default for NearOptions {
    fn default() -> Self {
        // datatrove's defaults: 14 bands of 8 rows over word 5-grams.
        NearOptions {
            unit: Unit::Words,
            shingle: 5,
            bands: 14,
            rows: 8,
            seed: 1,
        }
    }
}

/// Cleaning options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CleanOptions {
    pub dedup: Dedup,
    pub near: NearOptions,
    pub filters: Filters,
}

impl Default for CleanOptions {
    fn default() -> Self {
        CleanOptions {
            dedup: Dedup::Off,
            near: NearOptions::default(),
            filters: Filters::default(),
        }
    }
}

impl CleanOptions {
    /// Whether anything is checked at all.
    pub fn active(&self) -> bool {
        self.dedup != Dedup::Off || !self.filters.names().is_empty()
    }

    fn check(&self) -> Result<()> {
        let n = &self.near;
        if n.shingle == 0 || n.bands == 0 || n.rows == 0 {
            return Err(Error::Config(format!(
                "near-duplicate settings out of range: shingle {}, bands {}, rows {} must be positive",
                n.shingle, n.bands, n.rows
            )));
        }
        Ok(())
    }
}

/// What becomes of a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Removed by the named rule: `exact`, `near`, or a filter's name.
    Remove(String),
}

/// Per-rule counts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Tally {
    pub documents: u64,
    pub bytes: u64,
}

/// What cleaning did to one source.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceReport {
    pub read: Tally,
    pub kept: Tally,
    /// Removed, by rule.
    pub removed: std::collections::BTreeMap<String, Tally>,
}

/// A removed document, as a sample for `--dry-run-filters`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    pub rule: String,
    pub source: u32,
    pub document: u64,
    pub text: String,
}

/// The state of cleaning over one packing run.
pub struct Cleaner {
    options: CleanOptions,
    permutations: Vec<(u64, u64)>,
    exact: FxHashSet<u64>,
    near: FxHashSet<u64>,
    /// Keys of an earlier corpus (`--dedup-against`): a hit is a duplicate, nothing is added to them.
    against_exact: FxHashSet<u64>,
    against_near: FxHashSet<u64>,
    reports: std::collections::BTreeMap<u32, SourceReport>,
    samples: Vec<Sample>,
    samples_per_rule: usize,
    sampled: HashMap<String, usize>,
}

/// The keys a document adds: its exact hash and its bands.
struct Keys {
    exact: u64,
    bands: Vec<u64>,
}

impl Cleaner {
    pub fn new(options: CleanOptions, samples_per_rule: usize) -> Result<Self> {
        options.check()?;
        let mut state = options.near.seed ^ 0x005e_ed0f_c1ea_11e5;
        let permutations = (0..options.near.bands * options.near.rows)
            .map(|_| {
                let a = splitmix(&mut state) | 1; // odd: a bijection of the 64-bit values
                let b = splitmix(&mut state);
                (a, b)
            })
            .collect();
        Ok(Cleaner {
            options,
            permutations,
            exact: FxHashSet::default(),
            near: FxHashSet::default(),
            against_exact: FxHashSet::default(),
            against_near: FxHashSet::default(),
            reports: Default::default(),
            samples: Vec::new(),
            samples_per_rule,
            sampled: HashMap::new(),
        })
    }

    pub fn options(&self) -> &CleanOptions {
        &self.options
    }

    /// Decides every document of a batch, in order, and counts it in the report. `external`: the verdict of
    /// a filter of the caller's (a Python function), applied after the built-in filters.
    pub fn judge(
        &mut self,
        docs: &[&str],
        sources: &[u32],
        documents: &[u64],
        external: Option<(&str, &[bool])>,
    ) -> Vec<Verdict> {
        let options = &self.options;
        let permutations = &self.permutations;
        let prepared: Vec<(Option<String>, Option<Keys>)> = docs
            .par_iter()
            .enumerate()
            .map(|(i, text)| {
                let failed = options.filters.failed(text).or_else(|| match external {
                    Some((name, keep)) if !keep[i] => Some(name.to_string()),
                    _ => None,
                });
                let keys = (failed.is_none() && options.dedup != Dedup::Off).then(|| Keys {
                    exact: exact_key(text),
                    bands: if options.dedup == Dedup::Near {
                        band_keys(text, &options.near, permutations)
                    } else {
                        Vec::new()
                    },
                });
                (failed, keys)
            })
            .collect();
        let mut verdicts = Vec::with_capacity(docs.len());
        for (i, (failed, keys)) in prepared.into_iter().enumerate() {
            let verdict = match (failed, keys) {
                (Some(rule), _) => Verdict::Remove(rule),
                (None, None) => Verdict::Keep,
                (None, Some(keys)) => {
                    let repeat =
                        self.against_exact.contains(&keys.exact) || !self.exact.insert(keys.exact);
                    let mut near = false;
                    for band in &keys.bands {
                        near |= self.against_near.contains(band);
                        near |= !self.near.insert(*band);
                    }
                    if repeat {
                        Verdict::Remove("exact".into())
                    } else if near {
                        Verdict::Remove("near".into())
                    } else {
                        Verdict::Keep
                    }
                }
            };
            self.record(docs[i], sources[i], documents[i], &verdict);
            verdicts.push(verdict);
        }
        verdicts
    }

    fn record(&mut self, text: &str, source: u32, document: u64, verdict: &Verdict) {
        let report = self.reports.entry(source).or_default();
        let bytes = text.len() as u64;
        report.read.documents += 1;
        report.read.bytes += bytes;
        let tally = match verdict {
            Verdict::Keep => &mut report.kept,
            Verdict::Remove(rule) => report.removed.entry(rule.clone()).or_default(),
        };
        tally.documents += 1;
        tally.bytes += bytes;
        if let Verdict::Remove(rule) = verdict {
            let taken = self.sampled.entry(rule.clone()).or_default();
            if *taken < self.samples_per_rule {
                *taken += 1;
                let text: String = text.chars().take(400).collect();
                self.samples.push(Sample {
                    rule: rule.clone(),
                    source,
                    document,
                    text,
                });
            }
        }
    }

    /// What cleaning did, per source.
    pub fn reports(&self) -> &std::collections::BTreeMap<u32, SourceReport> {
        &self.reports
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Loads the keys another packed directory kept (`--dedup-against`): its documents count as earlier.
    pub fn load_against(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(KEYS_FILE);
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::Config(format!(
                    "{}: no {KEYS_FILE}: that directory was not packed with --dedup (pack it again with --dedup exact or near)",
                    dir.display()
                )),
                _ => Error::io(&path, e),
            })?;
        let bad = |reason: &str| Error::Format {
            path: path.clone(),
            reason: reason.to_string(),
        };
        if bytes.len() < 24 || &bytes[..8] != KEYS_MAGIC {
            return Err(bad("not a smallm dedup keys file"));
        }
        let header_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
        let header_end = 16 + header_len;
        if bytes.len() < header_end + 16 {
            return Err(bad("truncated"));
        }
        let header: KeysHeader =
            serde_json::from_slice(&bytes[16..header_end]).map_err(|e| bad(&e.to_string()))?;
        if self.options.dedup == Dedup::Near
            && (header.dedup != Dedup::Near || header.near != self.options.near)
        {
            return Err(Error::Config(format!(
                "{}: its near-duplicate keys were made with other settings ({:?}, {:?}) than this run's ({:?}); \
                 use the same --near-* settings, or --dedup exact",
                path.display(),
                header.dedup,
                header.near,
                self.options.near
            )));
        }
        let read_u64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let exact_count = read_u64(header_end) as usize;
        let near_count = read_u64(header_end + 8) as usize;
        let start = header_end + 16;
        if bytes.len() != start + 8 * (exact_count + near_count) {
            return Err(bad("truncated"));
        }
        self.against_exact
            .extend((0..exact_count).map(|i| read_u64(start + 8 * i)));
        if self.options.dedup == Dedup::Near {
            let base = start + 8 * exact_count;
            self.against_near
                .extend((0..near_count).map(|i| read_u64(base + 8 * i)));
        }
        Ok(())
    }

    /// Writes this run's keys (sorted, so the file is the same for any thread count) for a later
    /// `--dedup-against`.
    pub fn write_keys(&self, dir: &Path) -> Result<()> {
        let header = serde_json::to_vec(&KeysHeader {
            dedup: self.options.dedup,
            near: self.options.near,
        })
        .expect("the header always serializes");
        let mut exact: Vec<u64> = self.exact.iter().copied().collect();
        let mut near: Vec<u64> = self.near.iter().copied().collect();
        exact.sort_unstable();
        near.sort_unstable();
        write_atomic_with(&dir.join(KEYS_FILE), |out| {
            out.write_all(KEYS_MAGIC)?;
            out.write_all(&(header.len() as u64).to_le_bytes())?;
            out.write_all(&header)?;
            out.write_all(&(exact.len() as u64).to_le_bytes())?;
            out.write_all(&(near.len() as u64).to_le_bytes())?;
            for key in exact.iter().chain(&near) {
                out.write_all(&key.to_le_bytes())?;
            }
            Ok(())
        })
    }
}

#[derive(Serialize, Deserialize)]
struct KeysHeader {
    dedup: Dedup,
    near: NearOptions,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    mix(*state)
}

fn mix(mut h: u64) -> u64 {
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A stable 64-bit hash of bytes: FNV-1a, then splitmix64's finaliser to spread the bits. The packer's
/// validation split and every key of this module use it.
pub fn stable_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The hash of a document's text trimmed, with every run of white space one space.
pub fn exact_key(text: &str) -> u64 {
    let mut words = text.split_whitespace();
    let first = words.next().into_iter().flat_map(str::bytes);
    stable_hash(first.chain(words.flat_map(|word| std::iter::once(b' ').chain(word.bytes()))))
}

/// The text MinHash reads: lowercased, every run of characters that are neither letters nor digits one space.
pub fn simplified(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = true;
    for c in text.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
            space = false;
        } else if !space {
            out.push(' ');
            space = true;
        }
    }
    if out.ends_with(' ') {
        out.pop();
    }
    out
}

/// The shingles' hashes of a document (a text shorter than one shingle is one shingle).
fn shingles(text: &str, near: &NearOptions) -> Vec<u64> {
    let text = simplified(text);
    // The simplified text has one space between words, so a shingle is a slice of it: from the start of
    // its first unit to the end of its last.
    let (starts, ends): (Vec<usize>, Vec<usize>) = match near.unit {
        Unit::Words => {
            let mut spans = Vec::new();
            let mut at = 0;
            for word in text.split(' ') {
                spans.push((at, at + word.len()));
                at += word.len() + 1;
            }
            spans.into_iter().unzip()
        }
        Unit::Chars => text
            .char_indices()
            .map(|(i, c)| (i, i + c.len_utf8()))
            .unzip(),
    };
    let mut out: Vec<u64> = if starts.len() <= near.shingle {
        vec![stable_hash(text.bytes())]
    } else {
        (0..=starts.len() - near.shingle)
            .map(|i| stable_hash(text[starts[i]..ends[i + near.shingle - 1]].bytes()))
            .collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// The MinHash signature: for each permutation of the 64-bit values (`a x + b` modulo 2^64 with `a` odd,
/// over shingle hashes that are already mixed), the least value over the shingles. The permutations run
/// in the inner loop, over a block of shingles at a time, which the compiler vectorises.
pub fn signature(text: &str, near: &NearOptions, permutations: &[(u64, u64)]) -> Vec<u64> {
    let shingles = shingles(text, near);
    let mut minimum = vec![u64::MAX; permutations.len()];
    for &h in &shingles {
        for (m, &(a, b)) in minimum.iter_mut().zip(permutations) {
            *m = (*m).min(a.wrapping_mul(h).wrapping_add(b));
        }
    }
    minimum
}

/// The band keys: a hash of each band's rows and its index.
fn band_keys(text: &str, near: &NearOptions, permutations: &[(u64, u64)]) -> Vec<u64> {
    let signature = signature(text, near, permutations);
    signature
        .chunks(near.rows)
        .enumerate()
        .map(|(band, rows)| {
            stable_hash(
                (band as u64)
                    .to_le_bytes()
                    .into_iter()
                    .chain(rows.iter().flat_map(|r| r.to_le_bytes())),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dedup: Dedup) -> CleanOptions {
        CleanOptions {
            dedup,
            ..Default::default()
        }
    }

    fn judge(cleaner: &mut Cleaner, docs: &[&str]) -> Vec<Verdict> {
        let sources = vec![0; docs.len()];
        let documents: Vec<u64> = (0..docs.len() as u64).collect();
        cleaner.judge(docs, &sources, &documents, None)
    }

    const TEXT: &str = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat \
                        and the bird sings a song about the morning sun rising over green hills far away";

    #[test]
    fn exact_duplicates_go_whatever_their_spacing() {
        let mut cleaner = Cleaner::new(options(Dedup::Exact), 2).unwrap();
        let spaced = TEXT.replace(' ', "  ");
        let verdicts = judge(&mut cleaner, &[TEXT, &spaced, "another text", TEXT]);
        let exact = Verdict::Remove("exact".into());
        assert_eq!(
            verdicts,
            vec![Verdict::Keep, exact.clone(), Verdict::Keep, exact]
        );
        let report = &cleaner.reports()[&0];
        assert_eq!(report.read.documents, 4);
        assert_eq!(report.removed["exact"].documents, 2);
        assert_eq!(cleaner.samples().len(), 2);
    }

    #[test]
    fn near_duplicates_go_and_different_texts_stay() {
        let mut cleaner = Cleaner::new(options(Dedup::Near), 0).unwrap();
        let edited = TEXT.replace("lazy", "sleepy").replace("sun", "Sun!");
        let other = "a completely different sentence about tokenizers, shards and the training of small models \
                     on one graphics card with a memory plan for every kind of run that a user may start";
        let verdicts = judge(&mut cleaner, &[TEXT, &edited, other]);
        assert_eq!(
            verdicts,
            vec![Verdict::Keep, Verdict::Remove("near".into()), Verdict::Keep]
        );
    }

    #[test]
    fn the_signature_estimates_jaccard_similarity() {
        let near = NearOptions {
            bands: 32,
            rows: 8,
            ..Default::default()
        };
        let cleaner = Cleaner::new(
            CleanOptions {
                dedup: Dedup::Near,
                near,
                filters: Filters::default(),
            },
            0,
        )
        .unwrap();
        let words: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
        let a = words[..300].join(" ");
        let b = words[100..].join(" ");
        // Shingles of 5 words: 296 each, 196 shared: Jaccard 196 / 396.
        let (sa, sb) = (
            signature(&a, &near, &cleaner.permutations),
            signature(&b, &near, &cleaner.permutations),
        );
        let agree = sa.iter().zip(&sb).filter(|(x, y)| x == y).count() as f64 / sa.len() as f64;
        assert!((agree - 196.0 / 396.0).abs() < 0.1, "{agree}");
    }

    #[test]
    fn keys_round_trip_through_the_file() {
        let dir = std::env::temp_dir().join(format!("smallm-clean-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut first = Cleaner::new(options(Dedup::Near), 0).unwrap();
        judge(&mut first, &[TEXT]);
        first.write_keys(&dir).unwrap();
        let mut second = Cleaner::new(options(Dedup::Near), 0).unwrap();
        second.load_against(&dir).unwrap();
        let edited = TEXT.replace("lazy", "sleepy");
        assert_eq!(
            judge(&mut second, &[TEXT, &edited, "new"]),
            vec![
                Verdict::Remove("exact".into()),
                Verdict::Remove("near".into()),
                Verdict::Keep
            ]
        );
        let other = NearOptions {
            rows: 4,
            ..Default::default()
        };
        let mut third = Cleaner::new(
            CleanOptions {
                dedup: Dedup::Near,
                near: other,
                filters: Filters::default(),
            },
            0,
        )
        .unwrap();
        assert!(third
            .load_against(&dir)
            .unwrap_err()
            .to_string()
            .contains("other settings"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
