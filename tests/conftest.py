"""Shared fixtures: tiny seeded Llama checkpoints (a base and perturbed fine-tunes) in temp dirs."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from merger import synth

# No test may reach huggingface.co: Hub tests pass their loopback server's endpoint explicitly,
# and anything else that asks the Hub fails at once on this closed local port. Set before
# huggingface_hub is imported, since it reads HF_ENDPOINT once.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Derived files (GGUF conversions, the compiled engine kernels) go to a fresh folder, not the user's cache.
_TEST_CACHE = tempfile.mkdtemp(prefix="merger-test-cache-")
os.environ["MERGER_CACHE"] = _TEST_CACHE


def pytest_sessionfinish(session, exitstatus):
    """The run's cache goes with it (every run made a new one, and kept it, before)."""
    shutil.rmtree(_TEST_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base, ft_a, ft_b, ft_c: fp32 Llama (hidden 64, 4 layers, vocab 512); fine-tunes = base + noise."""
    root = tmp_path_factory.mktemp("models")
    base = synth.make_llama(root / "base", seed=0)
    for k, name in enumerate(("ft_a", "ft_b", "ft_c"), start=1):
        synth.make_llama(root / name, seed=k, base=base)
    return {name: root / name for name in ("base", "ft_a", "ft_b", "ft_c")}


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """`merger demo`'s seeded models under models/ (read-only: build outputs go to each test's tmp_path)."""
    from merger.demo import make_demo_models

    root = tmp_path_factory.mktemp("demo")
    make_demo_models(root)
    return root


@pytest.fixture(scope="session")
def load_weights():
    """Read every tensor of a model folder into a dict (test-side reference reader)."""
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    return load


@pytest.fixture
def native_on(monkeypatch):
    """The native kernels even under MERGER_NATIVE=0 (which keeps the engine off them, not their tests);
    a skip only where they cannot be built."""
    from merger.engine import calibrate, native

    choices = calibrate.choices  # the memoised function itself (a test may replace the module attribute)
    forced = os.environ.get("MERGER_NATIVE", "1") == "0"
    if forced:
        monkeypatch.setenv("MERGER_NATIVE", "1")
        native._library.cache_clear()
        choices.cache_clear()
    try:
        if native.step_kernel(torch.float32) is None or native.gemv_kernel(torch.bfloat16) is None:
            pytest.skip(native.status())
        yield
    finally:
        if forced:
            native._library.cache_clear()
            choices.cache_clear()

