"""Runs a plan: reads each job's inputs lazily, merges, frees them, streams shards to a staged
output folder that replaces OUT_DIR only when everything is written."""
from __future__ import annotations

import math
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from merger import plugins
from merger.card import finish_card, scrub_recipe
from merger.errors import CheckpointError, MergerError, PluginError, RecipeError
from merger.io.checkpoint import Checkpoint
from merger.io.hf import copy_tokenizer, write_config
from merger.io.writer import DEFAULT_SHARD_BYTES, ShardWriter, staged_output
from merger.methods.base import MergeContext
from merger.plan import Plan, make_plan
from merger.recipe import MergeRecipe

RECIPE_NAME = "merger_config.yml"


def resolve_models(refs: list[str], options: dict[str, Any]) -> dict[str, Path]:
    """Ask the resolver plugins (local folders, the Hub, ...) for a local folder per reference."""
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
    allow_pickle = bool((options or {}).get("allow_pickle"))
    return {ref: Checkpoint(p, label=ref, allow_pickle=allow_pickle) for ref, p in paths.items()}


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed: reruns are bit-identical whatever order tensors are merged in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def run_jobs(plan: Plan, ckpts: dict[str, Checkpoint], writer: ShardWriter, seed: int,
             progress: Callable[[int, int, int], None] | None = None) -> None:
    method = plan.method()
    total = len(plan.jobs)
    for k, job in enumerate(plan.jobs):
        tensors = [ckpts[ref].get(name).to(plan.compute_dtype) for ref, name in job.inputs]
        base = ckpts[job.base[0]].get(job.base[1]).to(plan.compute_dtype) if job.base else None
        ctx = MergeContext(name=job.name, generator=torch.Generator().manual_seed(tensor_seed(seed, job.name)),
                           dtype=plan.compute_dtype)
        try:
            out = method.merge(tensors, base, job.params, job.model_params, ctx)
        except ValueError as e:  # the contract's way to reject parameter values: the user's to fix
            raise RecipeError(f"{_who(plan.method)} on tensor {job.name}: {plugins.first_line(e)}") from None
        except MergerError:
            raise
        except Exception as e:  # a bug in the method: one line naming its plugin, not a traceback
            raise PluginError(f"{_who(plan.method)} failed on tensor {job.name}: "
                              f"{type(e).__name__}: {plugins.first_line(e)}") from None
        check_result(plan.method, job.name, job.shape, out)
        del tensors, base
        writer.add(job.name, out.to(job.out_dtype))
        del out
        if progress:
            progress(k + 1, total, writer.total_bytes)


def _who(method: type) -> str:
    return f"merge method {method.name!r} (plugin {getattr(method, '_merger_plugin', '?')!r})"


def check_result(method: type, name: str, shape: tuple[int, ...], out: Any) -> None:
    """The safety net for plugin methods: a wrong type, shape or non-finite values name the plugin."""
    who = _who(method)
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"{who} returned {type(out).__name__} for tensor {name}, not a torch.Tensor")
    if tuple(out.shape) != tuple(shape):
        raise PluginError(f"{who} returned shape {list(out.shape)} for tensor {name}, expected {list(shape)}")
    if not out.is_floating_point():
        raise PluginError(f"{who} returned dtype {out.dtype} for tensor {name}; return a floating tensor")
    if out.device.type != "cpu":
        raise PluginError(f"{who} returned tensor {name} on {out.device}; return it on the CPU (.cpu())")
    # min/max propagate NaN and show ±inf, without isfinite's tensor-sized bool temporary (14x faster).
    if out.numel() and not all(map(math.isfinite, (float(v) for v in torch.aminmax(out)))):
        raise PluginError(f"{who} produced NaN/inf in tensor {name}; check the method and its parameters")


class Progress:
    """Tensors done / total and MB/s on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.label = label
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int, nbytes: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and done < total):
            return
        self.last = now
        rate = nbytes / 1e6 / max(now - self.t0, 1e-9)
        end = "\n" if done == total else ""
        print(f"\r{self.label}: {done}/{total} tensors, {nbytes / 1e6:.1f} MB, {rate:.1f} MB/s", end=end,
              file=sys.stderr, flush=True)


def build_merge(recipe: MergeRecipe, out_dir: str | Path, *, force: bool = False,
                shard_bytes: int = DEFAULT_SHARD_BYTES, seed: int = 0, options: dict[str, Any] | None = None,
                label: str = "recipe", progress: bool | None = None) -> Path:
    """Plan and run a merge recipe into `out_dir` (atomic). Returns the output folder."""
    options = dict(options or {})
    if recipe.dtype:  # GGUF inputs are dequantized straight to the compute dtype (merger.io.gguf_convert)
        options.setdefault("dtype", recipe.dtype)
    method = plugins.methods()[recipe.merge_method]
    paths = resolve_models(recipe.model_refs(), options)
    ckpts = open_checkpoints(paths, options)
    plan = make_plan(recipe, method, ckpts, label=label)
    ref_cfg = ckpts[plan.reference].config
    with staged_output(out_dir, force=force) as tmp:
        writer = ShardWriter(tmp, shard_bytes, metadata={"merger_method": method.name})
        run_jobs(plan, ckpts, writer, seed, Progress(f"merging ({method.name})", progress))
        writer.finish()
        out_dtype = plan.out_dtype or _config_dtype(ref_cfg)
        write_config(tmp, ref_cfg, out_dtype, num_hidden_layers=plan.num_layers)
        copy_tokenizer(paths[plan.tokenizer_ref], tmp)
        save_recipe(tmp, recipe)
        finish_card(tmp, recipe.name or Path(out_dir).absolute().name, paths, options.get("base_dir"))
    return Path(out_dir)


def _config_dtype(cfg: dict[str, Any]) -> torch.dtype | None:
    from merger.io.dtypes import parse_dtype
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    try:
        return parse_dtype(name) if name else None
    except ValueError:
        return None


def save_recipe(dst: Path, recipe: Any) -> None:
    text = getattr(recipe, "_source_text", None)
    if text is None:
        text = yaml.safe_dump(recipe.model_dump(exclude_none=True, by_alias=True), sort_keys=False)
    (dst / RECIPE_NAME).write_text(scrub_recipe(text))  # no absolute paths or tokens leave the machine


def build_recipe(recipe: Any, out_dir: str | Path, **kwargs: Any) -> Path:
    """Build any loaded recipe: a merge, or an MoE composition when the recipe has experts."""
    if isinstance(recipe, MergeRecipe):
        return build_merge(recipe, out_dir, **kwargs)
    from merger.moe.compose import build_moe

    out = build_moe(recipe, out_dir, **kwargs)
    # The MoE card keeps its body; its front matter gets base_model/tags/license. Inputs are
    # re-resolved from the cache only (no network) to tell Hub ids from local folders.
    options = {**(kwargs.get("options") or {}), "offline": True, "progress": False}
    try:
        paths: dict[str, Path] | None = resolve_models(recipe.model_refs(), options)
    except MergerError:
        paths = None
    finish_card(out, recipe.name or Path(out).absolute().name, paths, options.get("base_dir"))
    return out
