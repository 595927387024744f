"""A corrupt config.json is a one-line CheckpointError naming the field, from parse_config and from
`merger generate` alike: never a ValueError / TypeError / KeyError traceback, never a silent default
(only an absent or null optional field takes one)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error

from merger import synth
from merger.engine.config import parse_config, rope_inv_freq
from merger.errors import CheckpointError

NAN, INF = float("nan"), float("inf")


def _base(kind: str) -> dict:
    """A valid config of each model type the engine runs."""
    if kind in ("llama", "mistral"):
        return synth.llama_config(model_type=kind, **({"sliding_window": 8} if kind == "mistral" else {}))
    cfg = synth.llama_config()
    if kind == "mixtral":
        cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                   num_experts_per_tok=2)
    else:
        cfg.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=32, use_sliding_window=True, sliding_window=8)
    return cfg


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}

# (model type, fields to set, text the message must hold); None deletes the field
CASES = [
    ("llama", {"num_hidden_layers": "four"}, "num_hidden_layers"),
    ("llama", {"num_hidden_layers": None}, "'num_hidden_layers' is missing"),
    ("llama", {"num_hidden_layers": -1}, "num_hidden_layers must be an integer >= 1, got -1"),
    ("llama", {"num_hidden_layers": True}, "num_hidden_layers must be an integer >= 1, got True"),
    ("llama", {"num_hidden_layers": 4.5}, "num_hidden_layers must be an integer >= 1, got 4.5"),
    ("llama", {"num_hidden_layers": 0}, "num_hidden_layers"),
    ("llama", {"hidden_size": "abc"}, "hidden_size must be an integer >= 1, got 'abc'"),
    ("llama", {"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads 3"),
    ("llama", {"num_key_value_heads": [2]}, "num_key_value_heads"),
    ("llama", {"rope_scaling": "linear"}, "rope_scaling must be an object"),
    ("llama", {"rope_scaling": ["linear", 2.0]}, "rope_scaling must be an object"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "rope_scaling.factor must be a finite"),
    ("llama", {"rope_scaling": {"rope_type": "linear"}}, "'rope_scaling.factor' is missing"),
    ("llama", {"rope_scaling": {"type": "linear", "factor": -2.0}}, "rope_scaling.factor"),
    ("llama", {"rope_scaling": {"rope_type": 3}}, "rope_scaling.rope_type must be a string"),
    ("llama", {"rope_scaling": {**_LLAMA3, "low_freq_factor": None}}, "'rope_scaling.low_freq_factor' is missing"),
    ("llama", {"rope_scaling": {**_LLAMA3, "high_freq_factor": 1.0}}, "rope_scaling.high_freq_factor must be greater"),
    ("llama", {"rope_scaling": {**_LLAMA3, "original_max_position_embeddings": 0}},
     "rope_scaling.original_max_position_embeddings"),
    ("llama", {"rope_parameters": "abc"}, "rope_parameters must be an object"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 0}}, "rope_parameters.factor"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}, "rope_parameters.rope_theta"),
    ("llama", {"rope_theta": INF}, "rope_theta must be a finite number > 0, got inf"),
    ("llama", {"rope_theta": 0}, "rope_theta"),
    ("llama", {"eos_token_id": "x"}, "eos_token_id must be an integer >= 0, got 'x'"),
    ("llama", {"eos_token_id": [1, "a"]}, "eos_token_id must be an integer >= 0, got 'a'"),
    ("llama", {"eos_token_id": -2}, "eos_token_id"),
    ("llama", {"bos_token_id": "<s>"}, "bos_token_id must be an integer >= 0, got '<s>'"),
    ("llama", {"bos_token_id": [1]}, "bos_token_id"),
    ("llama", {"max_position_embeddings": 0}, "max_position_embeddings must be an integer >= 1, got 0"),
    ("llama", {"max_position_embeddings": "4096"}, "max_position_embeddings"),
    ("llama", {"rms_norm_eps": -1e-5}, "rms_norm_eps must be a finite number > 0, got -1e-05"),
    ("llama", {"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number > 0, got '1e-5'"),
    ("llama", {"rms_norm_eps": NAN}, "rms_norm_eps must be a finite number > 0, got nan"),
    ("llama", {"vocab_size": True}, "vocab_size must be an integer >= 1, got True"),
    ("llama", {"vocab_size": 0}, "vocab_size must be an integer >= 1, got 0"),
    ("llama", {"vocab_size": -5}, "vocab_size"),
    ("llama", {"intermediate_size": 128.5}, "intermediate_size must be an integer >= 1, got 128.5"),
    ("llama", {"intermediate_size": INF}, "intermediate_size"),
    ("llama", {"head_dim": 0}, "head_dim must be an integer >= 1, got 0"),
    ("llama", {"head_dim": 15}, "head_dim must be even"),
    ("llama", {"head_dim": None, "hidden_size": 66}, "hidden_size 66 is not a multiple of num_attention_heads 4"),
    ("llama", {"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ("llama", {"attention_bias": 1}, "attention_bias must be true or false, got 1"),
    ("llama", {"architectures": "LlamaForCausalLM"}, "architectures must be a list"),
    ("llama", {"model_type": ["llama"]}, "model_type must be a string"),
    ("llama", {"layer_types": ["full_attention"] * 3}, "layer_types must be a list of 4 entries"),
    ("mistral", {"layer_types": ["full_attention", "sliding_attention", "chunked_attention", "full_attention"]},
     "layer_types"),
    ("mistral", {"layer_types": "sliding_attention"}, "layer_types"),
    ("mistral", {"sliding_window": -1}, "sliding_window must be an integer >= 0, got -1"),
    ("mistral", {"sliding_window": "4096"}, "sliding_window must be an integer >= 0, got '4096'"),
    ("mixtral", {"num_experts_per_tok": "two"}, "num_experts_per_tok must be an integer >= 1, got 'two'"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok 5 must be between 1 and 4"),
    ("mixtral", {"num_local_experts": 0}, "num_local_experts"),
    ("qwen2_moe", {"mlp_only_layers": "1"}, "mlp_only_layers must be a list of layer indices in 0..3"),
    ("qwen2_moe", {"mlp_only_layers": [1.5]}, "mlp_only_layers"),
    ("qwen2_moe", {"mlp_only_layers": [7]}, "mlp_only_layers"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step must be an integer >= 1, got 0"),
    ("qwen2_moe", {"use_sliding_window": "true"}, "use_sliding_window must be true or false"),
    ("qwen2_moe", {"max_window_layers": -1}, "max_window_layers"),
    ("qwen2_moe", {"moe_intermediate_size": None}, "'moe_intermediate_size' is missing"),
    ("qwen2_moe", {"norm_topk_prob": "no"}, "norm_topk_prob"),
]


def _corrupt(kind: str, fields: dict) -> dict:
    cfg = _base(kind)
    for k, v in fields.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize("kind,fields,needle", CASES, ids=[f"{k}-{'-'.join(f)}-{i}" for i, (k, f, _) in
                                                           enumerate(CASES)])
def test_corrupt_field_is_a_one_line_checkpoint_error(kind, fields, needle):
    with pytest.raises(CheckpointError) as e:  # anything but CheckpointError fails the test
        parse_config(_corrupt(kind, fields), "m/config.json")
    msg = str(e.value)
    assert msg.startswith("m/config.json: ") and "\n" not in msg
    assert needle in msg, msg


@pytest.mark.parametrize("kind", ["llama", "mistral", "mixtral", "qwen2_moe"])
def test_the_valid_bases_parse(kind):
    mc = parse_config(_base(kind))
    assert (mc.num_layers, mc.hidden_size, mc.head_dim, mc.max_position_embeddings) == (4, 64, 16, 512)
    assert mc.eos_token_ids == [2] and mc.bos_token_id == 1
    assert mc.sliding_windows == ([8] * 4 if kind == "mistral" else [None, None, None, None] if kind != "qwen2_moe"
                                  else [8, None, 8, None])  # Qwen2-MoE's rule: odd layers below max_window_layers


def test_absent_or_null_optional_fields_take_their_defaults_and_whole_floats_count():
    cfg = _corrupt("llama", {"max_position_embeddings": None, "rms_norm_eps": None, "head_dim": None,
                             "num_key_value_heads": None, "eos_token_id": None, "bos_token_id": None})
    cfg.update(rope_scaling=None, num_hidden_layers=4.0, sliding_window=None)
    mc = parse_config(cfg)
    assert (mc.max_position_embeddings, mc.rms_norm_eps, mc.head_dim, mc.num_kv_heads) == (4096, 1e-6, 16, 4)
    assert mc.num_layers == 4 and isinstance(mc.num_layers, int)
    assert mc.eos_token_ids == [] and mc.bos_token_id is None and mc.rope_scaling is None


def test_llama3_scaling_defaults_its_original_context_to_max_positions():
    mc = parse_config(_corrupt("llama", {"rope_scaling": _LLAMA3}))
    assert mc.rope_scaling == {**_LLAMA3, "original_max_position_embeddings": 512}
    inv = rope_inv_freq(mc)
    assert inv.shape == (8,) and bool(inv.isfinite().all())
    # the highest frequency (wavelength 2 pi < 512 / 4) is kept, the lowest divided by the factor
    assert inv[0].item() == 1.0
    assert math.isclose(inv[-1].item(), 10000.0 ** (-14 / 16) / 8.0, rel_tol=1e-6)


JUNK = ["x", [], {}, -1, 0, True, 1.5, NAN, INF, [1, "a"], {"a": 1}]


@pytest.mark.parametrize("kind", ["llama", "mistral", "mixtral", "qwen2_moe"])
def test_any_junk_in_any_field_is_accepted_or_a_checkpoint_error(kind):
    """A small fuzz over every field of every base: parse_config returns or raises CheckpointError, nothing else."""
    base, raised = _base(kind), 0
    keys = [*base, "rope_scaling", "rope_parameters", "layer_types", "mlp_only_layers", "shared_expert_intermediate_size",
            "decoder_sparse_step", "max_window_layers", "qkv_bias", "norm_topk_prob", "use_sliding_window"]
    for key in keys:
        for junk in JUNK:
            try:
                parse_config({**base, key: junk})
            except CheckpointError as e:
                assert "\n" not in str(e)
                raised += 1
    assert raised > 5 * len(base)  # most junk is refused, not silently taken


# --- through `merger generate` ------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cfg-errors")
    synth.make_llama(root / "llama", seed=0)
    synth.make_llama(root / "mistral", seed=0, model_type="mistral", sliding_window=8)
    return {"llama": root / "llama", "mistral": root / "mistral"}


def _generate(model_dir: Path):
    from typer.testing import CliRunner

    from merger.cli import app

    return CliRunner().invoke(app, ["generate", str(model_dir), "hi", "-n", "2"])


CLI_CASES = [c for c in CASES if c[0] in ("llama", "mistral")]


@pytest.mark.parametrize("kind,fields,needle", CLI_CASES, ids=[f"{k}-{'-'.join(f)}-{i}" for i, (k, f, _) in
                                                               enumerate(CLI_CASES)])
def test_cli_generate_on_a_corrupt_config_prints_one_error_line(tmp_path, checkpoints, kind, fields, needle):
    model = tmp_path / "model"
    shutil.copytree(checkpoints[kind], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg = {**cfg, **fields}
    for k, v in fields.items():
        if v is None:
            cfg.pop(k, None)
    (model / "config.json").write_text(json.dumps(cfg))
    res = _generate(model)
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "none", "config.json", needle)


def test_cli_generate_runs_on_the_uncorrupted_copies(checkpoints):
    for path in checkpoints.values():
        res = _generate(path)
        assert res.exit_code == 0, res.stderr
        assert "2 tokens after a" in res.stderr
