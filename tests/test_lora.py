"""`model: base+adapter`: a PEFT LoRA adapter folded into its base while the base is read, checked
against PEFT's own merge_and_unload(); bad adapters give one line and write nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from typer.testing import CliRunner

from merger.cli import app

from cli_checks import assert_one_line_error

peft = pytest.importorskip("peft", reason="pip install peft (a test dependency)")
runner = CliRunner()


def make_adapter(base: Path, out: Path, seed: int = 0, **lora_kw) -> dict[str, torch.Tensor]:
    """A PEFT adapter for `base` with random (non-zero) B matrices; returns PEFT's merged state dict."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora_kw})
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def build(tmp_path: Path, ref: str, name: str = "out") -> tuple[int, str, Path]:
    r = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
    res = runner.invoke(app, ["build", str(tmp_path / f"{name}.yaml"), str(tmp_path / name), "-q"])
    return res.exit_code, res.stderr, tmp_path / name


@pytest.mark.parametrize("kw", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
], ids=["plain", "rslora", "patterns", "embedding_and_saved_module"])
def test_folded_adapter_equals_peft_merge_and_unload(tmp_path, tiny_models, kw):
    want = make_adapter(tiny_models["base"], tmp_path / "adapter", **kw)
    code, err, out = build(tmp_path, f"{tiny_models['base']}+{tmp_path / 'adapter'}")
    assert code == 0, err
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    changed = 0
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    for name, t in want.items():
        assert_close(got[name], t, atol=1e-6, rtol=1e-6)
        changed += not torch.equal(t, base[name])
    assert changed >= 3  # the adapter really changed the targeted tensors


def test_lora_reference_in_a_merge_with_other_models(tmp_path, tiny_models):
    want = make_adapter(tiny_models["base"], tmp_path / "adapter")
    other = load_file(str(tiny_models["ft_a"] / "model.safetensors"))
    r = {"merge_method": "linear", "models": [
        {"model": f"{tiny_models['base']}+{tmp_path / 'adapter'}", "parameters": {"weight": 0.5}},
        {"model": str(tiny_models["ft_a"]), "parameters": {"weight": 0.5}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    res = runner.invoke(app, ["build", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.stderr
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    assert_close(got[name], 0.5 * want[name] + 0.5 * other[name], atol=1e-6, rtol=1e-6)


def test_fan_in_fan_out_transposes_the_delta(tmp_path, tiny_models):
    """A hand-written adapter (Conv1D layout): delta = (B·A)ᵀ · alpha / r, recomputed here."""
    ad = tmp_path / "adapter"
    ad.mkdir()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 64, generator=g), torch.randn(128, 2, generator=g)   # gate_proj weight is [128, 64]
    key = "base_model.model.model.layers.0.mlp.gate_proj"
    # with fan_in_fan_out the module's weight is [in, out]: our base stores [out, in] = [128, 64], so the
    # adapter is written for the transposed orientation: B [in=64, r], A [r, out=128]
    save_file({f"{key}.lora_A.weight": b.t().contiguous(), f"{key}.lora_B.weight": a.t().contiguous()},
              str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6,
                                                        "fan_in_fan_out": True, "target_modules": ["gate_proj"]}))
    code, err, out = build(tmp_path, f"{tiny_models['base']}+{ad}")
    assert code == 0, err
    base = load_file(str(tiny_models["base"] / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    got = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    assert_close(got, base + (a.t() @ b.t()).t() * 3.0, atol=1e-5, rtol=1e-5)


def _adapter_copy(tmp_path: Path, tiny_models, edit) -> Path:
    if not (tmp_path / "good").exists():
        make_adapter(tiny_models["base"], tmp_path / "good")
    bad = tmp_path / "bad"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(tmp_path / "good", bad)
    edit(bad)
    return bad


def _cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, needles", [
    (lambda d: (d / "adapter_config.json").unlink(), ["adapter_config.json is missing"]),
    (lambda d: _cfg(d, r=8), ["rank 4/4", "r = 8"]),
    (lambda d: _cfg(d, target_modules=["q_proj", "nonexistent_proj"]), ["target module 'nonexistent_proj'"]),
    (lambda d: _cfg(d, use_dora=True), ["use_dora", "merge_and_unload"]),
    (lambda d: _cfg(d, peft_type="IA3"), ["peft_type 'IA3'"]),
    (lambda d: _cfg(d, bias="all"), ["bias: all"]),
], ids=["no_config", "rank_mismatch", "absent_target", "dora", "not_lora", "trained_bias"])
def test_bad_adapters_are_one_line_and_leave_nothing(tmp_path, tiny_models, edit, needles):
    bad = _adapter_copy(tmp_path, tiny_models, edit)
    code, err, out = build(tmp_path, f"{tiny_models['base']}+{bad}")
    assert_one_line_error(code, err, out, *needles)
    (tmp_path / "v.yaml").write_text((tmp_path / "out.yaml").read_text())
    val = runner.invoke(app, ["validate", str(tmp_path / "v.yaml")])
    assert val.exit_code == 1 and val.stderr == err


def test_adapter_for_another_base_is_refused(tmp_path, tiny_models):
    from merger import synth

    synth.make_llama(tmp_path / "wide", seed=1, intermediate=96)
    make_adapter(tiny_models["base"], tmp_path / "adapter")
    code, err, out = build(tmp_path, f"{tmp_path / 'wide'}+{tmp_path / 'adapter'}")
    assert_one_line_error(code, err, out, "down_proj", "another base")
