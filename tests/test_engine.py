"""The bundled engine against transformers' own models (the independent reference), plus routing,
KV-cache, sampling and tokenizer invariants. Every model here is tiny, seeded and built in a tmp dir.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from arch_models import spread
from torch.testing import assert_close

from merger import synth
from merger.engine import calibrate, moe, native, weights
from merger.engine.generate import generate, generate_ids
from merger.engine.matmul import linear
from merger.engine.model import ContextError, load_model
from merger.engine.sampling import SamplingError, check_params, sample
from merger.engine.tokenizer import StreamDecoder, load_tokenizer
from merger.errors import CheckpointError, MergerError

transformers = pytest.importorskip("transformers")

VOCAB = 512


def _save_hf(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    synth.write_tokenizer(path, VOCAB)
    return path


def _mixtral(path: Path, experts: int = 4, top_k: int = 2, seed: int = 1) -> Path:
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(cfg)
    spread(model, seed, zero_centred_norms=False)
    return _save_hf(model, path)


def _qwen2_moe(path: Path, seed: int = 2) -> Path:
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.Qwen2MoeForCausalLM(cfg)
    spread(model, seed, zero_centred_norms=False)
    return _save_hf(model, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    out = {"llama": tiny_models["base"]}
    # tied + sharded + transformers-5 style llama3 rope_parameters + head_dim != hidden / heads
    cfg = synth.llama_config(tie=True, head_dim=24, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    del cfg["rope_theta"]
    synth.write_checkpoint(root / "tied", cfg, synth.random_weights(cfg, seed=5), max_shard_bytes=200_000)
    out["tied_sharded_llama3"] = root / "tied"
    cfg = synth.llama_config(model_type="mistral", sliding_window=8)
    synth.write_checkpoint(root / "mistral", cfg, synth.random_weights(cfg, seed=6))
    out["mistral_sliding"] = root / "mistral"
    out["mixtral"] = _mixtral(root / "mixtral")
    out["qwen2_moe"] = _qwen2_moe(root / "qwen2_moe")
    return out


def _hf(path: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare full-length greedy runs
    return model.eval()


PROMPT = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
ALL = ["llama", "tied_sharded_llama3", "mistral_sliding", "mixtral", "qwen2_moe"]


@pytest.mark.parametrize("name", ALL)
def test_logits_and_greedy_tokens_match_transformers(models, name):
    ours, ref = load_model(models[name]), _hf(models[name])
    with torch.no_grad():
        ref_logits = ref(PROMPT).logits
    assert_close(ours(PROMPT), ref_logits, atol=1e-4, rtol=1e-4)
    ref_new = ref.generate(PROMPT, do_sample=False, max_new_tokens=32, pad_token_id=0)[0, PROMPT.shape[1]:]
    new, _, _ = generate_ids(ours, PROMPT[0].tolist(), 32)
    assert new == ref_new.tolist()


def test_transformers5_stacked_expert_layout_loads_too(tmp_path, models):
    # transformers 5 keeps experts as mlp.experts.gate_up_proj [E, 2F, D] / down_proj [E, D, F] in
    # memory; a checkpoint saved straight from its state_dict has those names
    from safetensors.torch import save_file

    ref = _hf(models["mixtral"])
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((models["mixtral"] / "config.json").read_bytes())
    with torch.no_grad():
        expect = ref(PROMPT).logits
    assert_close(load_model(tmp_path)(PROMPT), expect, atol=1e-4, rtol=1e-4)


def test_tied_checkpoint_shares_the_embedding_and_is_sharded(models):
    path = models["tied_sharded_llama3"]
    assert (path / "model.safetensors.index.json").is_file()
    model = load_model(path)
    assert model.output.data_ptr() == model.embed.data_ptr()


@pytest.mark.parametrize("name", ["llama", "mistral_sliding", "mixtral", "qwen2_moe"])
def test_kv_cache_decode_equals_full_forward(models, name):
    """A batch of two sequences, so decode attention and routing see more than one row."""
    model = load_model(models[name])
    seq = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    full = model(seq)                                     # [2, 30, V], no cache
    model.setup_cache(2, 30)
    steps = [model(seq[:, :12], start_pos=0)]             # prefill
    steps.append(model(seq[:, 12:17], start_pos=12))      # a chunk after the prefill: masked path
    steps += [model(seq[:, i:i + 1], start_pos=i) for i in range(17, 30)]  # decode
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_bf16_decode_with_its_cache_tracks_the_bf16_full_forward(models):
    """The cache is bf16 where the native attention reads it; float32 only for torch's attention on a CPU
    where torch's bf16 math was measured slow."""
    from merger.engine.matmul import slow_half

    model = load_model(models["llama"], dtype=torch.bfloat16)
    seq = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    full = model(seq)
    model.setup_cache(1, 24)
    native_attend = native.attend_kernel(torch.bfloat16) is not None
    expect_dtype = torch.float32 if slow_half(torch.bfloat16, torch.device("cpu")) and not native_attend \
        else torch.bfloat16
    assert model.cache[0].k.dtype == expect_dtype
    steps = torch.cat([model(seq[:, :10], start_pos=0)] + [model(seq[:, i:i + 1], start_pos=i) for i in range(10, 24)],
                      dim=1)
    assert (steps - full).abs().max() < 0.05 * full.abs().max()
    assert (steps.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9


def _reference_moe(x, router, w13, w2, top_k, normalize):
    """Token by token, slot by slot, in float64: the formula the routing paths must reproduce."""
    x, router, w13, w2 = (t.double() for t in (x, router, w13, w2))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(router @ x[t], dim=-1)
        weights, experts = torch.topk(probs, top_k)
        if normalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts):
            f = w13.shape[1] // 2
            h = torch.nn.functional.silu(w13[e, :f] @ x[t]) * (w13[e, f:] @ x[t])
            out[t] += w * (w2[e] @ h)
    return out


@pytest.mark.parametrize("experts,top_k", [(2, 1), (2, 2), (3, 2), (4, 1), (5, 4), (8, 2), (8, 4)])
@pytest.mark.parametrize("tokens", [1, 3, 33])
@pytest.mark.parametrize("normalize", [True, False])
def test_routing_paths_equal_reference_loop(experts, top_k, tokens, normalize):
    g = torch.Generator().manual_seed(experts * 100 + top_k * 10 + tokens)
    d, f = 16, 24
    x = torch.randn(tokens, d, generator=g)
    router = torch.randn(experts, d, generator=g)
    w13 = torch.randn(experts, 2 * f, d, generator=g) / d ** 0.5
    w2 = torch.randn(experts, d, f, generator=g) / f ** 0.5
    ref = _reference_moe(x, router, w13, w2, top_k, normalize).float()
    weights, idx = moe.route(x, router, top_k, normalize)
    assert_close(moe.experts_decode(x, w13, w2, weights, idx), ref, atol=1e-5, rtol=1e-5)
    assert_close(moe.experts_grouped(x, w13, w2, weights, idx), ref, atol=1e-5, rtol=1e-5)


def test_routing_paths_in_bf16_stay_within_rounding_of_the_reference():
    # 64 tokens over 4 experts: ~32 rows each, so the grouped path takes the float32-upcast matmuls
    g = torch.Generator().manual_seed(11)
    d, f = 32, 48
    x = torch.randn(64, d, generator=g).bfloat16()
    router = torch.randn(4, d, generator=g).bfloat16()
    w13 = (torch.randn(4, 2 * f, d, generator=g) / d ** 0.5).bfloat16()
    w2 = (torch.randn(4, d, f, generator=g) / f ** 0.5).bfloat16()
    ref = _reference_moe(x, router, w13, w2, 2, True).float()
    weights, idx = moe.route(x, router, 2, True)
    for path in (moe.experts_decode, moe.experts_grouped):
        out = path(x, w13, w2, weights, idx)
        assert out.dtype == torch.float32
        assert_close(out, ref, atol=3e-2, rtol=3e-2)


def test_routing_weights_are_float32_and_renormalised_only_when_asked():
    x, router = torch.randn(7, 16, dtype=torch.bfloat16), torch.randn(5, 16, dtype=torch.bfloat16)
    w_norm, _ = moe.route(x, router, 2, True)
    w_raw, _ = moe.route(x, router, 2, False)
    assert w_norm.dtype == torch.float32
    assert_close(w_norm.sum(-1), torch.ones(7))
    assert (w_raw.sum(-1) < 1).all()
    assert_close(w_norm, w_raw / w_raw.sum(-1, keepdim=True))


@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_layer_states_match_transformers_hidden_states(models, name):
    ours, ref = load_model(models[name]), _hf(models[name])
    captured = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.append(o[0]))
             for layer in ref.model.layers]
    with torch.no_grad():
        hidden = ref(PROMPT, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    states = ours.layer_states(PROMPT)
    n_layers = len(ref.model.layers)
    assert states["layer_input"].dtype == torch.float32
    assert states["layer_input"].shape == (n_layers, PROMPT.shape[1], 64)
    assert_close(states["layer_input"], torch.stack([h[0] for h in hidden[:n_layers]]), atol=1e-5, rtol=1e-5)
    assert_close(states["mlp_input"], torch.stack(captured), atol=1e-5, rtol=1e-5)


def test_moe_of_identical_dense_experts_gives_the_dense_logits(tmp_path, models):
    dense_w = synth.random_weights(synth.llama_config(), seed=0)  # == tiny_models["base"]
    cfg = synth.llama_config()
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
               num_experts_per_tok=2)
    g = torch.Generator().manual_seed(3)
    w = {}
    for name, t in dense_w.items():
        if ".mlp." not in name:
            w[name] = t
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "block_sparse_moe.gate.weight"] = torch.randn(4, 64, generator=g)
        for j in range(4):
            for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                w[f"{p}block_sparse_moe.experts.{j}.{ours}.weight"] = dense_w[f"{p}mlp.{theirs}.weight"].clone()
    synth.write_checkpoint(tmp_path, cfg, w)
    seq = torch.randint(3, VOCAB, (1, 16), generator=g)
    assert_close(load_model(tmp_path)(seq), load_model(models["llama"])(seq), atol=2e-5, rtol=2e-5)


def test_bf16_model_tracks_the_fp32_model(models):
    fp32 = load_model(models["mixtral"], dtype=torch.float32)
    bf16 = load_model(models["mixtral"], dtype=torch.bfloat16)
    assert bf16.dtype == bf16.layers[0].ffn.w13.dtype == torch.bfloat16
    a, b = fp32(PROMPT), bf16(PROMPT)
    # same argmax nearly everywhere, and the logits within bf16 rounding of the fp32 ones
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (a - b).abs().max() < 0.1 * a.abs().max()


@pytest.mark.parametrize("half_math", ["as calibrated on this CPU", "native everywhere (as on AVX2 CPUs)"])
def test_bf16_logits_with_and_without_the_native_kernels_agree(models, monkeypatch, native_on, half_math):
    """Same model, native kernels vs torch's ops: logits differ only by float32 summation order (plus the bf16
    rounding of activations that can follow from it). "native everywhere" makes the dispatcher take the native
    gemv and gemm whatever calibration measured here (as it does on CPUs without fast bf16 math); decode runs
    the native step over a bf16 cache in both."""
    calls: list[str] = []
    if half_math.startswith("native"):
        real_choices = calibrate.choices()
        forced = {name: {**c, "decode": "native", "prefill": "native"} for name, c in real_choices.items()}
        monkeypatch.setattr(calibrate, "choices", lambda: forced)
        for op in ("gemv", "gemm"):
            real = getattr(native, op)
            monkeypatch.setattr(native, op, lambda *a, _op=op, _real=real, **k: calls.append(_op) or _real(*a, **k))
    model = load_model(models["mixtral"], dtype=torch.bfloat16)

    def decode_logits() -> torch.Tensor:
        model.setup_cache(1, PROMPT.shape[1] + 4)
        prefill = model(PROMPT, start_pos=0)
        steps = [model(torch.tensor([[t]]), start_pos=PROMPT.shape[1] + i) for i, t in enumerate([3, 8, 6, 2])]
        return torch.cat([prefill, *steps], dim=1)

    with_kernel = decode_logits()
    assert model.step is not None and model.cache[0].k.dtype == torch.bfloat16
    if half_math.startswith("native"):
        assert "gemm" in calls  # the prefill (decode goes through the step, not gemv)
    monkeypatch.setattr(native, "_kernel", lambda op, dtype: None)
    without = decode_logits()
    # the same greedy token wherever torch's logits leave it a clear lead: where two of them tie (bf16 logits
    # often do exactly), the native path may break the tie the other way, and its pick is then worth as much
    scale = without.abs().max().item()
    picked = with_kernel.argmax(-1, keepdim=True)
    lead = without.max(-1, keepdim=True).values - without.gather(-1, picked)
    assert lead.max() <= 0.01 * scale, lead.max()
    assert (picked.squeeze(-1) == without.argmax(-1)).float().mean() >= 0.9
    assert_close(with_kernel, without, atol=0.05 * scale, rtol=0)


@pytest.mark.parametrize("rows", [1, 5, 8, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_paths_equal_float64_math(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3000, generator=g).to(dtype)     # 3000 columns, 700 rows: several weight blocks
    w, b = torch.randn(700, 3000, generator=g).to(dtype), torch.randn(700, generator=g).to(dtype)
    ref = x.double() @ w.double().t() + b.double()
    out = linear(x.view(1, rows, 3000), w, b)
    assert out.shape == (1, rows, 700) and out.dtype == dtype and out.is_contiguous()
    if dtype == torch.float32:
        assert_close(out[0].double(), ref, atol=1e-3, rtol=1e-5)
    else:  # within one rounding of the exact result in the output dtype
        assert_close(out[0].float(), ref.to(dtype).float(), atol=0.5, rtol=2e-2)
    assert_close(linear(x, w, b, out_dtype=torch.float32), ref.float(), atol=0.5, rtol=2e-2)


# --- generation, sampling, tokenizer ------------------------------------------------------------

def test_generate_streams_the_same_text_and_stops_at_eos(models):
    model, tok = load_model(models["llama"]), load_tokenizer(models["llama"])
    pieces: list[str] = []
    res = generate(model, tok, "Once upon a time", max_new_tokens=12, stream=pieces.append)
    assert res.prompt_tokens == len(tok.encode("Once upon a time"))
    assert "".join(pieces) == res.text == tok.decode(res.token_ids)
    free = generate_ids(model, tok.encode("Once upon a time"), 12)[0]
    assert res.token_ids == free[:len(res.token_ids)]
    tok.eos_token_ids = {free[3]}  # make the 4th greedy token an EOS: generation must stop at it
    stopped = generate(model, tok, "Once upon a time", max_new_tokens=12)
    assert stopped.token_ids == free[:free.index(free[3]) + 1]


def test_sampling_is_seeded_and_degenerate_settings_are_greedy(models):
    model, tok = load_model(models["mixtral"]), load_tokenizer(models["mixtral"])
    tok.eos_token_ids = set()
    run = lambda **kw: generate(model, tok, "The king said", max_new_tokens=16, **kw).token_ids  # noqa: E731
    greedy = run()
    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    assert run(temperature=1.5, seed=7) != greedy
    assert run(temperature=1.5, top_k=1, seed=3) == greedy
    assert run(temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(logits, 1.0, top_p=0.7, generator=g) for _ in range(3000)])
    assert set(draws.tolist()) == {0, 1}                       # 0.5 < 0.7 <= 0.8: tokens 0 and 1
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    draws = torch.tensor([sample(logits, 1.0, top_k=3, generator=g) for _ in range(3000)])
    assert set(draws.tolist()) == {0, 1, 2}
    assert abs((draws == 2).float().mean().item() - 0.15 / 0.95) < 0.03
    with pytest.raises(SamplingError, match="top_p 1.5"):
        check_params(1.0, None, 1.5)
    with pytest.raises(SamplingError, match="temperature -1"):
        check_params(-1, None, None)


def test_tokenizer_encode_decode_chat_template_and_eos(models):
    tok = load_tokenizer(models["llama"])
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(models["llama"] / "tokenizer.json"))
    text = "def add(a, b):\n    return a + b"
    assert tok.encode(text) == [1] + ref.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_ids == {2} and tok.bos_token_id == 1
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<|system|>\nBe brief.\n<|user|>\nHi\n"


def test_chat_template_from_jinja_file_and_eos_list(tmp_path, models):
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (tmp_path / f).write_bytes((models["llama"] / f).read_bytes())
    template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>[x]"
    assert tok.encode_chat([{"role": "user", "content": "x"}]) == tok.encode("<s>[x]", add_bos=False)
    assert tok.eos_token_ids == {2, 7}


def test_stream_decoder_never_splits_multibyte_characters(models):
    tok = load_tokenizer(models["llama"])
    text = "fox 狐狸 🦊 café — naïve"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text.split())  # the tiny BPE splits these characters into byte tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


# --- user errors --------------------------------------------------------------------------------

def test_folder_without_config_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_unsupported_architecture_is_named(tmp_path, models):
    cfg = json.loads((models["llama"] / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'gpt2'.*not supported.*LlamaForCausalLM"):
        load_model(tmp_path)


def test_weights_not_matching_config_are_a_checkpoint_error(tmp_path, models):
    for f in models["llama"].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 6}))
    with pytest.raises(CheckpointError, match="config.json says 6 layers but the weights have no layer 4"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_model(tmp_path)


def test_prompt_longer_than_the_context_is_refused(tmp_path):
    synth.make_llama(tmp_path, seed=0, max_positions=16)
    model, tok = load_model(tmp_path), load_tokenizer(tmp_path)
    with pytest.raises(ContextError, match="context is 16"):
        generate(model, tok, "the fox " * 20, max_new_tokens=4)
    # a prompt that fits is capped at the context instead
    res = generate(model, tok, "the fox", max_new_tokens=100)
    assert res.prompt_tokens + len(res.token_ids) <= 16
    assert isinstance(ContextError("x"), MergerError)


# --- merger generate ----------------------------------------------------------------------------

def _cli(*args: str):
    from typer.testing import CliRunner

    from merger.cli import app

    return CliRunner().invoke(app, ["generate", *args])


def test_cli_generate_json_is_one_line_with_the_greedy_tokens(models):
    res = _cli(str(models["mixtral"]), "Once upon a time", "-n", "6", "--json")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) == {"token_ids", "text", "prompt_tokens", "prefill_s", "decode_s", "decode_tokens_per_s"}
    tok = load_tokenizer(models["mixtral"])
    ids = tok.encode("Once upon a time")
    expect = generate_ids(load_model(models["mixtral"]), ids, 6, eos_token_ids=tok.eos_token_ids)[0]
    assert out["prompt_tokens"] == len(ids) and out["token_ids"] == expect
    assert out["text"] == tok.decode(expect)


def test_cli_generate_streams_text_and_reports_speed_on_stderr(models):
    res = _cli(str(models["llama"]), "The fox", "-n", "5", "--chat", "--temperature", "0.8", "--seed", "4",
               "--top-k", "20", "--top-p", "0.9", "--dtype", "bfloat16")
    assert res.exit_code == 0, res.stderr
    assert "tokens/s" in res.stderr and "tokens/s" not in res.stdout
    model, tok = load_model(models["llama"], torch.bfloat16), load_tokenizer(models["llama"])
    ref = generate(model, tok, "The fox", 5, 0.8, 20, 0.9, 4, chat=True)
    assert res.stdout == ref.text + "\n"


@pytest.mark.parametrize("args,needle", [
    (["{missing}", "hi"], "does not exist"),
    (["{llama}", "hi", "--dtype", "int8"], "--dtype: unknown dtype 'int8'"),
    (["{llama}", "hi", "--device", "tpu"], "--device"),
    (["{llama}", "hi", "--top-p", "0"], "top_p 0"),
    (["{empty}", "hi"], "config.json"),
    (["{short}", "the fox " * 20], "context is 16"),
])
def test_cli_generate_user_errors_are_one_line(tmp_path, models, args, needle):
    (tmp_path / "empty").mkdir()
    synth.make_llama(tmp_path / "short", seed=0, max_positions=16)
    paths = {"missing": tmp_path / "missing", "llama": models["llama"], "empty": tmp_path / "empty",
             "short": tmp_path / "short"}
    res = _cli(*(a.format(**{k: str(v) for k, v in paths.items()}) for a in args))
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr


def test_rope_table_regrows_for_longer_inputs(models):
    model = load_model(models["tied_sharded_llama3"])
    expect = model(PROMPT)
    model.init_rope(model.device, 8)  # shorter than the prompt: forward must extend it
    assert model.ropes["global"].length == 8
    assert_close(model(PROMPT), expect, atol=0, rtol=0)
    assert model.ropes["global"].length >= PROMPT.shape[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_cuda_model_matches_the_cpu_model(models, name):
    cpu, gpu = load_model(models[name]), load_model(models[name], device="cuda")
    assert_close(gpu(PROMPT.cuda()).cpu(), cpu(PROMPT), atol=1e-3, rtol=1e-3)
    assert generate_ids(gpu, PROMPT[0].tolist(), 8)[0] == generate_ids(cpu, PROMPT[0].tolist(), 8)[0]


def test_cuda_device_without_cuda_is_a_user_error(models):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(MergerError, match="CUDA is not available"):
        load_model(models["llama"], device="cuda")


def test_unsupported_dtype_is_an_engine_error(models):
    from merger.engine.model import EngineError

    with pytest.raises(EngineError, match="float64 is not supported"):
        load_model(models["llama"], dtype=torch.float64)


def test_big_weights_on_huge_pages_give_the_same_model(models, monkeypatch):
    """Weights of HUGE_PAGE bytes or more load into 2 MiB-aligned, huge-page-advised memory. The threshold is
    lowered here so the tiny model's tensors take that path: same logits, bit for bit."""
    plain = load_model(models["mixtral"], dtype=torch.float32)
    if not weights.huge_pages():
        pytest.skip("no transparent huge pages here")
    monkeypatch.setattr(weights, "HUGE_PAGE", 4096)
    made, real_empty = [], weights.empty
    monkeypatch.setattr(weights, "empty", lambda *a: made.append(real_empty(*a)) or made[-1])
    placed = load_model(models["mixtral"], dtype=torch.float32)
    on_huge = {t.data_ptr() for t in made if t.nbytes >= 4096}
    assert {placed.layers[0].ffn.w13.data_ptr(), placed.layers[0].attn.wqkv.data_ptr(), placed.output.data_ptr()} <= on_huge
    assert torch.equal(placed(PROMPT), plain(PROMPT))


def test_huge_page_memory_is_aligned_writable_and_can_be_turned_off(monkeypatch):
    t = weights.empty((1024, 1024), torch.float32, torch.device("cpu"))  # 4 MiB
    if weights.huge_pages():
        assert t.data_ptr() % weights.HUGE_PAGE == 0
    t.fill_(2.0)
    assert t.shape == (1024, 1024) and t.sum().item() == 2.0 * 1024 * 1024
    monkeypatch.setenv("MERGER_HUGEPAGES", "0")
    weights.huge_pages.cache_clear()
    try:
        assert not weights.huge_pages()
    finally:
        monkeypatch.undo()
        weights.huge_pages.cache_clear()
