"""examples/ are runnable as they are: each script runs offline in a fresh interpreter and prints what its
docstring promises (the search example finds the planted weight)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"


def run(name: str) -> str:
    res = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["build.py", "eval.py", "search.py"]


def test_build_example():
    out = run("build.py")
    assert re.match(r"built .*/merged: README\.md, config\.json, .*model\.safetensors", out)
    assert "lm_head.weight: [512, 64]" in out


def test_eval_example():
    lines = run("eval.py").splitlines()
    assert lines[0].split()[:5] == ["model", "domain", "tokens", "nll", "ppl"]
    labelled = [ln.split()[:2] for ln in lines[2:] if re.match(r"\S+ \((merged|parent)\)", ln)]
    assert labelled == [["merged", "(merged)"], ["base", "(parent)"], ["ft-a", "(parent)"], ["ft-b", "(parent)"]]
    assert lines[-1] == "(window 256, stride 128 tokens)"


def test_search_example():
    pytest.importorskip("optuna")
    out = run("search.py")
    weight = float(re.search(r"best of 16 trials: weight ([0-9.]+)", out).group(1))
    assert abs(weight - 0.3) <= 0.1
    assert "merge_method: linear" in out
