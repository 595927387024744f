"""Router rows for an MoE: runs the recipe's gate initializer plugin once, checks what it returns
(shape, dtype, finite values) and warns when two experts get rows the router cannot tell apart."""
from __future__ import annotations

from pathlib import Path

import torch

from merger import plugins
from merger.errors import MergerError, PluginError, RecipeError, warn
from merger.io.checkpoint import Checkpoint
from merger.moe.base import ExpertPrompts, GateContext
from merger.moe.recipe import MoERecipe

SIMILAR_COS = 0.999  # router rows this close route alike: the experts would be chosen together


def compute_gates(recipe: MoERecipe, ckpts: dict[str, Checkpoint], base_path: Path, num_layers: int,
                  hidden: int, seed: int) -> torch.Tensor:
    """Router rows (layers, experts [+ shared], hidden) in float32 from the recipe's gate plugin."""
    cls = plugins.gate_initializers()[recipe.gate_mode]
    who = f"gate initializer {cls.name!r} (plugin {getattr(cls, '_merger_plugin', '?')!r})"
    every = recipe.gate_rows()
    # experts without prompts (allowed with a warning) get a zero row: the plugin sees the others only
    keep = [j for j, (_, e) in enumerate(every) if e.positive_prompts or not cls.needs_prompts]
    out = torch.zeros(num_layers, len(every), hidden)
    if not keep:
        return out
    members = [every[j] for j in keep]
    rows = [ExpertPrompts(where, tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ()))
            for where, e in members]
    base = ckpts[recipe.base_model]

    def read_weight(row: int | None, name: str) -> torch.Tensor:
        return (base if row is None else ckpts[members[row][1].source_model]).get(name)

    ctx = GateContext(num_layers=num_layers, hidden_size=hidden, experts=rows,
                      generator=torch.Generator().manual_seed(seed),
                      params=cls.Params.model_validate(recipe.gate_parameters), base_path=base_path,
                      embed_reader=lambda: base.get("model.embed_tokens.weight"), weight_reader=read_weight)
    try:
        got = cls().init_gates(ctx)
    except MergerError:
        raise
    except ValueError as e:
        raise RecipeError(f"{who}: {plugins.first_line(e)}") from None
    except Exception as e:
        raise PluginError(f"{who} failed: {type(e).__name__}: {plugins.first_line(e)}") from None
    finally:
        ctx.release()
    want = (num_layers, len(rows), hidden)
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
        shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise PluginError(f"{who} returned {shape}; expected a tensor of shape {list(want)} (layers, experts, hidden)")
    if not got.is_floating_point() or not torch.isfinite(got).all():
        raise PluginError(f"{who} returned non-finite or non-float router weights; check the plugin")
    got = got.float()
    if cls.needs_prompts:
        warn_similar_rows(got, rows)
    out[:, keep] = got
    return out


def warn_similar_rows(gates: torch.Tensor, rows: list[ExpertPrompts]) -> None:
    """Rows that are near-parallel in some layer make their experts indistinguishable to the router there."""
    unit = gates / gates.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    cos = unit @ unit.transpose(1, 2)  # [L, E, E]
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            if (rows[a].positive, rows[a].negative) == (rows[b].positive, rows[b].negative):
                continue  # the same prompts: warned about when the recipe loaded
            layers = (cos[:, a, b] > SIMILAR_COS).nonzero().flatten().tolist()
            if layers:
                warn(f"{rows[a].where} and {rows[b].where} get near-identical router rows in layer(s) "
                     f"{', '.join(map(str, layers))}: the router cannot tell them apart there; make their "
                     f"prompts more distinct (prompts ending in the same token look alike to early layers)")


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
