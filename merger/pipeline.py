"""The one build pipeline, for merges and MoE compositions alike:

    resolve references -> open checkpoints (headers) -> plan     (`prepare`; `merger validate` stops here)
    -> check OUT_DIR -> stage -> run the plan (shards, config, tokenizer, recipe, card) -> publish

Nothing is read beyond headers before the plan exists, nothing is written outside the staged folder,
and OUT_DIR changes in one atomic step at the very end (merger.io.output).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger import plugins
from merger.errors import CheckpointError
from merger.execute import Progress, write_plan
from merger.io.checkpoint import Checkpoint
from merger.io.lora import WEIGHTS_NAME, LoraAdapter, LoraCheckpoint
from merger.io.output import StagedOutput, check_output
from merger.io.refs import split_lora
from merger.io.writer import DEFAULT_SHARD_BYTES
from merger.plan import BuildPlan
from merger.recipe import MergeRecipe


@dataclass
class Prepared:
    """A recipe whose inputs are resolved and opened (headers only) and whose plan is made."""

    recipe: Any
    paths: dict[str, Path]
    checkpoints: dict[str, Any]             # Checkpoint, or LoraCheckpoint for `base+adapter`
    plan: BuildPlan
    adapters: dict[str, Path]               # LoRA reference -> the adapter's folder


def resolve_one(ref: str, options: dict[str, Any]) -> Path:
    """A stage of this pipeline by name, else what the resolver plugins (local folders, GGUF files, the
    Hub, ...) make of the reference."""
    stages = options.get("stages") or {}
    if ref in stages:
        return Path(stages[ref])
    path = plugins.load_plugins().hook.merger_resolve_model(reference=ref, options=options)
    if path is None:
        hint = f"; the stages of this file are {', '.join(map(repr, stages))}" if stages else ""
        raise CheckpointError(f"model {ref!r}: no such folder, and no resolver recognised it; check the path "
                              f"(relative paths start from the current folder){hint}")
    return Path(path)


def resolve_models(refs: list[str], options: dict[str, Any]) -> dict[str, Path]:
    """A local folder per reference; for a LoRA reference `base+adapter` the base's folder (the
    adapter's goes to options["adapters"])."""
    out: dict[str, Path] = {}
    adapters = options.setdefault("adapters", {})
    for ref in refs:
        lora = split_lora(ref, options.get("base_dir"))
        if lora is None:
            out[ref] = resolve_one(ref, options)
        else:
            out[ref] = resolve_one(lora[0], options)
            adapters[ref] = resolve_one(lora[1], options)
    return out


def open_checkpoints(paths: dict[str, Path], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checkpoints (headers only) by reference; a LoRA reference opens as its base seen through the adapter."""
    options = options or {}
    remote = options.get("remote_headers") or {}
    adapters = options.get("adapters") or {}
    out: dict[str, Any] = {}
    for ref, p in paths.items():
        lora = split_lora(ref, options.get("base_dir")) if ref in adapters else None
        key = lora[0] if lora else ref
        ck = Checkpoint(p, label=key, allow_pickle=bool(options.get("allow_pickle")), remote_headers=remote.get(key))
        if lora:
            adapter = LoraAdapter(adapters[ref], lora[1], (remote.get(lora[1]) or {}).get(WEIGHTS_NAME))
            ck = LoraCheckpoint(ck, adapter, ref)
        out[ref] = ck
    return out


def prepare(recipe: Any, options: dict[str, Any] | None = None, label: str = "recipe", seed: int = 0) -> Prepared:
    """Resolve, open and plan: every check that needs no tensor data. `options["headers_only"]` asks
    resolvers not to download weights (Hub models are then opened from their remote headers)."""
    options = dict(options or {})
    options.setdefault("remote_headers", {})
    if isinstance(recipe, MergeRecipe) and recipe.dtype:
        options.setdefault("dtype", recipe.dtype)  # GGUF inputs dequantize straight to the compute dtype
    paths = resolve_models(recipe.model_refs(), options)
    ckpts = open_checkpoints(paths, options)
    if isinstance(recipe, MergeRecipe):
        from merger.merge_plan import plan_merge

        plan = plan_merge(recipe, ckpts, label=label, seed=seed, device=options.get("device") or "cpu")
    else:
        from merger.moe.compose import plan_moe

        plan = plan_moe(recipe, ckpts, paths, label=label, seed=seed)
    return Prepared(recipe, paths, ckpts, plan, dict(options.get("adapters") or {}))


def protected_files(recipe: Any) -> dict[str, Path]:
    """Files the output may never hold: the recipe itself and its plugin files."""
    out: dict[str, Path] = {}
    source = getattr(recipe, "_source_path", None)
    if source:
        out["the recipe"] = Path(source)
        for i, name in enumerate(getattr(recipe, "plugins", None) or []):
            p = Path(name).expanduser()
            out[f"plugin file plugins[{i}]"] = p if p.is_absolute() else Path(source).parent / p
    return out


def local_inputs(refs: list[str], base_dir: str | None) -> tuple[dict[str, Path], dict[str, Path]]:
    """(folders, files) that the references name on this machine, before any resolver runs."""
    folders: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for ref in refs:
        try:
            p = Path(ref).expanduser()
        except RuntimeError:  # ~nosuchuser/x: the resolver says so
            continue
        p = p if p.is_absolute() else Path(base_dir or ".") / p
        if p.is_dir():
            folders[ref] = p
        elif p.exists():
            files[f"input {ref!r}"] = p
    return folders, files


def build_recipe(recipe: Any, out_dir: str | Path, *, force: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 seed: int = 0, options: dict[str, Any] | None = None, label: str = "recipe",
                 progress: bool | None = None, recipe_text: str | None = None,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Build any loaded recipe (a merge, or an MoE when it has experts) into `out_dir`. Returns it.
    `recipe_text` replaces the recipe saved beside the output (a whole multi-stage file for its final
    stage); `extra_files` are written into the output too (a stage's content key)."""
    options = dict(options or {})
    base_dir = options.get("base_dir")
    folders, files = local_inputs(recipe.model_refs(), base_dir)
    files.update(protected_files(recipe))
    check_output(out_dir, force, folders, files)           # before any download
    prepared = prepare(recipe, options, label, seed)
    adapters = {f"adapter of {ref!r}": p for ref, p in prepared.adapters.items()}
    check_output(out_dir, force, {**folders, **prepared.paths, **adapters}, files)
    plan = prepared.plan
    what = f"merging ({recipe.merge_method})" if plan.kind == "merge" else f"composing MoE ({recipe.gate_mode})"
    title = recipe.name or Path(out_dir).absolute().name
    staged = StagedOutput(out_dir, force)
    try:
        with staged as tmp:
            write_plan(plan, tmp, shard_bytes, recipe, title, prepared.paths, base_dir, Progress(what, progress),
                       recipe_text, workers=options.get("threads") or None)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            staged.publish()
    finally:
        for ck in prepared.checkpoints.values():
            ck.close()
    return Path(out_dir)
