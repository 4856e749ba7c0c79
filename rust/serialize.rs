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
use crate::pretokenize::GPT2_PATTERN;
use crate::sentencepiece::{Prepend, Spaces, SPACE};
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

/// The `tokenizer.json` text for `tok` (a tokenizer read from another's file: that file's text).
pub fn to_hf_json(tok: &Tokenizer) -> String {
    if let Some(foreign) = tok.foreign_parts() {
        return foreign.source.clone();
    }
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

/// The `tokenizer.tiktoken` rank file for `tok` (special tokens are not in it); empty for a
/// SentencePiece-style BPE, which tiktoken cannot run.
pub fn to_tiktoken(tok: &Tokenizer) -> String {
    if tok.sentencepiece_parts().is_some() {
        return String::new(); // tiktoken runs byte-level BPE only
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = String::with_capacity(tok.n_ordinary() * 16);
    for id in 0..tok.vocab_size() as u32 {
        let bytes = tok
            .token_bytes(id)
            .expect("ids below the vocabulary size exist");
        if tok.is_special(id) || bytes.is_empty() {
            continue; // special tokens are not ranks; a foreign vocabulary may leave ids unused
        }
        out.push_str(&b64.encode(bytes));
        out.push(' ');
        out.push_str(&id.to_string());
        out.push('\n');
    }
    out
}

/// Reads a BPE `tokenizer.json`: smallm's own; a byte-level one trained elsewhere (GPT-2, Llama 3,
/// Qwen2/3 and the like); or a SentencePiece-style one (Llama 2, TinyLlama, Mistral: [`crate::sentencepiece`]).
/// Those trained elsewhere keep their ids and encode as the `tokenizers` library does. Another kind of
/// tokenizer (WordPiece, Unigram), an option smallm does not implement, or a corrupt file is an error
/// saying which field is wrong.
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
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") => {}
        None if model.get("merges").is_some() => {} // files older than the field
        other => {
            let found = other.map_or("missing".to_string(), |t| format!("\"{t}\""));
            return Err(bad(format!(
                "model.type is {found}, not \"BPE\": only BPE tokenizers can be loaded"
            )));
        }
    }
    refuse_options(model).map_err(bad)?;
    let keys = vocab_keys(model).map_err(bad)?;
    let merges = merge_pairs(model).map_err(bad)?;
    let added = added_tokens(&doc, &keys).map_err(bad)?;
    if is_sentencepiece(&doc, model) {
        if model.get("ignore_merges").and_then(Value::as_bool) == Some(true) {
            return Err(bad("model.ignore_merges is set on a SentencePiece-style BPE, which smallm does not implement".into()));
        }
        let spaces = sentencepiece_spaces(&doc).map_err(bad)?;
        let unk = model.get("unk_token").and_then(Value::as_str);
        let fuse_unk = model.get("fuse_unk").and_then(Value::as_bool) == Some(true);
        let byte_fallback = model.get("byte_fallback").and_then(Value::as_bool) == Some(true);
        return Tokenizer::sentencepiece(
            keys,
            &merges,
            added,
            (unk, fuse_unk, byte_fallback, spaces),
            text.to_owned(),
        )
        .map_err(bad);
    }
    let ignore_merges = model.get("ignore_merges").and_then(Value::as_bool) == Some(true);
    let nfc = normalizer_is_nfc(doc.get("normalizer")).map_err(bad)?;
    let pattern = split_pattern(&doc).map_err(bad)?;

    let table = byte_to_char();
    let char_to_byte: std::collections::HashMap<char, u8> = table
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    let to_bytes = |key: &str| -> Option<Vec<u8>> {
        key.chars().map(|c| char_to_byte.get(&c).copied()).collect()
    };
    let mut vocab: Vec<(Vec<u8>, u32)> = Vec::with_capacity(keys.len());
    for (key, id) in &keys {
        let bytes = to_bytes(key)
            .ok_or_else(|| bad(format!("model.vocab key {key:?} is not byte-level encoded")))?;
        vocab.push((bytes, *id));
    }
    let key_bytes = |k: &str| to_bytes(k).expect("checked with the vocab");
    if let Some(native) = native_layout(&vocab, &merges, &added, &keys) {
        if !ignore_merges && !nfc {
            let (merge_ids, specials) = native;
            return Tokenizer::new(&pattern, merge_ids, specials).map_err(|e| bad(e.to_string()));
        }
    }
    let merges: Vec<(Vec<u8>, Vec<u8>)> = merges
        .iter()
        .map(|(l, r)| (key_bytes(l), key_bytes(r)))
        .collect();
    Tokenizer::foreign(
        &pattern,
        vocab,
        &merges,
        added,
        ignore_merges,
        nfc,
        text.to_owned(),
    )
    .map_err(bad)
}

/// `model.vocab` as (token, id), each id once.
fn vocab_keys(model: &Value) -> std::result::Result<Vec<(String, u32)>, String> {
    let vocab_json = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or("model.vocab is missing or not an object")?;
    let mut keys = Vec::with_capacity(vocab_json.len());
    let mut seen_ids = std::collections::HashSet::with_capacity(vocab_json.len());
    for (key, id) in vocab_json {
        let id = id
            .as_u64()
            .filter(|&i| i < u32::MAX as u64)
            .ok_or_else(|| format!("model.vocab[{key:?}] = {id} is not an id"))?
            as u32;
        if !seen_ids.insert(id) {
            return Err(format!("model.vocab: id {id} is given twice"));
        }
        keys.push((key.clone(), id));
    }
    Ok(keys)
}

/// `model.merges` as pairs of tokens of the vocabulary (whose join is one too), in priority order.
fn merge_pairs(model: &Value) -> std::result::Result<Vec<(String, String)>, String> {
    let in_vocab = |t: &str| model.get("vocab").and_then(|v| v.get(t)).is_some();
    let merges_json = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or("model.merges is missing or not a list")?;
    let mut merges: Vec<(String, String)> = Vec::with_capacity(merges_json.len());
    for (i, m) in merges_json.iter().enumerate() {
        let (l, r) = match m {
            Value::String(s) => s
                .split_once(' ')
                .filter(|(_, r)| !r.contains(' '))
                .ok_or_else(|| format!("model.merges[{i}] = {s:?} is not two tokens"))?,
            Value::Array(a) if a.len() == 2 && a.iter().all(Value::is_string) => (
                a[0].as_str().unwrap_or_default(),
                a[1].as_str().unwrap_or_default(),
            ),
            other => {
                return Err(format!(
                    "model.merges[{i}] = {other} is not a pair of tokens"
                ))
            }
        };
        for t in [l, r] {
            if !in_vocab(t) {
                return Err(format!("model.merges[{i}]: {t:?} is not in the vocab"));
            }
        }
        if !in_vocab(&format!("{l}{r}")) {
            return Err(format!(
                "model.merges[{i}]: {:?} (the two joined) is not in the vocab",
                format!("{l}{r}")
            ));
        }
        merges.push((l.to_owned(), r.to_owned()));
    }
    Ok(merges)
}

/// `added_tokens` as (content, id): an added token that is also a vocab entry takes the vocab's id, as in
/// `tokenizers`; two tokens on one id are refused naming both.
fn added_tokens(
    doc: &Value,
    keys: &[(String, u32)],
) -> std::result::Result<Vec<(String, u32)>, String> {
    let id_of_key: std::collections::HashMap<&str, u32> =
        keys.iter().map(|(k, id)| (k.as_str(), *id)).collect();
    let key_of_id: std::collections::HashMap<u32, &str> =
        keys.iter().map(|(k, id)| (*id, k.as_str())).collect();
    let mut added: Vec<(String, u32)> = Vec::new();
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
            .ok_or_else(|| format!("added_tokens[{i}].id is missing"))? as u32;
        let content = t
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("added_tokens[{i}].content is missing"))?;
        for flag in ["single_word", "lstrip", "rstrip"] {
            if t.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(format!(
                    "added_tokens[{i}] ({content:?}) sets {flag}, which smallm does not implement"
                ));
            }
        }
        let in_vocab = id_of_key.get(content).copied();
        let id = in_vocab.unwrap_or(id);
        let taken = match in_vocab {
            Some(_) => None,
            None => key_of_id
                .get(&id)
                .map(|other| format!("the vocab's {other:?}")),
        }
        .or_else(|| {
            added
                .iter()
                .find(|(other, other_id)| *other_id == id && other != content)
                .map(|(other, _)| format!("added_tokens' {other:?}"))
        });
        if let Some(other) = taken {
            return Err(format!(
                "added_tokens[{i}] ({content:?}) has id {id}, which is {other}'s: two tokens cannot share an id \
                 (they would decode differently from `tokenizers`); fix the file"
            ));
        }
        added.push((content.to_owned(), id));
    }
    Ok(added)
}

/// A smallm-layout file's merges (as id pairs) and special tokens.
type NativeParts = (Vec<(u32, u32)>, Vec<String>);

/// The merge ids and special tokens of a file in smallm's own layout (bytes are ids 0..256, merge
/// `i` creates `256 + i`, the added tokens follow in order), or None.
fn native_layout(
    vocab: &[(Vec<u8>, u32)],
    merges: &[(String, String)],
    added: &[(String, u32)],
    keys: &[(String, u32)],
) -> Option<NativeParts> {
    if vocab.len() != 256 + merges.len() {
        return None;
    }
    let id_of_key: std::collections::HashMap<&str, u32> =
        keys.iter().map(|(k, id)| (k.as_str(), *id)).collect();
    let by_id: std::collections::HashMap<u32, &[u8]> =
        vocab.iter().map(|(b, id)| (*id, b.as_slice())).collect();
    if (0..256u32).any(|b| by_id.get(&b) != Some(&&[b as u8][..])) {
        return None;
    }
    let mut ids = Vec::with_capacity(merges.len());
    for (i, (l, r)) in merges.iter().enumerate() {
        if id_of_key.get(format!("{l}{r}").as_str()) != Some(&(256 + i as u32)) {
            return None;
        }
        ids.push((id_of_key[l.as_str()], id_of_key[r.as_str()]));
    }
    let mut sorted = added.to_vec();
    sorted.sort_by_key(|(_, id)| *id);
    let first = (256 + merges.len()) as u32;
    if sorted
        .iter()
        .enumerate()
        .any(|(i, (_, id))| *id != first + i as u32)
    {
        return None;
    }
    Some((ids, sorted.into_iter().map(|(c, _)| c).collect()))
}

/// Whether a file is a SentencePiece-style BPE: byte fallback, or `▁` for spaces.
fn is_sentencepiece(doc: &Value, model: &Value) -> bool {
    let text = |v: Option<&Value>| v.map(Value::to_string).unwrap_or_default();
    let metaspace = ["normalizer", "pre_tokenizer", "decoder"]
        .iter()
        .any(|f| text(doc.get(*f)).contains('\u{2581}') || text(doc.get(*f)).contains("Metaspace"));
    metaspace
        || model.get("byte_fallback").and_then(Value::as_bool) == Some(true)
        || model.get("vocab").and_then(|v| v.get("<0x00>")).is_some()
}

/// How a SentencePiece-style file writes spaces: Llama 2's normalizer (`Prepend` a `▁`, `Replace` spaces
/// by `▁`, no pre-tokenizer) or the `Metaspace` pre-tokenizer (no normalizer). Anything else is refused,
/// naming the field.
fn sentencepiece_spaces(doc: &Value) -> std::result::Result<Spaces, String> {
    let marker = SPACE.to_string();
    let kind = |v: &Value| {
        v.get("type")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned()
    };
    let normalizer = doc.get("normalizer").filter(|n| !n.is_null());
    let pre = doc.get("pre_tokenizer").filter(|p| !p.is_null());
    match (normalizer, pre) {
        (Some(n), None) => {
            let steps: Vec<&Value> = match kind(n).as_str() {
                "Sequence" => n.get("normalizers").and_then(Value::as_array).into_iter().flatten().collect(),
                _ => vec![n],
            };
            let prepend = steps.iter().any(|s| {
                kind(s) == "Prepend" && s.get("prepend").and_then(Value::as_str) == Some(marker.as_str())
            });
            let replace = steps.iter().any(|s| {
                kind(s) == "Replace"
                    && s.get("pattern").and_then(|p| p.get("String")).and_then(Value::as_str) == Some(" ")
                    && s.get("content").and_then(Value::as_str) == Some(marker.as_str())
            });
            let kinds: Vec<String> = steps.iter().map(|s| kind(s)).collect();
            if !(prepend && replace && steps.len() == 2) {
                return Err(format!(
                    "normalizer is {kinds:?}; smallm reads a SentencePiece-style BPE whose normalizer prepends \"\u{2581}\" \
                     and replaces \" \" by it (Llama 2's), or whose pre_tokenizer is Metaspace"
                ));
            }
            Ok(Spaces { prepend: Prepend::Always, split: false, prepend_always: true })
        }
        (None, Some(p)) if kind(p) == "Metaspace" => {
            if p.get("replacement").and_then(Value::as_str) != Some(marker.as_str()) {
                return Err("pre_tokenizer Metaspace has another replacement than \"\u{2581}\"".into());
            }
            let prepend = match p.get("prepend_scheme").and_then(Value::as_str) {
                _ if p.get("add_prefix_space").and_then(Value::as_bool) == Some(false) => Prepend::Never,
                None | Some("always") => Prepend::Always,
                Some("first") => Prepend::First,
                Some("never") => Prepend::Never,
                Some(other) => return Err(format!("pre_tokenizer Metaspace prepend_scheme {other:?} is not known")),
            };
            let split = p.get("split").and_then(Value::as_bool) != Some(false);
            Ok(Spaces { prepend, split, prepend_always: false })
        }
        (n, p) => Err(format!(
            "a SentencePiece-style BPE with normalizer {} and pre_tokenizer {}: smallm reads Llama 2's normalizer \
             (Prepend and Replace, no pre_tokenizer) or a Metaspace pre_tokenizer (no normalizer)",
            n.map_or("null".into(), kind),
            p.map_or("null".into(), kind),
        )),
    }
}

/// BPE options that change the ids and that smallm does not implement.
fn refuse_options(model: &Value) -> std::result::Result<(), String> {
    if model
        .get("dropout")
        .and_then(Value::as_f64)
        .is_some_and(|d| d > 0.0)
    {
        return Err(
            "model.dropout is set: BPE dropout is for training, not for a fixed encoding".into(),
        );
    }
    for field in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if model
            .get(field)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            return Err(format!("model.{field} is set, which byte-level BPE does not use and smallm does not implement"));
        }
    }
    Ok(())
}

/// Whether the normalizer is Unicode NFC (Qwen's); none at all is fine, anything else is refused.
fn normalizer_is_nfc(normalizer: Option<&Value>) -> std::result::Result<bool, String> {
    match normalizer {
        None | Some(Value::Null) => Ok(false),
        Some(n) => match n.get("type").and_then(Value::as_str) {
            Some("NFC") => Ok(true),
            Some("Sequence")
                if n.get("normalizers")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty) =>
            {
                Ok(false)
            }
            other => Err(format!(
                "normalizer {other:?} is not one smallm implements (none, or NFC)"
            )),
        },
    }
}

/// The pre-tokenization regex: the `Split` step before a `ByteLevel` one, or GPT-2's regex for a
/// `ByteLevel` step that splits by itself (`use_regex`, as in GPT-2's file).
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
    let byte_level = *steps.last().ok_or("pre_tokenizer is an empty sequence")?;
    if byte_level.get("add_prefix_space").and_then(Value::as_bool) == Some(true) {
        return Err("pre_tokenizer ByteLevel step has add_prefix_space = true, which smallm does not implement".into());
    }
    let splits_itself = byte_level.get("use_regex").and_then(Value::as_bool) != Some(false);
    match kinds.as_slice() {
        ["ByteLevel"] if splits_itself => Ok(GPT2_PATTERN.to_owned()),
        ["Split", "ByteLevel"] if !splits_itself => {
            let split = steps[0];
            if split.get("behavior").and_then(Value::as_str) != Some("Isolated") {
                return Err("pre_tokenizer Split step must have behavior \"Isolated\"".into());
            }
            split
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| "pre_tokenizer Split step has no pattern.Regex".into())
        }
        _ => Err(format!(
            "pre_tokenizer is {kinds:?}; smallm reads [\"Split\", \"ByteLevel\"] (a regex split, then byte-level mapping with use_regex = false) or [\"ByteLevel\"] splitting by itself (GPT-2)"
        )),
    }
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
