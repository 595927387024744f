"""The engine on the families people merge today (Qwen2/2.5, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3, Phi-3 with
longrope and partial rotary, Mistral-Nemo's explicit head_dim) against transformers' own models, built tiny
and seeded from transformers' config classes (tests/arch_models.py): fp32 logits, 32 greedy tokens, bf16
error no worse than transformers' own bf16, the KV cache, and the per-layer states the MoE gates read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from arch_models import MODELS, VOCAB, build
from torch.testing import assert_close

from merger.engine.generate import generate_ids
from merger.engine.model import load_model

transformers = pytest.importorskip("transformers")

NAMES = list(MODELS)
PROMPT = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
# 12 tokens, then 32 new ones: past every sliding window (6-10) and across Phi-3's longrope switch at 16
SHORT = PROMPT[:, :12]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    return {name: build(name, root / name, seed=i) for i, name in enumerate(NAMES)}


def _hf(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.eos_token_id = None  # compare full-length greedy runs
    return model.eval()


def _hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest deviation relative to the reference's largest logit."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_fp32_logits_and_greedy_tokens_match_transformers(models, name):
    ours, ref = load_model(models[name]), _hf(models[name])
    assert _rel(ours(PROMPT), _hf_logits(ref, PROMPT)) <= 1e-4
    expect = ref.generate(SHORT, do_sample=False, max_new_tokens=32, pad_token_id=0)[0, SHORT.shape[1]:]
    new, _, _ = generate_ids(ours, SHORT[0].tolist(), 32)
    assert new == expect.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_bf16_error_is_no_worse_than_transformers_own(models, name):
    """Against transformers' fp32 logits, our bf16 run may deviate as much as transformers' bf16 run does."""
    exact = _hf_logits(_hf(models[name]), PROMPT)
    theirs = _rel(_hf_logits(_hf(models[name], torch.bfloat16), PROMPT), exact)
    ours = _rel(load_model(models[name], dtype=torch.bfloat16)(PROMPT), exact)
    assert 0 < theirs < 0.1  # bf16 really ran, and it is still the same model
    assert ours <= 1.5 * theirs, (ours, theirs)


# Phi-3's longrope is left out: a cache that crosses the switch keeps its early keys rotated with the short
# factors (as transformers' does), so there a decode is not meant to equal one full pass
@pytest.mark.parametrize("name", [n for n in NAMES if n != "phi3"])
def test_kv_cache_decode_equals_full_forward(models, name):
    model = load_model(models[name])
    seq = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    full = model(seq)
    model.setup_cache(2, 24)
    steps = [model(seq[:, :9], start_pos=0), model(seq[:, 9:13], start_pos=9)]  # prefill, then a masked chunk
    steps += [model(seq[:, i:i + 1], start_pos=i) for i in range(13, 24)]
    # float32 attention summed in another order by the native one-query kernel than by SDPA: ~1e-5 apart
    assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_layer_states_are_what_each_layer_and_its_mlp_receive(models, name):
    """layer_input: transformers' hidden_states; mlp_input: what each layer's MLP (or router) is called with —
    for Gemma that is the pre-feedforward norm's output, not the post-attention norm's."""
    ours, ref = load_model(models[name]), _hf(models[name])
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].clone()))
             for layer in ref.model.layers]
    with torch.no_grad():
        hidden = ref(PROMPT, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    states = ours.layer_states(PROMPT)
    n = len(ref.model.layers)
    assert_close(states["layer_input"], torch.stack([h[0] for h in hidden[:n]]), atol=1e-4, rtol=1e-4)
    assert_close(states["mlp_input"], torch.stack(seen), atol=1e-4, rtol=1e-4)


def test_gemma_embedding_scale_is_rounded_to_bf16_first(models):
    """sqrt(72) = 8.485 is 8.5 in bf16; transformers multiplies by that rounded factor, and so must we."""
    path = models["gemma2"]
    ref = _hf(path, torch.bfloat16)
    with torch.no_grad():
        want = ref(PROMPT, output_hidden_states=True).hidden_states[0][0]
    got = load_model(path, dtype=torch.bfloat16).layer_states(PROMPT)["layer_input"][0]
    assert torch.equal(got, want.float())
    raw = ref.model.embed_tokens.weight[PROMPT[0]].float()
    assert not torch.equal(got, (raw * 72 ** 0.5).bfloat16().float())  # the unrounded factor differs


@pytest.mark.parametrize("name, switch", [
    ("gemma2", lambda m: [setattr(layer.attn, "softcap", None) for layer in m.layers]),
    ("gemma2", lambda m: setattr(m.config, "final_softcap", None)),
    ("gemma3", lambda m: m.ropes.pop("local")),  # every layer on the global RoPE
    ("qwen3", lambda m: [setattr(layer.attn, "q_norm", None) for layer in m.layers]),
    ("phi3", lambda m: m.ropes["global"].freqs.pop()),  # short factors only
])
def test_each_family_switch_changes_the_logits(models, name, switch):
    """The features above are exercised, not bypassed: turning one off moves the logits away from transformers'."""
    model = load_model(models[name])
    exact = _hf_logits(_hf(models[name]), PROMPT)
    switch(model)
    if name == "gemma3":
        for layer in model.layers:
            layer.rope = "global"
    if name == "phi3":
        model.ropes["global"].switch = None
    assert _rel(model(PROMPT), exact) > 1e-3


def test_gemma3_config_in_transformers4_style_gives_the_same_model(tmp_path, models):
    """rope_theta + rope_scaling (global layers only) + rope_local_base_freq + sliding_window_pattern, no
    layer_types: the config transformers < 5 wrote for the checkpoint transformers 5 wrote as rope_parameters."""
    src = models["gemma3"]
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    assert set(rope) == {"full_attention", "sliding_attention"}
    cfg.pop("layer_types")
    cfg.pop("_sliding_window_pattern", None)
    cfg.update(rope_theta=rope["full_attention"]["rope_theta"], rope_scaling={"rope_type": "linear", "factor": 4.0},
               rope_local_base_freq=rope["sliding_attention"]["rope_theta"], sliding_window_pattern=2)
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(load_model(tmp_path)(PROMPT), load_model(src)(PROMPT))


def test_phi3_fused_weights_of_the_wrong_size_are_a_checkpoint_error(tmp_path, models):
    from merger.errors import CheckpointError

    src = models["phi3_partial"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 4}))
    with pytest.raises(CheckpointError, match="weights do not match config.json"):
        load_model(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_model_matches_the_cpu_model(models, name):
    cpu, gpu = load_model(models[name]), load_model(models[name], device="cuda")
    assert _rel(gpu(PROMPT.cuda()).cpu(), cpu(PROMPT)) <= 1e-3
    assert generate_ids(gpu, SHORT[0].tolist(), 16)[0] == generate_ids(cpu, SHORT[0].tolist(), 16)[0]
