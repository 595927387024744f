"""Clown-car composition planned as a BuildPlan: the experts' MLPs plus the base's everything-else
become a Mixtral, Qwen2-MoE (one shared expert; Llama, Mistral or Qwen2 inputs) or Qwen3-MoE (Qwen3
inputs) checkpoint. Planning checks configs and headers only; the router rows are computed by the gate
plugin when the plan runs, before the first tensor is written (merger.moe.routers)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from merger.errors import RecipeError
from merger.io.checkpoint import Checkpoint, split_layer
from merger.io.dtypes import parse_dtype
from merger.io.hf import config_dtype, output_config
from merger.moe.card import card_text
from merger.moe.layout import (PROJS, check_inputs, expert_name, mlp_name, moe_config, router_name, shared_gate_name,
                               shared_name)
from merger.moe.recipe import Expert, MoERecipe
from merger.moe.routers import compute_gates, warn_identical_experts
from merger.plan import BuildPlan, OutputTensor, tensor_seed
from merger.vocab.read import read_vocab
from merger.vocab.write import TokenizerFiles


def output_dtype(recipe: MoERecipe) -> torch.dtype | None:
    """out_dtype, else dtype (mergekit-moe's output dtype), else None: each tensor keeps its own."""
    name = recipe.out_dtype or recipe.dtype
    return parse_dtype(name) if name else None


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


class Gates:
    """The router rows, computed once when the plan runs (the `prepare` step), then sliced per layer."""

    def __init__(self, compute: Callable[[], torch.Tensor]):
        self._compute = compute
        self.rows: torch.Tensor | None = None

    def prepare(self) -> None:
        if self.rows is None:
            self.rows = self._compute()

    def layer(self, layer: int, rows: slice) -> torch.Tensor:
        self.prepare()
        assert self.rows is not None
        # a copy, not a view: shards must not hold tensors that alias one storage
        return self.rows[layer, rows].clone()


def plan_moe(recipe: MoERecipe, ckpts: dict[str, Checkpoint], paths: dict[str, Path], label: str = "recipe",
             seed: int = 0) -> BuildPlan:
    """Every output tensor of an MoE recipe, after the header-only checks of merger.moe.layout."""
    shapes = check_inputs(recipe, ckpts, label)  # the base's config also parsed as the engine will run it
    base = ckpts[recipe.base_model]
    check_tokenizer_source(recipe, ckpts, label)
    warn_identical_experts(recipe, paths)
    arch = shapes.layout
    out_dt = output_dtype(recipe)
    embed_dt = base.dtype("model.embed_tokens.weight")
    gate_dt = out_dt or embed_dt
    gates = Gates(functools.partial(compute_gates, recipe, ckpts, paths[recipe.base_model], shapes.num_layers,
                                    shapes.hidden, seed))
    gate_blame = f"gate_mode {recipe.gate_mode!r}"

    pre, post, layer_names = [], [], {}
    for name in base.names:
        sp = split_layer(name)
        if sp is None:
            (pre if "embed" in name else post).append(name)
        elif not sp[2].startswith(".mlp."):
            layer_names.setdefault(sp[1], []).append(name)

    def copy(name: str) -> OutputTensor:
        return OutputTensor(name, base.shape(name), out_dt or base.dtype(name), functools.partial(base.get, name),
                            [(base, name)])

    out = [copy(n) for n in pre]
    n_exp = len(recipe.experts)
    for i in range(shapes.num_layers):
        out += [copy(n) for n in layer_names.get(i, [])]  # a Qwen2 base's q/k/v biases, a Qwen3's q/k norms
        if arch == "qwen2_moe" and not base.has(f"model.layers.{i}.self_attn.q_proj.bias"):
            out += _zero_qkv_biases(base, i, gate_dt)
        out.append(OutputTensor(router_name(arch, i), (n_exp, shapes.hidden), gate_dt,
                                functools.partial(gates.layer, i, slice(0, n_exp)), blame=gate_blame))
        members = [(expert_name(arch, i, j, proj), e, f"experts[{j}]", proj)
                   for j, e in enumerate(recipe.experts) for proj in PROJS]
        if recipe.shared:
            members += [(shared_name(i, proj), recipe.shared, "shared_experts[0]", proj) for proj in PROJS]
        for out_name, e, where, proj in members:
            ck, name = ckpts[e.source_model], mlp_name(i, proj)
            knobs = [k for k in ("noise_scale", "residual_scale") if getattr(e, k) is not None]
            blame = " and ".join(f"{where}.{k}" for k in knobs)
            # every read is a tensor of its own (Checkpoint.get), so two experts from one model never alias
            out.append(OutputTensor(out_name, ck.shape(name), out_dt or ck.dtype(name),
                                    functools.partial(expert_tensor, ck, name, e, out_name, seed), [(ck, name)],
                                    blame))
        if recipe.shared:
            out.append(OutputTensor(shared_gate_name(i), (1, shapes.hidden), gate_dt,
                                    functools.partial(gates.layer, i, slice(n_exp, None)), blame=gate_blame))
    out += [copy(n) for n in post]

    config = output_config(moe_config(recipe, base.config, shapes), out_dt or config_dtype(base.config) or embed_dt)
    summary = [f"{n_exp} experts{' + 1 shared' if recipe.shared else ''}, {shapes.num_layers} layers, "
               f"gate_mode {recipe.gate_mode}, {recipe.experts_per_token} per token, layout {arch}"]
    return BuildPlan(kind="moe", tensors=out, config=config, tokenizer=TokenizerFiles(paths[recipe.tokenizer_ref()]),
                     metadata={"merger_moe_gate_mode": recipe.gate_mode}, prepare=[gates.prepare],
                     # the card names the layout the inputs settled on, whatever `architecture` left open
                     card_body=functools.partial(card_text, recipe.model_copy(update={"architecture": arch}), seed),
                     summary=summary)


def check_tokenizer_source(recipe: MoERecipe, ckpts: dict[str, Checkpoint], label: str) -> None:
    """An MoE keeps the base's embeddings, so another tokenizer must have exactly the base's vocabulary."""
    ref = recipe.tokenizer_ref()
    if ref == recipe.base_model:
        return
    base, other = (read_vocab(r, ckpts[r].path, ckpts[r].config) for r in (recipe.base_model, ref))
    token = base.first_difference(other)
    if token is not None:
        what = (f"is id {base.ids[token]} in the base but {other.ids[token]} there"
                if token in base.ids and token in other.ids
                else "is not in the base's vocabulary" if token not in base.ids else "is missing there")
        raise RecipeError(f"{label}: tokenizer_source: {ref!r} has another vocabulary than base_model (token "
                          f"{token!r} {what}); the MoE keeps the base's embeddings, so use its tokenizer")
    if base.rows != other.rows:
        raise RecipeError(f"{label}: tokenizer_source: {ref!r} has vocab_size {other.rows}, base_model {base.rows}; "
                          f"use the base's tokenizer")


def _zero_qkv_biases(base: Checkpoint, layer: int, dtype: torch.dtype) -> list[OutputTensor]:
    """Qwen2-MoE's q/k/v projections carry biases; a Llama/Mistral base has none (a Qwen2 base has its
    own, copied as they are), and a zero bias is exactly no bias, so the attention computes what the base's did."""
    out = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        rows = base.shape(f"model.layers.{layer}.self_attn.{proj}.weight")[0]
        out.append(OutputTensor(f"model.layers.{layer}.self_attn.{proj}.bias", (rows,), dtype,
                                functools.partial(torch.zeros, rows, dtype=dtype)))
    return out
