//! Tokenizers in the formats the ecosystem reads: the text of each file, and loading one back.
//! Writing them to disk is left to the caller (the Python package writes every file it saves).
//!
//! `tokenizer.json` follows the Hugging Face `tokenizers` layout: a BPE model whose vocabulary
//! keys are the GPT-2 byte-to-unicode mapping of each token's bytes, the exact merge list, a
//! `Sequence[Split(Regex), ByteLevel(use_regex=false)]` pre-tokenizer, a ByteLevel decoder, and
//! the special tokens as added tokens. `tokenizer.tiktoken` is tiktoken's rank file: one line per
//! non-special token, the base64 of its bytes, a space, and its id.

use std::path::Path;

use base64::Engine;
use serde_json::{json, Value};

use crate::bpe::Tokenizer;
use crate::{Error, Result};

/// The GPT-2 byte-to-unicode table: printable bytes map to themselves, the others to code
/// points from U+0100 on, so every byte has a visible, non-space character.
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are valid chars");
            next += 1;
            c
        };
    }
    table
}

fn bytes_to_key(bytes: &[u8], table: &[char; 256]) -> String {
    bytes.iter().map(|&b| table[b as usize]).collect()
}

/// The `tokenizer.json` text for `tok`.
pub fn to_hf_json(tok: &Tokenizer) -> String {
    let table = byte_to_char();
    let mut vocab = serde_json::Map::with_capacity(tok.n_ordinary());
    for id in 0..tok.n_ordinary() as u32 {
        let bytes = tok.token_bytes(id).expect("ordinary ids exist");
        vocab.insert(bytes_to_key(bytes, &table), json!(id));
    }
    let merges: Vec<Value> = tok
        .merges()
        .iter()
        .map(|&(l, r)| {
            let l = bytes_to_key(tok.token_bytes(l).expect("merge ids exist"), &table);
            let r = bytes_to_key(tok.token_bytes(r).expect("merge ids exist"), &table);
            json!([l, r])
        })
        .collect();
    let added: Vec<Value> = tok
        .specials()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "id": tok.n_ordinary() + i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            })
        })
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern()}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
            ],
        },
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    serde_json::to_string_pretty(&doc).expect("a JSON value always serializes")
}

/// The `tokenizer.tiktoken` rank file for `tok` (special tokens are not in it).
pub fn to_tiktoken(tok: &Tokenizer) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = String::with_capacity(tok.n_ordinary() * 16);
    for id in 0..tok.n_ordinary() as u32 {
        out.push_str(&b64.encode(tok.token_bytes(id).expect("ordinary ids exist")));
        out.push(' ');
        out.push_str(&id.to_string());
        out.push('\n');
    }
    out
}

/// Reads a `tokenizer.json` written by smallm. A file from another tokenizer (or a corrupt one)
/// is an error saying which field is wrong.
pub fn from_hf_json(text: &str, path: &Path) -> Result<Tokenizer> {
    let bad = |reason: String| Error::Format {
        path: path.to_path_buf(),
        reason,
    };
    let doc: Value = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "not valid JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        ))
    })?;
    let model = doc
        .get("model")
        .ok_or_else(|| bad("no \"model\" field".into()))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(bad(
            "model.type is not \"BPE\": only byte-level BPE tokenizers can be loaded".into(),
        ));
    }
    if model.get("ignore_merges").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "model.ignore_merges is true, which smallm does not support".into(),
        ));
    }
    let pattern = split_pattern(&doc).map_err(bad)?;

    let table = byte_to_char();
    let mut char_to_byte = std::collections::HashMap::new();
    for (b, &c) in table.iter().enumerate() {
        char_to_byte.insert(c, b as u8);
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("model.vocab is missing or not an object".into()))?;
    let mut by_id: Vec<Option<Vec<u8>>> = vec![None; vocab.len()];
    let mut id_of = std::collections::HashMap::with_capacity(vocab.len());
    for (key, id) in vocab {
        let id = id
            .as_u64()
            .filter(|&i| (i as usize) < vocab.len())
            .ok_or_else(|| {
                bad(format!(
                    "model.vocab[{key:?}] = {id} is not an id in 0..{}",
                    vocab.len()
                ))
            })?;
        let bytes: Vec<u8> = key
            .chars()
            .map(|c| char_to_byte.get(&c).copied())
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("model.vocab key {key:?} is not byte-level encoded")))?;
        if by_id[id as usize].replace(bytes).is_some() {
            return Err(bad(format!("model.vocab: id {id} is given twice")));
        }
        id_of.insert(key.as_str(), id as u32);
    }
    for (b, entry) in by_id.iter().take(256).enumerate() {
        if entry.as_deref() != Some(&[b as u8][..]) {
            return Err(bad(format!(
                "model.vocab: id {b} is not the single byte {b}; smallm tokenizers keep ids 0..256 for the raw bytes (this file comes from another tokenizer)"
            )));
        }
    }
    let merges_json = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("model.merges is missing or not a list".into()))?;
    let mut merges = Vec::with_capacity(merges_json.len());
    for (i, m) in merges_json.iter().enumerate() {
        let (l, r) = match m {
            Value::String(s) => s
                .split_once(' ')
                .ok_or_else(|| bad(format!("model.merges[{i}] = {s:?} is not two tokens")))?,
            Value::Array(a) if a.len() == 2 && a.iter().all(Value::is_string) => (
                a[0].as_str().unwrap_or_default(),
                a[1].as_str().unwrap_or_default(),
            ),
            other => {
                return Err(bad(format!(
                    "model.merges[{i}] = {other} is not a pair of tokens"
                )))
            }
        };
        let id = |t: &str| {
            id_of
                .get(t)
                .copied()
                .ok_or_else(|| bad(format!("model.merges[{i}]: {t:?} is not in the vocab")))
        };
        let (left, right) = (id(l)?, id(r)?);
        let merged = format!("{l}{r}");
        if id_of.get(merged.as_str()) != Some(&(256 + i as u32)) {
            return Err(bad(format!(
                "model.merges[{i}] ({l:?}, {r:?}) does not create id {}; smallm tokenizers give merge i the id 256 + i",
                256 + i
            )));
        }
        merges.push((left, right));
    }
    if vocab.len() != 256 + merges.len() {
        return Err(bad(format!(
            "model.vocab has {} entries but 256 bytes + {} merges make {}",
            vocab.len(),
            merges.len(),
            256 + merges.len()
        )));
    }
    let mut specials = Vec::new();
    let mut added: Vec<(u64, String)> = Vec::new();
    for (i, t) in doc
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let id = t
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("added_tokens[{i}].id is missing")))?;
        let content = t
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("added_tokens[{i}].content is missing")))?;
        added.push((id, content.to_owned()));
    }
    added.sort();
    for (i, (id, content)) in added.into_iter().enumerate() {
        let expected = (256 + merges.len() + i) as u64;
        if id != expected {
            return Err(bad(format!(
                "added token {content:?} has id {id}, expected {expected}: special tokens take the ids right after the merges"
            )));
        }
        specials.push(content);
    }
    Tokenizer::new(&pattern, merges, specials).map_err(|e| bad(e.to_string()))
}

/// The regex of the `Split` step of the pre-tokenizer, checking a `ByteLevel` step follows it.
fn split_pattern(doc: &Value) -> std::result::Result<String, String> {
    let pre = doc
        .get("pre_tokenizer")
        .ok_or("no \"pre_tokenizer\" field")?;
    let steps: Vec<&Value> = match pre.get("type").and_then(Value::as_str) {
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Value::as_array)
            .ok_or("pre_tokenizer.pretokenizers is missing")?
            .iter()
            .collect(),
        _ => vec![pre],
    };
    let kinds: Vec<&str> = steps
        .iter()
        .map(|s| s.get("type").and_then(Value::as_str).unwrap_or("?"))
        .collect();
    if kinds != ["Split", "ByteLevel"] {
        return Err(format!(
            "pre_tokenizer is {kinds:?}; smallm tokenizers use [\"Split\", \"ByteLevel\"] (a regex split, then byte-level mapping)"
        ));
    }
    if steps[1].get("use_regex").and_then(Value::as_bool) != Some(false) {
        return Err("pre_tokenizer ByteLevel step must have use_regex = false".into());
    }
    steps[0]
        .get("pattern")
        .and_then(|p| p.get("Regex"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "pre_tokenizer Split step has no pattern.Regex".into())
}

/// Loads `path/tokenizer.json`, or `path` itself when it is a file.
pub fn load(path: &Path) -> Result<Tokenizer> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    from_hf_json(&text, &file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::GPT4_PATTERN;
    use crate::train::{TrainOptions, WordCounts};

    fn trained() -> Tokenizer {
        let mut c = WordCounts::new(GPT4_PATTERN).unwrap();
        c.add_documents(&["hello hello world, 안녕하세요 안녕 🙂🙂 \n\n  x = [1, 2, 3]"])
            .unwrap();
        let options = TrainOptions {
            vocab_size: 300,
            special_tokens: vec!["<|endoftext|>".into(), "<|im_start|>".into()],
            min_frequency: 1,
        };
        c.train(&options, &mut |_| true).unwrap().0
    }

    #[test]
    fn byte_table_is_a_bijection_onto_visible_chars() {
        let t = byte_to_char();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert!(t.iter().all(|c| !c.is_whitespace() && !c.is_control()));
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn json_round_trips() {
        let tok = trained();
        let back = from_hf_json(&to_hf_json(&tok), Path::new("t.json")).unwrap();
        assert_eq!(back.merges(), tok.merges());
        assert_eq!(back.specials(), tok.specials());
        assert_eq!(back.pattern(), tok.pattern());
    }

    #[test]
    fn foreign_or_corrupt_json_names_the_field() {
        let p = Path::new("x/tokenizer.json");
        let err = from_hf_json("{not json", p).unwrap_err().to_string();
        assert!(
            err.contains("x/tokenizer.json") && err.contains("line 1"),
            "{err}"
        );
        let mut doc: Value = serde_json::from_str(&to_hf_json(&trained())).unwrap();
        doc["model"]["type"] = json!("WordPiece");
        assert!(from_hf_json(&doc.to_string(), p)
            .unwrap_err()
            .to_string()
            .contains("model.type"));
        let mut doc: Value = serde_json::from_str(&to_hf_json(&trained())).unwrap();
        doc["model"]["merges"][3] = json!("Ġ zzz");
        assert!(from_hf_json(&doc.to_string(), p)
            .unwrap_err()
            .to_string()
            .contains("merges[3]"));
    }

    #[test]
    fn tiktoken_lines_are_base64_and_rank() {
        let tok = trained();
        let text = to_tiktoken(&tok);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), tok.n_ordinary());
        assert_eq!(lines[32], "IA== 32");
    }
}
