"""The example plugin packages in plugins/, seen the way users see them: installed with pip and
found through the real entry-point mechanism by the real `merger` executable (entry points are
not loaded in-process under pytest), their example recipes built and checked against the
formulas; and the tutorial's code blocks, which must be the packages' files verbatim."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger.demo import make_demo_models

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "plugins.md"
PACKAGES = {"consensus": "merger-consensus", "delta_gates": "merger-delta-gates"}  # entry point -> dist
MERGER = shutil.which("merger") or str(Path(sys.executable).parent / "merger")


def merger(*args: str, cwd: Path, allow: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MERGER_LOAD_PLUGINS"}
    if allow is not None:
        env["MERGER_LOAD_PLUGINS"] = allow
    res = subprocess.run([MERGER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def plugin_rows(tmp_path_factory) -> dict[str, dict]:
    """`merger plugins --json` from the real executable, or a skip when the packages are not
    installed. Asked of the executable itself: in-process metadata can also see the packages'
    build folders through pytest's pythonpath, which entry-point loading in a shell does not."""
    if not Path(MERGER).exists():
        pytest.skip("no `merger` executable next to this Python; pip install -e . first")
    rows = {r["name"]: r for r in json.loads(merger("plugins", "--json", cwd=tmp_path_factory.mktemp("cwd")))}
    missing = [dist for name, dist in PACKAGES.items() if rows.get(name, {}).get("distribution") != dist]
    if missing:
        pytest.skip(f"example plugin packages not installed ({', '.join(missing)}); "
                    f"`pip install -e plugins/merger-consensus -e plugins/merger-delta-gates` (.ci/run does)")
    return rows


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A folder holding models/{base,ft-a,ft-b,ft-c}, as `merger demo` makes them."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_models(root)
    return root


def test_plugins_json_lists_the_installed_packages(plugin_rows):
    rows = plugin_rows
    for name, dist, registered in (("consensus", "merger-consensus", ["method:consensus"]),
                                   ("delta_gates", "merger-delta-gates", ["gate:expert_delta"])):
        assert rows[name]["distribution"] == dist and rows[name]["version"] == metadata.version(dist)
        assert rows[name]["loaded"] is True and rows[name]["registered"] == registered


def test_methods_lists_consensus_with_its_parameters(plugin_rows, tmp_path):
    line = next(ln for ln in merger("methods", cwd=tmp_path).splitlines() if " consensus " in ln)
    for cell in ("lambda=1.0, k=2", "weight=1.0, mask_lambda=0.4", "required", "2405.07813"):
        assert cell in line, (cell, line)
    assert line.rstrip(" │").endswith("consensus")  # the plugin column


def test_allow_list_in_the_real_executable(plugin_rows, tmp_path):
    rows = {r["name"]: r for r in json.loads(merger("plugins", "--json", cwd=tmp_path, allow="delta_gates"))}
    assert rows["delta_gates"]["loaded"] and not rows["consensus"]["loaded"]
    assert " consensus " not in merger("methods", cwd=tmp_path, allow="delta_gates")


def weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_consensus_example_recipe_builds(plugin_rows, demo_root):
    recipe = ROOT / "plugins" / "merger-consensus" / "examples" / "consensus.yaml"
    merger("build", str(recipe), "out/consensus", "-q", "--force", cwd=demo_root)
    out = weights(demo_root / "out" / "consensus")
    base, a, b, c = (weights(demo_root / "models" / n) for n in ("base", "ft-a", "ft-b", "ft-c"))
    assert set(out) == set(base)
    for name, got in out.items():
        layer = int(name.split(".")[2]) if ".layers." in name else 0
        alpha = 0.8 + 0.2 * layer / 3  # lambda: [0.8, 1.0] over 4 layers; outside the layers, 0.8
        taus = [(m[name] - base[name]) * w for m, w in ((a, 1.0), (b, 1.0), (c, 0.8))]
        total = sum(taus)
        lams = [0.3 if "mlp" in name else 0.5, 0.4, 0.4]  # ft-a's filter list, defaults for the others
        votes = sum((t.abs() >= lam * (total - t).abs()).int() for t, lam in zip(taus, lams))
        torch.testing.assert_close(got, base[name] + alpha * torch.where(votes >= 2, total, 0.0), msg=name)


def test_expert_delta_example_recipe_builds(plugin_rows, demo_root):
    recipe = ROOT / "plugins" / "merger-delta-gates" / "examples" / "expert_delta.yaml"
    merger("build", str(recipe), "out/expert_delta", "-q", "--force", cwd=demo_root)
    out = weights(demo_root / "out" / "expert_delta")
    base = weights(demo_root / "models" / "base")
    experts = [weights(demo_root / "models" / n) for n in ("ft-a", "ft-b", "ft-c")]
    for i in range(4):
        name = f"model.layers.{i}.mlp.gate_proj.weight"
        rows = []
        for e in experts:
            delta = (e[name] - base[name]).double()
            v = torch.linalg.svd(delta, full_matrices=False).Vh[0]
            rows.append(v if float(delta.sum(0) @ v) >= 0 else -v)  # sign: 1ᵀΔv ≥ 0
        torch.testing.assert_close(out[f"model.layers.{i}.block_sparse_moe.gate.weight"],
                                   torch.stack(rows).float(), atol=2e-5, rtol=0)


# --- the tutorial shows the packages' files verbatim -------------------------------------------
FILE_BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\n```[a-z]*\n(?P<body>.*?)```", re.S)


def test_tutorial_code_blocks_are_the_package_files():
    text = TUTORIAL.read_text()
    blocks = {m["path"]: m["body"] for m in FILE_BLOCK.finditer(text)}
    assert text.count("<!-- file: ") == len(blocks), "every file marker must be followed by a code block"
    for pkg in PACKAGES.values():
        assert {f"plugins/{pkg}/pyproject.toml", f"plugins/{pkg}/{pkg.replace('-', '_')}.py"} <= set(blocks)
    for path, body in blocks.items():
        assert body == (ROOT / path).read_text(), (
            f"docs/plugins.md shows a different {path}: copy the file into its block (or the block into the file)")


def test_readme_links_the_tutorial():
    assert "docs/plugins.md" in (ROOT / "README.md").read_text()
