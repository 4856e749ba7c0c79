"""lm-evaluation-harness on smallm: seconds per task item of smallm's model class against lm-eval's own ``hf``
model on the transformers export of the same run, and what ``--eval-tasks`` costs a training run.

1. The README demo's shape (the ``tiny`` preset over an 8,192-token tokenizer trained on Shakespeare), briefly
   trained, exported with ``smallm-export``; three tasks over local JSON Lines files built from Shakespeare
   (multiple choice with four endings, rolling log-likelihood of passages, greedy generation of 32 tokens),
   each run by both classes in one process (batch 16, fp32, the same items): seconds per item and the ratio,
   and whether the scores agree.
2. The demo run (``smallm-train`` on the built-in corpus, ``--max-steps``) with and without ``--eval-tasks``
   on the multiple-choice task at every validation: seconds per evaluation and its share of the run.

    python benches/lm_eval_speed.py --work /tmp/lm-eval-bench
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import random
import time
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from smallm.cli import train as train_cli
from smallm.inference.harness import SmallmLM, evaluate_tasks, task_manager
from smallm.interop.hf_export import export_hf
from smallm.run.layout import read_metrics
from smallm.run.load import load_model

TASKS = {"mc": "bench_mc", "rolling": "bench_rolling", "gen": "bench_gen"}


def write_tasks(folder: Path, lines: list[str], items: int) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    long = [line for line in lines if len(line.split()) >= 6]
    mc = []
    for _ in range(items):
        line = rng.choice(long).split()
        cut = len(line) // 2
        right = " " + " ".join(line[cut:])
        wrong = [" " + " ".join(rng.choice(long).split()[cut:]) for _ in range(3)]
        choices = [right, *wrong]
        rng.shuffle(choices)
        mc.append({"q": " ".join(line[:cut]), "choices": choices, "answer": choices.index(right)})
    start = [rng.randrange(len(lines) - 40) for _ in range(items // 4)]
    docs = [{"text": "\n".join(lines[s : s + 40])} for s in start]
    gen = [{"prompt": "\n".join(lines[s : s + 4]) + "\n", "answer": lines[s + 4]} for s in start]
    for name, rows in (("mc", mc), ("rolling", docs), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    head = "dataset_path: json\ntest_split: train\nmetadata:\n  version: 1.0\ndataset_kwargs:\n  data_files:\n"
    (folder / "mc.yaml").write_text(
        f"task: bench_mc\n{head}    train: {folder / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n"
        "  - metric: acc\n",
        encoding="utf-8",
    )
    (folder / "rolling.yaml").write_text(
        f"task: bench_rolling\n{head}    train: {folder / 'rolling.jsonl'}\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n",
        encoding="utf-8",
    )
    (folder / "gen.yaml").write_text(
        f"task: bench_gen\n{head}    train: {folder / 'gen.jsonl'}\noutput_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n\\n']\n"
        "  max_gen_toks: 32\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
        encoding="utf-8",
    )


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/lm-eval-bench"))
    p.add_argument("--items", type=int, default=200, help="multiple-choice items (a quarter as many of the others)")
    p.add_argument("--max-steps", type=int, default=300, help="steps of the demo run")
    p.add_argument("--eval-every", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(2)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    lines = [x for x in (args.data / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    write_tasks(work / "tasks", lines, args.items)

    # 1. One run, both classes.
    run = work / "run"
    if not (run / "checkpoints").is_dir():
        quiet(train_cli.main, ["--out", str(run), "--max-steps", "60", "--eval-every", "0",
                               "--device", "cpu"])  # fmt: skip
    if not (work / "hf").is_dir():
        quiet(export_hf, run, work / "hf")
    model, tokenizer, _ = load_model(run)
    manager = task_manager(list(TASKS.values()), [work / "tasks"])
    size = f"{model.num_parameters() / 1e6:.1f}M parameters"
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; the demo's shape ({size}), batch 16, fp32\n")  # fmt: skip
    print("| task | items | smallm s/item | lm-eval hf s/item | hf / smallm | scores agree |")
    print("|---|---|---|---|---|---|")
    for kind, task in TASKS.items():
        start = time.perf_counter()
        ours = quiet(evaluate_tasks, SmallmLM(model, tokenizer, batch_size=16), [task], include_path=[work / "tasks"])
        mine = time.perf_counter() - start
        start = time.perf_counter()
        theirs = quiet(
            simple_evaluate, model="hf", model_args={"pretrained": str(work / "hf"), "dtype": "float32",
            "device": "cpu"}, tasks=[task], task_manager=manager, batch_size=16, bootstrap_iters=0,
            random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
        )  # fmt: skip
        other = time.perf_counter() - start
        n = ours["n-samples"][task]["effective"]
        metric = {"mc": "acc,none", "rolling": "bits_per_byte,none", "gen": "exact_match,none"}[kind]
        a, b = ours["results"][task][metric], theirs["results"][task][metric]
        agree = abs(a - b) <= 1e-4 * max(1.0, abs(b))
        print(f"| {task} ({metric.split(',')[0]} {a:.4f} / {b:.4f}) | {n} | {mine / n:.4f} | {other / n:.4f} | "
              f"{other / mine:.2f}x | {agree} |")  # fmt: skip

    # 2. The demo run with and without tasks at each validation.
    times = {}
    for name, extra in (("without", []), ("with", ["--eval-tasks", TASKS["mc"], "--eval-include-path",
                                                   str(work / "tasks")])):  # fmt: skip
        out = work / f"demo-{name}"
        start = time.perf_counter()
        quiet(train_cli.main, ["--out", str(out), "--max-steps", str(args.max_steps), "--eval-every",
                               str(args.eval_every), "--device", "cpu", "--force", *extra])  # fmt: skip
        times[name] = time.perf_counter() - start
    evals = [m["task/seconds"] for m in read_metrics(work / "demo-with") if "task/seconds" in m]
    print(f"\nthe demo run ({args.max_steps} steps, validation every {args.eval_every}): {times['without']:.0f} s "
          f"without --eval-tasks, {times['with']:.0f} s with {TASKS['mc']} ({args.items} items) at each of "
          f"{len(evals)} validations: {sum(evals) / len(evals):.1f} s per evaluation, "
          f"{100 * sum(evals) / times['with']:.1f}% of the run")  # fmt: skip


if __name__ == "__main__":
    main()
