"""Weights in column panels (panels.py, cpu_dots.h `pdots`): the layout itself, the native gemv reading it
against float64 math, and whole models loaded with panels (thresholds lowered so that tiny models get them)
against transformers in float64, against the same model in rows, and with prefill's sums unchanged. Runs
wherever the kernels build; the kernels are AVX2, so on any x86 test machine."""
from __future__ import annotations

import pytest
import torch
from test_engine_native import DTYPES, _case, _float32_close
from test_engine_step import BUILDERS, PREFILL, SEQ, _decode
from torch.testing import assert_close

from merger.engine import calibrate, native, panels, step
from merger.engine.generate import generate_ids
from merger.engine.model import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _native(native_on):
    """Every test here runs the kernels (conftest's native_on)."""


@pytest.fixture
def small_panels(monkeypatch):
    """Rows of more than 64 bytes in panels of at most 64: hidden 64 then has 2 (bf16) or 4 (float32); the
    native kernels chosen for decode and prefill whatever calibration measured here (panels need the gemm)."""
    monkeypatch.setattr(panels, "PANEL_BYTES", 64)
    forced = {k: {**c, "decode": "native", "prefill": "native"} for k, c in calibrate.choices().items()}
    monkeypatch.setattr(calibrate, "choices", lambda: forced)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("panels")
    return {name: BUILDERS[name](root / name) for name in ("mixtral", "llama_biases", "qwen3_moe", "gemma2")}


def test_width_is_the_largest_fitting_divisor():
    assert panels.width(5632, 2) == 1408 and panels.width(14336, 2) == 2048 and panels.width(5632, 4) == 704
    assert panels.width(4096, 2) == 2048 and panels.width(2048, 4) == 1024
    assert panels.width(2048, 2) == 2048 and panels.width(576, 4) == 576  # 4 KB rows stay whole
    assert panels.width(8200, 2) == 1640 and panels.width(8209, 2) == 8209  # no divisor: rows


def test_panels_hold_the_columns_in_order(monkeypatch):
    monkeypatch.setattr(panels, "PANEL_BYTES", 32)                      # float32 rows of 16: panels of 8
    w = torch.arange(3 * 5 * 16, dtype=torch.float32).view(3, 5, 16)  # stacked experts [E, N, K]
    p = panels.to_panels(w)
    assert tuple(p.shape) == (3, 2, 5, 8) and torch.equal(p[1, 1, 2], w[1, 2, 8:])
    assert torch.equal(panels.plain(p[1]), w[1])


def _in_panels(w: torch.Tensor, p: int) -> torch.Tensor:
    """w [n, k] as [k / p, n, p] (what panels.to_panels makes, at a width of the test's choosing)."""
    return w.unflatten(-1, (w.shape[1] // p, p)).transpose(0, 1).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n,k,p", [(37, 96, 32), (130, 1000, 200), (70, 2056, 8)])
def test_gemv_on_panels_equals_float64_math(dtype, rows, n, k, p):
    """n around the kernel's 64-row panel runs and its 4-row steps; panels of 8 up to 200 columns."""
    x, w, b, ref = _case(dtype, rows, n, k)
    wp = _in_panels(w, p)
    kernel = native.gemv_kernel(dtype)
    out = native.gemv(x, wp, kernel, b, torch.float32)
    _float32_close(out, ref)
    assert_close(native.gemv(x, wp, kernel, b, dtype), out.to(dtype), atol=0, rtol=0)  # one rounding
    with pytest.raises(ValueError, match="does not fit panels"):
        native.gemv(x[:, :-8], wp, kernel)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [8, 37])
@pytest.mark.parametrize("n,k,p", [(37, 96, 32), (13, 1000, 200), (7, 2056, 8)])
def test_gemm_on_panels_equals_float64_math_and_its_sums_in_rows(dtype, rows, n, k, p):
    """Prefill's gemm packs its 256-wide slices from the panels (slices crossing a panel edge included)."""
    x, w, b, ref = _case(dtype, rows, n, k)
    x, wp = x.float(), _in_panels(w, p)
    kernel = native.gemm_kernel(dtype)
    out = native.gemm(x, wp, kernel, b, torch.float32)
    _float32_close(out, ref)
    assert torch.equal(out, native.gemm(x, w, kernel, b, torch.float32))  # the same packed values, same sums


@pytest.mark.parametrize("name", ["mixtral", "llama_biases", "qwen3_moe"])
def test_a_model_in_panels_decodes_as_transformers_in_float64(models, name, small_panels):
    model = load_model(models[name])
    panels.apply(model)
    ffn, attn = model.layers[0].ffn, model.layers[0].attn
    plain_dims = 3 if hasattr(ffn, "router") else 2
    # a weight in panels has one dimension more than in rows
    assert attn.wqkv.dim() == 3 and attn.wo.dim() == 3 and ffn.w13.dim() == plain_dims + 1
    # an MLP width of 140 or 262 has no divisor that is a multiple of 8: those rows stay whole; 48 gets panels
    assert (ffn.w2.dim() == plain_dims + 1) == (name == "qwen3_moe")
    tied = model.output.data_ptr() == model.embed.data_ptr()
    assert model.output.dim() == (2 if tied else 3) and model.embed.dim() == 2
    got = _decode(model)
    moe = {"experts_implementation": "eager"} if plain_dims == 3 else {}
    ref = transformers.AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float64, **moe).eval()
    with torch.no_grad():
        want = ref(SEQ).logits[:, PREFILL:]
    assert_close(got.double(), want, atol=2e-5 * want.abs().max().item(), rtol=0)
    assert_close(_decode(model, use_step=False), got, atol=1e-5, rtol=1e-5)  # the per-op path on panels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_sums_are_the_same_in_panels_and_in_rows(models, dtype, small_panels, monkeypatch):
    """Matmuls of 8 rows or more read a plain copy (an expert given fewer tokens takes the gemv: a dense model)."""
    panelled, rows = load_model(models["llama_biases"], dtype=dtype), load_model(models["llama_biases"], dtype=dtype)
    panels.apply(panelled)
    assert panelled.layers[0].ffn.w13.dim() == 3 and rows.layers[0].ffn.w13.dim() == 2
    for m in (panelled, rows):
        m.setup_cache(1, PREFILL)
    assert torch.equal(panelled(SEQ[:, :PREFILL], start_pos=0), rows(SEQ[:, :PREFILL], start_pos=0))


def test_models_the_step_does_not_run_stay_in_rows(models, small_panels):
    model = load_model(models["gemma2"])
    panels.apply(model)
    assert model.layers[0].ffn.w2.dim() == 2 and model.layers[0].attn.wqkv.dim() == 2


@pytest.mark.parametrize("prefill", ["torch", "blocked"])
def test_weights_stay_in_rows_where_prefill_is_not_the_native_gemm(models, small_panels, monkeypatch, prefill):
    """torch's GEMM would read a plain copy made per call, which halved prefill: no panels then."""
    forced = {k: {**c, "prefill": prefill} for k, c in calibrate.choices().items()}
    monkeypatch.setattr(calibrate, "choices", lambda: forced)
    model = load_model(models["mixtral"])
    panels.apply(model)
    assert model.layers[0].attn.wqkv.dim() == 2 and model.layers[0].ffn.w13.dim() == 3


def test_weights_go_into_panels_when_a_model_first_decodes(models, small_panels, monkeypatch):
    """Loading and scoring (prefill only) keep rows; generate moves them once, and the same tokens come out."""
    model = load_model(models["mixtral"])
    assert model.layers[0].attn.wqkv.dim() == 2
    model.setup_cache(1, 16)
    assert model.step is not None
    calls = []
    real = step.DecodeStep.__call__
    monkeypatch.setattr(step.DecodeStep, "__call__", lambda self, *a: calls.append(a) or real(self, *a))
    first, _, _ = generate_ids(model, SEQ[0, :PREFILL].tolist(), 8)
    wqkv = model.layers[0].attn.wqkv
    assert wqkv.dim() == 3 and len(calls) == 7  # the step, built again on the panels, took every decode token
    again, _, _ = generate_ids(model, SEQ[0, :PREFILL].tolist(), 8)
    assert model.layers[0].attn.wqkv is wqkv and again == first
    monkeypatch.setenv("MERGER_PANELS", "0")
    rows = load_model(models["mixtral"])
    assert generate_ids(rows, SEQ[0, :PREFILL].tolist(), 8)[0] == first and rows.layers[0].attn.wqkv.dim() == 2
