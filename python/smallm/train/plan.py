"""The plan of a run before it starts: what ``--dry-run`` prints for every kind of run, and the dashboard's
Plan button shows.

:func:`plan_run` resolves a configuration as the run would (device, precision, sequence length, batch), reads
the base model's shape from its ``config.json`` (no weights are loaded for the estimate) and gives a
:class:`Plan`:

* the parameters trained, memory by item and the estimated peak (:func:`smallm.train.plan_memory.estimate_step`),
  FLOPs per step;
* the steps of the run (its data counted as the run would: conversations packed, pairs encoded);
* time per step and to the end on named GPUs, from their datasheet peak at :data:`ASSUMED_MFU` of it (their
  memory checked against the estimate made for the precision they would run at), and on this device from a
  short measured warm-up (:func:`measure_run`: the real trainer, a few real steps on the real data, in a
  temporary directory that is then deleted), with the peak measured there too;
* when the peak exceeds the memory to fit in (``--fit-memory``, else this device's), the settings that would
  make it fit, each with the peak it gives.

:func:`measure_run` measures the peak as the allocator saw it: on CUDA ``torch.cuda.max_memory_allocated``
over the steps; on the CPU, which keeps no such counter, the running sum of the allocations and frees the
PyTorch profiler records (``profile_memory``), from before the model is built, at its highest within a step.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from smallm.files.atomic import scratch_directory
from smallm.inference.generate import free_memory
from smallm.model.config import ModelConfig, padded_vocab
from smallm.train.config import DRY_RUN_STEP_SECONDS, DRY_RUN_STEPS, FinetuneConfig, RunConfig, TrainConfig
from smallm.train.distributed import Runtime, resolve_device
from smallm.train.jobs import TASKS, build_trainer
from smallm.train.memory import GPU_PEAKS, format_bytes, format_count, measured_peak_flops, peak_flops_for_name
from smallm.train.plan_memory import StepEstimate, StepShape, estimate_step
from smallm.train.resolve import model_config_of, resolve
from smallm.train.tasks import RunContext

__all__ = ["ASSUMED_MFU", "CUDA_CONTEXT", "PLAN_GPUS", "Measurement", "Plan", "measure_run", "plan_run", "step_shape"]

ASSUMED_MFU = 0.35
"""The share of a GPU's datasheet peak its time estimates assume (small models rarely reach more)."""
CUDA_CONTEXT = 512 * 2**20
"""What the CUDA context and the allocator's slack take besides the tensors, counted against a GPU's memory."""
PLAN_GPUS = (("T4 16GB", "T4", 16), ("RTX 4090 24GB", "RTX 4090", 24), ("L4 24GB", "L4", 24),
             ("A100 40GB", "A100", 40), ("A100 80GB", "A100", 80), ("H100 80GB", "H100 SXM", 80))  # fmt: skip
"""(label, name in :data:`smallm.train.memory.GPU_PEAKS`, memory in GB) of the GPUs every plan is sized for."""


@dataclass(frozen=True)
class Measurement:
    """What a warm-up measured: seconds per step (after the first) and the peak bytes the allocator saw."""

    seconds_per_step: float | None
    peak: int | None
    steps: int
    max_steps: int
    device: str


@dataclass
class Plan:
    """A run's plan; :meth:`text` is what ``--dry-run`` prints."""

    cfg: RunConfig
    model: ModelConfig
    shape: StepShape
    estimate: StepEstimate
    steps: int
    budget: int | None
    measured: Measurement | None = None
    requested_precision: str = "auto"  # as given: a GPU row resolves "auto" for that GPU
    suggestions: list[tuple[str, int]] = field(default_factory=list)
    not_measured: str = "not measured (--dry-run-steps 0)"  # why this device has no measured row

    @property
    def fits(self) -> bool | None:
        """Whether the estimated peak fits the memory to fit in (None where it is unknown)."""
        return None if self.budget is None else self.estimate.peak <= self.budget

    def text(self) -> str:
        """The whole plan: what is trained, the memory table, the time table and whether it fits."""
        return "\n".join([self.summary(), "", self.memory_table(), "", self.time_table(), "", self.fit_text()])

    def summary(self) -> str:
        est, shape, cfg = self.estimate, self.shape, self.cfg
        r = shape.lora_r
        what = {"full": "every weight", "lora": f"LoRA r={r}", "qlora": f"QLoRA (NF4 base), LoRA r={r}"}
        base = f" of {cfg.init_from}" if isinstance(cfg, FinetuneConfig) else ""
        tokens = shape.tokens * shape.micro_batches
        pairs = " pairs" if shape.kind in ("dpo", "rm") else ""
        lines = [
            f"plan: {cfg.command}{base}, {what[shape.mode]}, {shape.precision} on {cfg.device}"
            + (", activation checkpointing" if shape.activation_checkpointing else ""),
            f"model: {format_count(est.parameters)} parameters ({self.model.n_layer} layers, width "
            f"{self.model.n_embd}, vocab {self.model.vocab_size}); trained: {format_count(est.trained)} "
            f"({100 * est.trained / est.parameters:.2f}%)",
            f"step: {shape.batch_size}{pairs} x {shape.seq_len} tokens x {shape.micro_batches} micro-batch(es) = "
            f"{tokens:,} tokens; {self.steps:,} steps",
            f"FLOPs per step: {est.flops_per_step:.3g} run ({est.model_flops_per_step:.3g} model FLOPs)",
        ]
        return "\n".join(lines)

    def memory_table(self) -> str:
        return f"memory ({self.shape.precision}, {self.shape.optimizer}):\n{self.estimate.table()}"

    def fit_text(self) -> str:
        """Whether the peak fits the memory to fit in, and what would make it fit."""
        est, lines = self.estimate, []
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines += [f"the estimated peak {format_bytes(est.peak)} {verdict} in {format_bytes(self.budget)}"]
        if self.suggestions:
            lines.append("to fit, change (cumulatively, in this order):")
            lines += [f"  {change}: peak {format_bytes(peak)}" for change, peak in self.suggestions]
        elif self.fits is False:
            lines.append("no setting smallm can change makes it fit: a smaller model, or a device with more memory")
        lines.append("not counted: the CUDA context (~0.5 GiB), allocator fragmentation, kernel workspaces")
        return "\n".join(lines)

    def time_table(self) -> str:
        """Time per step and to the end on this device (measured) and on the named GPUs (estimated)."""
        rows = ["| device | precision | peak | fits | s / step | to the end |", "|---|---|---:|---|---:|---:|"]
        m = self.measured
        if m is not None:
            peak = "n/a" if m.peak is None else f"{format_bytes(m.peak)} measured"
            per = m.seconds_per_step
            cells = ["n/a", "n/a"] if per is None else [f"{per:.3g}", _duration(per * self.steps)]
            label = f"this machine ({m.device}), measured over {m.steps} warm-up steps"
            rows.append(f"| {label} | {self.shape.precision} | {peak} | yes | {cells[0]} | {cells[1]} |")
        else:
            rows.append(f"| this machine ({self.cfg.device}) | {self.shape.precision} | | | {self.not_measured} | |")
        model_flops = self.estimate.flops_per_step
        for label, name, gb in PLAN_GPUS:
            precision = gpu_precision(self.requested_precision, name)
            est = estimate_step(self.model, replace(self.shape, precision=precision))
            capacity = gb * 10**9 - CUDA_CONTEXT
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
            peak = peak_flops_for_name(name, dtype, tf32=True) or 0.0
            per = model_flops / (ASSUMED_MFU * peak) if peak else float("nan")
            fits = "yes" if est.peak <= capacity else "no"
            rows.append(f"| {label} | {precision} | {format_bytes(est.peak)} | {fits} | {per:.3g} | "
                        f"{_duration(per * self.steps)} |")  # fmt: skip
        return (
            f"time (GPUs: datasheet peak at {ASSUMED_MFU:.0%} utilisation; their peak memory estimated for the "
            "precision they would run at):\n" + "\n".join(rows)
        )


def gpu_precision(precision: str, name: str) -> str:
    """The precision a run set to ``precision`` trains at on the GPU ``name``: ``auto`` is bf16 where it has
    bf16 tensor cores, else fp16."""
    if precision != "auto":
        return precision
    entry = next(e for e in GPU_PEAKS if e.label == name)
    return "bf16" if entry.bf16 is not None else "fp16"


def step_shape(cfg: RunConfig, micro_batches: int) -> StepShape:
    """The :class:`StepShape` of a resolved configuration."""
    finetune = isinstance(cfg, FinetuneConfig)
    lora = finetune and cfg.lora_r > 0
    mode = ("qlora" if cfg.quantize == "nf4" else "lora") if lora else "full"
    return StepShape(
        kind=cfg.method if finetune else "pretrain", mode=mode, batch_size=cfg.batch_size, seq_len=cfg.seq_len or 1,
        micro_batches=micro_batches, precision=cfg.precision, activation_checkpointing=cfg.activation_checkpointing,
        optimizer=cfg.optimizer, lora_r=cfg.lora_r if lora else 0,
        lora_targets=tuple(cfg.lora().targets) if lora else StepShape().lora_targets,
        train_embeddings=bool(lora and cfg.lora_train_embeddings),
    )  # fmt: skip


def plan_run(cfg: RunConfig, *, measure_steps: int | None = None, budget: int | None = None) -> Plan:
    """The plan of ``cfg`` (validated, as the command line or the dashboard builds it). ``measure_steps``
    real steps run on the device for the time estimate (default: ``cfg.dry_run_steps``; when that is None,
    :data:`~smallm.train.config.DRY_RUN_STEPS` if a step is quick here), when the estimate fits the free
    memory. ``budget``: the bytes to fit in (default: ``cfg.fit_memory`` GiB, else what the device has free)."""
    device = resolve_device("auto") if cfg.device == "auto" else torch.device(cfg.device)
    requested = cfg.precision
    cfg = resolve(cfg, device)
    task = TASKS[type(cfg)](cfg) if isinstance(cfg, FinetuneConfig) else None  # reads the data once
    model = _grown(task, model_config_of(cfg))
    micro_batches = cfg.micro_batches(cfg.seq_len or 1, 1)
    shape = step_shape(cfg, micro_batches)
    estimate = estimate_step(model, shape)
    if budget is None:
        budget = int(cfg.fit_memory * 2**30) if cfg.fit_memory else free_memory(device)
    steps = measure_steps if measure_steps is not None else cfg.dry_run_steps
    why = _why_not_measured(estimate, device, steps)
    measured = measure_run(cfg, steps or DRY_RUN_STEPS) if why is None else None
    plan = Plan(cfg, model, shape, estimate, measured.max_steps if measured else count_steps(cfg, model, task),
                budget, measured, requested)  # fmt: skip
    plan.not_measured = why or plan.not_measured
    if budget is not None and estimate.peak > budget:
        plan.suggestions = suggestions(model, shape, budget)
    return plan


def _why_not_measured(estimate: StepEstimate, device: torch.device, steps: int | None) -> str | None:
    """Why the warm-up is not run (None: it is): asked not to, too little free memory, or (by default) steps
    that would take too long here (the step's FLOPs at half the CPU's measured matmul peak)."""
    if steps == 0:
        return "not measured (--dry-run-steps 0)"
    free = free_memory(device)
    if free is not None and estimate.peak > free:
        return f"not measured: the estimate exceeds the {format_bytes(free)} free here"
    if steps is None and device.type == "cpu":
        seconds = estimate.flops_per_step / (0.5 * measured_peak_flops(torch.float32))
        if seconds > DRY_RUN_STEP_SECONDS:
            return f"not measured: a step would take about {_duration(seconds)} here (--dry-run-steps N to measure)"
    return None


def suggestions(model: ModelConfig, shape: StepShape, budget: int) -> list[tuple[str, int]]:
    """Changes that bring the peak under ``budget``, applied one after another in the order that costs the
    least (checkpointing, smaller micro-batches with more of them, LoRA, QLoRA, a shorter context), each with
    the peak it gives; empty when even all of them do not fit."""
    steps: list[tuple[str, int]] = []

    def add(change: str, new: StepShape) -> StepShape:
        steps.append((change, estimate_step(model, new).peak))
        return new

    if not shape.activation_checkpointing:
        shape = add("--activation-checkpointing", replace(shape, activation_checkpointing=True))
    while estimate_step(model, shape).peak > budget and shape.batch_size > 1:
        b, n = shape.batch_size // 2, shape.micro_batches * 2
        # Pretraining keeps its --batch-tokens and takes more micro-batches by itself; fine-tuning is told how many.
        change = f"--batch-size {b}" + (" (the same --batch-tokens)" if shape.kind == "pretrain" else
                                        f" --grad-accum {n} (the same step)")  # fmt: skip
        shape = add(change, replace(shape, batch_size=b, micro_batches=n))
    if estimate_step(model, shape).peak > budget and shape.mode == "full" and shape.kind != "pretrain":
        shape = add("--lora-r 16", replace(shape, mode="lora", lora_r=16))
    if estimate_step(model, shape).peak > budget and shape.mode == "lora":
        precision = "bf16" if shape.precision == "fp32" else shape.precision
        shape = add(f"--quantize nf4 --precision {precision}", replace(shape, mode="qlora", precision=precision))
    while estimate_step(model, shape).peak > budget and shape.seq_len > 128:
        shape = add(f"--seq-len {shape.seq_len // 2} (longer examples are left out)",
                    replace(shape, seq_len=shape.seq_len // 2))  # fmt: skip
    return steps if steps and steps[-1][1] <= budget else []


def count_steps(cfg: RunConfig, model: ModelConfig, task: Any = None) -> int:
    """The optimizer steps of the run: ``max_steps``, or its epochs over the data as the task counts them
    (conversations packed into rows, pairs that fit), without building the model."""
    if isinstance(cfg, TrainConfig) or cfg.max_steps:
        return cfg.max_steps
    task = task or TASKS[type(cfg)](cfg)
    runtime = Runtime(rank=1, world_size=1, local_rank=0, device=torch.device("cpu"))  # rank 1: no log lines
    context = RunContext(runtime=runtime, vocab_size=model.vocab_size, seq_len=cfg.seq_len or 1,
                         batch_size=cfg.batch_size, seed=cfg.seed, amp_dtype=None,
                         frozen_start=lambda: lambda: nullcontext(None))  # fmt: skip
    task.attach(context)
    return task.max_steps(cfg.batch_size * cfg.micro_batches(cfg.seq_len or 1, 1))


def measure_run(cfg: RunConfig, steps: int) -> Measurement:
    """Runs ``steps`` real training steps of ``cfg`` (the real trainer and data, writing nothing: its
    ``out`` is a temporary directory, deleted after), and measures the peak memory over them and the
    seconds per step after the first (the first two are profiled on the CPU, so later ones are timed when
    there are any)."""
    device = torch.device(cfg.device)
    with scratch_directory("smallm-plan-") as tmp:
        run = replace(cfg, out=str(tmp / "run"), resume=False, force=False, dry_run=False, eval_tasks=None)
        times: list[float] = []
        with _peak_tracker(device) as tracker:
            trainer = build_trainer(run)
            for i in range(steps):
                with tracker.step(profiled=i < 2):
                    started = time.perf_counter()
                    trainer.train_step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - started)
        timed = times[2:] if len(times) > 2 else times[1:]
        per = statistics.median(timed) if timed else None
        return Measurement(per, tracker.peak(), steps, trainer.max_steps, str(device))


class _StepWindows:
    """Marks the steps of a warm-up (a profiler range on the CPU) and reads the peak over them."""

    def __init__(self, device: torch.device, profiler: Any) -> None:
        self.device, self.profiler = device, profiler

    @contextmanager
    def step(self, profiled: bool) -> Iterator[None]:
        if self.profiler is None or not profiled:
            yield
            return
        with torch.profiler.record_function("smallm.plan.step"):
            yield

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.profiler is None:
            return None
        return cpu_peak_in_steps(self.profiler, "smallm.plan.step")


@contextmanager
def _peak_tracker(device: torch.device) -> Iterator[_StepWindows]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield _StepWindows(device, None)
    elif device.type == "cpu":
        from torch.profiler import ProfilerActivity, profile

        gc.collect()  # tensors of earlier objects freed inside the window would count as negative allocations
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own log lines are of no use to a plan
        windows = _StepWindows(device, None)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            windows.profiler = prof
            yield windows
    else:
        yield _StepWindows(device, None)


def cpu_peak_in_steps(profiler: Any, marker: str) -> int | None:
    """The most CPU memory the allocator held within the profiler ranges named ``marker``: the running sum of
    the recorded allocations (positive) and frees (negative) since the profiler started."""
    events = list(profiler.profiler.kineto_results.events())
    windows = sorted((e.start_ns(), e.end_ns()) for e in events if e.name() == marker)
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and "CPU" in str(e.device_type())
    )
    live, best, w = 0, None, 0
    for at, n in memory:
        live += n
        while w < len(windows) and windows[w][1] < at:
            w += 1
        if w < len(windows) and windows[w][0] <= at:
            best = live if best is None else max(best, live)
    return best


def _grown(task: Any, model: ModelConfig) -> ModelConfig:
    """The shape a fine-tuning run (its ``task``) trains: the base's, grown to the tokenizer when ChatML's
    markers are added to its vocabulary (:mod:`smallm.train.trainable`)."""
    if task is None:
        return model
    size = task.tokenizer.vocab_size
    return replace(model, vocab_size=padded_vocab(size)) if size > model.vocab_size else model


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no peak known
        return "n/a"
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
