"""Assertions shared by the CLI error tests: one line, exit 1, no traceback, nothing left behind."""
from __future__ import annotations

from pathlib import Path


def assert_one_line_error(code: int, err: str, out: Path, *needles: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "merger-tmp" in p.name]
