"""config.json against the stored tensors: a tensor the model would not use (a layer past num_hidden_layers,
a bias the config turns off, an extra expert) or one it needs and lacks is a CheckpointError naming it,
raised before any tensor data is read. Tied embeddings and RoPE buffers old savers wrote still load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import assert_one_line_error
from torch.testing import assert_close

from merger import synth
from merger.engine.model import load_model
from merger.errors import CheckpointError
from merger.io import checkpoint as io_checkpoint

SEQ = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(0))


def _write(path: Path, cfg: dict, weights: dict) -> Path:
    return synth.write_checkpoint(path, cfg, weights)


def _set_layers(path: Path, n: int) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": n}))


@pytest.fixture
def engine_check_only(monkeypatch):
    """Take out merger.io's own layer-count check (where it has one), so the engine's check is what answers."""
    if hasattr(io_checkpoint, "check_stored_layers"):
        monkeypatch.setattr(io_checkpoint, "check_stored_layers", lambda *a, **k: None)


def _no_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = io_checkpoint.Checkpoint.get
    monkeypatch.setattr(io_checkpoint.Checkpoint, "get", lambda self, name: reads.append(name) or real(self, name))
    return reads


def test_fewer_layers_in_config_than_in_the_weights_is_refused(tmp_path):
    synth.make_llama(tmp_path, seed=0)
    _set_layers(tmp_path, 2)
    with pytest.raises(CheckpointError, match="config.json says 2 layers but the weights hold layer 2.*num_hidden_layers"):
        load_model(tmp_path)


def test_the_engine_names_the_first_unused_layer_tensor_and_reads_nothing(tmp_path, monkeypatch, engine_check_only):
    synth.make_llama(tmp_path, seed=0)
    _set_layers(tmp_path, 2)
    reads = _no_reads(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert str(e.value) == (f"{tmp_path}: config.json says 2 layers but the weights hold layer 2 "
                            "(model.layers.2.input_layernorm.weight); config.json and the weights disagree: "
                            "fix num_hidden_layers (they hold layers up to 3)")
    assert reads == []


def test_more_layers_in_config_than_in_the_weights_is_refused(tmp_path, monkeypatch, engine_check_only):
    synth.make_llama(tmp_path, seed=0)
    _set_layers(tmp_path, 6)
    reads = _no_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"config.json says 6 layers but the weights have no layer 4 "
                                              r"\(model.layers.4.input_layernorm.weight is missing\)"):
        load_model(tmp_path)
    assert reads == []


def test_cli_generate_with_a_layer_count_mismatch_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from merger.cli import app

    synth.make_llama(tmp_path / "m", seed=0)
    _set_layers(tmp_path / "m", 2)
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "m"), "hi", "-n", "2"])
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "none", "config.json says 2 layers",
                          "num_hidden_layers")


def test_bias_tensors_the_config_turns_off_are_refused(tmp_path):
    cfg = synth.llama_config()
    w = synth.random_weights(cfg, seed=0)
    w["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    _write(tmp_path, cfg, w)
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.self_attn.q_proj.bias' is not used by the "
                                              r"llama model config.json describes; config.json and the weights"):
        load_model(tmp_path)


def test_a_stray_tensor_is_refused_and_a_missing_one_named(tmp_path):
    cfg = synth.llama_config()
    w = synth.random_weights(cfg, seed=0)
    _write(tmp_path / "stray", cfg, {**w, "model.vision_tower.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="'model.vision_tower.weight' is not used"):
        load_model(tmp_path / "stray")
    del w["model.layers.1.mlp.up_proj.weight"]
    _write(tmp_path / "missing", cfg, w)
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_model(tmp_path / "missing")


def test_experts_beyond_num_local_experts_are_refused(tmp_path):
    cfg = synth.llama_config()
    dense = synth.random_weights(cfg, seed=0)
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=3, num_experts_per_tok=2)
    w = {k: v for k, v in dense.items() if ".mlp." not in k}
    for i in range(4):
        p = f"model.layers.{i}.block_sparse_moe."
        w[p + "gate.weight"] = torch.randn(4, 64)  # stored router for 4 experts
        for j in range(4):
            for name, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                w[f"{p}experts.{j}.{name}.weight"] = dense[f"model.layers.{i}.mlp.{theirs}.weight"].clone()
    _write(tmp_path, cfg, w)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.block_sparse_moe.experts.3.w1.weight' is not used"):
        load_model(tmp_path)


def test_tied_embeddings_load_with_or_without_a_stale_lm_head(tmp_path):
    cfg = synth.llama_config(tie=True)
    w = synth.random_weights(cfg, seed=0)
    assert "lm_head.weight" not in w
    _write(tmp_path / "tied", cfg, w)
    _write(tmp_path / "stale", cfg, {**w, "lm_head.weight": torch.randn(512, 64)})
    tied, stale = load_model(tmp_path / "tied"), load_model(tmp_path / "stale")
    assert tied.output.data_ptr() == tied.embed.data_ptr() and stale.output.data_ptr() == stale.embed.data_ptr()
    assert_close(stale(SEQ), tied(SEQ), atol=0, rtol=0)


def test_saved_rotary_buffers_are_ignored(tmp_path):
    cfg = synth.llama_config()
    w = synth.random_weights(cfg, seed=0)
    _write(tmp_path / "plain", cfg, w)
    inv = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(4)}
    _write(tmp_path / "buffers", cfg, {**w, **inv})
    assert_close(load_model(tmp_path / "buffers")(SEQ), load_model(tmp_path / "plain")(SEQ), atol=0, rtol=0)
