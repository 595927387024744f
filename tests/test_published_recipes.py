"""Real published mergekit recipes (tests/data/published_recipes/, one per file, each opening with a
`# source:` line) against merger's static loader: every recipe is read and validated without touching
its models (no files, no Hub), with `merger.recipe_file.load_recipe`, or for a multi-document
(mergekit-multi) file `merger.stages.load_pipeline`.

EXPECTED records the verdict beside each recipe: "ok", or "error: <part of the one-line message>" only
where the recipe itself is wrong (a typo'd or misplaced key, an impossible value, invalid YAML), with
the mistake explained in a comment. A recipe whose only problem is a feature merger lacks is "ok" with
a `needs:` note; those cases are xfail(strict=True), so when the feature lands the case XPASSes, the
suite goes red, and the note is what to delete. A feature that has landed keeps a plain comment.

Now: 84 recipes, 70 expected "ok" and 14 with a real mistake; merger accepts all 70 good ones (8 with a
warning) and rejects the 14 with the recorded reason; no case waits on merger.
`python -m pytest -s tests/test_published_recipes.py -k summary` prints the live counts."""
from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path

import pytest
import yaml

from merger.errors import MergerError
from merger.recipe_file import load_recipe

RECIPES_DIR = Path(__file__).parent / "data" / "published_recipes"
RECIPES = sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))

# name -> "ok" | "error: <substring>", or (verdict, "needs: <feature>") for a case that waits on merger.
EXPECTED: dict[str, str | tuple[str, str]] = {
    # --- arcee_fusion (method present now) ---
    "arcee_fusion-absa-sauerkraut.yaml": "ok",
    "arcee_fusion-llama-3.2-3b.yaml": "ok",
    "arcee_fusion-mergekit-example.yaml": "ok",
    # --- breadcrumbs ---
    "breadcrumbs_ties-eggs-and-bread-rp-pt2.yaml": "ok",
    # `random_seed` is mergekit's --random-seed command-line option, not a merge parameter: in
    # `parameters:` it does nothing (mergekit drops it silently), so the seed the author meant is lost.
    "breadcrumbs_ties-llama-3.1-random-seed.yaml": "error: parameters.random_seed",
    # The card's first model block is mis-indented (`density: 0.9` then `gamma:`/`weight:` two spaces
    # deeper), which is not valid YAML.
    "breadcrumbs_ties-super-nova-int-pt2.yaml": "error: invalid YAML at line 7",
    # --- dare ---
    "dare_linear-absa-rescale.yaml": "ok",
    "dare_ties-bert-embedding-models.yaml": "ok",       # density gradients starting at 0
    "dare_ties-calm2-llama2-dpo.yaml": "ok",
    "dare_ties-eggs-and-bread-rp-pt1.yaml": "ok",
    "dare_ties-gemma-moon-2-9b.yaml": "ok",             # int8_mask, chat_template: auto, tokenizer_source: <model>
    "dare_ties-gpt2-bible-backdoor.yaml": "ok",
    "dare_ties-qwen1.5-sailor-0.5b.yaml": "ok",         # Windows paths with spaces and CJK characters
    "dare_ties-super-nova-cre-pt1.yaml": "ok",          # 9-point density vs 8-point weight gradients
    # --- della ---
    "della-absa-sauerkraut.yaml": "ok",
    # `lambda` is one value per tensor for della (mergekit reads it from the top-level parameters
    # only and silently ignores it per model), so the author's `lambda: 0.85` on each model does nothing.
    "della-super-nova-rp-pt1.yaml": "error: models[1].parameters.lambda",
    # density 0.9 with della's default epsilon 0.15 puts density + epsilon at 1.05; mergekit raises
    # "Epsilon must be chosen such that density +/- epsilon is in (0, 1)" when it merges.
    "della_linear-opiniongpt-phi3.yaml": "error: density ± epsilon",
    "della_linear-velvet-orchid-modules.yaml": "ok",    # modules: form (present now); normalize: 1.0, tokenizer: {}
    # --- karcher (tol written as 1e-5 etc. is a YAML string; numbers in quotes are accepted) ---
    "karcher-absa-sauerkraut.yaml": "ok",
    # these ask for max_iter 20000, 9999 and 1200 (merger bounds the loop at 100000; mergekit has no bound)
    "karcher-abyssal-seraph-final.yaml": "ok",
    "karcher-lunamaid-stage2-modules.yaml": "ok",  # modules: form (present now)
    "karcher-megamoon-17-models.yaml": "ok",            # lists Vortex5/Lunar-Nexus-12B twice (not a static error)
    "karcher-velvet-orchid-stage1.yaml": "ok",
    # --- linear ---
    "linear-absa-layer-specific-slices.yaml": "ok",     # one slice pairing layers 0-16 of A with 16-32 of B
    # `layer_range: [0, -1]` is not a layer range (mergekit has no negative indices), and `weight` sits
    # beside `layer_range` instead of under `parameters:`.
    "linear-opiniongpt-phi3-slices-lora.yaml": "error: layer_range [0, -1]",
    "linear-orca-wizardlm-platypus.yaml": "ok",
    # linear needs a weight per model; mergekit fails with "Missing required parameter weight" (the
    # issue's title). The base+lora reference itself is fine.
    "linear-qwen-single-lora-no-weight.yaml": "error: weight: required by linear",
    "linear-rosa-stablelm-loras.yaml": "ok",            # base+lora references (folded in at build time)
    "linear-tinyllama-base+lora.yaml": "ok",            # base+lora reference
    "linear-tinyllama-chat-base.yaml": "ok",
    # --- model_stock ---
    "model_stock-athena-apollo-8b.yaml": "ok",          # name:, tokenizer_source: <model>
    "model_stock-huatuogpt-loras.yaml": "ok",           # base+lora for the base and every model
    "model_stock-lorablatedstock-windows-paths.yaml": "ok",
    "model_stock-mn-hekate-weights.yaml": "ok",         # per-model weight filter lists: ignored with a warning
    "model_stock-parammyl-8b.yaml": "ok",               # slices form
    "model_stock-weirdcompound-stage-a.yaml": "ok",     # base also listed among the models
    # --- MoE (mergekit-moe); identical / empty / missing prompts are accepted with a warning (present
    # now; mergekit itself refuses them, but such sparse-upcycled models are published) ---
    "moe-cheap_embed-phi-2.yaml": "ok",
    "moe-hidden-mistral-clown-car.yaml": "ok",
    "moe-identical-empty-prompts.yaml": "ok",           # one model twice, the same empty prompt for each
    "moe-l3.1-2x8b-yaml-anchors-negative-prompts.yaml": "ok",   # YAML anchors/aliases, negative prompts
    # The card's broken code fence glued "yaml" onto the first key: `yamlbase_model:`, so the recipe
    # has no base_model.
    "moe-lumosia-4x10.7-identical-empty-prompts.yaml": "error: base_model",
    "moe-qwen-empty-prompts.yaml": "ok",                # `positive_prompts: []` everywhere
    "moe-qwen2.5-shared-expert.yaml": "ok",             # architecture: qwen, shared_experts, residual_scale
    "moe-random-smol_llama-upcycle.yaml": "ok",         # gate_mode: random, no prompts
    "moe-sonya-7b-x8-sparse-upcycle.yaml": "ok",        # 8 copies of one model, identical [""] prompts
    "moe-template-mergekit-docs.yaml": "ok",            # mergekit's docs template: expert 2 has no prompts
    # --- multi-stage (mergekit-multi; present now) ---
    "multi-gradient-slerp-ties-mega.yaml": "ok",        # every document named; the last is the final one
    "multi-linear-slerp-dare_ties-mergekit-multi.yaml": "ok",
    "multi-nuslerp-passthrough-kansensakura-12b.yaml": "ok",
    # --- nearswap ---
    "nearswap-absa-sauerkraut.yaml": "ok",
    "nearswap-abyssal-seraph-stage1.yaml": "ok",        # tokenizer: {source: <model>}
    # `dtype: bfloat16`` carries a stray backtick: not a dtype.
    "nearswap-abyssal-seraph-stage2-dtype-typo.yaml": "error: unknown dtype 'bfloat16`'",
    # --- nuslerp ---
    "nuslerp-absa-sauerkraut.yaml": "ok",
    "nuslerp-strawberrylemonade-70b.yaml": "ok",        # weight gradients, float32 -> out_dtype bfloat16, tokenizer:
    # The `models:` line is missing, leaving the model list under `base_model:`: not valid YAML.
    "nuslerp-weirdcompound-missing-models-key.yaml": "error: invalid YAML at line 5",
    # --- passthrough ---
    "passthrough-gpt2-small.yaml": "ok",
    "passthrough-mistral-instruct-self-stack.yaml": "ok",
    "passthrough-orcamini-platy-44layer.yaml": "ok",
    "passthrough-smollm-360m-prune.yaml": "ok",
    # passthrough ignores base_model; mergekit accepts one silently.
    "passthrough-yi-34b-tess-capybara.yaml": "ok",  # base_model: only the config donor (a warning says so)
    # --- sce ---
    "sce-absa-sauerkraut.yaml": "ok",
    # --- slerp ---
    "slerp-absa-gradual-shift.yaml": "ok",              # 32-point gradient
    "slerp-absa-tokenizer-source.yaml": "ok",
    "slerp-eggs-and-bread-rp.yaml": "ok",
    "slerp-lunamaid-stage1-normalize.yaml": "ok",       # `normalize` is not slerp's: ignored with a warning
    # `down_proj: {weight: 0.5}` inside a slice source is not a mergekit key (parameters go under
    # `parameters:` with a `filter: down_proj`); mergekit drops it silently.
    "slerp-mistral-sqlcoder-awq.yaml": "error: slices[0].sources[1].down_proj",
    "slerp-mistralrp-noromaid.yaml": "ok",
    "slerp-orca-platypus-gradient.yaml": "ok",
    "slerp-prymmal-phi3-3b.yaml": "ok",
    "slerp-qwen2.5-coder-mfann.yaml": "ok",
    "slerp-scrambled-eggs-on-toast-1.yaml": "ok",
    # `tokenizer_source: model:<id>` is the pre-2024 syntax; the reference (with its `model:` prefix)
    # only fails when resolved, and Llama-3 cannot be slerped with Mistral anyway. Statically fine.
    "slerp-starling-llama3-tokenizer-model-prefix.yaml": "ok",
    # `embed_slerp` belonged to mergekit's old tokenizer_permute method (removed July 2024); mergekit
    # now ignores it, so the embedding treatment the author asked for does not happen.
    "slerp-super-nova-cre.yaml": "error: parameters.embed_slerp",
    "slerp-super-nova-rp-stp1.yaml": "error: parameters.embed_slerp",   # also a typo'd model id (asual-Autopsy/...)
    "slerp-super-nova-rp.yaml": "ok",
    "slerp-violet-twilight.yaml": "ok",
    "slerp-zamba2-7b.yaml": "ok",                       # filters: feed_forward, mamba, layernorm
    # --- task_arithmetic ---
    # slerp's `t` gradients given to task_arithmetic, which needs a `weight` per model instead
    # (mergekit: "Missing required parameter weight").
    "task_arithmetic-deephat-gemma-t.yaml": "error: weight: required by task_arithmetic",
    # --- ties ---
    "ties-biomistral.yaml": "ok",
    "ties-mistral-predibase-lora.yaml": "ok",           # base+lora reference
    "ties-orca-platypus-wizardmath.yaml": "ok",         # density/weight gradients and a weight filter list
    # `dtype: float16` nested under `parameters:` instead of at the top level (mergekit fails with
    # "Input should be a valid list").
    "ties-pth-dtype-in-parameters.yaml": "error: parameters.dtype",
    "ties-super-nova-int-pt1.yaml": "ok",
    "ties-workspace-base-in-models.yaml": "ok",
}


def _verdict(name: str) -> tuple[str, str | None]:
    entry = EXPECTED[name]
    return (entry, None) if isinstance(entry, str) else entry


def _params() -> list:
    out = []
    for name in RECIPES:
        needs = _verdict(name)[1] if name in EXPECTED else None
        marks = [pytest.mark.xfail(strict=True, reason=needs)] if needs else []
        out.append(pytest.param(name, id=name.removesuffix(".yaml"), marks=marks))
    return out


def _documents(text: str) -> int:
    try:
        return sum(1 for _ in yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return 1  # the loader reports the YAML error itself


def load(path: Path):
    """The static check `merger validate` starts with: read, validate names, values and model counts."""
    if _documents(path.read_text(encoding="utf-8")) > 1:
        from merger.stages import load_pipeline  # multi-stage files (mergekit-multi)
        return load_pipeline(path)
    return load_recipe(path)


@pytest.mark.parametrize("name", _params())
def test_published_recipe(name):
    assert name in EXPECTED, f"{name}: add its verdict to EXPECTED"
    verdict, _needs = _verdict(name)
    path = RECIPES_DIR / name
    if verdict == "ok":
        load(path)
        return
    assert verdict.startswith("error: "), verdict
    with pytest.raises(MergerError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and name in message, message
    assert verdict.removeprefix("error: ") in message, message


def test_every_recipe_has_a_verdict_and_a_source():
    assert set(EXPECTED) == set(RECIPES)
    for name in RECIPES:
        first = (RECIPES_DIR / name).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# source: ") and len(first) > len("# source: ") + 10, name


def test_summary_acceptance_counts():
    """Always passes; prints what merger accepts today (run with -s)."""
    accepted, rejected, warned = [], [], 0
    for name in RECIPES:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                load(RECIPES_DIR / name)
                accepted.append(name)
            except MergerError:
                rejected.append(name)
        warned += "warning:" in err.getvalue()
    verdicts = {n: _verdict(n) for n in RECIPES if n in EXPECTED}
    real = [n for n, (v, _) in verdicts.items() if v != "ok"]
    pending = Counter(needs for _, needs in verdicts.values() if needs)
    print(f"\npublished recipes: {len(RECIPES)}; merger accepts {len(accepted)} now "
          f"({warned} of them with a warning), rejects {len(rejected)}")
    print(f"expected: {len(RECIPES) - len(real)} ok, {len(real)} with a real mistake")
    for needs, n in sorted(pending.items()):
        print(f"  waiting ({n}): {needs}")
    surprises = [n for n in accepted if n in real] + [n for n in rejected if n not in real]
    print(f"  differing from the expectation now (incl. the xfail cases): {', '.join(surprises) or 'none'}")
