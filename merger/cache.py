"""Where merger keeps files it derives and reuses: converted GGUF checkpoints, compiled CPU kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """$MERGER_CACHE/<kind>, else $XDG_CACHE_HOME/merger/<kind>, else ~/.cache/merger/<kind> (not created)."""
    root = os.environ.get("MERGER_CACHE")
    if root:
        return Path(root).expanduser() / kind
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "merger" / kind
