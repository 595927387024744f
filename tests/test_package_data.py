"""The C sources merger compiles on first use ship in the package: each one under merger/ is matched by
pyproject.toml's package-data for its own package (a wheel without them silently falls back to torch)."""
from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_c_source_and_header_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = sorted(p for ext in ("*.c", "*.h") for p in (ROOT / "merger").rglob(ext))
    assert len(files) >= 7  # the engine's three sources and three headers, the methods' one source
    for f in files:
        package = ".".join(f.parent.relative_to(ROOT).parts)
        assert any(fnmatch.fnmatch(f.name, pat) for pat in patterns.get(package, [])), (
            f"{f.relative_to(ROOT)} is not in pyproject.toml's package-data for {package}")


def test_the_engine_library_is_built_from_every_source_and_header_beside_it():
    from merger.engine import native

    here = Path(native.__file__).parent
    assert sorted(native.SOURCES) == sorted(here.glob("cpu_*.c"))
    assert sorted(native.HEADERS) == sorted(here.glob("cpu_*.h"))  # all of them in the library's key
