"""smallm-rm and smallm-score: a reward model trained with the Bradley-Terry loss on preference pairs, in full
or with LoRA; its scores read at the last token; the export as transformers' LlamaForSequenceClassification
gives the same scores."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from smallm import Tokenizer
from smallm.data.conversations import DataError, encode_conversation
from smallm.inference.scoring import reward_tensors, score_conversations
from smallm.interop.hf_export import HFError
from smallm.model.reward import RewardModel
from smallm.run.load import load_model
from smallm.train.config import RewardConfig
from smallm.train.jobs import build_trainer
from test_lora_dpo import make_base

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*is an Enum subclass:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def base(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"), tok, n_layer=1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sums: the chosen reply is right, the rejected one off by a few."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(path, "w") as f:
        for _ in range(60):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            wrong = a + b + rng.choice([-2, -1, 1, 2])
            f.write(json.dumps({"prompt": f"{a}+{b}=?", "chosen": f"{a + b}", "rejected": f"{wrong} or so"}) + "\n")
    return path


def rm_config(base: Path, data: Path, out: Path, **overrides: Any) -> RewardConfig:
    values: dict[str, Any] = dict(
        init_from=str(base), data=str(data), out=str(out), max_steps=30, batch_size=8, lr=3e-3, warmup_steps=2,
        log_every=5, eval_every=15, checkpoint_every=15, device="cpu", val_fraction=0.2,
    )  # fmt: skip
    values.update(overrides)
    return RewardConfig(**values)


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_head_reads_the_last_token_and_padding_changes_nothing(tok: Tokenizer) -> None:
    from smallm.model.config import ModelConfig

    torch.manual_seed(0)
    model = RewardModel(ModelConfig(vocab_size=1216, n_layer=1, n_embd=64, n_head=4, max_seq_len=64)).eval()
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids = encode_conversation(tok, conversation).ids
    alone, _ = reward_tensors([ids], tok.eot_token, torch.device("cpu"))
    padded, last = reward_tensors([ids, ids[:5]], tok.eot_token, torch.device("cpu"))
    with torch.no_grad():
        hidden = model.model(alone, None, 0, None)[0, -1]
        expected = model.score(hidden).item()
        assert model(padded, reward_index=last)[0].item() == pytest.approx(expected, abs=1e-6)
    assert score_conversations(model, tok, [conversation])[0] == pytest.approx(expected, abs=1e-6)


def test_a_sharded_runs_padding_batch_runs_a_forward_and_counts_nothing(tok: Tokenizer) -> None:
    """Under FSDP a rank with fewer validation rows runs padding batches (one row, all targets ignored) so that
    every rank runs as many forwards; the objective must run one on it and add no pair."""
    from smallm.data.conversations import EncodedPair
    from smallm.data.loader import IGNORE_INDEX
    from smallm.model.config import ModelConfig
    from smallm.train.tasks.reward import BradleyTerryLoss, pair_rows

    torch.manual_seed(0)
    model = RewardModel(ModelConfig(vocab_size=1216, n_layer=1, n_embd=64, n_head=4, max_seq_len=64))
    side = lambda text: encode_conversation(tok, [{"role": "user", "content": "hi"},  # noqa: E731
                                                  {"role": "assistant", "content": text}])  # fmt: skip
    real = pair_rows([EncodedPair(side("hello"), side("go away"))], tok.eot_token, torch.device("cpu"))
    padding = (torch.zeros(1, 64, dtype=torch.long), torch.full((1, 64), IGNORE_INDEX))
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    objective = BradleyTerryLoss()
    alone = objective.evaluate(model, [real])
    assert torch.equal(objective.evaluate(model, [real, padding]), alone) and len(forwards) == 3
    assert objective.validation_metrics(objective.evaluate(model, [padding])) == {}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_a_reward_model_learns_to_prefer_the_chosen_replies(
    base: Path, pairs: Path, tmp_path: Path, method: str
) -> None:
    if method == "qlora":
        pytest.importorskip("torchao")
    options = {"full": {}, "lora": {"lora_r": 8}, "qlora": {"lora_r": 8, "quantize": "nf4"}}[method]
    result = build_trainer(rm_config(base, pairs, tmp_path, **options)).fit()
    lines = [m for m in metrics(tmp_path) if "accuracy" in m]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert result["val_accuracy"] >= 0.75 and result["val_margin"] > 0
    model, tok, config = load_model(tmp_path)
    assert isinstance(model, RewardModel) and config["finetune"]["method"] == "rm"
    right = [{"role": "user", "content": "3+4=?"}, {"role": "assistant", "content": "7"}]
    wrong = [{"role": "user", "content": "3+4=?"}, {"role": "assistant", "content": "9 or so"}]
    good, bad = score_conversations(model, tok, [right, wrong])
    assert good > bad


def test_smallm_export_of_a_reward_run_is_a_sequence_classifier_scoring_as_smallm_score(
    base: Path, pairs: Path, tmp_path: Path, tok: Tokenizer, capsys: pytest.CaptureFixture
) -> None:
    transformers = pytest.importorskip("transformers")
    from smallm.cli.export import main as export
    from smallm.cli.score import main as score

    build_trainer(rm_config(base, pairs, tmp_path / "rm", max_steps=4)).fit()
    assert export([str(tmp_path / "rm"), "--out", str(tmp_path / "hf")]) == 0  # as the user types it
    assert "AutoModelForSequenceClassification" in capsys.readouterr().out
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "LlamaForSequenceClassification" and theirs.config.pad_token_id == tok.eot_token
    assert "lm_head.weight" not in theirs.state_dict()
    conversations = [[{"role": "user", "content": f"{a}+1=?"}, {"role": "assistant", "content": "x" * a}]
                     for a in (1, 5, 9)]  # fmt: skip
    replies = tmp_path / "replies.jsonl"
    replies.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    assert score([str(tmp_path / "rm"), "--data", str(replies), "--out", str(tmp_path / "scored.jsonl")]) == 0
    ours = [json.loads(line)["score"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    ids, _ = reward_tensors(
        [encode_conversation(tok, c).ids for c in conversations], tok.eot_token, torch.device("cpu")
    )
    with torch.no_grad():
        logits = theirs(input_ids=ids).logits[:, 0]
    torch.testing.assert_close(logits, torch.tensor(ours), atol=1e-4, rtol=0)
    with pytest.raises(HFError, match=r"reward model .* llama.cpp does not run"):  # GGUF refuses it by name
        from smallm.interop.export import export_run

        export_run(tmp_path / "rm", tmp_path / "rm.gguf", format="gguf")


def test_init_from_a_reward_run_takes_its_language_model(
    base: Path, pairs: Path, tmp_path: Path, tok: Tokenizer, corpus_docs: list[str], make_shards: object
) -> None:
    from smallm.train.config import TrainConfig

    build_trainer(rm_config(base, pairs, tmp_path / "rm", max_steps=2)).fit()
    reward, _, _ = load_model(tmp_path / "rm")
    data = make_shards(corpus_docs, tokenizer=tok)  # type: ignore[operator]
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "lm"), init_from=str(tmp_path / "rm"), max_steps=1,
                      batch_size=2, seq_len=16, batch_tokens=32, device="cpu", eval_every=0)  # fmt: skip
    trainer = build_trainer(cfg)
    lm = trainer.model.module
    assert type(lm).__name__ == "SmallLM" and not hasattr(lm, "score")
    for name, tensor in lm.state_dict().items():
        assert torch.equal(tensor, reward.state_dict()[name]), name


def test_smallm_score_writes_each_line_with_its_score(
    base: Path, pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli.score import main as score

    build_trainer(rm_config(base, pairs, tmp_path / "rm", max_steps=2)).fit()
    replies = tmp_path / "replies.jsonl"
    replies.write_text(
        json.dumps({"prompt": "1+1=?", "reply": "2"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "4"}]})
        + "\n", encoding="utf-8",
    )  # fmt: skip
    assert score([str(tmp_path / "rm"), "--data", str(replies), "--device", "cpu"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(r) for r in out] == [{"prompt", "reply", "score"}, {"messages", "score"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    assert score([str(tmp_path / "rm"), "--data", str(bad), "--device", "cpu"]) == 1
    assert "bad.jsonl:1: the conversation must end with the assistant turn to score" in capsys.readouterr().err
    assert score([str(base), "--data", str(replies), "--device", "cpu"]) == 1
    assert "is a language model, not a reward model" in capsys.readouterr().err


# ----- best-of-N ------------------------------------------------------------------------------------


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}=?", "answer": str(2 * a)}) + "\n" for a in range(1, 6)))
    return path


def scorer_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A verifier module on the path: 1 for a reply that contains the answer, else minus its length / 100."""
    (tmp_path / "verifier.py").write_text(
        "def exact(record, reply):\n    return 1.0 if record['answer'] in reply else -len(reply) / 100\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "verifier:exact"


def verified_sampling(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, dict]:
    """The policy of ``base``, its tokenizer, and best-of-N options scoring with the test's verifier."""
    from smallm.inference.generate import SamplingConfig
    from smallm.inference.rejection import load_score_function

    policy, tok, _ = load_model(base)
    verifier = load_score_function(scorer_module(tmp_path, monkeypatch))
    return policy, tok, dict(score_function=verifier, sampling=SamplingConfig(temperature=1.0), max_new_tokens=6,
                             seed=3)  # fmt: skip


def test_best_of_n_keeps_the_best_reply_resumes_and_is_deterministic(
    base: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smallm.inference.rejection import run_best_of_n

    policy, tok, options = verified_sampling(base, tmp_path, monkeypatch)
    result = run_best_of_n(policy, tok, prompts, tmp_path / "best.jsonl", 4, pairs_out=tmp_path / "pairs.jsonl",
                           **options)  # fmt: skip
    best = [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert [b["index"] for b in best] == [0, 1, 2, 3, 4] and result["prompts"] == 5
    assert all(b["score"] >= b["mean_score"] for b in best)
    assert result["mean_best"] >= result["mean_score"]
    assert best[0]["messages"][-1]["role"] == "assistant" and best[0]["messages"][0]["content"] == "1+1=?"
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)

    # Interrupted after three prompts, the fourth torn mid-line: the rerun does exactly the rest.
    lines = (tmp_path / "best.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "again.jsonl").write_text("".join(lines[:3]) + lines[3][:10])
    again = run_best_of_n(policy, tok, prompts, tmp_path / "again.jsonl", 4, **options)
    assert again["prompts"] == 2
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "best.jsonl").read_text()


def test_best_of_n_min_score_keeps_only_prompts_whose_best_reaches_it_and_resumes(
    base: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smallm.inference.rejection import below_path, run_best_of_n

    policy, tok, options = verified_sampling(base, tmp_path, monkeypatch)
    everything = run_best_of_n(policy, tok, prompts, tmp_path / "all.jsonl", 4, **options)
    best = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    threshold = sorted(b["score"] for b in best)[2]  # the middle best score: some prompts reach it, some not
    out = tmp_path / "kept.jsonl"
    result = run_best_of_n(policy, tok, prompts, out, 4, pairs_out=tmp_path / "pairs.jsonl", min_score=threshold,
                           **options)  # fmt: skip
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    below = [json.loads(line) for line in below_path(out).read_text().splitlines()]
    assert below_path(out).name == "kept.below.jsonl"
    assert [k["index"] for k in kept] == [b["index"] for b in best if b["score"] >= threshold]
    assert [b["index"] for b in below] == [b["index"] for b in best if b["score"] < threshold]
    assert all(max(b["scores"]) < threshold and len(b["replies"]) == 4 for b in below)
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert {p["index"] for p in pairs} <= {k["index"] for k in kept}
    assert (result["prompts"], result["kept"]) == (5, len(kept)) and result["mean_best"] == everything["mean_best"]
    again = run_best_of_n(policy, tok, prompts, out, 4, min_score=threshold, **options)
    assert again["prompts"] == 0  # the prompts below the threshold count as done too


def test_best_of_n_with_a_reward_model_from_the_command_line(
    base: Path, pairs: Path, prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli.best_of_n import main as best_of_n

    build_trainer(rm_config(base, pairs, tmp_path / "rm", max_steps=2)).fit()
    args = [str(base), "--reward", str(tmp_path / "rm"), "--prompts", str(prompts), "--n", "3", "--out",
            str(tmp_path / "best.jsonl"), "--max-new-tokens", "4", "--seed", "1", "--device", "cpu"]  # fmt: skip
    assert best_of_n(args) == 0
    assert "5 prompts, best of 3: mean best score" in capsys.readouterr().err
    model, tok, _ = load_model(tmp_path / "rm")
    line = json.loads((tmp_path / "best.jsonl").read_text().splitlines()[0])
    assert score_conversations(model, tok, [line["messages"]])[0] == pytest.approx(line["score"], abs=1e-5)
    assert best_of_n(args) == 0 and "resuming: 5 of 5 prompts" in capsys.readouterr().err
    assert best_of_n([str(base), "--reward", str(base), *args[3:], "--force"]) == 1
    assert "is a language model, not a reward model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("return float('nan')", "gave nan for a reply to the prompt of .*prompts.jsonl:1: a score is a finite number"),
        ("return None", "gave None for a reply to the prompt of .*prompts.jsonl:1"),
        ("raise KeyError('answer')", "raised KeyError on the prompt of .*prompts.jsonl:1: 'answer'"),
    ],
)
def test_a_scoring_function_that_fails_is_one_line_naming_it_and_the_prompt(
    body: str, message: str, base: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from smallm.cli.best_of_n import main as best_of_n

    module = f"broken_scorer_{abs(hash(body))}"  # one module name per body: imported modules are cached by name
    (tmp_path / f"{module}.py").write_text(f"def score(record, reply):\n    {body}\n")
    monkeypatch.chdir(tmp_path)  # a module of the current directory, as the README's checks.py
    args = [str(base), "--reward-fn", f"{module}:score", "--prompts", str(prompts), "--n", "2", "--out",
            str(tmp_path / "best.jsonl"), "--max-new-tokens", "2", "--device", "cpu"]  # fmt: skip
    assert best_of_n(args) == 1
    err = capsys.readouterr().err
    assert re.search(f"--reward-fn score {message}", err) and "Traceback" not in err, err
    assert not (tmp_path / "best.jsonl").exists() or "nan" not in (tmp_path / "best.jsonl").read_text().lower()


def test_best_of_n_resumes_only_the_same_prompts_and_settings(
    base: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smallm.files.destination import DestinationError
    from smallm.files.lock import Lock
    from smallm.inference.rejection import run_best_of_n

    policy, tok, options = verified_sampling(base, tmp_path, monkeypatch)
    out = tmp_path / "best.jsonl"
    run_best_of_n(policy, tok, prompts, out, 2, **options)
    with pytest.raises(DataError, match=r"other prompts or settings \(--n 2 then, 3 now\).*--force"):
        run_best_of_n(policy, tok, prompts, out, 3, **options)
    with pytest.raises(DataError, match=r"--seed 3 then, 4 now"):
        run_best_of_n(policy, tok, prompts, out, 2, **{**options, "seed": 4})
    others = tmp_path / "others.jsonl"  # as many prompts, other ones
    others.write_text(prompts.read_text().replace("1+1=?", "9+9=?"))
    with pytest.raises(DataError, match=r"its prompt 0 is not the one on .*others.jsonl:1"):
        run_best_of_n(policy, tok, others, out, 2, **options)
    with pytest.raises(ValueError, match="overlap: give each its own file"):
        run_best_of_n(policy, tok, prompts, tmp_path / "new.jsonl", 2, pairs_out=tmp_path / "new.jsonl", **options)
    busy = pytest.raises(DestinationError, match=r"in use by smallm-best-of-n \(process")
    with Lock(out, "smallm-best-of-n", directory=False), busy:  # a second run on the --out one writes
        run_best_of_n(policy, tok, prompts, out, 2, **options)
    assert run_best_of_n(policy, tok, prompts, out, 3, force=True, **options)["prompts"] == 5  # --force: start over


def test_best_of_n_refuses_an_n_that_cannot_fit_before_allocating_it(
    base: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from smallm.cli.best_of_n import main as best_of_n

    scorer = scorer_module(tmp_path, monkeypatch)
    args = [str(base), "--reward-fn", scorer, "--prompts", str(prompts), "--n", "300000", "--out",
            str(tmp_path / "best.jsonl"), "--device", "cpu"]  # fmt: skip
    assert best_of_n(args) == 1
    err = capsys.readouterr().err
    assert re.search(r"generating 300000 sequence\(s\) of up to \d+ tokens needs about [\d.]+ GiB", err), err
    assert "fewer at a time (--n, --batch-size)" in err and "Traceback" not in err
