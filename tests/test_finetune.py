"""Fine-tuning data: ChatML supervision masks, packing, and the errors bad files get."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from smallm import Tokenizer
from smallm.data.conversations import (
    DataError,
    Example,
    encode_conversation,
    encode_pairs,
    pack_examples,
    read_conversations,
    read_pairs,
)
from smallm.data.loader import IGNORE_INDEX
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.text.chat import IM_END, chatml_ids

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "한국어로 말해 줘."},
    {"role": "assistant", "content": "다섯입니다."},
]


def write_lines(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def supervised_text(tok: Tokenizer, example: Example) -> str:
    return tok.decode(example.ids[example.supervised].tolist())


def test_a_conversation_is_chatml_and_only_the_replies_are_supervised(tok: Tokenizer) -> None:
    example = encode_conversation(tok, CHAT)
    assert example.ids.tolist() == chatml_ids(tok, CHAT)
    assert supervised_text(tok, example) == f"2 plus 3 is 5.{IM_END}다섯입니다.{IM_END}"
    # Each reply's <|im_end|> is learned (so the model stops); the newline after it is not.
    end = tok.special_tokens[IM_END]
    assert example.supervised[example.ids == end].tolist() == [False, False, True, False, True]


def test_supervise_from_skips_the_replies_of_the_prompt(tok: Tokenizer) -> None:
    example = encode_conversation(tok, CHAT, supervise_from=3)
    assert supervised_text(tok, example) == f"다섯입니다.{IM_END}"


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), text), min_size=1, max_size=6))
def test_supervision_covers_each_reply_and_nothing_else(tok: Tokenizer, turns: list[tuple[str, str]]) -> None:
    """Whatever the text: the ids are chatml_ids', and the supervised bytes are the replies and their
    <|im_end|>, give or take a token that straddles the role header's newline and the reply's start."""
    messages = [{"role": r, "content": c} for r, c in turns]
    example = encode_conversation(tok, messages)
    assert example.ids.tolist() == chatml_ids(tok, messages)
    end = tok.special_tokens[IM_END]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert int((example.supervised & (example.ids == end)).sum()) == len(replies)
    got = tok.decode_bytes(example.ids[example.supervised].tolist())
    want = b"".join(c.encode() + IM_END.encode() for c in replies)
    assert got.endswith(want[-len(IM_END) :]) if replies else got == b""
    assert len(want) <= len(got) <= len(want) + len(replies)  # at most the header's "\n" more per reply


def test_reading_conversations_names_the_line_and_the_problem(tmp_path: Path) -> None:
    good = {"messages": CHAT}
    cases = {
        '{"messages": [': "bad.jsonl:2: not valid JSON (Expecting value, column 15)",
        json.dumps({"text": "hi"}): "bad.jsonl:2: expected an object with a 'messages' list",
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}): "messages[0] has role 'bot'",
        json.dumps({"messages": [{"role": "user"}]}): "messages[0] must be an object with string 'role' and 'content'",
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}]}
        ): "bad.jsonl:2: the conversation has no assistant turn",
    }
    for line, message in cases.items():
        path = write_lines(tmp_path / "bad.jsonl", [good, line])
        with pytest.raises(DataError, match=re.escape(message)):
            read_conversations(path)
    with pytest.raises(DataError, match="holds no conversation"):
        read_conversations(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="cannot read"):
        read_conversations(tmp_path / "missing.jsonl")
    assert read_conversations(write_lines(tmp_path / "ok.jsonl", [good, "", good])) == [CHAT, CHAT]


def test_pairs_take_strings_or_message_lists(tmp_path: Path, tok: Tokenizer) -> None:
    path = write_lines(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Add 2 and 3.", "chosen": "5.", "rejected": "6."},
            {"prompt": CHAT[:2], "chosen": [CHAT[2]], "rejected": [{"role": "assistant", "content": "7."}]},
        ],
    )
    pairs = read_pairs(path)
    assert pairs[0] == (
        [{"role": "user", "content": "Add 2 and 3."}],
        [{"role": "assistant", "content": "5."}],
        [{"role": "assistant", "content": "6."}],
    )
    encoded, dropped = encode_pairs(tok, pairs, max_len=100)
    assert dropped == 0
    assert supervised_text(tok, encoded[1].chosen) == f"2 plus 3 is 5.{IM_END}"
    assert supervised_text(tok, encoded[1].rejected) == f"7.{IM_END}"
    assert encode_pairs(tok, pairs, max_len=10) == ([], 2)
    bad = {
        json.dumps({"prompt": "a", "chosen": "b"}): "bad.jsonl:1: missing 'rejected'",
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}): "are the same",
        json.dumps({"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}): "no assistant",
    }
    for line, message in bad.items():
        with pytest.raises(DataError, match=re.escape(message)):
            read_pairs(write_lines(tmp_path / "bad.jsonl", [line]))


def fake_example(n: int, seed: int) -> Example:
    rng = np.random.default_rng(seed)
    supervised = rng.random(n) < 0.5
    supervised[-1] = True
    return Example(rng.integers(0, 1000, n), supervised)


@given(st.lists(st.integers(2, 40), min_size=1, max_size=30), st.integers(8, 48))
def test_packing_places_every_fitting_example_once_intact(lengths: list[int], seq_len: int) -> None:
    examples = [fake_example(n, i) for i, n in enumerate(lengths)]
    rows = pack_examples(examples, seq_len, pad_id=7)
    fitting = [e for e in examples if len(e.ids) - 1 <= seq_len]
    assert rows.dropped == len(examples) - len(fitting)
    found = []
    for x, y, seg in zip(rows.x, rows.y, rows.segments):
        assert (np.diff(seg) >= 0).all()  # segments are contiguous and in order
        for s in np.unique(seg):
            part = seg == s
            if s == seg.max() and (x[part] == 7).all() and (y[part] == IGNORE_INDEX).all() and s > 0:
                continue  # the row's padding
            found.append((tuple(x[part]), tuple(y[part])))
    want = [(tuple(e.ids[:-1]), tuple(np.where(e.supervised[1:], e.ids[1:], IGNORE_INDEX))) for e in fitting]
    assert sorted(found) == sorted(want)
    assert rows.x.shape[1:] == (seq_len,) and len(rows) <= len(fitting)
    assert rows.tokens == sum(len(e.ids) - 1 for e in fitting)


def test_a_packed_row_computes_what_its_conversations_compute_alone(tok: Tokenizer, one_torch_thread: None) -> None:
    """The masking is exact: the summed loss of a packed row equals the sum of the losses of its
    conversations run one by one, and so do the gradients."""
    conversations = [CHAT, CHAT[1:3], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    examples = [encode_conversation(tok, c) for c in conversations]
    total = sum(len(e.ids) - 1 for e in examples)
    rows = pack_examples(examples, total + 5, pad_id=tok.eot_token)
    assert len(rows) == 1 and rows.dropped == 0
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=1216, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=256)
    model = SmallLM(config)
    x, y, seg = (torch.from_numpy(a) for a in (rows.x, rows.y, rows.segments))
    _, packed = model(x, y, reduction="sum", segment_ids=seg)
    packed.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = torch.zeros(())
    for e in examples:
        ids = torch.from_numpy(e.ids)
        targets = torch.where(torch.from_numpy(e.supervised[1:]), ids[1:], IGNORE_INDEX)
        alone = alone + model(ids[None, :-1], targets[None], reduction="sum")[1]
    alone.backward()
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
    for p, g in zip(model.parameters(), packed_grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_packing_drops_what_is_too_long_or_learns_nothing() -> None:
    nothing = Example(np.arange(5), np.zeros(5, dtype=bool))
    rows = pack_examples([fake_example(30, 0), fake_example(10, 1), nothing], 16)
    assert rows.dropped == 2 and len(rows) == 1
