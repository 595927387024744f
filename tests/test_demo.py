"""The README's main command, `merger demo`, end to end (on the MoE recipe alone, to stay quick)."""
from __future__ import annotations

import shutil
from pathlib import Path

from merger.demo import ROUTE_PROMPTS, run_demo

RECIPES = Path(__file__).parent.parent / "recipes"


def test_demo_builds_routes_and_generates(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(RECIPES / "moe.yaml", recipes / "moe.yaml")
    lines: list[str] = []
    outs = run_demo(tmp_path / "demo", recipes=recipes, echo=lines.append)
    assert outs == [tmp_path / "demo" / "out" / "moe"]
    text = "\n".join(lines)
    for prompt in ROUTE_PROMPTS:
        assert repr(prompt) in text
    assert "ppl prose" in text and "out/moe" in text and "models/base" in text
    # Scoring is deterministic: a second run prints the same table.
    again: list[str] = []
    run_demo(tmp_path / "demo", recipes=recipes, echo=again.append)
    assert again[-1] == lines[-1]
