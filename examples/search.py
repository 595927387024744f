"""Search a recipe parameter with the Python API, offline (needs `pip install 'merger[search]'`): two
tiny models whose linear merge at weight 0.3 on the first is a model planted to predict a text; optuna's
TPE varies `models[0].parameters.weight` over [0, 1], each trial is built and scored on that text, and
the best recipe comes back (and, with `out`, its build). `merger search` runs the same.

    python examples/search.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from merger.evaluate.planted import make_linear_pair
from merger.evaluate.search import search
from merger.evaluate.texts import Text

TEXT = " ".join(["Once upon a time the little fox walked home."] * 4)


def main(root: Path) -> float:
    a, b = make_linear_pair(root, TEXT, best=0.3)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                         {"model": str(b), "parameters": {"weight": 0.7}}]}   # normalised: best at a's weight 0.3
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "space.yaml").write_text("models[0].parameters.weight: [0.0, 1.0]\n")
    result = search(root / "recipe.yaml", root / "space.yaml", trials=16, texts=[Text("fox", TEXT, "example")],
                    window=64, seed=0, storage=f"sqlite:///{root / 'study.db'}", out=root / "best",
                    echo=lambda line: None)
    weight = result.best_params["models[0].parameters.weight"]
    print(f"best of {result.complete} trials: weight {weight:.3f} (planted at 0.3), perplexity {result.best_value:.4f}")
    print(result.recipe_yaml, end="")
    return weight


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="merger-example-") as tmp:
        main(Path(tmp))
