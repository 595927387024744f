"""calibrate.py's logic with a fake timer (no timings): the fastest candidate wins each choice, the result is
cached beside the kernels and reused, and a change of CPU, kernel source or a corrupt file measures again; the
dispatcher follows whatever was chosen."""
from __future__ import annotations

import json

import pytest
import torch

from merger.engine import calibrate, matmul, native
from merger.engine.matmul import linear

# seconds per (dtype, what, ..., candidate); anything not listed takes 1.0
FAKE = {
    ("bf16", "decode", "torch"): 0.1, ("bf16", "decode", "native"): 0.5,
    ("bf16", "prefill", "blocked"): 0.1, ("bf16", "prefill", "torch"): 0.4, ("bf16", "prefill", "native"): 0.2,
    ("fp16", "decode", "native"): 0.1, ("fp16", "prefill", "native"): 0.1, ("fp16", "prefill", "torch"): 0.3,
    ("fp32", "decode", "native"): 0.1, ("fp32", "prefill", "torch"): 0.1, ("fp32", "prefill", "blocked"): 0.2,
}


def fake_gemv(dtype: str, k: int, layout: str) -> float:
    """bf16: side by side faster from K = 2048 on, and at K = 512 again (which must not count); fp16: side
    by side 5% faster at the largest K (within calibrate.SIDE_MARGIN: not counted), slower below; fp32: a tie
    everywhere (the first candidate wins a tie)."""
    if dtype == "bf16":
        return 0.2 if layout == "one after another" else (0.1 if k >= 2048 or k == 512 else 0.3)
    if dtype == "fp16":
        return 0.2 if layout == "one after another" else (0.19 if k == max(calibrate.SIDE_KS) else 0.3)
    return 1.0


class FakeTimer:
    """Returns FAKE's number for a candidate without running it; counts the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, label, fn):
        self.calls += 1
        if label[1] == "gemv":
            return fake_gemv(label[0], int(label[2].removeprefix("K=")), label[3])
        return FAKE.get(label, 1.0)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGER_CALIBRATE", "1")
    calibrate.choices.cache_clear()
    yield tmp_path / "cache" / "kernels"
    calibrate.choices.cache_clear()


def test_the_fastest_candidate_wins_each_choice(fresh):
    got = calibrate.measure(FakeTimer())
    have_native = native.gemv_kernel(torch.bfloat16) is not None
    bf16, fp16, fp32 = got["bf16"], got["fp16"], got["fp32"]
    assert bf16["decode"] == "torch" and bf16["prefill"] == "blocked" and bf16["slow_torch"] is True
    assert fp32["prefill"] == "torch" and fp32["slow_torch"] is False
    if have_native:
        # side by side won at K = 16384 down to 2048, lost at 1024: rows of K >= 2048 go side by side
        assert bf16["side_from"] == 2048 and 2048 in calibrate.SIDE_KS
        assert fp16["side_from"] == calibrate.NEVER  # not clearly faster at the largest K: never
        assert fp16["decode"] == fp16["prefill"] == "native" and fp32["decode"] == "native"
        assert bf16["seconds"]["decode native"] == 0.5
    else:  # only torch's paths to choose from
        assert fp16["decode"] == fp32["decode"] == "torch" and bf16["side_from"] == calibrate.NEVER
    assert bf16["seconds"]["decode torch"] == 0.1


def test_choices_are_cached_beside_the_kernels_and_reused(fresh):
    first = FakeTimer()
    choices = calibrate.load_or_measure(first)
    assert first.calls > 0
    files = list(fresh.glob("calibration-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["signature"] == calibrate.signature() and saved["choices"] == choices
    again = FakeTimer()
    assert calibrate.load_or_measure(again) == choices and again.calls == 0


@pytest.mark.parametrize("change", ["cpu flags", "torch's instruction set", "kernel source", "corrupt file",
                                    "wrong dtypes"])
def test_a_changed_machine_or_a_bad_file_measures_again(fresh, monkeypatch, change):
    calibrate.load_or_measure(FakeTimer())
    path = next(fresh.glob("calibration-*.json"))
    if change == "cpu flags":
        real = calibrate.cpu_signature()
        monkeypatch.setattr(calibrate, "cpu_signature", lambda: {**real, "flags": real["flags"] + " amx_tile"})
    elif change == "torch's instruction set":  # ATEN_CPU_CAPABILITY=default on the same CPU
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    elif change == "kernel source":
        monkeypatch.setattr(native, "source_key", lambda cc=None: "0123456789abcdef")
    elif change == "corrupt file":
        path.write_text("{not json")
    else:
        path.write_text(json.dumps({"signature": calibrate.signature(), "choices": {"bf16": {}}}))
    timer = FakeTimer()
    calibrate.load_or_measure(timer)
    assert timer.calls > 0
    if change in ("cpu flags", "torch's instruction set", "kernel source"):
        assert len(list(fresh.glob("calibration-*.json"))) == 2  # keyed by the signature: both kept


def test_calibration_can_be_turned_off(fresh, monkeypatch):
    monkeypatch.setenv("MERGER_CALIBRATE", "0")
    monkeypatch.setattr(calibrate, "measure", lambda timer=None: pytest.fail("measured"))
    assert calibrate.choices() == calibrate.defaults()
    assert not list(fresh.glob("calibration-*.json"))


def test_the_dispatcher_follows_the_choices(monkeypatch):
    calls: list[str] = []
    for op in ("gemv", "gemm"):
        real = getattr(native, op)
        monkeypatch.setattr(native, op, lambda *a, _op=op, _real=real, **k: calls.append(_op) or _real(*a, **k))
    x1, x20, w = torch.randn(1, 64).bfloat16(), torch.randn(20, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    ref1, ref20 = (x.double() @ w.double().t() for x in (x1, x20))
    for decode, prefill in (("torch", "torch"), ("torch", "blocked"), ("native", "native")):
        if decode == "native" and native.gemv_kernel(torch.bfloat16) is None:
            continue
        pick = {name: {**c, "decode": decode, "prefill": prefill} for name, c in calibrate.defaults().items()}
        monkeypatch.setattr(calibrate, "choices", lambda pick=pick: pick)
        calls.clear()
        out1, out20 = linear(x1, w, out_dtype=torch.float32), linear(x20, w, out_dtype=torch.float32)
        assert calls == (["gemv", "gemm"] if decode == "native" else [])
        assert matmul.use_blocked(x20) == (prefill == "blocked")
        torch.testing.assert_close(out1.double(), ref1, atol=1e-4, rtol=1e-2)
        torch.testing.assert_close(out20.double(), ref20, atol=1e-4, rtol=1e-2)
