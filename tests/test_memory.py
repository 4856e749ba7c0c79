"""Run planning (:mod:`smallm.train.memory`): parameter and FLOP counts equal the model's own, the activation
estimate equals the tensors autograd really saves on a tiny CPU model, the memory estimate scales as
documented, and the peak-FLOP/s table maps device names to the datasheet numbers.

Every model here is tiny (2 layers, width 64) and runs on the CPU; larger configs are built on the
meta device, which allocates nothing.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from smallm.model.config import PRESETS, ModelConfig  # noqa: E402
from smallm.model.lm import SmallLM  # noqa: E402
from smallm.train.memory import (  # noqa: E402
    MemoryEstimate,
    describe_run,
    estimate_training_memory,
    flops_per_token,
    format_estimate,
    layer_activation_bytes,
    matmul_weight_count,
    mfu,
    parameter_count,
    peak_flops,
    peak_flops_for_name,
    warn_unknown_device,
)

# No activation of a B x T = 120-token batch has a 2-D shape equal to a weight's (97, 64, 32, 160),
# so the weight copies autocast saves can be told apart from activations by shape.
VOCAB, BATCH, SEQ = 97, 3, 40


def tiny_config(**overrides: object) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=160, max_seq_len=64)
    return ModelConfig(**{**fields, **overrides})


def estimate(config: ModelConfig, **overrides: object) -> MemoryEstimate:
    args = dict(batch_size=8, seq_len=64, precision="bf16", activation_checkpointing=False)
    args.update(overrides)
    batch_size, seq_len = args.pop("batch_size"), args.pop("seq_len")
    return estimate_training_memory(config, batch_size, seq_len, **args)


# ----- counts agree with the model ----------------------------------------------------------------

CONFIGS = {
    "gqa-tied": dict(),
    "mha-untied": dict(n_kv_head=4, tie_embeddings=False),
    "mqa-untied-default-mlp": dict(n_kv_head=1, tie_embeddings=False, intermediate_size=None),
    "wide-heads-3-layers": dict(n_layer=3, n_embd=96, n_head=3, n_kv_head=3, vocab_size=1000),
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_parameter_count_equals_the_models(overrides: dict) -> None:
    config = tiny_config(**overrides)
    model = SmallLM(config)
    assert parameter_count(config) == model.num_parameters()
    assert parameter_count(config, exclude_embeddings=True) == model.num_parameters(exclude_embeddings=True)


def counted_flops_per_token(model: SmallLM, seq_len: int) -> int:
    """6 x the weights of the linear layers the model really holds (lm_head even when tied) + attention."""
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6 * matmul_weights + 12 * model.config.n_layer * model.config.n_embd * seq_len


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_flops_per_token_counts_the_models_matmuls(overrides: dict) -> None:
    config = tiny_config(**overrides)
    model = SmallLM(config)
    assert flops_per_token(config) == counted_flops_per_token(model, config.max_seq_len)
    for seq_len in (1, 17, 64):
        assert flops_per_token(config, seq_len) == counted_flops_per_token(model, seq_len)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_counts_equal_the_models_for_every_preset(name: str, tie_embeddings: bool) -> None:
    config = ModelConfig.preset(name, tie_embeddings=tie_embeddings)
    with torch.device("meta"):
        model = SmallLM(config)
    assert parameter_count(config) == model.num_parameters()
    assert parameter_count(config, exclude_embeddings=True) == model.num_parameters(exclude_embeddings=True)
    assert flops_per_token(config, 512) == counted_flops_per_token(model, 512)


def test_tinyllama_has_its_published_size() -> None:
    assert round(parameter_count(ModelConfig.preset("tinyllama-1.1b")) / 1e6) == 1100


# ----- activations: the estimate against what autograd saves ---------------------------------------


def saved_tensor_bytes(config: ModelConfig, precision: str, checkpointing: bool) -> tuple[int, int]:
    """(activation bytes, weight-copy bytes) that a training forward of a BATCH x SEQ batch leaves
    saved for backward, each storage counted once, parameters left out."""
    torch.manual_seed(0)
    model = SmallLM(config).train()
    model.gradient_checkpointing = checkpointing
    x, y = torch.randint(0, VOCAB, (2, BATCH, SEQ))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    activations: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            is_copy = t.dtype != torch.float32 and t.dim() == 2 and tuple(t.shape) in weight_shapes
            (copies if is_copy else activations)[storage.data_ptr()] = storage.nbytes()
        return t

    amp = {"bf16": torch.bfloat16, "fp32": None}[precision]
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        _, loss = model(x, y)
    loss.backward()
    return sum(activations.values()), sum(copies.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_head=4, tie_embeddings=False)], ids=["gqa", "mha"])
def test_activation_estimate_matches_the_saved_tensors(precision: str, overrides: dict) -> None:
    config = tiny_config(**overrides)
    measured, copies = saved_tensor_bytes(config, precision, checkpointing=False)
    est = estimate(config, batch_size=BATCH, seq_len=SEQ, precision=precision)
    log_probs = 4 * BATCH * SEQ * VOCAB  # the part of est.logits that autograd saves
    assert est.activations + log_probs == pytest.approx(measured, rel=0.01)
    assert copies == est.weight_copies


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointing_keeps_block_inputs_and_recomputes_one_block(precision: str) -> None:
    config = tiny_config(n_kv_head=4)
    measured, _ = saved_tensor_bytes(config, precision, checkpointing=True)
    est = estimate(config, batch_size=BATCH, seq_len=SEQ, precision=precision, activation_checkpointing=True)
    one_block = layer_activation_bytes(config, BATCH, SEQ, precision)
    rope = 2 * SEQ * config.head_dim * 4  # kept alive as the checkpoint's arguments, not as saved tensors
    log_probs = 4 * BATCH * SEQ * VOCAB
    assert est.activations - one_block - rope + log_probs == pytest.approx(measured, rel=0.01)


def test_math_attention_saves_the_score_matrix_and_flash_does_not() -> None:
    config = tiny_config()

    def block(seq_len: int, attention: str) -> int:
        return layer_activation_bytes(config, 2, seq_len, "bf16", attention)

    probabilities = 4 * 2 * config.n_head * 64 * 64
    assert block(64, "math") - block(64, "flash") > probabilities
    assert block(64, "flash") == 2 * block(32, "flash")  # linear in T
    assert block(64, "math") > 2 * block(32, "math")  # quadratic in T


# ----- the estimate's documented behaviour ---------------------------------------------------------


def test_checkpointing_reduces_activations_and_nothing_else() -> None:
    config = tiny_config(n_layer=6)
    plain, ckpt = estimate(config), estimate(config, activation_checkpointing=True)
    assert ckpt.activations < plain.activations / 2
    for item in ("parameters", "gradients", "optimizer_state", "weight_copies", "logits"):
        assert getattr(ckpt, item) == getattr(plain, item)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_and_logits_grow_linearly_in_batch_and_flash_seq_len(checkpointing: bool) -> None:
    config = tiny_config()
    base = estimate(config, batch_size=2, seq_len=32, activation_checkpointing=checkpointing)
    for scaled in (
        estimate(config, batch_size=4, seq_len=32, activation_checkpointing=checkpointing),
        estimate(config, batch_size=2, seq_len=64, activation_checkpointing=checkpointing),
    ):
        assert scaled.activations == pytest.approx(2 * base.activations, rel=0.01)
        assert scaled.logits == 2 * base.logits
        assert scaled.parameters == base.parameters


def test_logits_are_three_fp32_tensors_of_batch_by_seq_by_vocab() -> None:
    config = tiny_config(vocab_size=50304)
    for precision in ("fp32", "bf16"):
        assert estimate(config, batch_size=8, seq_len=64, precision=precision).logits == 3 * 4 * 8 * 64 * 50304


def test_fsdp_divides_the_parameter_side_by_world_size() -> None:
    config = tiny_config()
    single = estimate(config)
    sharded = estimate(config, world_size=4, fsdp=True)
    for item in ("parameters", "gradients", "optimizer_state"):
        assert getattr(sharded, item) == getattr(single, item) // 4
    for item in ("activations", "logits", "weight_copies"):
        assert getattr(sharded, item) == getattr(single, item)


def test_ddp_adds_gradient_buckets() -> None:
    config = tiny_config()
    single, ddp = estimate(config), estimate(config, world_size=4)
    assert ddp.gradients == 2 * single.gradients
    assert ddp.parameters == single.parameters and ddp.optimizer_state == single.optimizer_state


def test_precision_changes_activations_and_weight_copies_only() -> None:
    config = tiny_config()
    fp32, bf16, fp16 = (estimate(config, precision=p) for p in ("fp32", "bf16", "fp16"))
    n = parameter_count(config)
    for est in (fp32, bf16):  # fp32 weights, gradients and AdamW moments under autocast too
        assert (est.parameters, est.gradients, est.optimizer_state) == (4 * n, 4 * n, 8 * n)
        assert est.logits == fp32.logits
    assert fp32.weight_copies == 0
    assert bf16.weight_copies == 2 * matmul_weight_count(config)
    # Autocast halves the matmul activations, but the residual stream and the norms stay fp32.
    assert 0.5 * fp32.activations < bf16.activations < fp32.activations
    assert fp16 == MemoryEstimate(**{**bf16.__dict__, "precision": "fp16"})


def test_total_is_the_sum_of_the_items() -> None:
    est = estimate(tiny_config(), world_size=2)
    items = (est.parameters, est.gradients, est.optimizer_state, est.weight_copies, est.activations, est.logits)
    assert est.total == sum(items)


def test_optimizer_state_counts_fp32_tensors_per_parameter() -> None:
    config = tiny_config()
    n = parameter_count(config)
    assert estimate(config, optimizer="adamw").optimizer_state == 8 * n
    assert estimate(config, optimizer="sgd").optimizer_state == 4 * n


@pytest.mark.parametrize(
    "overrides",
    [dict(precision="fp8"), dict(optimizer="adafactor"), dict(seq_len=65), dict(batch_size=0), dict(attention="x")],
)
def test_bad_arguments_are_refused(overrides: dict) -> None:
    with pytest.raises(ValueError):
        estimate(tiny_config(), **overrides)


def test_reports_name_every_item() -> None:
    config = ModelConfig.preset("124m", vocab_size=50304, tie_embeddings=True)  # GPT-2 small's 124M
    table = format_estimate(estimate_training_memory(config, 16, 1024, precision="bf16", activation_checkpointing=True))
    for word in ("parameters", "gradients", "optimizer state", "weight copies", "activations", "logits", "total"):
        assert word in table
    assert "GiB" in table
    text = describe_run(config, 16, 1024, "bf16")
    assert "124M parameters" in text and f"{parameter_count(config):,}" in text
    assert f"{flops_per_token(config, 1024):.3g} per token" in text
    assert "no checkpointing" in text and "with checkpointing" in text
    assert "FSDP" in describe_run(config, 16, 1024, "bf16", world_size=8, fsdp=True)


# ----- peak FLOP/s and MFU -------------------------------------------------------------------------

DEVICES = [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H100 PCIe", torch.float16, 756e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float16, 312e12),
    ("NVIDIA A10G", torch.bfloat16, 70e12),
    ("NVIDIA A10", torch.bfloat16, 125e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA L40S", torch.bfloat16, 362e12),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
    ("NVIDIA GeForce RTX 3090", torch.bfloat16, 71e12),
    ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, None),  # no bf16 tensor cores before Ampere
    ("Tesla T4", torch.float16, 65e12),
    ("Tesla T4", torch.bfloat16, None),
    ("NVIDIA RTX A1000", torch.bfloat16, None),  # not an A100
    ("NVIDIA GeForce RTX 3090 Ti", torch.bfloat16, None),  # not a 3090
    ("AMD Instinct MI300X", torch.bfloat16, None),
    ("NVIDIA H100 80GB HBM3", torch.float64, None),
]


@pytest.mark.parametrize(("name", "dtype", "expected"), DEVICES)
def test_peak_flops_maps_device_names_to_datasheet_numbers(name: str, dtype: torch.dtype, expected: float) -> None:
    assert peak_flops_for_name(name, dtype) == expected


def test_peak_flops_reads_the_cuda_device_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda:0"), torch.bfloat16) == 989e12
    assert peak_flops("cuda", torch.bfloat16) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops("cuda:0", torch.bfloat16) is None


def test_peak_flops_of_the_cpu_is_unknown() -> None:
    assert peak_flops("cpu", torch.float32) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_fp32_peak_depends_on_tf32() -> None:
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.float32, tf32=True) == 495e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.float32, tf32=False) == 67e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-40GB", torch.float32, tf32=True) == 156e12
    assert peak_flops_for_name("Tesla V100-SXM2-16GB", torch.float32, tf32=True) == 15.7e12  # no TF32


def test_unknown_device_warns_once() -> None:
    with pytest.warns(UserWarning, match="MFU will not be reported"):
        warn_unknown_device("test_memory's imaginary GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unknown_device("test_memory's imaginary GPU")


def test_the_cpus_peak_is_measured_once() -> None:
    from smallm.train.memory import measured_peak_flops

    peak = measured_peak_flops(torch.float32)
    assert peak > 1e8  # any CPU that runs torch multiplies faster than 0.1 GFLOP/s
    assert measured_peak_flops(torch.float32) == peak  # cached: the process measures it once


def test_mfu_is_achieved_over_peak_flops() -> None:
    assert mfu(6e8, 1e5, 1.2e14) == pytest.approx(0.5)
    assert mfu(flops_per_token(tiny_config(), 64), 0.0, 1e12) == 0.0
    assert mfu(6e8, 1e5, None) is None
