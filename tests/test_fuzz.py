"""A seeded fuzz run of `merger validate` and `merger build`: hundreds of mutated recipes and dozens of
corrupted checkpoints. For every case: exit code 0 or 1, never a traceback; a failure is exactly one
`error:` line and leaves no output or temp folder; and validate's verdict equals build's wherever the
build failed before reading any tensor (validate runs the same checks, so it must fail with the same
line). Deterministic: the same seed gives the same cases."""
from __future__ import annotations

import copy
import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merger.cli import app
from merger.io.checkpoint import Checkpoint

runner = CliRunner()
N_RECIPES, N_CHECKPOINTS = 360, 60

BAD_VALUES = [None, True, False, "", "abc", -1, 0, 3, 0.5, -0.5, 1e308, float("inf"), float("-inf"), float("nan"),
              [], {}, [1, "a"], {"x": 1}, [0.2, 0.9], [{"filter": "mlp", "value": 2.0}], [{"filter": 3, "value": 1}],
              "~nosuchuser-fuzz/x", "../../etc", "org/name", "\u2603" * 3, "x" * 300, [[[[1]]]], 10**30, "bfloat16",
              "float64", [0, 2], [3, 1], [-1, 2]]
TYPOS = {"merge_method": "merge_methd", "models": "model", "parameters": "params", "weight": "wieght",
         "density": "densty", "base_model": "base", "layer_range": "range", "source_model": "source",
         "positive_prompts": "prompts", "experts_per_token": "experts_per_tok"}


def templates(m: dict[str, str]) -> list[dict]:
    ab = [{"model": m["ft_a"], "parameters": {"weight": 0.6, "density": 0.5}},
          {"model": m["ft_b"], "parameters": {"weight": 0.4, "density": 0.7}}]
    return [
        {"merge_method": "linear", "models": [{"model": m["ft_a"], "parameters": {"weight": 1.0}},
                                              {"model": m["ft_b"], "parameters": {"weight": [0.2, 0.8]}}],
         "dtype": "float32"},
        {"merge_method": "ties", "base_model": m["base"], "models": copy.deepcopy(ab), "parameters": {"lambda": 0.9}},
        {"merge_method": "della", "base_model": m["base"], "models": copy.deepcopy(ab),
         "parameters": {"epsilon": 0.1}},
        {"merge_method": "slerp", "base_model": m["base"], "models": [{"model": m["ft_a"]}],
         "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.5}]}},
        {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": m["ft_a"], "layer_range": [0, 2]}]},
            {"sources": [{"model": m["ft_b"], "layer_range": [1, 4]}]}]},
        {"merge_method": "karcher", "models": [{"model": m["ft_a"]}, {"model": m["ft_b"]}],
         "parameters": {"max_iter": 5, "tol": 1e-6}},
        {"merge_method": "linear", "base_model": m["base"], "chat_template": "chatml",
         "models": [{"model": m["ft_a"], "parameters": {"weight": 0.5}}, {"model": m["ft_b"], "parameters": {"weight": 0.5}}],
         "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
             "<s>": {"source": m["ft_a"], "force": True}, "<x>": {"source": {"kind": "zero"}},
             "<y>": {"source": {"kind": "model_token", "model": m["base"], "token_id": 5}}}}},
        {"base_model": m["base"], "gate_mode": "random", "experts_per_token": 1,
         "experts": [{"source_model": m["ft_a"], "noise_scale": 0.01}, {"source_model": m["ft_b"]}]},
        {"base_model": m["base"], "gate_mode": "cheap_embed", "dtype": "bfloat16",
         "experts": [{"source_model": m["ft_a"], "positive_prompts": ["def add(a, b):"]},
                     {"source_model": m["ft_b"], "positive_prompts": ["Once upon a time"],
                      "residual_scale": 0.5}]},
    ]


def paths_of(tree, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += paths_of(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += paths_of(v, prefix + (i,))
    return out


def mutate(recipe: dict, rng: random.Random) -> dict | str:
    """One to three random edits: a bad value, a deleted or misspelt key, an unknown key, a duplicated
    list item; sometimes raw text damage instead."""
    if rng.random() < 0.06:
        text = yaml.safe_dump(recipe, sort_keys=False)
        cut = rng.randrange(len(text))
        return rng.choice([text[:cut], text[:cut] + "]]: {" + text[cut:], text + "merge_method: linear\n",
                           "\t" + text, text.replace(":", "", 1)])
    r = copy.deepcopy(recipe)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths_of(r)[1:])
        parent = r
        for p in path[:-1]:
            parent = parent[p]
        key = path[-1]
        op = rng.random()
        if op < 0.55:
            parent[key] = copy.deepcopy(rng.choice(BAD_VALUES))
        elif op < 0.7 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.8 and isinstance(parent, dict):
            parent[TYPOS.get(key, f"{key}_x")] = parent.pop(key)
        elif op < 0.9 and isinstance(parent, dict):
            parent[rng.choice(["select_topk", "foo", "weight", "t", "tokenizer_source", "name"])] = \
                copy.deepcopy(rng.choice(BAD_VALUES))
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            parent[key] = copy.deepcopy(rng.choice(BAD_VALUES))
        if not isinstance(r, dict):
            break
    return r


@pytest.fixture
def count_reads(monkeypatch):
    reads = [0]
    real = Checkpoint.get

    def get(self, name):
        reads[0] += 1
        return real(self, name)

    monkeypatch.setattr(Checkpoint, "get", get)
    return reads


def run_case(tmp: Path, text: str, reads: list[int], label: str) -> str:
    """validate + build of one recipe text; the assertions every case must satisfy. Returns the verdict."""
    case = tmp / "case"
    case.mkdir()
    try:
        (case / "r.yaml").write_text(text)
        val = runner.invoke(app, ["validate", str(case / "r.yaml")])
        reads[0] = 0
        res = runner.invoke(app, ["build", str(case / "r.yaml"), str(case / "out"), "-q"])
        for name, r in (("validate", val), ("build", res)):
            assert r.exit_code in (0, 1), (label, name, r.exit_code, r.output, text)
            assert "Traceback" not in r.output and not isinstance(r.exception, AssertionError), \
                (label, name, r.output, text)
            if r.exit_code == 1:
                lines = r.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: "), (label, name, r.stderr, text)
        assert not [p for p in case.iterdir() if "merger-" in p.name], (label, text)
        if res.exit_code == 1:
            assert not (case / "out").exists(), (label, text)
            if reads[0] == 0:  # failed before reading any tensor: validate must say exactly the same
                assert val.exit_code == 1 and val.stderr == res.stderr, (label, val.output, res.stderr, text)
            return "fail"
        assert val.exit_code == 0, (label, val.stderr, text)
        assert (case / "out" / "config.json").is_file(), (label, text)
        return "ok"
    finally:
        shutil.rmtree(case, ignore_errors=True)


def test_fuzzed_recipes(tmp_path, tiny_models, count_reads):
    m = {k: str(v) for k, v in tiny_models.items()}
    rng = random.Random(20261201)
    bases = templates(m)
    verdicts = {"ok": 0, "fail": 0}
    for k in range(N_RECIPES):
        mutated = mutate(bases[k % len(bases)], rng)
        text = mutated if isinstance(mutated, str) else yaml.safe_dump(mutated, sort_keys=False, allow_unicode=True)
        verdicts[run_case(tmp_path, text, count_reads, f"recipe {k}")] += 1
    assert sum(verdicts.values()) == N_RECIPES and verdicts["fail"] > N_RECIPES // 2, verdicts


# --- corrupted checkpoints ------------------------------------------------------------------------

CONFIG_KEYS = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "intermediate_size", "tie_word_embeddings", "rms_norm_eps", "rope_scaling", "max_position_embeddings",
               "model_type", "architectures", "torch_dtype", "eos_token_id", "bos_token_id", "hidden_act"]


def corrupt(folder: Path, rng: random.Random) -> str:
    """Damage one model folder in one of many ways; returns what was done."""
    st = folder / "model.safetensors"
    cfg_path = folder / "config.json"
    kind = rng.randrange(9)
    if kind <= 2:  # a config value of the wrong type or range
        cfg = json.loads(cfg_path.read_text())
        key = rng.choice(CONFIG_KEYS)
        cfg[key] = copy.deepcopy(rng.choice(BAD_VALUES))
        cfg_path.write_text(json.dumps(cfg))
        return f"config {key}={cfg[key]!r}"
    if kind == 3:  # config.json that is not JSON, or not an object
        cfg_path.write_text(rng.choice(["", "[1, 2]", "{", "null", '"x"', "{" * 5000]))
        return "config text"
    data = st.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    if kind <= 6:  # one header field damaged
        name = rng.choice(names)
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = copy.deepcopy(rng.choice(BAD_VALUES + [[0, 1], [5], ["x"], [1.5, 2]]))
        raw = json.dumps(header).encode()
        st.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        return f"header {name}.{field}={header[name][field]!r}"
    if kind == 7:  # truncated or padded file
        cut = rng.choice([4, 8 + n // 2, 8 + n + 10, len(data) - 3])
        st.write_bytes(data[:cut] if rng.random() < 0.8 else data + b"\0" * 16)
        return f"cut at {cut}"
    st.unlink() if rng.random() < 0.5 else (folder / "tokenizer.json").write_text("{not json")
    return "file removed or tokenizer damaged"


def test_fuzzed_checkpoints(tmp_path, tiny_models, count_reads):
    rng = random.Random(7)
    verdicts = {"ok": 0, "fail": 0}
    for k in range(N_CHECKPOINTS):
        bad = tmp_path / f"bad{k}"
        shutil.copytree(tiny_models["ft_a"], bad)
        what = corrupt(bad, rng)
        if k % 3 == 2:
            r = {"base_model": str(tiny_models["base"]), "gate_mode": "random",
                 "experts": [{"source_model": str(bad)}, {"source_model": str(tiny_models["ft_b"])}]}
        else:
            r = {"merge_method": "linear", "models": [{"model": str(tiny_models["ft_b"]), "parameters": {"weight": 1}},
                                                      {"model": str(bad), "parameters": {"weight": 1}}]}
        verdicts[run_case(tmp_path, yaml.safe_dump(r), count_reads, f"checkpoint {k}: {what}")] += 1
        shutil.rmtree(bad)
    assert verdicts["fail"] >= N_CHECKPOINTS // 2, verdicts
