"""Build a TIES merge with the Python API, offline: seeded tiny checkpoints (a base and two fine-tunes)
in a temp folder, a recipe written as YAML, loaded, validated and built.

    python examples/build.py            # prints the output folder's files and a few of its tensors
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from safetensors import safe_open

from merger import synth
from merger.pipeline import build_recipe
from merger.recipe_file import load_recipe


def main(root: Path) -> Path:
    base = synth.make_llama(root / "base", seed=0)                 # tiny Llama: hidden 64, 4 layers, vocab 512
    for seed, name in ((1, "ft-a"), (2, "ft-b")):
        synth.make_llama(root / name, seed=seed, base=base)        # "fine-tunes": the base plus seeded noise
    recipe = {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "ft-a"), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(root / "ft-b"), "parameters": {"weight": 0.4, "density": 0.5}}],
        "dtype": "float32",
    }
    (root / "ties.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = build_recipe(load_recipe(root / "ties.yaml"), root / "merged", progress=False)
    print(f"built {out}:", ", ".join(sorted(p.name for p in out.iterdir())))
    shard = next(out.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        for name in sorted(f.keys())[:3]:
            print(f"  {name}: {list(f.get_slice(name).get_shape())}")
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="merger-example-") as tmp:
        main(Path(tmp))
