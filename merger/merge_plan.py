"""Merge recipe -> BuildPlan. Reads checkpoint headers (names, shapes), never tensor data.

A `models:` recipe is planned as one slice spanning every layer, so gradients, filters and parameter
precedence (per-model > slice > top-level) follow one code path for both forms. Every output tensor's
parameters are resolved and validated here, with the recipe field each value came from, so `merger
validate` (which runs this planner) fails exactly where `merger build` would, before reading any tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from merger import plugins
from merger.errors import CheckpointError, MergerError, PluginError, RecipeError
from merger.io.checkpoint import Checkpoint, split_layer
from merger.io.dtypes import parse_dtype
from merger.io.hf import config_dtype, output_config
from merger.layer_config import layer_updates
from merger.methods.base import MergeContext
from merger.params import Level, Scalar, fields_of, resolve
from merger.plan import BuildPlan, OutputTensor, tensor_seed
from merger.recipe import MergeRecipe, merge_groups, method_base
from merger.vocab.plan import Reader, VocabPlan, chat_template_for, is_embedding
from merger.vocab.write import TokenizerFiles


@dataclass
class Source:
    """One model of a slice: its reference, layer range and per-model parameter level."""

    model: str
    layer_range: tuple[int, int]
    level: Level
    where: str


def who(method: type) -> str:
    return f"merge method {method.name!r} (plugin {getattr(method, '_merger_plugin', '?')!r})"


class MergeJob:
    """Computes one output tensor: reads its inputs in the compute dtype (through `reader` when they
    need aligning to the output vocabulary) and runs the method."""

    def __init__(self, method: Any, name: str, inputs: list[tuple[Checkpoint, str]],
                 base: tuple[Checkpoint, str] | None, params: BaseModel, model_params: list[BaseModel],
                 compute_dtype: torch.dtype, seed: int, shape: tuple[int, ...], reader: Reader | None = None,
                 device: torch.device = torch.device("cpu")):
        self.method, self.name, self.inputs, self.base = method, name, inputs, base
        self.params, self.model_params = params, model_params
        self.compute_dtype, self.seed, self.shape, self.reader = compute_dtype, seed, shape, reader
        self.device = device

    def __call__(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged tensor; `out` (the executor's, only where OutputTensor.writes_out) goes to the method."""
        cls = type(self.method)
        if self.reader is not None:
            tensors, base = self.reader(self.compute_dtype)
        else:
            tensors = [ck.get(n).to(self.compute_dtype) for ck, n in self.inputs]
            base = self.base[0].get(self.base[1]).to(self.compute_dtype) if self.base else None
        if self.device.type != "cpu":
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
            base = base.to(self.device) if base is not None else None
        ctx = MergeContext(name=self.name, generator=torch.Generator().manual_seed(tensor_seed(self.seed, self.name)),
                           dtype=self.compute_dtype, device=self.device, out=out)
        try:
            out = self.method.merge(tensors, base, self.params, self.model_params, ctx)
        except ValueError as e:  # the contract's way to reject parameter values: the user's to fix
            raise RecipeError(f"{who(cls)} on tensor {self.name}: {plugins.first_line(e)}") from None
        except MergerError:
            raise
        except Exception as e:  # a bug in the method: one line naming its plugin, not a traceback
            raise PluginError(f"{who(cls)} failed on tensor {self.name}: "
                              f"{type(e).__name__}: {plugins.first_line(e)}") from None
        if self.device.type != "cpu" and isinstance(out, torch.Tensor) and out.device == self.device:
            out = out.cpu()
        check_result(cls, self.name, self.shape, out)
        return out


def check_result(method: type, name: str, shape: tuple[int, ...], out: Any) -> None:
    """The safety net for plugin methods: a wrong type, shape or device names the plugin."""
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"{who(method)} returned {type(out).__name__} for tensor {name}, not a torch.Tensor")
    if tuple(out.shape) != tuple(shape):
        raise PluginError(f"{who(method)} returned shape {list(out.shape)} for tensor {name}, expected {list(shape)}")
    if not out.is_floating_point():
        raise PluginError(f"{who(method)} returned dtype {out.dtype} for tensor {name}; return a floating tensor")
    if out.device.type != "cpu":
        raise PluginError(f"{who(method)} returned tensor {name} on {out.device}; return it on the CPU (.cpu())")


def _validated(model: type[BaseModel], values: dict[str, Any], origin: dict[str, str], label: str,
               tensor: str, method: type, fallback: str) -> BaseModel:
    """A Params/ModelParams instance for one tensor; RecipeError names the recipe field at fault."""
    fields = fields_of(model)
    for key, value in values.items():
        problem = fields[key].check(value)
        if problem:
            raise RecipeError(f"{label}: {origin[key]}: {problem} (at tensor {tensor}, value {value!r})")
    try:
        return model.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        key = err["loc"][0] if err["loc"] else None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            f = fields[str(key)]
            given = [lvl for lvl in origin.values()]
            raise RecipeError(f"{label}: {fallback}.{f.key}: required by {method.name}, but no value applies to "
                              f"tensor {tensor} (no filter entry matches it); add an entry without `filter` as "
                              f"the default" + (f" (given: {', '.join(given)})" if given else "")) from None
        where = origin.get(str(key)) if key is not None else ", ".join(sorted(origin.values())) or fallback
        raise RecipeError(f"{label}: {where}: {msg} (at tensor {tensor})") from None


def _check_params(method: type, params: BaseModel, model_params: list[BaseModel], label: str, tensor: str,
                  origins: list[str]) -> None:
    try:
        method.check_params(params, model_params)
    except ValueError as e:
        raise RecipeError(f"{label}: {', '.join(sorted(set(origins))) or 'parameters'}: {plugins.first_line(e)} "
                          f"(at tensor {tensor})") from None


def check_constant_params(recipe: MergeRecipe, label: str) -> None:
    """Where every parameter is a plain scalar, each tensor gets the same values: run the per-tensor checks
    (cross-field rules, the method's check_params) once when the recipe loads, before any model is opened.
    Gradients and filters are checked per tensor by the planner."""
    method = plugins.methods()[recipe.merge_method]
    top = Level("parameters", recipe.parameters)
    base = method_base(recipe, method)
    for _where, slice_level, members in merge_groups(recipe):
        levels = [slice_level, top] + [lvl for _l, _r, lvl in members]
        if not all(isinstance(v, Scalar) for lvl in levels for v in lvl.params.values()):
            continue
        values, origin = resolve([slice_level, top], method.Params, "", None)
        params = _validated(method.Params, values, origin, label, "every tensor", method, "parameters")
        model_params, origins = [], list(origin.values())
        for loc, ref, lvl in members:
            if method.base_is_input or ref != base:
                values, origin = resolve([lvl, slice_level, top], method.ModelParams, "", None)
                model_params.append(_validated(method.ModelParams, values, origin, label, "every tensor", method,
                                               f"{loc}.parameters"))
                origins += origin.values()
        _check_params(method, params, model_params, label, "every tensor", origins)


def compute_device(name: str) -> torch.device:
    """`--device`: cpu, cuda[:n], or auto (the first GPU when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise RecipeError(f"--device: {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"--device: {name} asked for, but no CUDA device is available; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise RecipeError(f"--device: {name!r}: merges run on cpu or cuda")
    return dev


def plan_merge(recipe: MergeRecipe, ckpts: dict[str, Checkpoint], label: str = "recipe", seed: int = 0,
               device: str = "cpu") -> BuildPlan:
    """Every output tensor of a merge recipe; RecipeError/CheckpointError on any inconsistency."""
    method_cls = plugins.methods()[recipe.merge_method]
    merge_device = compute_device(device)
    compute = parse_dtype(recipe.dtype) if recipe.dtype else torch.float32
    out_dt = parse_dtype(recipe.out_dtype) if recipe.out_dtype else (parse_dtype(recipe.dtype) if recipe.dtype else None)
    base = method_base(recipe, method_cls)
    template = chat_template_for(recipe, [ckpts[r].path for r in recipe.model_refs()], label)
    top = Level("parameters", recipe.parameters)
    groups = merge_groups(recipe)
    if recipe.models is not None:  # one slice over every layer of the first model
        n = ckpts[base or recipe.models[0].model].num_layers
        slices = [(groups[0][1], [Source(ref, (0, n), lvl, loc) for loc, ref, lvl in groups[0][2]])]
    else:
        slices = [(slice_level, [Source(src.model, src.layer_range, lvl, loc)
                                 for (loc, _ref, lvl), src in zip(members, s.sources)])
                  for (_w, slice_level, members), s in zip(groups, recipe.slices or [])]

    parts = []
    for slice_level, sources in slices:
        for src in sources:
            nl = ckpts[src.model].num_layers
            if src.layer_range[1] > nl:
                where = f"{src.where}.layer_range" if recipe.slices is not None else src.where
                raise RecipeError(f"{label}: {where}: layer_range {list(src.layer_range)} exceeds the {nl} layers "
                                  f"of model {src.model!r}")
        inputs = [s for s in sources if method_cls.base_is_input or s.model != base]
        if method_cls.base_is_input and base is not None and base not in [s.model for s in sources]:
            inputs.append(Source(base, sources[0].layer_range, Level("base_model", {}), "base_model"))
        base_src = None
        if base is not None and not method_cls.base_is_input:
            base_src = next((s for s in sources if s.model == base), None) or \
                Source(base, sources[0].layer_range, Level("base_model", {}), "base_model")
        parts.append((slice_level, inputs, base_src, base_src or inputs[0]))

    method = method_cls()
    tensors: list[OutputTensor] = []
    reference = recipe.base_model or parts[0][3].model  # the config and tokenizer donor, as in mergekit
    vocab = VocabPlan(recipe, ckpts, reference, label) if recipe.vocab_source is not None else None

    def add(out_name: str, slice_level: Level, inputs: list[Source], base_src: Source | None, ref_src: Source,
            names: dict[str, str], t: float | None) -> None:
        """`names` maps a model reference to its own name for this output tensor."""
        ref_ck = ckpts[ref_src.model]
        shape = ref_ck.shape(names[ref_src.model])
        aligned = vocab is not None and is_embedding(out_name) and len(shape) == 2
        if aligned:
            shape = (vocab.out.rows, shape[1])
        for src in inputs + ([base_src] if base_src else []):
            ck, tname = ckpts[src.model], names[src.model]
            if not ck.has(tname):
                raise CheckpointError(f"model {src.model!r} has no tensor {tname!r} (needed for {out_name}); "
                                      f"are all models the same architecture?")
            if aligned:
                vocab.check_rows(ck, src.model, tname)
            if (ck.shape(tname)[1:] if aligned else ck.shape(tname)) != (shape[1:] if aligned else shape):
                raise CheckpointError(f"shape mismatch for {out_name}: {list(ck.shape(tname))} in {src.model!r} "
                                      f"but {list(ref_ck.shape(names[ref_src.model]))} in {ref_src.model!r}")
        values, origin = resolve([slice_level, top], method_cls.Params, out_name, t)
        params = _validated(method_cls.Params, values, origin, label, out_name, method_cls, "parameters")
        model_params, origins = [], list(origin.values())
        for src in inputs:
            values, origin = resolve([src.level, slice_level, top], method_cls.ModelParams, names[src.model], t)
            model_params.append(_validated(method_cls.ModelParams, values, origin, label, out_name, method_cls,
                                           f"{src.where}.parameters"))
            origins += origin.values()
        _check_params(method_cls, params, model_params, label, out_name, origins)
        reader = None
        if aligned:
            reader = vocab.reader([(s.model, ckpts[s.model], names[s.model]) for s in inputs],
                                  (base_src.model, ckpts[base_src.model], names[base_src.model]) if base_src else None)
        job = MergeJob(method, out_name, [(ckpts[s.model], names[s.model]) for s in inputs],
                       (ckpts[base_src.model], names[base_src.model]) if base_src else None,
                       params, model_params, compute, seed, shape, reader, merge_device)
        blame = (f"{who(method_cls)} with these parameters ({', '.join(sorted(set(origins)))})" if origins
                 else who(method_cls))
        saved_dt = out_dt or ref_ck.dtype(names[ref_src.model])
        tensors.append(OutputTensor(out_name, shape, saved_dt, job, job.inputs + ([job.base] if job.base else []),
                                    blame, writes_out=bool(getattr(method_cls, "writes_out", False))
                                    and saved_dt == compute and merge_device.type == "cpu"))

    def non_layer(part: tuple, pre: bool) -> None:
        slice_level, inputs, base_src, ref_src = part
        for name in ckpts[ref_src.model].names:
            if split_layer(name) is None and is_pre(name) == pre:
                everyone = inputs + ([base_src] if base_src else [])
                add(name, slice_level, inputs, base_src, ref_src, {s.model: name for s in everyone}, None)

    non_layer(parts[0], pre=True)
    out_layer = 0
    for slice_level, inputs, base_src, ref_src in parts:
        n = ref_src.layer_range[1] - ref_src.layer_range[0]
        by_layer: dict[int, list[tuple[str, str]]] = {}
        for name in ckpts[ref_src.model].names:
            sp = split_layer(name)
            if sp is not None:
                by_layer.setdefault(sp[1], []).append((sp[0], sp[2]))
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            for prefix, suffix in by_layer.get(ref_src.layer_range[0] + k, []):
                everyone = inputs + ([base_src] if base_src else [])
                names = {s.model: f"{prefix}{s.layer_range[0] + k}{suffix}" for s in everyone}
                add(f"{prefix}{out_layer + k}{suffix}", slice_level, inputs, base_src, ref_src, names, t)
        out_layer += n
    non_layer(parts[-1], pre=False)

    ref_cfg = ckpts[reference].config
    updates: dict[str, Any] = {"num_hidden_layers": out_layer}
    if recipe.slices is not None:
        updates.update(layer_updates(ref_cfg, [(ckpts[r.model].config, *r.layer_range) for _, _, _, r in parts]))
    if vocab is not None:
        updates["vocab_size"] = vocab.out.rows
        source = vocab.out.source.ref
    else:
        source = reference
    config = output_config(ref_cfg, out_dt or config_dtype(ref_cfg), **updates)
    tokenizer = (vocab.tokenizer_files(template) if vocab is not None
                 else TokenizerFiles(ckpts[source].path, None, template))
    summary = [f"{len(tensors)} tensors from {len(recipe.model_refs())} models, {out_layer} layers, "
               f"config from {reference!r}, tokenizer from {source!r}"]
    if vocab is not None:
        summary.append(vocab.summary())
    return BuildPlan(kind="merge", tensors=tensors, config=config, tokenizer=tokenizer,
                     metadata={"merger_method": method_cls.name}, summary=summary)


def is_pre(name: str) -> bool:
    """Embedding-like tensors go before the layers; final norm and lm_head after."""
    return "embed" in name or name.startswith(("transformer.wte", "wte."))
