"""Adapting an English model to Korean, with and without a vocabulary extension, at equal training FLOPs.

The scenario of ``smallm-tokenize --extend``: a base model trained on English and code with an English-only
tokenizer stands in for an imported model; it is then trained on Korean movie reviews (with 20% English
replay) in three arms from the same weights and for the same training FLOPs:

* ``no extension``: the base tokenizer, which spells Korean in bytes;
* ``extension``: the base tokenizer extended by ``--extend`` tokens learned on the Korean training text, the
  model grown to it (new rows from the rows of the tokens that spell them), a first stage that trains only
  the new rows (``train = "new-tokens"``, EEVE's first step) and then everything;
* ``extension, no row stage``: the same extension, everything trained from the start.

FLOPs per token are ``smallm.train.memory.flops_per_token`` (the grown head costs more per token, so the
extended arms see fewer tokens). Every checkpoint is evaluated on held-out text that neither the tokenizers
nor any run saw: the last ``--heldout`` reviews of the Korean corpus and the last 50 KB of Shakespeare, in bits
per byte (comparable across tokenizers). Prints the tables, writes the curves to ``--plot``.

    python benches/korean_adaptation.py --work /tmp/ko-bench    # about 40 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import time
from pathlib import Path

import torch
from smallm.cli import eval as eval_cli
from smallm.cli import tokenize as tokenize_cli
from smallm.cli import train as train_cli
from smallm.run.load import load_model
from smallm.text.tokenizer import Tokenizer
from smallm.train.memory import flops_per_token

SEQ, ROWS, STEP_TOKENS = 256, 8, 2048
MODEL = ["--preset", "tiny", "--batch-size", str(ROWS), "--seq-len", str(SEQ), "--device", "cpu"]


def run(main, argv: list[str]) -> str:
    """Runs a smallm command in this process; its output, or SystemExit with it when it fails."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.getvalue()[-3000:]}")
    return out.getvalue()


def split_corpora(data: Path, work: Path, heldout: int) -> None:
    english = (data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = english.rfind("\n\n", 0, len(english) - 50_000)
    (work / "en_train.txt").write_text(english[:cut], encoding="utf-8")
    (work / "en_heldout.txt").write_text(english[cut + 2 :], encoding="utf-8")
    reviews = (data / "nsmc_reviews_ko.txt").read_text(encoding="utf-8").splitlines()
    (work / "ko_train.txt").write_text("\n".join(reviews[:-heldout]), encoding="utf-8")
    (work / "ko_heldout.txt").write_text("\n".join(reviews[-heldout:]), encoding="utf-8")


def toml(path: Path, settings: dict, stages: list[dict]) -> Path:
    def value(v: object) -> str:
        if isinstance(v, list):
            return "[" + ", ".join("{ " + ", ".join(f"{k} = {json.dumps(x)}" for k, x in d.items()) + " }"
                                   for d in v) + "]"  # fmt: skip
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in settings.items()]
    for stage in stages:
        lines += ["", "[[stage]]", *(f"{k} = {value(v)}" for k, v in stage.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bpb(checkpoint: Path, text: Path) -> float:
    report = run(eval_cli.main, [str(checkpoint), "--data", str(text), "--json", "--no-progress", "--device", "cpu"])
    return json.loads(report.strip().splitlines()[-1])["bits_per_byte"]


def chars_per_token(tokenizer: Tokenizer, path: Path) -> float:
    lines = path.read_text(encoding="utf-8").splitlines()
    return sum(map(len, lines)) / sum(len(ids) for ids in tokenizer.encode_ordinary_batch(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("runs/korean-adaptation"))
    p.add_argument("--vocab", type=int, default=8192, help="the base tokenizer's size")
    p.add_argument("--extend", type=int, default=4000, help="tokens the extension adds")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=400, help="the no-extension arm's steps (of 2,048 tokens)")
    p.add_argument("--row-steps", type=float, default=0.1, help="share of the extension's steps on new rows only")
    p.add_argument("--points", type=int, default=8, help="evaluations per arm")
    p.add_argument("--heldout", type=int, default=1000, help="held-out Korean reviews")
    p.add_argument("--plot", type=Path, default=Path("docs/korean_adaptation.png"))
    args = p.parse_args()
    torch.set_num_threads(2)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    split_corpora(args.data, work, args.heldout)
    w = str(work)

    # The base: English and code, an English-only tokenizer.
    run(tokenize_cli.main, [f"{w}/en_train.txt", "@stdlib", "--vocab", str(args.vocab), "--out", f"{w}/tok",
                            "--no-shards", "--quiet"])  # fmt: skip
    for name, source, mode in (("en", "en_train.txt", "paragraph"), ("code", "@stdlib", "file"),
                               ("ko", "ko_train.txt", "line")):  # fmt: skip
        path = source if source.startswith("@") else f"{w}/{source}"
        run(tokenize_cli.main, [path, "--doc-mode", mode, "--tokenizer", f"{w}/tok", "--out", f"{w}/base-data/{name}",
                                "--quiet"])  # fmt: skip
    mix = [{"path": f"{w}/base-data/en", "weight": 0.7}, {"path": f"{w}/base-data/code", "weight": 0.3}]
    settings = {"out": f"{w}/base", "max_steps": args.base_steps, "batch_tokens": STEP_TOKENS, "data": mix,
                "eval_every": 0, "checkpoint_every": args.base_steps}  # fmt: skip
    base_cfg = toml(work / "base.toml", settings, [])
    if not (work / "base" / "checkpoints").is_dir():
        run(train_cli.main, ["--config", str(base_cfg), *MODEL])

    # The extension, learned on the Korean training text; English packed with it for the replay.
    report = run(tokenize_cli.main, [f"{w}/ko_train.txt", "--doc-mode", "line", "--tokenizer", f"{w}/base",
                                     "--extend", str(args.extend), "--out", f"{w}/ext-data/ko", "--quiet"])  # fmt: skip
    run(tokenize_cli.main, [f"{w}/en_train.txt", "--doc-mode", "paragraph", "--tokenizer", f"{w}/ext-data/ko",
                            "--out", f"{w}/ext-data/en", "--quiet"])  # fmt: skip
    base_model, base_tok, _ = load_model(work / "base")
    ext_tok = Tokenizer.load(work / "ext-data" / "ko")
    grown = base_model.config.__class__(**{**vars(base_model.config), "vocab_size": -(-ext_tok.vocab_size // 64) * 64})
    fpt = {"base": flops_per_token(base_model.config, SEQ), "ext": flops_per_token(grown, SEQ)}
    ext_steps = round(args.steps * fpt["base"] / fpt["ext"])
    row_steps = max(1, round(ext_steps * args.row_steps))

    arms = {
        "no extension": ("base-data", "base", [{"name": "all", "steps": args.steps}]),
        "extension": ("ext-data", "ext", [{"name": "new-rows", "steps": row_steps, "train": "new-tokens"},
                                          {"name": "all", "steps": ext_steps - row_steps}]),
        "extension, no row stage": ("ext-data", "ext", [{"name": "all", "steps": ext_steps}]),
    }  # fmt: skip
    curves: dict[str, list[tuple[float, float, float]]] = {}
    base_point = (0.0, bpb(work / "base", work / "ko_heldout.txt"), bpb(work / "base", work / "en_heldout.txt"))
    for arm, (data, kind, stages) in arms.items():
        out = work / arm.replace(", ", "-").replace(" ", "-")
        steps = sum(s["steps"] for s in stages)
        mixture = [{"path": f"{w}/{data}/ko", "weight": 0.8}, {"path": f"{w}/{data}/en", "weight": 0.2}]
        for stage in stages:
            stage.update(batch_tokens=STEP_TOKENS, data=mixture)
        stages[-1]["lr"] = "decay"
        cfg = toml(work / f"{out.name}.toml", {"out": str(out), "init_from": f"{w}/base", "eval_every": 0,
                                              "checkpoint_every": max(1, steps // args.points), "keep_last": 100},
                   stages)  # fmt: skip
        if not (out / "checkpoints").is_dir():
            run(train_cli.main, ["--config", str(cfg), *MODEL])
        curves[arm] = []
        for checkpoint in sorted((out / "checkpoints").glob("step_*")):
            step = int(checkpoint.name.split("_")[-1])
            flops = step * STEP_TOKENS * fpt[kind]
            ko, en = bpb(checkpoint, work / "ko_heldout.txt"), bpb(checkpoint, work / "en_heldout.txt")
            curves[arm].append((flops, ko, en))
        print(f"{arm}: {steps} steps done ({time.perf_counter() - started:.0f} s so far)", flush=True)

    heldout = work / "ko_heldout.txt"
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; base: tiny preset, "
          f"{args.base_steps} steps of {STEP_TOKENS} tokens on English and code, vocabulary {base_tok.vocab_size}; "
          f"{report.strip().splitlines()[1] if len(report.splitlines()) > 1 else ''}\n")  # fmt: skip
    print("| tokenizer | vocabulary | Korean chars/token (held-out) | English chars/token (held-out) |")
    print("|---|---|---|---|")
    for name, tok in (("base", base_tok), ("extended", ext_tok)):
        ko, en = chars_per_token(tok, heldout), chars_per_token(tok, work / "en_heldout.txt")
        print(f"| {name} | {tok.vocab_size} | {ko:.3f} | {en:.3f} |")
    print(f"\nadaptation: {args.steps} steps of {STEP_TOKENS} tokens without the extension; {ext_steps} with it "
          f"({row_steps} of them on the new rows only), the same {args.steps * STEP_TOKENS * fpt['base']:.3g} "
          "training FLOPs; Korean 0.8 / English 0.2\n")  # fmt: skip
    print("| arm | tokens | training FLOPs | Korean bpb (held-out) | English bpb (held-out) | Korean vs no extension |")
    print("|---|---|---|---|---|---|")
    print(f"| base, before adaptation | 0 | 0 | {base_point[1]:.4f} | {base_point[2]:.4f} | |")
    reference = curves["no extension"][-1][1]
    for arm, points in curves.items():
        tokens = (args.steps if arm == "no extension" else ext_steps) * STEP_TOKENS
        flops, ko, en = points[-1]
        print(f"| {arm} | {tokens:,} | {flops:.3g} | {ko:.4f} | {en:.4f} | {ko / reference:.3f}x |")
    print("\ncurves (training FLOPs, Korean bpb, English bpb):")
    for arm, points in curves.items():
        print(f"  {arm}: " + "; ".join(f"{f:.3g} {k:.4f} {e:.4f}" for f, k, e in points))
    plot(curves, base_point, args.plot)
    print(f"\nplot: {args.plot}; {time.perf_counter() - started:.0f} s in all")


def plot(curves: dict[str, list[tuple[float, float, float]]], base: tuple[float, float, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, points in curves.items():
        flops = [f for f, _, _ in points]
        axes[0].plot(flops, [k for _, k, _ in points], marker="o", label=arm)
        axes[1].plot(flops, [e for _, _, e in points], marker="o", label=arm)
    for ax, start, what in zip(axes, base[1:], ("Korean (held-out reviews)", "English (held-out Shakespeare)")):
        top = max(v for points in curves.values() for v in (p[1 if ax is axes[0] else 2] for p in points))
        if start < 1.5 * top:  # off the scale (a base that never saw Korean): said in the title instead
            ax.axhline(start, color="grey", linestyle="--", linewidth=1, label="the base, before adaptation")
        else:
            what += f"; the base: {start:.2f}"
        ax.set_xlabel("adaptation training FLOPs")
        ax.set_ylabel("bits per byte")
        ax.set_title(what)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
