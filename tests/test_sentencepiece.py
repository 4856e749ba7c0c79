"""SentencePiece-style BPE files (Llama 2, TinyLlama, Mistral and their kin), built here with the ``tokenizers``
library in the layouts transformers writes: they load in smallm, encode to exactly the ids ``tokenizers``
gives, decode to its text, pack, and carry a model through import, training, fine-tuning and export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_text import CODE, EMOJI, ENGLISH, KOREAN
from smallm.text.tokenizer import Tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

SPACE = "\u2581"
CORPUS = [*ENGLISH, *KOREAN[:3], *CODE] * 8 + ["café naïve résumé 12345 67 it's they'll  two  spaces"] * 8
TEXTS = [
    *ENGLISH, *KOREAN, *EMOJI, *CODE, "", " ", "  ", "\n\n\n", "12345678 1 22 333", " leading", "trailing ",
    "  two  spaces  ", f"a{SPACE}b {SPACE}", "cafe\u0301 and café", "tabs\t\tand\r\nCRLF", "ẞ ǅ ﬁ ① ⅷ ½ 한국어 🙂",
]  # fmt: skip
LLAMA2_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
]}  # fmt: skip


def sentencepiece_style(layout: str, vocab: int = 700) -> dict:
    """A SentencePiece-style BPE trained by ``tokenizers`` as SentencePiece trains (words start at a ``▁``;
    with ``spanning``, merges may also join words), laid out as transformers writes Llama 2's file:
    ``<unk>``, ``<s>``, ``</s>`` at 0-2, the 256 ``<0xNN>`` byte tokens at 3-258, then the rest; byte
    fallback, fused unknowns, ``<s>`` added in front of a text. ``llama2``: the Prepend/Replace normalizer;
    ``metaspace`` and ``spanning``: the Metaspace pre-tokenizer (prepend scheme "first", no split); ``split``:
    Metaspace splitting at every ``▁``."""
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=layout != "spanning")
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=150)
    hf.train_from_iterator(CORPUS, trainer)
    doc = json.loads(hf.to_str())
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(doc["model"]["vocab"].items(), key=lambda item: item[1]):
        ids.setdefault(token, len(ids))
    doc["model"]["vocab"] = ids
    for added in doc["added_tokens"]:
        added["id"] = ids[added["content"]]
    if layout == "llama2":
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
        doc["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace]}
        doc["pre_tokenizer"] = None
    else:
        doc["normalizer"] = None
        doc["pre_tokenizer"] = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "first",
                                "split": layout == "split"}  # fmt: skip
    doc["decoder"] = LLAMA2_DECODER
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    doc["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }  # fmt: skip
    return doc


LAYOUTS = ("llama2", "metaspace", "split", "spanning")
BUILT: dict[str, tuple[Tokenizer, object]] = {}


@pytest.fixture(scope="module", autouse=True)
def built(tmp_path_factory: pytest.TempPathFactory) -> None:
    for layout in LAYOUTS:
        folder = tmp_path_factory.mktemp(layout)
        (folder / "tokenizer.json").write_text(json.dumps(sentencepiece_style(layout)), encoding="utf-8")
        BUILT[layout] = (Tokenizer.load(folder), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ids_and_text_equal_tokenizers_on_every_sample(layout: str) -> None:
    ours, theirs = BUILT[layout]
    assert ours.foreign and ours.sentencepiece and ours.pattern == ""
    for text in TEXTS:
        expected = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode_ordinary(text) == expected, repr(text)
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=False), repr(text)
    assert ours.encode_ordinary_batch(TEXTS) == [ours.encode_ordinary(t) for t in TEXTS]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_added_tokens_are_cut_out_and_the_text_after_them_spaced_as_tokenizers_does(layout: str) -> None:
    ours, theirs = BUILT[layout]
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    for text in ("<s>hello</s>", "a<s>b", " <s> b", "</s></s>x", "x <unk> y"):
        assert ours.encode(text, allowed_special="all") == theirs.encode(text, add_special_tokens=False).ids, text
    assert ours.roles.document == "<s>" and ours.roles.add_bos and ours.bos_id == 1


ALPHABET = [*f"ab cé1 2\n\t'ST한국🙂\u0301.,{SPACE}", "\U0002a6b2", "Ω"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(ALPHABET), max_size=40))
def test_random_text_gives_the_ids_of_tokenizers(text: str) -> None:
    for ours, theirs in BUILT.values():
        expected = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode_ordinary(text) == expected, repr(text)
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=False), repr(text)


def test_byte_lengths_count_the_marker_as_a_space() -> None:
    ours, _ = BUILT["llama2"]
    lengths = ours.token_byte_lengths()
    # A literal "▁" in the text is the marker too (as in sentencepiece), so it counts as one byte.
    for text in (t for t in TEXTS if t and SPACE not in t):
        assert sum(int(lengths[i]) for i in ours.encode_ordinary(text)) == len(text.encode("utf-8")) + 1, repr(text)
    assert ours.token_bytes(3 + 0xE3) == b"\xe3"  # a byte token is its byte


def test_saving_writes_the_file_back_and_no_tiktoken_ranks(tmp_path: Path) -> None:
    ours, _ = BUILT["llama2"]
    ours.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = Tokenizer.load(tmp_path)
    assert again.to_json() == ours.to_json() and again.encode_ordinary(TEXTS[0]) == ours.encode_ordinary(TEXTS[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "normalizer Sequence and pre_tokenizer Whitespace"),
        (lambda d: d["normalizer"]["normalizers"].pop(), 'normalizer is \\["Prepend"\\]'),
        (lambda d: d["model"].update(ignore_merges=True), "ignore_merges"),
    ],
)
def test_layouts_smallm_does_not_run_are_refused_naming_the_field(change, message: str, tmp_path: Path) -> None:
    doc = sentencepiece_style("llama2")
    change(doc)
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(tmp_path)


def test_an_imported_llama2_packs_trains_fine_tunes_and_exports_with_its_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LlamaForCausalLM with a Llama 2 layout tokenizer: smallm-import, smallm-tokenize --tokenizer RUN (every
    document starts with <s>), smallm-train --init-from, smallm-sft with its chat template, smallm-export;
    transformers reads the export's tokenizer to smallm's ids and its model to smallm's logits."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from smallm.cli import export as export_cli
    from smallm.cli import import_hf as import_cli
    from smallm.cli import tokenize as tokenize_cli
    from smallm.cli import train as train_cli
    from smallm.cli.finetune import sft_main
    from smallm.data.shardset import ShardSet
    from smallm.run.load import load_model
    from test_imported_models import chats_file, random_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "hf"
    doc = sentencepiece_style("llama2")
    random_model(folder, -(-len(doc["model"]["vocab"]) // 64) * 64)
    (folder / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")  # fmt: skip
    config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "chat_template": template}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    run = tmp_path / "run"
    assert import_cli.main([str(folder), "--out", str(run)]) == 0
    tokenizer = Tokenizer.load(run)
    assert tokenizer.sentencepiece and tokenizer.roles.eos == "</s>"

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS[:120]), encoding="utf-8")
    data = tmp_path / "data"
    assert tokenize_cli.main([str(corpus), "--doc-mode", "line", "--tokenizer", str(run), "--out", str(data),
                              "--quiet"]) == 0  # fmt: skip
    train = ShardSet.open(data, "train")
    first = train.shards[0].tokens[:40].tolist()
    assert first[0] == 1 and first[1 : 1 + 5] == tokenizer.encode_ordinary(CORPUS[0])[:5]  # <s>, then the text
    steps = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--device", "cpu", "--eval-every", "0"]
    assert train_cli.main(["--init-from", str(run), "--data", str(data), "--out", str(tmp_path / "ko"), *steps,
                           "--batch-tokens", "64", "--sample-tokens", "4"]) == 0  # fmt: skip
    chats = chats_file(tmp_path / "chats.jsonl")
    assert sft_main([str(tmp_path / "ko"), "--data", str(chats), "--out", str(tmp_path / "sft"), *steps,
                     "--seq-len", "128"]) == 0  # fmt: skip

    assert export_cli.main([str(tmp_path / "sft"), "--out", str(tmp_path / "export")]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    for text in TEXTS[:12]:
        assert theirs(text)["input_ids"] == [1, *tokenizer.encode_ordinary(text)], repr(text)
    model, _, _ = load_model(tmp_path / "sft")
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    ids = torch.tensor([[1, *tokenizer.encode_ordinary(ENGLISH[0])]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
    assert dataclasses.asdict(model.config)["vocab_size"] >= tokenizer.vocab_size
