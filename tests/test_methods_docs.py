"""The README's merge-method table is exactly what `merger methods --markdown` prints for the
built-in methods, so the docs cannot drift from the registry."""
from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from merger import plugins
from merger.cli import app

README = Path(__file__).parent.parent / "README.md"


def test_readme_method_table_matches_registry():
    res = CliRunner().invoke(app, ["methods", "--markdown"])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    # Only built-ins belong in the README; a plugin a test registered in-process may be listed too.
    builtin = {n for n, cls in plugins.methods().items() if getattr(cls, "_merger_plugin", "") == "merger.builtin"}
    want = lines[:2] + [ln for ln in lines[2:] if ln.split("|")[1].strip() in builtin]
    block = re.search(r"<!-- methods:start -->\n(.*?)\n<!-- methods:end -->", README.read_text(), re.S)
    assert block, "README.md needs a <!-- methods:start --> ... <!-- methods:end --> block"
    assert block.group(1).splitlines() == want
    expected = {"linear", "passthrough", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher",
                "model_stock", "sce", "nearswap"}
    assert expected <= builtin


def test_every_builtin_method_cites_its_source():
    for name, cls in plugins.methods().items():
        if getattr(cls, "_merger_plugin", "") != "merger.builtin":
            continue
        assert cls.reference.startswith("https://"), name
        assert cls.description, name
        assert (cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__), name
