"""MoE router rows from what fine-tuning changed, no prompts needed. Per layer and expert, with
Δ = W_gate(expert) − W_gate(base) the change to the MLP gate projection [F, D]: `svd` takes the
top right singular vector of Δ (the input direction whose gate activations moved most), signed so
that moving along it raises them on average (1ᵀΔv ≥ 0); `mean` takes Δᵀ1, the direction of the
largest average rise. Rows are unit length; an expert identical to the base gets a zero row."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

import merger
from merger.moe.base import GateContext

EPS = 1e-8


class ExpertDelta(merger.GateInitializer):
    name = "expert_delta"
    description = "top singular vector (or mean row) of each expert's change to the base's gate_proj"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: Literal["svd", "mean"] = "svd"
        # the dense MLP weight to compare, per layer (Llama/Mistral naming by default)
        tensor: str = "model.layers.{layer}.mlp.gate_proj.weight"
        iterations: int = Field(300, ge=1)  # power-iteration budget before the exact SVD fallback

    def init_gates(self, ctx: GateContext) -> torch.Tensor:
        p = ctx.params
        rows = torch.zeros(ctx.num_layers, ctx.num_experts, ctx.hidden_size)
        for layer in range(ctx.num_layers):
            name = p.tensor.format(layer=layer)
            base = ctx.weight(name)
            for j in range(ctx.num_experts):
                delta = ctx.weight(name, row=j) - base  # [F, D]
                rows[layer, j] = mean_direction(delta) if p.mode == "mean" else top_direction(delta, p.iterations)
        return rows


def mean_direction(delta: torch.Tensor) -> torch.Tensor:
    """Δᵀ1 / ‖Δᵀ1‖: the unit input direction that raises the gate pre-activations most on average."""
    m = delta.sum(dim=0)
    return m / m.norm().clamp(min=EPS)


def top_direction(delta: torch.Tensor, iterations: int, tol: float = 1e-10) -> torch.Tensor:
    """Top right singular vector of Δ, signed by 1ᵀΔv ≥ 0. Power iteration on ΔᵀΔ started from the
    mean direction (two mat-vecs a step instead of an O(F·D²) SVD per layer and expert, and the
    start fixes the sign), in float64 so a tight tolerance means an accurate vector; a spectrum
    too flat to converge within `iterations` falls back to the exact SVD."""
    if not delta.any():
        return torch.zeros(delta.shape[1])
    d = delta.double()  # iterates are unit vectors, so tol is independent of the weights' scale
    v = mean_direction(d)
    if v.norm() == 0:  # rows cancel exactly: start from the largest row instead
        v = d[d.norm(dim=1).argmax()] / d.norm(dim=1).max()
    for _ in range(iterations):
        w = d.T @ (d @ v)
        w = w / w.norm().clamp(min=EPS)
        if (w - v).norm() < tol:
            return w.float()
        v = w
    vh = torch.linalg.svd(d, full_matrices=False).Vh[0]
    return (vh if float(d.sum(dim=0) @ vh) >= 0 else -vh).float()


@merger.hookimpl
def merger_register_gate_initializers(register) -> None:
    register(ExpertDelta)
