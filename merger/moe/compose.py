"""Clown-car composition: the experts' MLPs plus the base's everything-else become a Mixtral (or,
with a shared expert, Qwen2-MoE) checkpoint. Checks headers first, then initialises the router
rows through the gate plugin, then streams tensors one at a time into an atomic output folder."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merger import plugins
from merger.errors import MergerError, PluginError, RecipeError
from merger.execute import Progress, open_checkpoints, resolve_models, save_recipe, tensor_seed
from merger.io.checkpoint import Checkpoint
from merger.io.dtypes import parse_dtype
from merger.io.hf import copy_tokenizer, write_config
from merger.io.writer import DEFAULT_SHARD_BYTES, ShardWriter, staged_output
from merger.moe.base import ExpertPrompts, GateContext
from merger.moe.card import write_model_card
from merger.moe.layout import (PROJS, Shapes, check_inputs, expert_name, mlp_name, moe_config, router_name,
                               shared_gate_name, shared_name)
from merger.moe.recipe import Expert, MoERecipe
from merger.plan import split_layer

SIMILAR_COS = 0.999  # router rows this close route alike: the experts would be chosen together


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def build_moe(recipe: MoERecipe, out_dir: str | Path, *, force: bool = False,
              shard_bytes: int = DEFAULT_SHARD_BYTES, seed: int = 0, options: dict[str, Any] | None = None,
              label: str = "recipe", progress: bool | None = None) -> Path:
    """Compose an MoE recipe into `out_dir` (atomic). Returns the output folder."""
    options = dict(options or {})
    paths = resolve_models(recipe.model_refs(), options)
    ckpts = open_checkpoints(paths, options)
    shapes = check_inputs(recipe, ckpts, label)
    warn_identical_experts(recipe, paths)
    base = ckpts[recipe.base_model]
    gates = compute_gates(recipe, ckpts, paths[recipe.base_model], shapes, seed)
    out_dtype = output_dtype(recipe)
    sources = plan_tensors(recipe, ckpts, shapes, gates, out_dtype or base.dtype("model.embed_tokens.weight"), seed)
    show = Progress(f"composing MoE ({recipe.gate_mode})", progress)
    with staged_output(out_dir, force=force) as tmp:
        writer = ShardWriter(tmp, shard_bytes, metadata={"merger_moe_gate_mode": recipe.gate_mode})
        for k, src in enumerate(sources):
            tensor = src.read()
            writer.add(src.name, tensor if out_dtype is None else tensor.to(out_dtype))
            del tensor
            show(k + 1, len(sources), writer.total_bytes)
        writer.finish()
        write_config(tmp, moe_config(recipe, base.config, shapes), out_dtype or _config_dtype(base))
        copy_tokenizer(paths[recipe.tokenizer_ref()], tmp)
        save_recipe(tmp, recipe)
        write_model_card(tmp, recipe, seed)
    return Path(out_dir)


def output_dtype(recipe: MoERecipe) -> torch.dtype | None:
    """out_dtype, else dtype (mergekit-moe's output dtype), else None: each tensor keeps its own."""
    name = recipe.out_dtype or recipe.dtype
    return parse_dtype(name) if name else None


def _config_dtype(base: Checkpoint) -> torch.dtype:
    name = base.config.get("torch_dtype") or base.config.get("dtype")
    try:
        return parse_dtype(name) if name else base.dtype("model.embed_tokens.weight")
    except ValueError:
        return base.dtype("model.embed_tokens.weight")


def warn_identical_experts(recipe: MoERecipe, paths: dict[str, Path]) -> None:
    """Identical experts are allowed (sparse upcycling) but worth a word on stderr."""
    seen: dict[Path, str] = {}
    for where, e in recipe.gate_rows():
        p = paths[e.source_model].resolve()
        if p in seen:
            warn(f"{where} and {seen[p]} both use {e.source_model!r}: their MLPs start identical (sparse "
                 f"upcycling); they differ only through noise_scale or further training")
        else:
            seen[p] = where


# --- router rows ------------------------------------------------------------------------
def compute_gates(recipe: MoERecipe, ckpts: dict[str, Checkpoint], base_path: Path, shapes: Shapes,
                  seed: int) -> torch.Tensor:
    """Router rows (layers, experts [+ shared], hidden) in float32 from the recipe's gate plugin."""
    cls = plugins.gate_initializers()[recipe.gate_mode]
    who = f"gate initializer {cls.name!r} (plugin {getattr(cls, '_merger_plugin', '?')!r})"
    members = recipe.gate_rows()
    rows = [ExpertPrompts(where, tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ()))
            for where, e in members]
    base = ckpts[recipe.base_model]

    def read_weight(row: int | None, name: str) -> torch.Tensor:
        return (base if row is None else ckpts[members[row][1].source_model]).get(name)

    ctx = GateContext(num_layers=shapes.num_layers, hidden_size=shapes.hidden, experts=rows,
                      generator=torch.Generator().manual_seed(seed),
                      params=cls.Params.model_validate(recipe.gate_parameters), base_path=base_path,
                      embed_reader=lambda: base.get("model.embed_tokens.weight"), weight_reader=read_weight)
    try:
        out = cls().init_gates(ctx)
    except MergerError:
        raise
    except ValueError as e:
        raise RecipeError(f"{who}: {plugins.first_line(e)}") from None
    except Exception as e:
        raise PluginError(f"{who} failed: {type(e).__name__}: {plugins.first_line(e)}") from None
    finally:
        ctx.release()
    want = (shapes.num_layers, len(rows), shapes.hidden)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PluginError(f"{who} returned {got}; expected a tensor of shape {list(want)} (layers, experts, hidden)")
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise PluginError(f"{who} returned non-finite or non-float router weights; check the plugin")
    out = out.float()
    if cls.needs_prompts:
        warn_similar_rows(out, rows)
    return out


def warn_similar_rows(gates: torch.Tensor, rows: list[ExpertPrompts]) -> None:
    """Rows that are near-parallel in some layer make their experts indistinguishable to the router there."""
    unit = gates / gates.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    cos = unit @ unit.transpose(1, 2)  # [L, E, E]
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            layers = (cos[:, a, b] > SIMILAR_COS).nonzero().flatten().tolist()
            if layers:
                warn(f"{rows[a].where} and {rows[b].where} get near-identical router rows in layer(s) "
                     f"{', '.join(map(str, layers))}: the router cannot tell them apart there; make their "
                     f"prompts more distinct (prompts ending in the same token look alike to early layers)")


# --- tensor plan ------------------------------------------------------------------------
@dataclass
class Source:
    name: str
    read: Callable[[], torch.Tensor]


def expert_tensor(ck: Checkpoint, name: str, e: Expert, out_name: str, seed: int) -> torch.Tensor:
    """One expert tensor with mergekit's knobs: + N(0, noise_scale²) noise, then (down projection only)
    × residual_scale. Noise is seeded per output tensor, so reruns are bit-identical."""
    t = ck.get(name)
    is_down = name.endswith("down_proj.weight")
    if e.noise_scale is None and (e.residual_scale is None or not is_down):
        return t
    dtype = t.dtype
    t = t.float()
    if e.noise_scale is not None:
        g = torch.Generator().manual_seed(tensor_seed(seed, out_name))
        t = t + e.noise_scale * torch.randn(t.shape, generator=g)
    if is_down and e.residual_scale is not None:
        t = t * e.residual_scale
    return t.to(dtype)


def plan_tensors(recipe: MoERecipe, ckpts: dict[str, Checkpoint], shapes: Shapes, gates: torch.Tensor,
                 gate_dtype: torch.dtype, seed: int) -> list[Source]:
    """Every output tensor in file order: embeddings, then per layer the base's attention and norms,
    router, experts (and shared expert), then the final norm and lm_head."""
    arch = recipe.output_architecture
    base = ckpts[recipe.base_model]
    pre, post, layer_names = [], [], {}
    for name in base.names:
        sp = split_layer(name)
        if sp is None:
            (pre if "embed" in name else post).append(name)
        elif not sp[2].startswith(".mlp."):
            layer_names.setdefault(sp[1], []).append(name)

    def copy(name: str) -> Source:
        return Source(name, functools.partial(base.get, name))

    out = [copy(n) for n in pre]
    n_exp = len(recipe.experts)
    read_before: set[tuple[Path, str]] = set()
    for i in range(shapes.num_layers):
        out += [copy(n) for n in layer_names.get(i, [])]
        if arch == "qwen2_moe":
            out += _zero_qkv_biases(base, i, gate_dtype)
        out.append(Source(router_name(arch, i), functools.partial(_rows, gates, i, slice(0, n_exp), gate_dtype)))
        members = [(expert_name(arch, i, j, proj), e, proj) for j, e in enumerate(recipe.experts) for proj in PROJS]
        if recipe.shared:
            members += [(shared_name(i, proj), recipe.shared, proj) for proj in PROJS]
        for out_name, e, proj in members:
            read = functools.partial(expert_tensor, ckpts[e.source_model], mlp_name(i, proj), e, out_name, seed)
            key = (ckpts[e.source_model].path.resolve(), mlp_name(i, proj))
            if key in read_before:  # safetensors hands back the same storage twice; a shard cannot hold aliases
                read = functools.partial(_cloned, read)
            read_before.add(key)
            out.append(Source(out_name, read))
        if recipe.shared:
            out.append(Source(shared_gate_name(i), functools.partial(_rows, gates, i, slice(n_exp, None), gate_dtype)))
    out += [copy(n) for n in post]
    return out


def _rows(gates: torch.Tensor, layer: int, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    # a copy, not a view: shards must not hold tensors that alias one storage
    return gates[layer, rows].to(dtype, copy=True)


def _cloned(read: Callable[[], torch.Tensor]) -> torch.Tensor:
    return read().clone()


def _zero_qkv_biases(base: Checkpoint, layer: int, dtype: torch.dtype) -> list[Source]:
    """Qwen2-MoE's q/k/v projections carry biases; a Llama/Mistral base has none, and a zero bias
    is exactly no bias, so the attention computes what the base's did."""
    out = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        rows = base.shape(f"model.layers.{layer}.self_attn.{proj}.weight")[0]
        out.append(Source(f"model.layers.{layer}.self_attn.{proj}.bias",
                          functools.partial(torch.zeros, rows, dtype=dtype)))
    return out
