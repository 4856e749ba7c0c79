"""The README's tour, run as written: every command its ``bash`` blocks show, in a shell, with only size flags
added (fewer steps, shorter rows, smaller batches), on a tiny corpus and tiny models made here.

Each README command belongs to one scene (commands that follow one another in the README share a sandbox and
run in order) or is skipped for a stated reason (installing, benchmarks, the network); a README command in
neither fails :func:`test_every_readme_command_is_in_the_tour`, so the README cannot show a command that no
test has run. A command passes when it exits 0 without a traceback (``smallm-push``, which needs the network,
must instead fail with its one-line offline message).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from sample_text import CODE, ENGLISH, KOREAN
from smallm import Tokenizer
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.write import write_run

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

SIZE_FLAGS = {
    "smallm-train": ["--preset", "tiny", "--max-steps", "2", "--batch-size", "2", "--seq-len", "32",
                     "--batch-tokens", "64", "--eval-every", "0", "--sample-tokens", "4", "--device", "cpu"],
    "smallm-sft": ["--max-steps", "2", "--batch-size", "2", "--seq-len", "64", "--eval-every", "0",
                   "--sample-tokens", "4", "--device", "cpu"],
    "smallm-generate": ["--max-new-tokens", "8", "--prompt-tokens", "16", "--repeats", "1", "--device", "cpu"],
    "smallm-chat": ["--max-new-tokens", "8", "--device", "cpu"],
    "smallm-eval": ["--device", "cpu", "--no-progress"],
    "smallm-score": ["--device", "cpu"],
    "smallm-best-of-n": ["--n", "2", "--max-new-tokens", "4", "--device", "cpu"],
}  # fmt: skip
SIZE_FLAGS["smallm-dpo"] = SIZE_FLAGS["smallm-rm"] = SIZE_FLAGS["smallm-sft"]

SKIPPED = {
    "pip install .": "installing is what CI does before the tests run",
    'pip install ".[test]" && python -m pytest': "the test suite itself",
    'pip install ".[finetune]"': "an install (CI installs every extra the tour needs)",
    'pip install ".[notebook]"': "an install (CI installs every extra the tour needs)",
    'pip install ".[bench]"': "an install, for the benchmarks",
    'pip install ".[eval]"': "an install (CI installs every extra the tour needs)",
    "smallm-eval runs/124m --tasks smallm_core --limit 500": "its tasks' data comes from the Hub, unreachable here",
    "cargo bench": "a benchmark (minutes; not a test)",
}
SKIPPED_PATTERN = re.compile(r"python benches/\w+\.py( --[\w-]+ \S+)*")
"""The benchmarks: minutes each, and measurements rather than checks."""


def readme_commands() -> list[str]:
    """Every command line of the README's ``bash`` blocks, as written, without its trailing comment."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line.strip())
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


# ----- what the scenes start from ---------------------------------------------------------------------


@dataclass
class Assets:
    """Made once: a tokenizer, shards packed with it, tiny models, an instruct model in transformers' layout."""

    root: Path
    tokenizer: Path
    shards: Path
    mixture: dict[str, Path]
    base: Path
    instruct: Path
    qwen_tokenizer: Path
    hub_cache: Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer, corpus_docs: list[str]) -> Assets:
    from smallm.cli.export import main as export
    from smallm.cli.tokenize import main as tokenize
    from test_imported_models import LLAMA3_TEMPLATE, ids_of, llama3_tokenizer, random_model, write_folder

    root = tmp_path_factory.mktemp("assets")
    tok.save(root / "tokenizer")
    write_corpus(root / "corpus", corpus_docs)
    assert tokenize([str(root / "corpus"), "--tokenizer", str(root / "tokenizer"), "--out", str(root / "shards"),
                     "--quiet"]) == 0  # fmt: skip
    mixture = {}
    for name, lines in (("en", ENGLISH), ("ko", KOREAN), ("code", [c.replace("\n", " ") for c in CODE])):
        source = root / f"text-{name}.txt"
        source.write_text("\n".join(f"{line} {i}" for i in range(30) for line in lines), encoding="utf-8")
        mixture[name] = root / f"data-{name}"
        assert tokenize([str(source), "--doc-mode", "line", "--tokenizer", str(root / "tokenizer"), "--val-fraction",
                         "0.2", "--out", str(mixture[name]), "--quiet"]) == 0  # fmt: skip
    config = ModelConfig(vocab_size=1216, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, max_seq_len=128)
    torch.manual_seed(0)
    base = write_run(root / "base", SmallLM(config), tok, {"train": {}, "model": dataclasses.asdict(config)})
    doc = llama3_tokenizer()
    generation = {"eos_token_id": [ids_of(doc, "<|end_of_text|>"), ids_of(doc, "<|eot_id|>")]}
    settings = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    instruct = write_folder(root / "instruct", doc, settings, generation)
    random_model(instruct, -(-(len(doc["model"]["vocab"]) + len(doc["added_tokens"])) // 64) * 64)
    qwen = qwen_tokenizer_folder(root / "qwen")
    assert export([str(base), "--out", str(root / "smol")]) == 0
    cache = root / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    shutil.copytree(root / "smol", cache / "snapshots" / ("0" * 40))
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0" * 40)
    return Assets(root, root / "tokenizer", root / "shards", mixture, base, instruct, qwen, root / "hub")


def write_corpus(folder: Path, docs: list[str]) -> None:
    folder.mkdir()
    for i, doc in enumerate(docs[:60]):
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")


def qwen_tokenizer_folder(folder: Path) -> Path:
    from test_foreign_tokenizers import qwen_style

    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(qwen_style()), encoding="utf-8")
    config = {"tokenizer_class": "Qwen2TokenizerFast", "eos_token": "<|im_end|>", "bos_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def chats(path: Path, n: int = 16) -> None:
    records = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                             {"role": "assistant", "content": f"{2 * a}."}]} for a in range(1, n + 1)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def pairs(path: Path, n: int = 16) -> None:
    records = [{"prompt": f"What is {a} plus {a}?", "chosen": f"{2 * a}.", "rejected": f"{2 * a + 1}."}
               for a in range(1, n + 1)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def small_toml(source: Path, target: Path, data: dict[str, str] | None = None) -> None:
    """An example config of the repository at the tour's size: every stage 2 steps of 64 tokens, rows of 32."""
    import tomllib

    config = tomllib.loads(source.read_text(encoding="utf-8"))
    config.update(batch_size=2, seq_len=32, eval_every=2, checkpoint_every=2, warmup_steps=1)
    if "max_steps" in config:
        config.update(max_steps=4, batch_tokens=64)
    for stage in config.get("stage", []):
        stage.update(steps=2, batch_tokens=64 * (2 if stage.get("lr") == "decay" else 1))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(toml_text(config), encoding="utf-8")


def toml_text(config: dict) -> str:
    def value(v: object) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in config.items() if k != "stage"]
    for stage in config.get("stage", []):
        lines += ["", "[[stage]]", *(f"{k} = {value(v)}" for k, v in stage.items())]
    return "\n".join(lines) + "\n"


# ----- the scenes ---------------------------------------------------------------------------------------


@dataclass
class Scene:
    name: str
    commands: list[str]
    setup: Callable[[Path, Assets], None] = lambda sandbox, assets: None
    env: Callable[[Path, Assets], dict[str, str]] = lambda sandbox, assets: {}
    fails: dict[str, str] = field(default_factory=dict)
    """Commands that must fail, and what their one-line message says."""
    script: bool = False
    """Run the commands as one shell script (they share shell variables)."""
    needs_shared: bool = False


def copy(assets_path: Callable[[Assets], Path], *targets: str) -> Callable[[Path, Assets], None]:
    def setup(sandbox: Path, assets: Assets) -> None:
        for target in targets:
            (sandbox / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(assets_path(assets), sandbox / target)

    return setup


def with_corpus(sandbox: Path, assets: Assets) -> None:
    shutil.copytree(assets.root / "corpus", sandbox / "corpus")
    (sandbox / "more").mkdir()
    for i, line in enumerate(ENGLISH[:4]):
        (sandbox / "more" / f"part{i}.txt").write_text(line * 20, encoding="utf-8")
    (sandbox / "new.txt").write_text("\n".join(ENGLISH), encoding="utf-8")
    (sandbox / "reviews.txt").write_text("\n".join(KOREAN * 5), encoding="utf-8")
    with gzip.open(sandbox / "docs.jsonl.gz", "wt", encoding="utf-8") as file:
        file.writelines(json.dumps({"body": doc, "id": i}) + "\n" for i, doc in enumerate(ENGLISH * 3))
    (sandbox / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in KOREAN * 3), encoding="utf-8")
    shutil.copytree(assets.qwen_tokenizer, sandbox / "path" / "to" / "qwen")


def cleaning(sandbox: Path, assets: Assets) -> None:
    """Two crawls of long documents with copies and near copies, Korean reviews with repeats, a filter."""
    words = " ".join(ENGLISH).split()
    pages = [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 3)]
    for name, part in (("crawl", pages[: len(pages) // 2]), ("crawl2", pages[len(pages) // 4 :])):
        (sandbox / name).mkdir()
        for i, page in enumerate([*part, *part[:3], *(p.replace(" the ", " a ", 1) for p in part[3:6])]):
            (sandbox / name / f"page{i}.txt").write_text(page, encoding="utf-8")
    (sandbox / "reviews.txt").write_text("\n".join(KOREAN * 5), encoding="utf-8")
    (sandbox / "my_filters.py").write_text("def keep(text):\n    return 'http' not in text\n", encoding="utf-8")


def pretraining(sandbox: Path, assets: Assets) -> None:
    shutil.copytree(assets.shards, sandbox / "data")
    (sandbox / "run.toml").write_text('data = "data/"\nout = "runs/from-toml"\npreset = "tiny"\n', encoding="utf-8")


def mixtures(sandbox: Path, assets: Assets) -> None:
    for name, path in assets.mixture.items():
        shutil.copytree(path, sandbox / "data" / name)
    for example in ("tinyllama_stages.toml", "one_stage.toml"):
        small_toml(REPO / "examples" / example, sandbox / "examples" / example)


def shared_corpora(sandbox: Path, assets: Assets) -> None:
    (sandbox.parent / "shared").mkdir(exist_ok=True)
    if not (sandbox.parent / "shared" / "data").exists():
        (sandbox.parent / "shared" / "data").symlink_to(REPO.parent / "shared" / "data")
    for example in ("tinyllama_stages.toml", "one_stage.toml"):
        small_toml(REPO / "examples" / example, sandbox / "examples" / example)


def fine_tuning(sandbox: Path, assets: Assets) -> None:
    for run in ("runs/124m", "runs/1b", "runs/sft", "runs/chat"):
        copy(lambda a: a.base, run)(sandbox, assets)
    chats(sandbox / "chats.jsonl")
    pairs(sandbox / "pairs.jsonl")
    (sandbox / "replies.jsonl").write_text(
        "".join(json.dumps({"prompt": f"What is {a} plus {a}?", "reply": f"{2 * a}."}) + "\n" for a in range(1, 6)),
        encoding="utf-8",
    )
    (sandbox / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"What is {a} plus {a}?", "answer": f"{2 * a}."}) + "\n" for a in range(1, 6)),
        encoding="utf-8",
    )
    (sandbox / "checks.py").write_text(
        "def exact(record, reply):\n    return float(reply.strip() == record['answer'])\n"
    )


def imported_instruct(sandbox: Path, assets: Assets) -> None:
    shutil.copytree(assets.instruct, sandbox / "path" / "to" / "Llama-3.2-1B-Instruct")
    shutil.copytree(assets.instruct, sandbox / "path" / "to" / "llama")
    (sandbox / "corpus_ko").mkdir()
    for i, line in enumerate(KOREAN):
        (sandbox / "corpus_ko" / f"review{i}.txt").write_text(line * 10, encoding="utf-8")
    chats(sandbox / "chats.jsonl")


def korean_adaptation(sandbox: Path, assets: Assets) -> None:
    from test_vocab_extension import korean_corpus

    copy(lambda a: a.base, "runs/en")(sandbox, assets)
    for name, lines in (("corpus_ko", korean_corpus(300, 0)), ("corpus_en", ENGLISH * 10)):
        (sandbox / name).mkdir()
        for i in range(3):
            (sandbox / name / f"part{i}.txt").write_text("\n".join(lines[i::3]), encoding="utf-8")
    small_toml(REPO / "examples" / "korean_adaptation.toml", sandbox / "examples" / "korean_adaptation.toml")


def benchmark_tasks(sandbox: Path, assets: Assets) -> None:
    copy(lambda a: a.base, "runs/124m")(sandbox, assets)
    shutil.copytree(assets.shards, sandbox / "data")
    shutil.copytree(assets.root / "corpus", sandbox / "corpus")
    rows = [f"{i}\t{KOREAN[i % len(KOREAN)]}\t{i % 2}\n" for i in range(16)]
    for name, part in (("ratings_train.txt", rows[:8]), ("ratings_test.txt", rows[8:])):
        (sandbox / name).write_text("id\tdocument\tlabel\n" + "".join(part), encoding="utf-8")
    (sandbox / "my_tasks").mkdir()
    items = [{"q": line.rsplit(" ", 1)[0], "choices": [" " + line.rsplit(" ", 1)[1], " banana"], "answer": 0}
             for line in ENGLISH]  # fmt: skip
    (sandbox / "my_tasks" / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    (sandbox / "my_tasks" / "my_task.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: my_tasks/mc.jsonl\n"
        "test_split: train\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )


def generation_and_export(sandbox: Path, assets: Assets) -> None:
    fine_tuning(sandbox, assets)
    shutil.copytree(assets.shards, sandbox / "data")
    shutil.copytree(assets.instruct, sandbox / "path" / "to" / "llama")


def hub_env(sandbox: Path, assets: Assets) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(assets.hub_cache), "SMALLM_CACHE": str(sandbox / "smallm-cache")}


SCENES = [
    Scene("the demo", ["smallm-train"]),
    Scene("tokenize a corpus, then reuse its tokenizer", [
        "smallm-tokenize corpus/ more/*.txt --vocab 32000 --out data/",
        "smallm-tokenize new.txt --tokenizer data/ --out data2/",
    ], with_corpus),
    Scene("tokenize lines", ["smallm-tokenize reviews.txt --doc-mode line --out data/"], with_corpus),
    Scene("tokenize JSON Lines", ["smallm-tokenize docs.jsonl.gz --text-field body --out data/"], with_corpus),
    Scene("tokenize a dataset",
          ["HF_HUB_OFFLINE=1 smallm-tokenize --hf-dataset json --hf-data-files a.jsonl --out data/"], with_corpus),
    Scene("tokenizer only", ["smallm-tokenize corpus/ --vocab 32000 --out tok/ --no-shards"], with_corpus),
    Scene("tokenizer only, GPT-2's pattern",
          ["smallm-tokenize corpus/ --pattern gpt2 --special-tokens '<|endoftext|>' --out tok/ --no-shards"],
          with_corpus),
    Scene("a tokenizer trained elsewhere", ["smallm-tokenize corpus/ --tokenizer path/to/qwen/ --out data/"],
          with_corpus),
    Scene("cleaning while packing", [
        "smallm-tokenize crawl/ --vocab 32000 --out data/ --dedup near --quality gopher",
        "smallm-tokenize reviews.txt --doc-mode line --tokenizer data/ --out ko/ --dedup near --near-shingle chars:5 "
        "--min-script hangul:0.5",
        "smallm-tokenize crawl2/ --tokenizer data/ --out data2/ --dedup near --dedup-against data/",
        "smallm-tokenize crawl/ --dedup near --quality gopher --dry-run-filters",
        "smallm-tokenize crawl/ --tokenizer data/ --out data3/ --filter my_filters:keep",
    ], cleaning),
    Scene("pretraining", [
        "smallm-train --data data/ --out runs/124m --preset 124m --max-steps 5000",
        "smallm-train --data data/ --out runs/124m --resume",
        "smallm-train --config run.toml --lr 1e-3 --model-n-layer 8",
        "smallm-train --data data/ --preset tinyllama-1.1b --dry-run",
        "torchrun --nproc_per_node 8 -m smallm.cli.train --data data/ --preset 350m",
    ], pretraining),
    Scene("mixtures and stages", [
        "smallm-train --data data/ko:0.6 --data data/en:0.3 --data data/code:0.1 --out runs/mix",
        "smallm-train --config examples/tinyllama_stages.toml",
        "smallm-eval runs/mix --data data/ko data/en data/code",
    ], mixtures),
    Scene("the stages on the shared corpora", [
        "D=../shared/data",
        "smallm-tokenize $D/tinyshakespeare.txt $D/nsmc_reviews_ko.txt @stdlib --vocab 8192 --out data/tok --no-shards",
        "smallm-tokenize $D/tinyshakespeare.txt --doc-mode paragraph --val-fraction 0.05 --tokenizer data/tok "
        "--out data/en",
        "smallm-tokenize $D/nsmc_reviews_ko.txt --doc-mode line --tokenizer data/tok --out data/ko",
        "smallm-tokenize @stdlib --tokenizer data/tok --out data/code",
        "smallm-train --config examples/tinyllama_stages.toml && smallm-train --config examples/one_stage.toml",
    ], shared_corpora, script=True, needs_shared=True),
    Scene("fine-tuning", [
        "smallm-sft runs/124m --data chats.jsonl --out runs/124m-sft",
        "smallm-sft runs/124m --data chats.jsonl --out runs/124m-lora --lora-r 16 --lora-targets all-linear",
        "smallm-sft runs/1b --data chats.jsonl --out runs/1b-qlora --lora-r 16 --quantize nf4 --precision bf16",
        "smallm-dpo runs/124m-sft --data pairs.jsonl --out runs/124m-dpo --beta 0.1",
        "smallm-merge runs/124m-lora --out runs/124m-merged",
        "smallm-sft runs/1b --data chats.jsonl --lora-r 16 --quantize nf4 --dry-run --fit-memory 8",
    ], fine_tuning),
    Scene("reward models and rejection sampling", [
        "smallm-rm runs/sft --data pairs.jsonl --out runs/rm",
        "smallm-score runs/rm --data replies.jsonl",
        "smallm-best-of-n runs/sft --reward runs/rm --prompts prompts.jsonl --n 8 --out best.jsonl "
        "--pairs best_pairs.jsonl",
        "smallm-best-of-n runs/sft --reward-fn checks:exact --prompts prompts.jsonl --n 8 --out best.jsonl",
        "smallm-sft runs/sft --data best.jsonl --out runs/sft2",
    ], fine_tuning),
    Scene("adapting an imported instruct model", [
        "smallm-import path/to/Llama-3.2-1B-Instruct --out runs/llama",
        "smallm-tokenize corpus_ko/ --tokenizer runs/llama --out data/ko",
        "smallm-train --init-from runs/llama --data data/ko --out runs/llama-ko --max-steps 2000",
        "smallm-sft runs/llama --data chats.jsonl --out runs/llama-qlora --lora-r 16 --quantize nf4",
        "smallm-chat runs/llama-qlora",
    ], imported_instruct),
    Scene("adapting a model to Korean", [
        "smallm-tokenize corpus_ko/ --doc-mode line --tokenizer runs/en --extend 4000 --out data/ko-ext",
        "smallm-tokenize corpus_en/ --tokenizer data/ko-ext --out data/en-ext",
        "smallm-train --config examples/korean_adaptation.toml",
        "smallm-export runs/ko-adapted --format gguf --out ko.gguf",
    ], korean_adaptation),
    Scene("benchmark tasks", [
        "smallm-eval runs/124m --tasks nsmc --num-fewshot 5",
        "smallm-eval runs/124m --tasks my_task --include-path my_tasks/ --data data/",
        "smallm-train --data data/ --eval-tasks my_task --eval-include-path my_tasks/ --eval-limit 200",
        "smallm-tokenize corpus/ --tokenizer runs/124m --out tok-report/ --no-shards --report",
    ], benchmark_tasks),
    Scene("generating, chatting, evaluating, exporting", [
        'smallm-generate runs/124m --prompt "def fibonacci(" --temperature 0.8 --top-p 0.95 --max-new-tokens 200',
        "smallm-generate runs/124m --benchmark",
        'smallm-chat runs/chat --system "You are helpful."',
        "smallm-eval runs/124m --data data/ --json",
        "smallm-export runs/124m --out hf/124m",
        "smallm-export runs/124m --format gguf --out gguf/124m.gguf --dtype q4_k_m",
        "smallm-chat HuggingFaceTB/SmolLM2-135M-Instruct",
        "smallm-import path/to/llama --out runs/imported",
        "smallm-push hf/124m --repo-id you/smallm-124m",
    ], generation_and_export, hub_env, fails={"smallm-push hf/124m --repo-id you/smallm-124m": "offline"}),
]  # fmt: skip


def test_every_readme_command_is_in_the_tour() -> None:
    toured = [command for scene in SCENES for command in scene.commands]
    missing = [
        c for c in readme_commands() if c not in toured and c not in SKIPPED and not SKIPPED_PATTERN.fullmatch(c)
    ]
    assert missing == [], "README commands that no test runs: add them to a scene of tests/test_readme_tour.py"
    stale = [c for c in toured if c not in readme_commands()]
    assert stale == [], "tour commands the README no longer shows"


def sized(command: str) -> str:
    """``command`` with the size flags of each program it runs appended (``&&`` chains too)."""
    parts = []
    for part in command.split(" && "):
        words = shlex.split(part)
        program = next((w for w in words if "=" not in w), "")
        flags = [] if "--dry-run" in words else SIZE_FLAGS.get(program, [])
        if program == "torchrun":  # two processes here, each a row of the step's 128 tokens
            part = part.replace("--nproc_per_node 8", "--nproc_per_node 2")
            flags = [*SIZE_FLAGS["smallm-train"], "--batch-tokens", "128"]
        parts.append(" ".join([part, *map(shlex.quote, flags)]))
    return " && ".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("scene", SCENES, ids=[s.name for s in SCENES])
def test_the_readme_tour_runs_as_written(scene: Scene, assets: Assets, tmp_path: Path) -> None:
    if scene.needs_shared and not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("needs ../shared/data (the shared corpora), absent here")
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    scene.setup(sandbox, assets)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **scene.env(sandbox, assets)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    commands = ["\n".join(map(sized, scene.commands))] if scene.script else [sized(c) for c in scene.commands]
    for command, shown in zip(commands, ["the script"] if scene.script else scene.commands):
        done = subprocess.run(
            ["bash", "-c", command], cwd=sandbox, env=env, input="Hello!\n", capture_output=True, text=True,
            timeout=900,
        )  # fmt: skip
        output = done.stdout + done.stderr
        if shown in scene.fails:
            assert done.returncode == 1 and scene.fails[shown] in done.stderr, f"{shown}:\n{output}"
        else:
            assert done.returncode == 0, f"{shown} exited {done.returncode}:\n{output[-3000:]}"
        assert "Traceback" not in output, f"{shown}:\n{output[-3000:]}"
