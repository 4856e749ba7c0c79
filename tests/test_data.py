"""The training data loader: shards are mapped not copied, batches are shifted pairs, both sampling
modes are deterministic, resumable and split across ranks, validation covers a split exactly once, and
every malformed shard directory fails with a message that names the file.

The shard directories are written here with numpy, straight from the format description (not with
``smallm.data.loader``'s constants), so these tests also pin the on-disk format the packer must write.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smallm import Tokenizer

torch = pytest.importorskip("torch")
from smallm.data.loader import (  # noqa: E402
    IGNORE_INDEX,
    TokenLoader,
    ValidationLoader,
)
from smallm.data.shardset import ShardError, ShardSet  # noqa: E402

# ----- fixtures: a real tokenizer file and shard directories written from lists of documents ------


@dataclass(frozen=True)
class TokenizerFile:
    json: bytes
    vocab_size: int
    bos_id: int


@pytest.fixture(scope="module")
def vocab(corpus_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> TokenizerFile:
    tok = Tokenizer.train_from_iterator(corpus_docs, 300)
    out = tmp_path_factory.mktemp("tok300")
    tok.save(out)
    return TokenizerFile((out / "tokenizer.json").read_bytes(), tok.vocab_size, tok.eot_token)


def write_shard_dir(
    directory: Path, splits: dict[str, list[list[list[int]]]], vocab: TokenizerFile, dtype: str = "uint16"
) -> Path:
    """Writes a shard directory: ``splits`` maps a split to its shards, each a list of documents."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_bytes(vocab.json)
    np_dtype, version = {"uint16": ("<u2", 1), "uint32": ("<u4", 2)}[dtype]
    entries: dict[str, list[dict[str, object]]] = {}
    for split, shards in splits.items():
        entries[split] = []
        for i, docs in enumerate(shards):
            tokens = np.array([t for doc in docs for t in doc], dtype=np_dtype)
            starts = np.cumsum([0] + [len(doc) for doc in docs])[:-1].astype("<i8")
            header = np.zeros(256, dtype="<i4")
            header[:3] = (20240520, version, len(tokens))
            name = f"{split}_{i:06d}"
            (directory / f"{name}.bin").write_bytes(header.tobytes() + tokens.tobytes())
            index_header = np.array([20240521, 1, len(docs), len(tokens)], dtype="<i8")
            (directory / f"{name}.idx").write_bytes(index_header.tobytes() + starts.tobytes())
            entry = {
                "file": f"{name}.bin",
                "index": f"{name}.idx",
                "tokens": len(tokens),
                "documents": len(docs),
            }
            entries[split].append(entry)
    manifest = {
        "format": "smallm-shards",
        "format_version": 1,
        "tokenizer": {"file": "tokenizer.json", "sha256": hashlib.sha256(vocab.json).hexdigest()},
        "vocab_size": vocab.vocab_size,
        "dtype": dtype,
        "bos_id": vocab.bos_id,
        "special_tokens": {"<|endoftext|>": vocab.bos_id},
        "shard_tokens": 1000,
        "splits": entries,
        "sources": [],
        "options": {},
        "totals": {},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def random_documents(vocab: TokenizerFile, lengths: list[int], seed: int) -> list[list[int]]:
    """Documents of the given lengths: BOS, then random ordinary ids."""
    rng = np.random.default_rng(seed)
    return [[vocab.bos_id, *rng.integers(0, vocab.bos_id, size=n - 1).tolist()] for n in lengths]


def tagged_documents(vocab: TokenizerFile, lengths: list[int]) -> list[list[int]]:
    """Document i is BOS followed by the id i repeated, so any two-token prefix names it."""
    assert len(lengths) < vocab.bos_id
    return [[vocab.bos_id] + [i] * (n - 1) for i, n in enumerate(lengths)]


def take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def windows(tokens: np.ndarray, n: int) -> list[tuple[int, ...]]:
    """Every run of n consecutive tokens, in order."""
    values = tokens.tolist()
    return [tuple(values[i : i + n]) for i in range(len(values) - n + 1)]


def segments(row: np.ndarray, bos_id: int) -> list[np.ndarray]:
    """A row cut before every BOS."""
    cuts = np.flatnonzero(row == bos_id)
    return np.split(row, cuts[1:])


@pytest.fixture(scope="module")
def corpus_dir(vocab: TokenizerFile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three train shards and one val shard of random documents (2..120 tokens)."""
    rng = np.random.default_rng(0)
    docs = random_documents(vocab, rng.integers(2, 121, size=150).tolist(), seed=1)
    splits = {"train": [docs[:60], docs[60:100], docs[100:140]], "val": [docs[140:]]}
    return write_shard_dir(tmp_path_factory.mktemp("corpus"), splits, vocab)


# ----- the shard set ------------------------------------------------------------------------------


def test_shard_tensors_share_memory_with_the_file_map(corpus_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about non-writable arrays; the map must not be one
        shards = ShardSet.open(corpus_dir)
    assert len(shards.shards) == 3
    for shard in shards.shards:
        assert isinstance(shard.array, np.memmap)
        assert Path(shard.array.filename) == shard.path.resolve()
        assert shard.tokens.data_ptr() == shard.array.ctypes.data
        assert np.shares_memory(shard.tokens.numpy(), shard.array)
        assert shard.tokens.dtype == torch.uint16
        on_disk = np.fromfile(shard.path, dtype="<u2", offset=1024)
        np.testing.assert_array_equal(shard.tokens.numpy(), on_disk)


def test_uint32_shards_load_and_give_the_same_batches_as_uint16(vocab: TokenizerFile, tmp_path: Path) -> None:
    docs = random_documents(vocab, list(range(2, 60)), seed=3)
    narrow = ShardSet.open(write_shard_dir(tmp_path / "u16", {"train": [docs[:30], docs[30:]]}, vocab))
    wide = ShardSet.open(write_shard_dir(tmp_path / "u32", {"train": [docs[:30], docs[30:]]}, vocab, "uint32"))
    assert wide.shards[0].tokens.dtype == torch.uint32
    for mode in ("random", "documents"):
        a, b = TokenLoader(narrow, 3, 16, mode=mode), TokenLoader(wide, 3, 16, mode=mode)
        for (xa, ya), (xb, yb) in zip(take(a, 5), take(b, 5)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ----- training batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["random", "documents"])
def test_batches_are_int64_pairs_with_y_the_next_token(corpus_dir: Path, mode: str) -> None:
    shards = ShardSet.open(corpus_dir)
    for x, y in take(TokenLoader(shards, 4, 32, mode=mode), 5):
        assert x.shape == y.shape == (4, 32)
        assert x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("mode", ["random", "documents"])
def test_same_seed_gives_the_same_batches_and_another_seed_others(corpus_dir: Path, mode: str) -> None:
    shards = ShardSet.open(corpus_dir)
    first = take(TokenLoader(shards, 4, 24, mode=mode, seed=5), 6)
    again = take(TokenLoader(shards, 4, 24, mode=mode, seed=5), 6)
    other = take(TokenLoader(shards, 4, 24, mode=mode, seed=6), 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_random_windows_reach_every_valid_start_weighted_by_shard_length(vocab: TokenizerFile, tmp_path: Path) -> None:
    # T + 1 = 8: shard 0 has 11 tokens (starts 0..3), shard 1 has 19 (starts 0..11): weights 4 : 12.
    docs = random_documents(vocab, [5, 6, 7, 12], seed=4)
    shards = ShardSet.open(write_shard_dir(tmp_path, {"train": [docs[:2], docs[2:]]}, vocab))
    lookup = {window: (k, i) for k, s in enumerate(shards.shards) for i, window in enumerate(windows(s.array, 8))}
    assert len(lookup) == 4 + 12  # random tokens: every window is unique, so its content gives its place
    seen = []
    for x, y in take(TokenLoader(shards, 50, 7, mode="random", seed=1), 40):
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            seen.append(lookup[tuple(row)])
    assert {i for k, i in seen if k == 0} == set(range(4))
    assert {i for k, i in seen if k == 1} == set(range(12))
    assert sum(k == 0 for k, _ in seen) / len(seen) == pytest.approx(4 / 16, abs=0.04)


def test_document_rows_start_with_bos_and_hold_whole_documents_but_a_cropped_last(
    vocab: TokenizerFile, tmp_path: Path
) -> None:
    lengths = np.random.default_rng(2).integers(2, 40, size=120).tolist()
    docs = tagged_documents(vocab, lengths)
    shards = ShardSet.open(write_shard_dir(tmp_path, {"train": [docs[:50], docs[50:]]}, vocab))
    crops = 0
    for x, y in take(TokenLoader(shards, 4, 31, mode="documents", buffer_size=16), 30):
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            assert row[0] == vocab.bos_id
            *whole, last = segments(row, vocab.bos_id)
            for part in whole:
                assert part.tolist() == docs[part[1]]
            if len(last) > 1:  # else a lone BOS: some document cropped to one token
                assert last.tolist() == docs[last[1]][: len(last)]
            crops += len(last) == 1 or len(last) < len(docs[last[1]])
    assert crops > 0


def test_best_fit_takes_the_largest_document_that_fits_then_crops_the_shortest(
    vocab: TokenizerFile, tmp_path: Path
) -> None:
    docs = tagged_documents(vocab, [5, 10, 6])
    shards = ShardSet.open(write_shard_dir(tmp_path, {"train": [docs]}, vocab))
    ((x, y),) = take(TokenLoader(shards, 2, 15, mode="documents"), 1)
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    assert [p.tolist() for p in segments(rows[0], vocab.bos_id)] == [docs[1], docs[2]]  # 10 + 6 = 16
    # Row 2: the 5 (the epoch's last), then epoch 1's 10 fits the remaining 11; the 1 left crops the 5.
    assert [p.tolist() for p in segments(rows[1], vocab.bos_id)] == [docs[0], docs[1], docs[0][:1]]


def test_a_document_longer_than_a_row_starts_a_row_of_its_own(vocab: TokenizerFile, tmp_path: Path) -> None:
    docs = tagged_documents(vocab, [40, 5, 10])
    shards = ShardSet.open(write_shard_dir(tmp_path, {"train": [docs]}, vocab))
    loader = TokenLoader(shards, 2, 15, mode="documents")
    ((x, y),) = take(loader, 1)
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    assert rows[0].tolist() == docs[0][:16]  # not left waiting for a row end, to be cropped to 1 token
    # Row 2: 10 + 5, then epoch 1; the 1 left crops the shortest that fits in a row, the 5.
    assert [p.tolist() for p in segments(rows[1], vocab.bos_id)] == [docs[2], docs[1], docs[1][:1]]
    assert loader.cropped_fraction == pytest.approx((24 + 4) / (40 + 10 + 5 + 5))


def test_cropped_fraction_is_dropped_tokens_over_consumed_tokens(vocab: TokenizerFile, tmp_path: Path) -> None:
    # Rows of 16 from 12-token documents: one whole, one cropped to 4 (8 dropped of 24 taken).
    shards = ShardSet.open(write_shard_dir(tmp_path, {"train": [tagged_documents(vocab, [12] * 40)]}, vocab))
    loader = TokenLoader(shards, 2, 15, mode="documents")
    assert loader.cropped_fraction == 0.0
    take(loader, 5)
    assert loader.cropped_fraction == pytest.approx(1 / 3)
    position = loader.state_dict()["position"]
    assert (position["tokens_cropped"], position["tokens_consumed"]) == (8 * 10, 24 * 10)
    random_loader = TokenLoader(shards, 2, 15, mode="random")
    take(random_loader, 2)
    assert random_loader.cropped_fraction == 0.0


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), min_size=1, max_size=60),
    seq_len=st.integers(1, 40),
    buffer_size=st.integers(1, 20),
)
def test_documents_mode_uses_every_document_once_per_epoch(
    vocab: TokenizerFile,
    tmp_path_factory: pytest.TempPathFactory,
    lengths: list[int],
    seq_len: int,
    buffer_size: int,
) -> None:
    docs = tagged_documents(vocab, lengths)
    shards = ShardSet.open(write_shard_dir(tmp_path_factory.mktemp("docs"), {"train": [docs]}, vocab))
    loader = TokenLoader(shards, 3, seq_len, mode="documents", buffer_size=buffer_size)
    uses, lone, segments_seen = np.zeros(len(docs), dtype=int), 0, 0
    while loader.epoch < 2:
        x, y = next(loader)
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            assert row[0] == vocab.bos_id
            parts = segments(row, vocab.bos_id)
            for part in parts[:-1]:
                assert part.tolist() == docs[part[1]] if len(part) > 1 else 1 in lengths
            for part in parts:
                if len(part) > 1:
                    uses[part[1]] += 1
            lone += sum(len(part) == 1 for part in parts)
            segments_seen += len(parts)
    # Epochs 0 .. e-1 are done and epoch e has started, so each document was used e or e+1 times; only a
    # lone BOS (a 1-token document, or a crop to one token) does not say which document it was.
    e = loader.epoch
    assert e * len(docs) <= segments_seen <= (e + 1) * len(docs)
    assert np.all(uses <= e + 1)
    assert np.maximum(e - uses, 0).sum() <= lone


# ----- resume and ranks ---------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [False, True], ids=["inline", "prefetch"])
@pytest.mark.parametrize("mode", ["random", "documents"])
def test_resume_is_bitwise_identical(corpus_dir: Path, mode: str, prefetch: bool) -> None:
    shards = ShardSet.open(corpus_dir)
    loader = TokenLoader(shards, 4, 40, mode=mode, seed=3, buffer_size=32, prefetch=prefetch)
    take(loader, 7)
    state = json.loads(json.dumps(loader.state_dict()))  # plain data: JSON survives
    expected = take(loader, 25)
    if mode == "documents":  # the resumed stretch crosses into the next epoch
        assert state["position"]["epoch"] == 0 < loader.epoch
    resumed = TokenLoader(shards, 4, 40, mode=mode, seed=3, buffer_size=32, prefetch=prefetch)
    take(resumed, 2)  # a loader that already ran (and, with prefetch, prepared a batch ahead)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, take(resumed, 25)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.cropped_fraction == loader.cropped_fraction
    assert resumed.state_dict() == loader.state_dict()
    loader.close()
    resumed.close()


@pytest.mark.parametrize("mode", ["random", "documents"])
def test_prefetching_gives_the_same_batches(corpus_dir: Path, mode: str) -> None:
    shards = ShardSet.open(corpus_dir)
    inline = take(TokenLoader(shards, 4, 40, mode=mode), 10)
    ahead = TokenLoader(shards, 4, 40, mode=mode, prefetch=True)
    for (x, y), (ax, ay) in zip(inline, take(ahead, 10)):
        assert torch.equal(x, ax) and torch.equal(y, ay)
    ahead.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["random", "documents"])
def test_cuda_batches_equal_cpu_batches(corpus_dir: Path, mode: str) -> None:
    shards = ShardSet.open(corpus_dir)
    cpu = take(TokenLoader(shards, 4, 40, mode=mode), 10)
    cuda = TokenLoader(shards, 4, 40, mode=mode, device="cuda")
    for (x, y), (cx, cy) in zip(cpu, take(cuda, 10)):
        assert cx.is_cuda and torch.equal(x, cx.cpu()) and torch.equal(y, cy.cpu())
    cuda.close()
    val_cpu = list(ValidationLoader(ShardSet.open(corpus_dir, "val"), 3, 16))
    val_cuda = list(ValidationLoader(ShardSet.open(corpus_dir, "val"), 3, 16, device="cuda"))
    assert all(torch.equal(a.cpu(), b) for pa, pb in zip(val_cuda, val_cpu) for a, b in zip(pa, pb))


def test_loading_the_state_of_another_configuration_fails(corpus_dir: Path) -> None:
    shards = ShardSet.open(corpus_dir)
    state = TokenLoader(shards, 4, 40, mode="documents").state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(shards, 4, 41, mode="documents").load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(shards, 4, 40, mode="documents", rank=1, world_size=2).load_state_dict(state)


def test_ranks_see_disjoint_documents_that_cover_the_epoch(vocab: TokenizerFile, tmp_path: Path) -> None:
    # 48 documents of 8 tokens, rows of 16: two whole documents a row, 8 a batch, 24 a rank's epoch.
    docs = tagged_documents(vocab, [8] * 48)
    shards = ShardSet.open(write_shard_dir(tmp_path, {"train": [docs[:20], docs[20:]]}, vocab))
    seen = []
    for rank in range(2):
        loader = TokenLoader(shards, 4, 15, mode="documents", seed=9, rank=rank, world_size=2)
        ids = [int(p[1]) for x, y in take(loader, 3) for row in x.numpy() for p in segments(row, vocab.bos_id)]
        assert loader.epoch == 0 and len(ids) == len(set(ids)) == 24
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(48))


def test_ranks_sample_random_windows_inside_disjoint_parts_of_each_shard(vocab: TokenizerFile, tmp_path: Path) -> None:
    docs = random_documents(vocab, [30] * 20, seed=5)
    shards = ShardSet.open(write_shard_dir(tmp_path, {"train": [docs[:8], docs[8:]]}, vocab))
    lookup = {w: (k, i) for k, s in enumerate(shards.shards) for i, w in enumerate(windows(s.array, 11))}
    covered: list[set[tuple[int, int]]] = []
    for rank in range(3):
        cover = set()
        for x, y in take(TokenLoader(shards, 8, 10, mode="random", rank=rank, world_size=3), 20):
            for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
                k, start = lookup[tuple(row)]
                n = shards.shards[k].num_tokens
                assert n * rank // 3 <= start and start + 11 <= n * (rank + 1) // 3
                cover |= {(k, i) for i in range(start, start + 11)}
        covered.append(cover)
    assert all(not covered[a] & covered[b] for a in range(3) for b in range(a))


# ----- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 3])
def test_validation_makes_every_token_a_target_exactly_once(
    vocab: TokenizerFile, tmp_path: Path, world_size: int
) -> None:
    docs = random_documents(vocab, [1, 16, 17, 9, 30, 2], seed=6)
    val = [docs[:1], docs[1:2], docs[2:3], docs[3:]]  # shards of 1, 16, 17 and 41 tokens; T = 8
    shards = ShardSet.open(write_shard_dir(tmp_path, {"train": [docs], "val": val}, vocab), "val")
    per_rank = []
    for rank in range(world_size):
        loader = ValidationLoader(shards, 3, 8, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(x.shape[0] <= 3 and x.shape == y.shape and x.dtype == y.dtype == torch.int64 for x, y in batches)
        per_rank.append([(xr, yr) for x, y in batches for xr, yr in zip(x.tolist(), y.tolist())])
    rows = [per_rank[i % world_size][i // world_size] for i in range(sum(map(len, per_rank)))]
    assert len(rows) == 0 + 2 + 2 + 5
    targets = [t for _, y in rows for t in y if t != IGNORE_INDEX]
    assert targets == [t for s in shards.shards for t in s.array[1:].tolist()]
    expected = []  # the rows spelled out: T+1 tokens with stride T, the last padded
    for s in shards.shards:
        tokens = s.array.tolist()
        for start in range(0, len(tokens) - 1, 8):
            window = tokens[start : start + 9]
            pad = 9 - len(window)
            expected.append((window[:-1] + [vocab.bos_id] * pad, window[1:] + [IGNORE_INDEX] * pad))
    assert rows == expected


def test_validation_of_an_empty_split_has_no_batches(vocab: TokenizerFile, tmp_path: Path) -> None:
    directory = write_shard_dir(tmp_path, {"train": [random_documents(vocab, [5], 0)], "val": []}, vocab)
    assert len(ValidationLoader(ShardSet.open(directory, "val"), 2, 4)) == 0


# ----- errors -------------------------------------------------------------------------------------


def _poke(path: Path, offset: int, value: int, dtype: str) -> None:
    data = bytearray(path.read_bytes())
    item = np.array([value], dtype=dtype).tobytes()
    data[offset : offset + len(item)] = item
    path.write_bytes(bytes(data))


def _edit_manifest(directory: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


# Each corruption: what to do to a fresh directory (shard 1 has 3 documents of 4, 5 and 6 tokens, at 0, 4
# and 9), the file the error must name, and words it must contain.
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, list[str]]] = {
    "tokenizer hash": (
        lambda d: (d / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes() + b" "),
        "tokenizer.json",
        ["manifest.json", "sha256"],
    ),
    "bad magic": (
        lambda d: _poke(d / "train_000001.bin", 0, 7, "<i4"),
        "train_000001.bin",
        ["20240520", "7"],
    ),
    "bad version": (
        lambda d: _poke(d / "train_000001.bin", 4, 3, "<i4"),
        "train_000001.bin",
        ["version", "3"],
    ),
    "uint32 header, uint16 manifest": (
        lambda d: _poke(d / "train_000001.bin", 4, 2, "<i4"),
        "train_000001.bin",
        ["expected 1", "found 2"],
    ),
    "file size": (
        lambda d: (d / "train_000001.bin").write_bytes((d / "train_000001.bin").read_bytes() + b"xx"),
        "train_000001.bin",
        ["1056", "1054"],
    ),
    "missing shard": (lambda d: (d / "train_000001.bin").unlink(), "train_000001.bin", ["missing"]),
    "missing index": (lambda d: (d / "train_000001.idx").unlink(), "train_000001.idx", ["missing"]),
    "token id >= vocab": (
        lambda d: _poke(d / "train_000001.bin", 1024 + 2 * 6, 301, "<u2"),
        "train_000001.bin",
        ["id 301", "vocab_size 300"],
    ),
    "manifest token count": (
        lambda d: _edit_manifest(d, lambda m: m["splits"]["train"][1].update(tokens=16)),
        "train_000001.bin",
        ["15", "16", "manifest.json"],
    ),
    "manifest document count": (
        lambda d: _edit_manifest(d, lambda m: m["splits"]["train"][1].update(documents=4)),
        "train_000001.idx",
        ["3", "4", "manifest.json"],
    ),
    "index magic": (lambda d: _poke(d / "train_000001.idx", 0, 1, "<i8"), "train_000001.idx", ["20240521"]),
    "index token count": (
        lambda d: _poke(d / "train_000001.idx", 24, 14, "<i8"),
        "train_000001.idx",
        ["14", "15"],
    ),
    "index size": (
        lambda d: (d / "train_000001.idx").write_bytes((d / "train_000001.idx").read_bytes()[:-8]),
        "train_000001.idx",
        ["48", "56"],
    ),
    "offsets not increasing": (
        lambda d: _poke(d / "train_000001.idx", 32 + 16, 4, "<i8"),
        "train_000001.idx",
        ["increasing"],
    ),
    "first offset not 0": (
        lambda d: _poke(d / "train_000001.idx", 32, 1, "<i8"),
        "train_000001.idx",
        ["not 0"],
    ),
    "document without bos": (
        lambda d: _poke(d / "train_000001.bin", 1024 + 2 * 4, 5, "<u2"),
        "train_000001.idx",
        ["BOS", "train_000001.bin"],
    ),
    "manifest version": (
        lambda d: _edit_manifest(d, lambda m: m.update(format_version=2)),
        "manifest.json",
        ["version"],
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_malformed_shard_directory_fails_naming_the_file(vocab: TokenizerFile, tmp_path: Path, name: str) -> None:
    corrupt, file, words = CORRUPTIONS[name]
    shards = [random_documents(vocab, [3, 7], seed=1), random_documents(vocab, [4, 5, 6], seed=2)]
    directory = write_shard_dir(tmp_path, {"train": shards}, vocab)
    ShardSet.open(directory)  # fine before
    corrupt(directory)
    with pytest.raises(ShardError) as error:
        ShardSet.open(directory)
    message = str(error.value)
    assert str(directory / file) in message
    assert all(word in message for word in words), message


def test_verify_false_skips_reading_the_tokens(vocab: TokenizerFile, tmp_path: Path) -> None:
    directory = write_shard_dir(tmp_path, {"train": [random_documents(vocab, [4, 5], seed=1)]}, vocab)
    _poke(directory / "train_000000.bin", 1024 + 2, 300, "<u2")
    with pytest.raises(ShardError, match="vocab_size"):
        ShardSet.open(directory)
    assert ShardSet.open(directory, verify=False).num_tokens == 9


def test_an_unknown_split_fails_listing_the_splits(corpus_dir: Path) -> None:
    with pytest.raises(ShardError, match=r"no split 'test' \(it has \['train', 'val'\]\)"):
        ShardSet.open(corpus_dir, "test")
