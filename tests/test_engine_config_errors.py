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
from merger.engine.config import SUPPORTED, parse_config, rope_inv_freq
from merger.errors import CheckpointError

NAN, INF = float("nan"), float("inf")


_PHI3_LONGROPE = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
_FAMILY = {  # model type -> the fields that make a llama_config() one of its family
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, use_sliding_window=True,
                      sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "qwen3": dict(),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "gemma2": dict(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window=8,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window=8,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                            "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                        layer_types=["sliding_attention", "full_attention"] * 2),
    "phi3": dict(rope_scaling=_PHI3_LONGROPE, original_max_position_embeddings=64, sliding_window=8),
}
KINDS = ["llama", "mistral", *_FAMILY]


def _base(kind: str) -> dict:
    """A valid config of each model type the engine runs."""
    if kind in ("llama", "mistral"):
        return synth.llama_config(model_type=kind, **({"sliding_window": 8} if kind == "mistral" else {}))
    cfg = synth.llama_config()
    cfg.update(model_type=kind, architectures=[SUPPORTED[kind]], **_FAMILY[kind])
    if kind.startswith("gemma"):
        del cfg["hidden_act"], cfg["tie_word_embeddings"]  # Gemma reads hidden_activation; ties by default
    if kind == "gemma3_text":
        del cfg["rope_theta"]  # transformers 5 nests it in rope_parameters
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
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported by the engine (supported: silu, "
                                      "gelu_pytorch_tanh)"),
    ("llama", {"hidden_act": 3}, "hidden_act must be a string"),
    ("mixtral", {"hidden_act": "gelu_pytorch_tanh"}, "for MoE experts (only silu)"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope type 'yarn' is not supported by the engine (supported: default, linear, llama3, longrope)"),
    ("llama", {"rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, "per-layer-type rope_parameters"),
    ("llama", {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]},
     "'gemma3' (model_type/architectures) is not supported by the engine; that is the multimodal Gemma 3"),
    ("qwen2", {"max_window_layers": "all"}, "max_window_layers must be an integer >= 0"),
    ("qwen2", {"use_sliding_window": 1}, "use_sliding_window must be true or false"),
    ("qwen3", {"attention_bias": "no"}, "attention_bias must be true or false"),
    ("qwen3_moe", {"num_experts": None, "num_local_experts": "4"}, "num_local_experts must be an integer >= 0"),
    ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok 9 must be between 1 and 4"),
    ("qwen3_moe", {"mlp_only_layers": [4]}, "mlp_only_layers must be a list of layer indices in 0..3"),
    ("gemma2", {"hidden_activation": "relu"}, "hidden_activation 'relu' is not supported by the engine"),
    ("gemma2", {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a finite number > 0, got 0"),
    ("gemma2", {"attn_logit_softcapping": "50"}, "attn_logit_softcapping must be a finite number > 0"),
    ("gemma2", {"final_logit_softcapping": -30.0}, "final_logit_softcapping must be a finite number > 0"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention is true"),
    ("gemma2", {"sliding_window": 0.5}, "sliding_window must be an integer >= 0"),
    ("gemma3_text", {"layer_types": None, "sliding_window_pattern": 0},
     "sliding_window_pattern must be an integer >= 1"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_theta": "1e6"}, "sliding_attention": {}}},
     "rope_parameters.full_attention.rope_theta must be a finite number > 0"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {}, "sliding_attention": {"rope_type": "dynamic"}}},
     "rope type 'dynamic' is not supported"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {}, "chunked_attention": {}}}, "per-layer-type"),
    ("gemma3_text", {"rope_parameters": None, "rope_local_base_freq": -1}, "rope_local_base_freq must be a finite"),
    ("phi3", {"rope_scaling": {**_PHI3_LONGROPE, "short_factor": [1.0] * 7}},
     "rope_scaling.short_factor must be a list of 8 numbers > 0"),
    ("phi3", {"rope_scaling": {**_PHI3_LONGROPE, "long_factor": [1.0] * 7 + ["x"]}}, "rope_scaling.long_factor"),
    ("phi3", {"rope_scaling": {"type": "su", "long_factor": [1.0] * 8}}, "'rope_scaling.short_factor' is missing"),
    ("phi3", {"rope_scaling": {**_PHI3_LONGROPE, "attention_factor": 0}}, "rope_scaling.attention_factor"),
    ("phi3", {"original_max_position_embeddings": 0}, "original_max_position_embeddings must be an integer >= 1"),
    ("phi3", {"partial_rotary_factor": 1.5}, "partial_rotary_factor must be at most 1"),
    # 16 * 0.3 = 4.8 -> 4 rotated dims, so the 8 factors no longer fit
    ("phi3", {"partial_rotary_factor": 0.3}, "rope_scaling.short_factor must be a list of 2 numbers"),
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


# each family's window rule: Qwen2-MoE odd layers below max_window_layers, Qwen2 from max_window_layers on,
# Gemma 2 alternating (sliding first), Gemma 3 here as its layer_types say, Phi-3 and Mistral every layer
WINDOWS = {"mistral": [8] * 4, "qwen2_moe": [8, None, 8, None], "qwen2": [None, None, 8, 8],
           "gemma2": [8, None, 8, None], "gemma3_text": [8, None, 8, None], "phi3": [8] * 4}


@pytest.mark.parametrize("kind", KINDS)
def test_the_valid_bases_parse(kind):
    mc = parse_config(_base(kind))
    assert (mc.num_layers, mc.hidden_size, mc.head_dim, mc.max_position_embeddings) == (4, 64, 16, 512)
    assert mc.eos_token_ids == [2] and mc.bos_token_id == 1
    assert mc.sliding_windows == WINDOWS.get(kind, [None] * 4)


def test_family_fields_come_from_their_config_keys():
    gemma2, gemma3, phi3 = (parse_config(_base(k)) for k in ("gemma2", "gemma3_text", "phi3"))
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.attn_scale) == (50.0, 30.0, 16 ** -0.5)
    assert gemma2.norm_plus_one and gemma2.sandwich_norms and gemma2.embed_scale == 8.0 and gemma2.tie_word_embeddings
    assert gemma2.hidden_act == "gelu_pytorch_tanh" and not gemma2.qk_norm
    # transformers' Gemma 3 never soft-caps attention; its two RoPEs come from the nested rope_parameters
    assert gemma3.attn_softcap is None and gemma3.qk_norm and gemma3.final_softcap is None
    assert (gemma3.rope.theta, gemma3.rope.scaling, gemma3.local_rope.theta) == (1e6, {"rope_type": "linear",
                                                                                     "factor": 8.0}, 1e4)
    # longrope: the top-level original context wins; attention factor sqrt(1 + ln(512/64) / ln(64))
    assert phi3.fused_weights and phi3.rope.switch == 64
    assert math.isclose(phi3.rope.scaling["attention_factor"], math.sqrt(1 + math.log(8) / math.log(64)))
    partial = parse_config({**_base("phi3"), "rope_scaling": None, "partial_rotary_factor": 0.75})
    assert partial.rope.dim == 12 and partial.head_dim == 16
    qwen3_moe = parse_config({**_base("qwen3_moe"), "num_experts": None, "num_local_experts": 4})
    assert qwen3_moe.num_experts == 4 and qwen3_moe.shared_expert_intermediate_size == 0 and qwen3_moe.norm_topk_prob
    assert parse_config(_base("qwen2")).qkv_bias and not parse_config(_base("qwen2")).o_bias
    assert not parse_config({**_base("gemma2"), "final_logit_softcapping": None}).final_softcap  # null: off
    # an absent sliding_window is the config class's default (MistralConfig: 4096), a null one is off
    mistral = {k: v for k, v in _base("mistral").items() if k != "sliding_window"}
    assert parse_config(mistral).sliding_windows == [4096] * 4
    assert parse_config({**mistral, "sliding_window": None}).sliding_windows == [None] * 4


def test_absent_or_null_optional_fields_take_their_defaults_and_whole_floats_count():
    cfg = _corrupt("llama", {"max_position_embeddings": None, "rms_norm_eps": None, "head_dim": None,
                             "num_key_value_heads": None, "eos_token_id": None, "bos_token_id": None})
    cfg.update(rope_scaling=None, num_hidden_layers=4.0, sliding_window=None)
    mc = parse_config(cfg)
    assert (mc.max_position_embeddings, mc.rms_norm_eps, mc.head_dim, mc.num_kv_heads) == (4096, 1e-6, 16, 4)
    assert mc.num_layers == 4 and isinstance(mc.num_layers, int)
    assert mc.eos_token_ids == [] and mc.bos_token_id is None and mc.rope.scaling is None


def test_llama3_scaling_defaults_its_original_context_to_max_positions():
    mc = parse_config(_corrupt("llama", {"rope_scaling": _LLAMA3}))
    assert mc.rope.scaling == {**_LLAMA3, "original_max_position_embeddings": 512}
    inv = rope_inv_freq(mc)
    assert inv.shape == (8,) and bool(inv.isfinite().all())
    # the highest frequency (wavelength 2 pi < 512 / 4) is kept, the lowest divided by the factor
    assert inv[0].item() == 1.0
    assert math.isclose(inv[-1].item(), 10000.0 ** (-14 / 16) / 8.0, rel_tol=1e-6)


JUNK = ["x", [], {}, -1, 0, True, 1.5, NAN, INF, [1, "a"], {"a": 1}]


@pytest.mark.parametrize("kind", KINDS)
def test_any_junk_in_any_field_is_accepted_or_a_checkpoint_error(kind):
    """A small fuzz over every field of every base: parse_config returns or raises CheckpointError, nothing else."""
    base, raised = _base(kind), 0
    keys = [*base, "rope_scaling", "rope_parameters", "layer_types", "mlp_only_layers", "shared_expert_intermediate_size",
            "decoder_sparse_step", "max_window_layers", "qkv_bias", "norm_topk_prob", "use_sliding_window",
            "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
            "sliding_window_pattern", "rope_local_base_freq", "partial_rotary_factor", "num_local_experts",
            "original_max_position_embeddings", "use_bidirectional_attention"]
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
