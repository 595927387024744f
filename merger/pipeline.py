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
from merger.io.output import StagedOutput, check_output
from merger.io.writer import DEFAULT_SHARD_BYTES
from merger.plan import BuildPlan
from merger.recipe import MergeRecipe


@dataclass
class Prepared:
    """A recipe whose inputs are resolved and opened (headers only) and whose plan is made."""

    recipe: Any
    paths: dict[str, Path]
    checkpoints: dict[str, Checkpoint]
    plan: BuildPlan


def resolve_models(refs: list[str], options: dict[str, Any]) -> dict[str, Path]:
    """Ask the resolver plugins (local folders, GGUF files, the Hub, ...) for a local folder per reference."""
    pm = plugins.load_plugins()
    out: dict[str, Path] = {}
    for ref in refs:
        path = pm.hook.merger_resolve_model(reference=ref, options=options)
        if path is None:
            raise CheckpointError(f"model {ref!r}: no such folder, and no resolver recognised it; "
                                  f"check the path (relative paths start from the current folder)")
        out[ref] = Path(path)
    return out


def open_checkpoints(paths: dict[str, Path], options: dict[str, Any] | None = None) -> dict[str, Checkpoint]:
    options = options or {}
    remote = options.get("remote_headers") or {}
    return {ref: Checkpoint(p, label=ref, allow_pickle=bool(options.get("allow_pickle")),
                            remote_headers=remote.get(ref))
            for ref, p in paths.items()}


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

        plan = plan_merge(recipe, ckpts, label=label, seed=seed)
    else:
        from merger.moe.compose import plan_moe

        plan = plan_moe(recipe, ckpts, paths, label=label, seed=seed)
    return Prepared(recipe, paths, ckpts, plan)


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
                 progress: bool | None = None) -> Path:
    """Build any loaded recipe (a merge, or an MoE when it has experts) into `out_dir`. Returns it."""
    options = dict(options or {})
    base_dir = options.get("base_dir")
    folders, files = local_inputs(recipe.model_refs(), base_dir)
    files.update(protected_files(recipe))
    check_output(out_dir, force, folders, files)           # before any download
    prepared = prepare(recipe, options, label, seed)
    check_output(out_dir, force, {**folders, **prepared.paths}, files)
    plan = prepared.plan
    what = f"merging ({recipe.merge_method})" if plan.kind == "merge" else f"composing MoE ({recipe.gate_mode})"
    title = recipe.name or Path(out_dir).absolute().name
    staged = StagedOutput(out_dir, force)
    try:
        with staged as tmp:
            write_plan(plan, tmp, shard_bytes, recipe, title, prepared.paths, base_dir, Progress(what, progress))
            staged.publish()
    finally:
        for ck in prepared.checkpoints.values():
            ck.close()
    return Path(out_dir)
