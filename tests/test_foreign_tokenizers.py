"""Tokenizers others trained: byte-level BPE ``tokenizer.json`` files in the layouts of the common model
families (GPT-2, Llama 3, Qwen2/3, SmolLM), built here with the ``tokenizers`` library, load in smallm
and encode to exactly the ids ``tokenizers`` gives; SentencePiece-style files load too (more of them in
test_sentencepiece.py)."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_text import CODE, EMOJI, ENGLISH, KOREAN
from smallm.text.tokenizer import Tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = CONTRACTIONS + r"\p{N}{1,3}" + REST
QWEN_PATTERN = CONTRACTIONS + r"\p{N}" + REST
BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
CORPUS = [*ENGLISH, *KOREAN, *EMOJI, *CODE] * 8 + ["café naïve résumé 12345 67 IT'S they'LL"] * 8
TEXTS = [
    *ENGLISH, *KOREAN, *EMOJI, *CODE, "", " ", "\n\n\n", "12345678 1 22 333", "IT'S WE'LL they'Re",
    "cafe\u0301 and café", "   leading, trailing   ", "tabs\t\tand\r\nCRLF", "ẞ ǅ ﬁ ① ⅷ ½",
]  # fmt: skip


def train(pre_tokenizer: object, specials: list[str], vocab: int = 700, normalizer: object = None) -> dict:
    """A byte-level BPE trained by ``tokenizers``, as the JSON document it saves."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(CORPUS, trainer)
    return json.loads(hf.to_str())


def append_added(doc: dict, tokens: list[tuple[str, bool]]) -> dict:
    """Added tokens after the vocabulary, as Llama 3 and Qwen have them (``special`` as given)."""
    first = len(doc["model"]["vocab"])
    for i, (content, special) in enumerate(tokens):
        doc["added_tokens"].append(
            {"id": first + i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": special}
        )  # fmt: skip
    return doc


def gpt2_style() -> dict:
    """ByteLevel alone splitting with GPT-2's regex; <|endoftext|> at id 0 (as the trainer puts it)."""
    return train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), ["<|endoftext|>"])


def llama3_style() -> dict:
    """Split(Llama 3's regex) + ByteLevel, ignore_merges, the specials after the vocabulary."""
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated")
    doc = train(pre_tokenizers.Sequence([split, BYTE_LEVEL]), [])
    doc["model"]["ignore_merges"] = True
    return append_added(doc, [("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|eot_id|>", True)])


def qwen_style() -> dict:
    """NFC, Split(Qwen's regex: one digit per piece) + ByteLevel, specials and non-special added tokens."""
    split = pre_tokenizers.Split(Regex(QWEN_PATTERN), "isolated")
    doc = train(pre_tokenizers.Sequence([split, BYTE_LEVEL]), [], normalizer=normalizers.NFC())
    tokens = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False)]
    return append_added(doc, tokens)


def smollm_style() -> dict:
    """Specials first (ids 0-2), then the bytes and merges, as SmolLM's file has them."""
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated")
    pre = pre_tokenizers.Sequence([split, BYTE_LEVEL])
    return train(pre, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


FAMILIES = {"gpt2": gpt2_style, "llama3": llama3_style, "qwen": qwen_style, "smollm": smollm_style}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object]:
    folder = tmp_path_factory.mktemp(request.param)
    (folder / "tokenizer.json").write_text(json.dumps(FAMILIES[request.param]()), encoding="utf-8")
    return Tokenizer.load(folder), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_ids_equal_tokenizers_on_every_sample(pair: tuple[Tokenizer, object]) -> None:
    ours, theirs = pair
    assert ours.foreign
    for text in TEXTS:
        expected = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allowed_special="all") == expected, repr(text)
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=False)


def test_added_tokens_keep_their_ids_and_are_cut_out(pair: tuple[Tokenizer, object]) -> None:
    ours, theirs = pair
    for token, id in ours.special_tokens.items():
        assert theirs.token_to_id(token) == id
        text = f"a{token}b {token}{token}\n"
        assert ours.encode(text, allowed_special="all") == theirs.encode(text, add_special_tokens=False).ids
    assert ours.vocab_size == theirs.get_vocab_size(with_added_tokens=True)


def test_batches_and_byte_lengths_follow_the_files_ids(pair: tuple[Tokenizer, object]) -> None:
    ours, _ = pair
    batch = ours.encode_ordinary_batch(TEXTS)
    assert batch == [ours.encode_ordinary(t) for t in TEXTS]
    lengths = ours.token_byte_lengths()
    for text in TEXTS:
        ids = ours.encode_ordinary(text)
        sizes = {len(text.encode("utf-8")), len(unicodedata.normalize("NFC", text).encode("utf-8"))}
        assert sum(int(lengths[i]) for i in ids) in sizes
    for id in ours.special_tokens.values():
        assert lengths[id] == 0


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab cé1 2\n\t'ST한국🙂\u0301.,")), max_size=40))
def test_random_text_gives_the_ids_of_tokenizers(text: str) -> None:
    for ours, theirs in BUILT.values():
        assert ours.encode_ordinary(text) == theirs.encode(text, add_special_tokens=False).ids, repr(text)


BUILT: dict[str, tuple[Tokenizer, object]] = {}


@pytest.fixture(scope="module", autouse=True)
def built(tmp_path_factory: pytest.TempPathFactory) -> None:
    for name, make in FAMILIES.items():
        folder = tmp_path_factory.mktemp(f"built-{name}")
        doc = make()
        if name in ("qwen", "llama3"):  # so that random text never meets an added token string
            doc["added_tokens"] = []
        (folder / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
        BUILT[name] = (Tokenizer.load(folder), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))


def test_saving_writes_the_file_back_as_it_was(pair: tuple[Tokenizer, object], tmp_path: Path) -> None:
    ours, _ = pair
    ours.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.to_json() == ours.to_json()
    assert again.encode("ROMEO: 12345 café", allowed_special="all") == ours.encode(
        "ROMEO: 12345 café", allowed_special="all"
    )
    ranks = (tmp_path / "tokenizer.tiktoken").read_text().splitlines()
    assert len(ranks) == ours.vocab_size - len(ours.special_tokens)


def test_a_sentencepiece_style_bpe_trained_by_tokenizers_loads_to_its_ids(tmp_path: Path) -> None:
    hf = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    hf.train_from_iterator(CORPUS, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.load(tmp_path)
    assert ours.sentencepiece
    for line in CORPUS[:200]:
        assert ours.encode_ordinary(line) == hf.encode(line, add_special_tokens=False).ids, repr(line)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "add_prefix_space"),
        (lambda d: d.update(normalizer={"type": "NFKC"}), "normalizer"),
        (lambda d: d["added_tokens"][0].update(lstrip=True), "lstrip"),
        (lambda d: d["model"].update(dropout=0.1), "dropout"),
    ],
)
def test_options_smallm_does_not_implement_are_refused_naming_them(change, message: str, tmp_path: Path) -> None:
    doc = llama3_style()
    change(doc)
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(tmp_path)


def handmade(vocab: list[str], merges: list[list[str]], ignore_merges: bool) -> dict:
    """A minimal byte-level file: the tokens given (GPT-2 byte characters), in that id order."""
    return {
        "version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None, "decoder": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\S+|\s+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": {t: i for i, t in enumerate(vocab)}, "merges": merges},
    }  # fmt: skip


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_ignore_merges_takes_a_whole_word_and_a_missing_byte_is_dropped(ignore_merges: bool, tmp_path: Path) -> None:
    # "abc" is a token no merge makes; "x" is not in the vocabulary at all.
    doc = handmade(["a", "b", "c", "Ġ", "ab", "abc"], [["a", "b"]], ignore_merges)
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    ours, theirs = Tokenizer.load(tmp_path), tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ("abc", "abc abcx", "xx", "cab"):
        assert ours.encode_ordinary(text) == theirs.encode(text).ids, text
    assert ours.encode_ordinary("abc") == ([5] if ignore_merges else [4, 2])


def test_an_imported_model_keeps_its_tokenizer_packs_a_corpus_and_continues_pretraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LLaMA folder with a Qwen-style tokenizer: smallm-import keeps the tokenizer, smallm-tokenize
    packs a corpus with it (the same ids as tokenizers), and smallm-train continues from the weights."""
    transformers = pytest.importorskip("transformers")
    from smallm.cli import import_hf as import_cli
    from smallm.cli import tokenize as tokenize_cli
    from smallm.cli import train as train_cli
    from smallm.data.shardset import ShardSet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "llama"
    doc = qwen_style()
    vocab = len(doc["model"]["vocab"]) + len(doc["added_tokens"])
    config = transformers.LlamaConfig(
        vocab_size=-(-vocab // 64) * 64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    run = tmp_path / "run"
    assert import_cli.main([str(folder), "--out", str(run)]) == 0
    tokenizer = Tokenizer.load(run)
    assert tokenizer.foreign and tokenizer.vocab_size == vocab

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    data = tmp_path / "data"
    args = [str(corpus), "--doc-mode", "line", "--tokenizer", str(run), "--out", str(data), "--quiet"]
    assert tokenize_cli.main([*args, "--val-fraction", "0.1"]) == 0
    shards = ShardSet.open(data, "train")
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    starts = shards.shards[0].doc_starts
    first = shards.shards[0].array[starts[0] + 1 : starts[1]].tolist()  # after the document's BOS
    assert shards.bos_id == tokenizer.eot_token and first in [hf.encode(t).ids for t in CORPUS]

    out = tmp_path / "continued"
    args = ["--data", str(data), "--out", str(out), "--init-from", str(run), "--max-steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--batch-tokens", "64", "--device", "cpu", "--sample-tokens", "2"]  # fmt: skip
    assert train_cli.main(args) == 0
    assert (out / "checkpoints" / "step_00000002" / "model.safetensors").is_file()


@pytest.mark.parametrize("taken_by", ["vocab", "added"])
def test_an_added_token_on_another_tokens_id_is_refused_naming_both(taken_by: str, tmp_path: Path) -> None:
    doc = llama3_style()
    first = doc["added_tokens"][0]
    if taken_by == "vocab":
        other, clash = next(iter(doc["model"]["vocab"].items()))[0], next(iter(doc["model"]["vocab"].values()))
    else:
        other, clash = first["content"], first["id"]
    doc["added_tokens"].append({**first, "content": "<|mine|>", "id": clash})
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    message = rf"\(\"<\|mine\|>\"\) has id {clash}, which is .*{re.escape(json.dumps(other))}'s: two tokens"
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(tmp_path)
