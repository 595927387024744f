"""The native decode step (step.py, cpu_step.c `step`): one call per token for the whole model, against
transformers' own models in float64 and against the engine's per-op path, on every family it takes (dense,
routed experts, mixed dense/MoE layers, q/k/v, o and MLP biases, q/k norms, sliding windows, a head size that is
not a multiple of 8, longrope), plus the cases it leaves to the per-op path. Runs wherever the kernels build."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from arch_models import VOCAB, build
from torch.testing import assert_close

from merger.engine import calibrate, step
from merger.engine.generate import generate_ids
from merger.engine.model import ContextError, load_model

transformers = pytest.importorskip("transformers")

SEQ = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
PREFILL = 12  # then 18 decode steps: past every sliding window here (6-10)


@pytest.fixture(autouse=True)
def _native(native_on):
    """Every test here runs the kernels (conftest's native_on)."""


def _save(model: torch.nn.Module, path: Path, seed: int) -> Path:
    from arch_models import spread

    from merger import synth

    spread(model, seed, zero_centred_norms=False)
    model.save_pretrained(path, safe_serialization=True)
    synth.write_tokenizer(path, VOCAB)
    return path


def _mixtral(path: Path) -> Path:
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=140, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=256, sliding_window=7)
    torch.manual_seed(11)
    return _save(transformers.MixtralForCausalLM(cfg), path, 11)


def _llama_biases(path: Path) -> Path:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=262, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                   attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    torch.manual_seed(12)
    return _save(transformers.LlamaForCausalLM(cfg), path, 12)


BUILDERS = {
    "mixtral": _mixtral,
    "llama_biases": _llama_biases,
    **{name: (lambda path, name=name: build(name, path, seed=20)) for name in
       ("qwen2", "qwen2_sliding", "qwen3", "qwen3_moe", "mistral_nemo", "phi3", "gemma2", "phi3_partial")},
}
STEP = ["mixtral", "llama_biases", "qwen2", "qwen2_sliding", "qwen3", "qwen3_moe", "mistral_nemo", "phi3"]
PER_OP = ["gemma2", "phi3_partial"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("step")
    return {name: make(root / name) for name, make in BUILDERS.items()}


def _decode(model, use_step: bool = True) -> torch.Tensor:
    """Prefill PREFILL tokens of SEQ, then decode the rest one by one: logits [1, 30 - PREFILL, V]."""
    model.setup_cache(1, SEQ.shape[1])
    assert (model.step is not None) == use_step or not use_step
    if not use_step:
        model.step = None
    model(SEQ[:, :PREFILL], start_pos=0)
    return torch.cat([model(SEQ[:, i:i + 1], start_pos=i) for i in range(PREFILL, SEQ.shape[1])], dim=1)


# Phi-3 is compared with the per-op path only: a cache that crosses its longrope switch keeps its early keys
# rotated with the short factors, so there decode is not one full pass
@pytest.mark.parametrize("name", [n for n in STEP if n != "phi3"])
def test_step_logits_equal_float64_transformers(models, name, monkeypatch):
    calls = []
    real = step.DecodeStep.__call__
    monkeypatch.setattr(step.DecodeStep, "__call__", lambda self, *a: calls.append(a) or real(self, *a))
    got = _decode(load_model(models[name]))
    assert len(calls) == SEQ.shape[1] - PREFILL  # every decode token went through the step
    moe = {"experts_implementation": "eager"} if "moe" in name or name == "mixtral" else {}  # grouped_mm: no float64
    ref = transformers.AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float64, **moe).eval()
    with torch.no_grad():
        want = ref(SEQ).logits[:, PREFILL:]
    assert_close(got.double(), want, atol=2e-5 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", STEP)
def test_step_equals_the_per_op_path_in_float32(models, name):
    model = load_model(models[name])
    assert_close(_decode(model), _decode(model, use_step=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "llama_biases"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_step_tracks_the_per_op_native_path(models, name, dtype, monkeypatch):
    """Both round where transformers rounds; they differ by float32 summation order, which can flip a rounding
    now and then. The per-op side takes the native gemv too, so the matmul sums are the same."""
    forced = {k: {**c, "decode": "native", "prefill": "native"} for k, c in calibrate.choices().items()}
    monkeypatch.setattr(calibrate, "choices", lambda: forced)
    model = load_model(models[name], dtype=dtype)
    fast, slow = _decode(model), _decode(model, use_step=False)
    assert model.cache[0].k.dtype == dtype  # the kernel reads the half-precision cache as it is
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.9
    assert_close(fast, slow, atol=0.03 * slow.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", STEP)
def test_greedy_tokens_through_the_step_equal_transformers(models, name):
    ref = transformers.AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    want = ref.generate(SEQ[:, :PREFILL], do_sample=False, max_new_tokens=32, pad_token_id=0)[0, PREFILL:]
    got, _, _ = generate_ids(load_model(models[name]), SEQ[0, :PREFILL].tolist(), 32)
    assert got == want.tolist()


@pytest.mark.parametrize("name", PER_OP)
def test_models_with_pieces_the_step_lacks_keep_the_per_op_path(models, name):
    model = load_model(models[name])
    assert step.unsupported(model, 1)
    model.setup_cache(1, 8)
    assert model.step is None


def test_batches_and_other_devices_keep_the_per_op_path(models):
    model = load_model(models["mixtral"])
    assert step.unsupported(model, 2) == "batch 1 on the CPU only"
    model.setup_cache(2, 8)
    assert model.step is None
    model.setup_cache(1, 8)
    assert model.step is not None
    model.cache = None  # freeing the cache drops the step that points into it
    assert model.step is None


def test_tokens_and_positions_the_step_cannot_take_get_the_usual_errors(models):
    model = load_model(models["mixtral"])
    model.setup_cache(1, 8)
    model(SEQ[:, :4], start_pos=0)
    with pytest.raises(IndexError):
        model(torch.tensor([[VOCAB + 3]]), start_pos=4)
    with pytest.raises(ContextError, match="do not fit the KV cache"):
        model(torch.tensor([[5]]), start_pos=8)
