"""Judge a merge with the Python API, offline: build a linear merge of two seeded tiny fine-tunes, then
score it and its parents on the built-in texts (prose, code, qa, math) with merger's engine: perplexity
per domain, and KL(parent ‖ merged) and top-1 agreement with each parent. `merger eval` prints the same.

    python examples/eval.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from merger import synth
from merger.evaluate.report import evaluate
from merger.evaluate.texts import Text, builtin_texts
from merger.pipeline import build_recipe
from merger.recipe_file import load_recipe


def main(root: Path) -> str:
    base = synth.make_llama(root / "base", seed=0)
    for seed, name in ((1, "ft-a"), (2, "ft-b")):
        synth.make_llama(root / name, seed=seed, base=base)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(root / "ft-a"), "parameters": {"weight": 0.5}},
                         {"model": str(root / "ft-b"), "parameters": {"weight": 0.5}}]}
    (root / "linear.yaml").write_text(yaml.safe_dump(recipe))
    merged = build_recipe(load_recipe(root / "linear.yaml"), root / "merged", progress=False)
    # the first 800 characters of each built-in domain keep the example quick; drop the slice for all of it
    texts = [Text(t.name, t.text[:800], t.source) for t in builtin_texts()]
    models = [merged, root / "base", root / "ft-a", root / "ft-b"]
    report = evaluate(models, texts, against=True, window=256)
    table = report.format_table(names={str(m): m.name for m in models})   # short names instead of temp paths
    print(table)
    return table


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="merger-example-") as tmp:
        main(Path(tmp))
