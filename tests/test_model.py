"""The model: its logits equal Hugging Face's ``LlamaForCausalLM`` with the same weights, its state dict
has Hugging Face's key names, KV-cache decoding (batched, left-padded) equals a full forward, it is
causal, its loss and gradients are the ones a trainer expects, and its presets and configs are what
the docs say.

Every model here is tiny (2 layers, width 64) and runs in fp32 on the CPU.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from smallm.data.loader import IGNORE_INDEX  # noqa: E402
from smallm.model.config import PRESETS, ModelConfig  # noqa: E402
from smallm.model.lm import SmallLM  # noqa: E402
from smallm.train.memory import flops_per_token  # noqa: E402

VOCAB = 97


def tiny_config(**overrides: object) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64)
    return ModelConfig(**{**fields, **overrides})


def random_model(seed: int = 0, **overrides: object) -> SmallLM:
    """A model in eval mode whose weights, norms included, are all far from their init, so that a
    wrong order of operations or an ignored norm weight shows in the logits."""
    torch.manual_seed(seed)
    model = SmallLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----- Hugging Face equivalence ------------------------------------------------------------------


def hf_llama_config(config: ModelConfig):
    """The ``transformers.LlamaConfig`` of ``config``: what an export writes to config.json."""
    transformers = pytest.importorskip("transformers")
    # transformers 5 moved rope_theta into rope_parameters; 4.x takes it as a top-level field.
    if int(transformers.__version__.split(".")[0]) >= 5:
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}}
    else:
        rope = {"rope_theta": config.rope_theta}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
        **rope,
    )


def hf_twin(model: SmallLM):
    """A ``LlamaForCausalLM`` holding ``model``'s weights, loaded strictly (every key matches 1:1)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(hf_llama_config(model.config)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


@pytest.mark.parametrize(
    ("n_kv_head", "tie_embeddings", "rope_theta"),
    [(2, True, 10000.0), (4, False, 10000.0), (1, False, 500000.0), (4, True, 1e6)],
    ids=["gqa-tied", "mha-untied", "mqa-untied-theta5e5", "mha-tied-theta1e6"],
)
def test_logits_and_loss_equal_transformers_llama(n_kv_head: int, tie_embeddings: bool, rope_theta: float) -> None:
    model = random_model(n_kv_head=n_kv_head, tie_embeddings=tie_embeddings, rope_theta=rope_theta)
    hf = hf_twin(model)
    ids = random_ids(3, 40)
    with torch.no_grad():
        ours, expected = model(ids), hf(ids).logits
        assert ours.abs().max() > 1  # the comparison is not between two near-zero tensors
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        # HF shifts labels inside; ours takes targets already shifted.
        _, loss = model(ids[:, :-1], ids[:, 1:])
        torch.testing.assert_close(loss, hf(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)


def test_rmsnorm_matches_transformers_bitwise_in_bf16() -> None:
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    model = random_model()
    ours = model.model.layers[0].input_layernorm.to(torch.bfloat16)
    theirs = llama.LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 9, 64).to(torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))


def test_state_dict_keys_are_hugging_face_llama_names() -> None:
    model = random_model(tie_embeddings=False)
    keys = set(model.state_dict())
    per_layer = [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
    ]  # fmt: skip
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{name}.weight" for i in range(2) for name in per_layer}
    assert keys == expected  # weights only: no biases, no rotary tables
    transformers = pytest.importorskip("transformers")
    assert keys == set(transformers.LlamaForCausalLM(hf_llama_config(model.config)).state_dict())


def test_peft_target_module_names_exist() -> None:
    linear_names = {name.rsplit(".", 1)[-1] for name, m in random_model().named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= linear_names


# ----- KV cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1, 1, 1, 1], [3, 4, 1, 2, 2]], ids=["prefill-then-steps", "chunks"])
def test_kv_cache_decoding_equals_full_forward(chunks: list[int]) -> None:
    model = random_model(n_kv_head=2)
    ids = random_ids(2, sum(chunks))
    cache = model.new_kv_cache(batch_size=2, max_len=16)
    pieces, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            pieces.append(model(ids[:, pos : pos + n], kv_cache=cache, start_pos=pos))
            pos += n
        torch.testing.assert_close(torch.cat(pieces, dim=1), model(ids), atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_prompt_alone() -> None:
    model = random_model(n_kv_head=2)
    prompts = [random_ids(1, 4, seed=2)[0], random_ids(1, 7, seed=3)[0]]
    continuation = random_ids(2, 3, seed=4)  # tokens "sampled" after each prompt
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    with torch.no_grad():
        no_cache = model(ids, attention_mask=mask)
        cache = model.new_kv_cache(batch_size=2)
        steps = [model(ids, kv_cache=cache, attention_mask=mask)]
        for i in range(continuation.size(1)):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            steps.append(model(continuation[:, i : i + 1], kv_cache=cache, start_pos=width + i, attention_mask=mask))
        cached = torch.cat(steps, dim=1)
        assert torch.isfinite(cached).all()  # padding rows included
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, continuation[row]])[None])[0]
            torch.testing.assert_close(no_cache[row, width - len(prompt) :], alone[: len(prompt)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cached[row, width - len(prompt) :], alone, atol=1e-5, rtol=1e-5)


def test_cache_and_position_limits_raise() -> None:
    model = random_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_ids(1, 65))
    with pytest.raises(ValueError, match="max_len"):
        model.new_kv_cache(1, max_len=65)
    cache = model.new_kv_cache(2, max_len=8)
    with pytest.raises(ValueError, match="KV cache"):
        model(random_ids(1, 4), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache"):
        model(random_ids(2, 4), kv_cache=cache, start_pos=6)
    with pytest.raises(ValueError, match="attention_mask"):
        model(random_ids(2, 4), kv_cache=cache, start_pos=2, attention_mask=torch.ones(2, 4))


# ----- causality, loss, gradients ----------------------------------------------------------------


def test_changing_a_future_token_leaves_earlier_logits_unchanged() -> None:
    model = random_model()
    ids = random_ids(2, 20)
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_loss_skips_ignored_targets_and_reductions_agree() -> None:
    model = random_model()
    ids, targets = random_ids(2, 10), random_ids(2, 10, seed=5)
    targets[0, :3] = IGNORE_INDEX
    targets[1, -1] = IGNORE_INDEX
    with torch.no_grad():
        logits, mean = model(ids, targets)
        _, total = model(ids, targets, reduction="sum")
        _, per_token = model(ids, targets, reduction="none")
    assert logits.dtype == torch.float32
    keep = targets != IGNORE_INDEX
    log_probs = logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None])
    torch.testing.assert_close(mean, -log_probs.mean())
    torch.testing.assert_close(total, mean * keep.sum())
    assert per_token.shape == targets.shape and torch.equal(per_token[~keep], torch.zeros(4))
    torch.testing.assert_close(per_token.sum(), total)


def test_ignore_index_is_cross_entropys_default() -> None:
    import inspect

    assert inspect.signature(torch.nn.functional.cross_entropy).parameters["ignore_index"].default == IGNORE_INDEX


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    ids, targets = random_ids(2, 16), random_ids(2, 16, seed=6)
    grads, block_calls = [], []
    for checkpointing in (False, True):
        model = random_model().train()
        model.gradient_checkpointing = checkpointing
        calls = []
        model.model.layers[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        model(ids, targets)[1].backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        block_calls.append(len(calls))
    assert block_calls == [1, 2]  # checkpointing really recomputed the block in backward
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-6, msg=name)


def test_init_scales_residual_projections_by_depth() -> None:
    torch.manual_seed(0)
    config = tiny_config(n_layer=8, n_embd=128, init_std=0.02)
    model = SmallLM(config)
    layer = model.model.layers[3]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for residual_out in (layer.self_attn.o_proj, layer.mlp.down_proj):
        assert residual_out.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))


# ----- embeddings, dtypes, devices ---------------------------------------------------------------


def test_tied_embeddings_share_storage_and_untied_do_not() -> None:
    tied = random_model(tie_embeddings=True).to(torch.float64)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = random_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 64


def test_rotary_tables_stay_fp32_and_survive_meta_device() -> None:
    reference = SmallLM(tiny_config()).model.rotary_emb
    half = SmallLM(tiny_config()).to(torch.bfloat16)
    assert half.model.rotary_emb.cos.dtype == torch.float32
    torch.testing.assert_close(half.model.rotary_emb.cos, reference.cos, atol=0, rtol=0)
    with torch.device("meta"):
        deferred = SmallLM(tiny_config())
    deferred.to_empty(device="cpu")
    deferred.init_weights()
    torch.testing.assert_close(deferred.model.rotary_emb.sin, reference.sin, atol=0, rtol=0)
    assert torch.isfinite(deferred(random_ids(1, 8))).all()


# ----- configs and presets -----------------------------------------------------------------------

# Parameter counts at vocab_size 32000 (the table in the PRESETS comments).
PRESET_PARAMS = {  # at vocab 32000, untied: the tied counts of the preset comments + 32000 x width
    "tiny": 11_340_032 + 32000 * 256,
    "38m": 38_252_928 + 32000 * 384,
    "124m": 109_529_856 + 32000 * 768,
    "350m": 341_099_520 + 32000 * 1024,
    "tinyllama-1.1b": 1_100_048_384,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_with_their_documented_sizes(name: str) -> None:
    with torch.device("meta"):
        model = SmallLM(ModelConfig.preset(name, vocab_size=32000))
    assert model.num_parameters() == PRESET_PARAMS[name]


def test_gpt2_shaped_presets_match_gpt2_sizes_at_its_vocab() -> None:
    with torch.device("meta"):
        small = SmallLM(ModelConfig.preset("124m", vocab_size=50304, tie_embeddings=True))  # GPT-2 ties them
        medium = SmallLM(ModelConfig.preset("350m", vocab_size=50304, tie_embeddings=True))
    assert round(small.num_parameters() / 1e6) == 124
    assert round(medium.num_parameters() / 1e6) == 360  # GPT-2 medium: 355M with biases, 50257 ids


def test_tinyllama_preset_is_tinyllamas_shape() -> None:
    config = ModelConfig.preset("tinyllama-1.1b")
    shape = (config.vocab_size, config.n_layer, config.n_embd, config.n_head, config.n_kv_head)
    assert shape == (32000, 22, 2048, 32, 4)
    assert (config.intermediate_size, config.max_seq_len, config.rope_theta) == (5632, 2048, 10000.0)
    assert not config.tie_embeddings


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ValueError, match=r"'7b'.*124m.*tinyllama-1\.1b"):
        ModelConfig.preset("7b")


@pytest.mark.parametrize(("n_embd", "expected"), [(64, 256), (256, 768), (768, 2048), (1024, 2816), (2048, 5632)])
def test_default_intermediate_size_is_8_thirds_of_width_rounded_up_to_256(n_embd: int, expected: int) -> None:
    assert ModelConfig(n_embd=n_embd, n_head=1).intermediate_size == expected
    assert ModelConfig(n_embd=n_embd, n_head=1, intermediate_size=100).intermediate_size == 100


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(n_embd=66, n_head=4), "n_embd"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(n_embd=12, n_head=4), "head_dim"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(max_seq_len=2.5), "max_seq_len"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(rope_theta=-1.0), "rope_theta"),
    ],
)
def test_bad_configs_raise_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_parameter_and_flop_counts() -> None:
    model = random_model(tie_embeddings=True)
    d, L, ff, kv = 64, 2, 256, 32
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    assert model.num_parameters() == VOCAB * d + L * per_layer + d
    assert model.num_parameters(exclude_embeddings=True) == L * per_layer + d
    matmuls = L * (2 * d * d + 2 * d * kv + 3 * d * ff) + VOCAB * d  # lm_head counts even when tied
    assert flops_per_token(model.config, 32) == 6 * matmuls + 12 * L * d * 32


def test_zero_residual_init_starts_every_block_as_the_identity() -> None:
    from smallm.train.trainable import initialise

    model = random_model()
    initialise(model, "zero-residual")
    ids = random_ids(2, 16)
    with torch.no_grad():
        embedded = model.model.embed_tokens(ids)
        for layer in model.model.layers:
            assert torch.count_nonzero(layer.self_attn.o_proj.weight) == 0
            assert torch.count_nonzero(layer.mlp.down_proj.weight) == 0
            assert torch.equal(layer(embedded, model.model.rotary_emb(torch.arange(16)[None], embedded.dtype), None,
                                     None, 0), embedded)  # fmt: skip
    assert torch.count_nonzero(model.model.layers[0].self_attn.q_proj.weight) > 0


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "relu2"])
def test_qk_norm_and_activations_keep_the_model_causal_and_cached(act: str) -> None:
    """With QK-norm and each activation, a KV-cached decode gives the logits of the full forward."""
    config = ModelConfig(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=32,
                         qk_norm=True, hidden_act=act)  # fmt: skip
    torch.manual_seed(0)
    model = SmallLM(config).eval()
    ids = random_ids(1, 12)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(1)
        steps = [model(ids[:, :8], kv_cache=cache)] + [
            model(ids[:, i : i + 1], kv_cache=cache, start_pos=i) for i in range(8, 12)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        ModelConfig(hidden_act="gelu")
