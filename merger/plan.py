"""Recipe -> per-tensor jobs. Pure: reads checkpoint headers (names, shapes), never tensor data.

A `models:` recipe is planned as one slice spanning every layer, so gradients, filters and
parameter precedence (per-model > slice > top-level) follow one code path for both forms.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from merger.errors import CheckpointError, RecipeError
from merger.io.checkpoint import Checkpoint
from merger.io.dtypes import parse_dtype
from merger.recipe import MergeRecipe, ModelEntry, SliceSource, SliceSpec

LAYER_RE = re.compile(r"^(.*?layers\.)(\d+)(\..+)$")


def split_layer(name: str) -> tuple[str, int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.', 3, '.mlp.up_proj.weight')."""
    m = LAYER_RE.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def resolve_value(spec: Any, tensor_name: str, t: float | None) -> Any:
    """Concrete value of a parameter spec for one tensor; None if no filter entry matches.

    t is the layer's position in its slice (None outside the layers: first gradient value)."""
    if isinstance(spec, list) and spec and isinstance(spec[0], dict):
        for entry in spec:
            flt = entry.get("filter")
            if flt is None or flt in tensor_name:
                return resolve_value(entry["value"], tensor_name, t)
        return None
    if isinstance(spec, list):
        if len(spec) == 1 or t is None:
            return spec[0]
        x = min(max(t, 0.0), 1.0) * (len(spec) - 1)
        i = min(int(x), len(spec) - 2)
        return spec[i] + (spec[i + 1] - spec[i]) * (x - i)
    return spec


def lookup(levels: list[dict[str, Any]], model: type[BaseModel], tensor_name: str, t: float | None) -> dict[str, Any]:
    """Collect the fields of `model` from parameter dicts, highest precedence first."""
    out: dict[str, Any] = {}
    for fname, f in model.model_fields.items():
        for params in levels:
            spec = params.get(f.alias) if f.alias and f.alias in params else params.get(fname)
            if spec is None:
                continue
            value = resolve_value(spec, tensor_name, t)
            if value is not None:
                out[f.alias or fname] = value
                break
    return out


@dataclass
class Job:
    name: str
    inputs: list[tuple[str, str]]          # (model reference, tensor name) per merged input
    base: tuple[str, str] | None
    params: BaseModel
    model_params: list[BaseModel]
    shape: tuple[int, ...]
    out_dtype: torch.dtype


@dataclass
class Plan:
    method: type
    jobs: list[Job]
    reference: str                          # model whose config.json the output starts from
    num_layers: int
    tokenizer_ref: str
    compute_dtype: torch.dtype
    out_dtype: torch.dtype | None           # None: each tensor keeps the reference's dtype
    models: list[str] = field(default_factory=list)


def _as_slices(recipe: MergeRecipe, ckpts: dict[str, Checkpoint]) -> list[SliceSpec]:
    if recipe.slices is not None:
        return recipe.slices
    assert recipe.models is not None
    entries: list[ModelEntry] = list(recipe.models)
    first = recipe.base_model or entries[0].model
    n = ckpts[first].num_layers
    sources = [SliceSource(model=m.model, layer_range=(0, n), parameters=m.parameters) for m in entries]
    if recipe.base_model and recipe.base_model not in [m.model for m in entries]:
        sources.append(SliceSource(model=recipe.base_model, layer_range=(0, n)))
    return [SliceSpec(sources=sources)]


def make_plan(recipe: MergeRecipe, method: type, ckpts: dict[str, Checkpoint], label: str = "recipe") -> Plan:
    """Build every output tensor's job; raises RecipeError/CheckpointError on inconsistencies."""
    compute = parse_dtype(recipe.dtype) if recipe.dtype else torch.float32
    out_dt = parse_dtype(recipe.out_dtype) if recipe.out_dtype else (parse_dtype(recipe.dtype) if recipe.dtype else None)
    slices = _as_slices(recipe, ckpts)
    form = "slices" if recipe.slices is not None else "models"
    base = recipe.base_model

    # Per-slice: which sources are merged inputs, and where the base comes from.
    parts = []
    for si, s in enumerate(slices):
        for j, src in enumerate(s.sources):
            nl = ckpts[src.model].num_layers
            if src.layer_range[1] > nl:
                where = f"slices[{si}].sources[{j}].layer_range" if form == "slices" else f"models[{j}]"
                raise RecipeError(f"{label}: {where}: layer_range {list(src.layer_range)} exceeds the "
                                  f"{nl} layers of model {src.model!r}")
        inputs = [src for src in s.sources if method.base_is_input or src.model != base]
        base_src = None
        if base is not None and not method.base_is_input:
            base_src = next((src for src in s.sources if src.model == base), None)
            if base_src is None:
                base_src = SliceSource(model=base, layer_range=s.sources[0].layer_range)
        ref_src = base_src or inputs[0]
        parts.append((s, inputs, base_src, ref_src))

    reference = parts[0][3].model
    jobs: list[Job] = []
    top = recipe.parameters

    def add_job(out_name: str, s: SliceSpec, inputs: list[SliceSource], base_src: SliceSource | None,
                ref_src: SliceSource, names: dict[str, str], t: float | None) -> None:
        """`names` maps a model reference to its tensor name for this output tensor."""
        ref_ck = ckpts[ref_src.model]
        shape = ref_ck.shape(names[ref_src.model])
        for src in inputs + ([base_src] if base_src else []):
            ck = ckpts[src.model]
            tname = names[src.model]
            if not ck.has(tname):
                raise CheckpointError(f"model {src.model!r} has no tensor {tname!r} (needed for {out_name}); "
                                      f"are all models the same architecture?")
            if ck.shape(tname) != shape:
                raise CheckpointError(f"shape mismatch for {out_name}: {list(ck.shape(tname))} in {src.model!r} "
                                      f"but {list(shape)} in {ref_src.model!r}")
        try:
            gp = method.Params.model_validate(lookup([s.parameters, top], method.Params, out_name, t))
            mps = [method.ModelParams.model_validate(
                lookup([src.parameters, s.parameters, top], method.ModelParams, names[src.model], t))
                for src in inputs]
        except ValidationError as e:
            err = e.errors()[0]
            raise RecipeError(f"{label}: parameters for tensor {out_name}: {'.'.join(map(str, err['loc']))}: "
                              f"{err['msg'].removeprefix('Value error, ')}") from None
        jobs.append(Job(
            name=out_name, inputs=[(src.model, names[src.model]) for src in inputs],
            base=(base_src.model, names[base_src.model]) if base_src else None,
            params=gp, model_params=mps, shape=shape,
            out_dtype=out_dt or ref_ck.dtype(names[ref_src.model]),
        ))

    def non_layer(part: tuple, pre: bool) -> None:
        s, inputs, base_src, ref_src = part
        for name in ckpts[ref_src.model].names:
            if split_layer(name) is None and _is_pre(name) == pre:
                add_job(name, s, inputs, base_src, ref_src, {src.model: name for src in s.sources} | (
                    {base_src.model: name} if base_src else {}), None)

    non_layer(parts[0], pre=True)
    out_layer = 0
    for s, inputs, base_src, ref_src in parts:
        n = ref_src.layer_range[1] - ref_src.layer_range[0]
        ref_ck = ckpts[ref_src.model]
        by_layer: dict[int, list[tuple[str, str]]] = {}
        for name in ref_ck.names:
            sp = split_layer(name)
            if sp is not None:
                by_layer.setdefault(sp[1], []).append((sp[0], sp[2]))
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            for prefix, suffix in by_layer.get(ref_src.layer_range[0] + k, []):
                names = {src.model: f"{prefix}{src.layer_range[0] + k}{suffix}"
                         for src in s.sources + ([base_src] if base_src else [])}
                add_job(f"{prefix}{out_layer + k}{suffix}", s, inputs, base_src, ref_src, names, t)
        out_layer += n
    non_layer(parts[-1], pre=False)

    tok = recipe.tokenizer_source
    tokenizer_ref = reference if tok in (None, "base") else tok
    return Plan(method=method, jobs=jobs, reference=reference, num_layers=out_layer,
                tokenizer_ref=tokenizer_ref, compute_dtype=compute, out_dtype=out_dt,
                models=recipe.model_refs())


def _is_pre(name: str) -> bool:
    """Embedding-like tensors go before the layers; final norm and lm_head after."""
    return "embed" in name or name.startswith(("transformer.wte", "wte."))
