"""Built-in gate initializers: random, uniform_random, cheap_embed, hidden (mergekit-moe's modes)
and router_input, which builds each row from the vector the router actually multiplies at run
time: layer i's post-attention RMSNorm output. `hidden` uses the residual stream entering layer i
instead, a different vector (before attention, before the norm and its per-channel weights), so its
rows score prompts against a state the router never sees."""
from __future__ import annotations

import torch

from merger.moe.base import GateContext, GateInitializer

NORM_EPS = 1e-8


def l2_normalize(v: torch.Tensor) -> torch.Tensor:
    """Unit rows along the last axis; the norm is clamped at 1e-8 so a zero row stays zero."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=NORM_EPS)


class Random(GateInitializer):
    name = "random"
    description = "N(0, 1) rows, unscaled, seeded by --random-seed (for training afterwards)"

    def init_gates(self, ctx: GateContext) -> torch.Tensor:
        return torch.randn((ctx.num_layers, ctx.num_experts, ctx.hidden_size), generator=ctx.generator)


class UniformRandom(GateInitializer):
    name = "uniform_random"
    description = "U(-1/sqrt(hidden), 1/sqrt(hidden)) rows, torch.nn.Linear's default init, seeded"

    def init_gates(self, ctx: GateContext) -> torch.Tensor:
        bound = ctx.hidden_size ** -0.5
        u = torch.rand((ctx.num_layers, ctx.num_experts, ctx.hidden_size), generator=ctx.generator)
        return (2 * u - 1) * bound


class CheapEmbed(GateInitializer):
    name = "cheap_embed"
    description = "normalised sum of the prompts' input embeddings (BOS included), same row every layer"
    needs_prompts = True

    def init_gates(self, ctx: GateContext) -> torch.Tensor:
        embed = ctx.embedding()  # [V, D]

        def f(prompts: tuple[str, ...]) -> torch.Tensor:
            ids = [i for p in prompts for i in ctx.tokenize(p)]
            return l2_normalize(embed[torch.tensor(ids, dtype=torch.long)].sum(dim=0))  # [D]

        rows = []
        for e in ctx.experts:
            v = f(e.positive)
            if e.negative:
                v = v - f(e.negative)
            rows.append(l2_normalize(v))
        return torch.stack(rows).unsqueeze(0).expand(ctx.num_layers, -1, -1).contiguous()  # [L, E, D]


class _PromptStates(GateInitializer):
    """Per layer: a state at each prompt's last token, averaged over the prompts; positives minus
    negatives; L2-normalised per layer."""

    needs_prompts = True
    state: str  # a key of GateContext.layer_states()

    def init_gates(self, ctx: GateContext) -> torch.Tensor:
        def f(prompts: tuple[str, ...]) -> torch.Tensor:
            last = [ctx.layer_states(p)[self.state][:, -1, :] for p in prompts]  # each [L, D]
            return torch.stack(last).mean(dim=0)

        rows = []
        for e in ctx.experts:
            v = f(e.positive)
            if e.negative:
                v = v - f(e.negative)
            rows.append(l2_normalize(v))  # [L, D]
        return torch.stack(rows, dim=1)   # [L, E, D]


class Hidden(_PromptStates):
    name = "hidden"
    description = "hidden state entering each layer at the prompts' last token (mergekit's default)"
    state = "layer_input"


class RouterInput(_PromptStates):
    name = "router_input"
    description = "each layer's post-attention-norm MLP input at the prompts' last token: what the router sees"
    state = "mlp_input"


BUILTIN_GATES = (Random, UniformRandom, CheapEmbed, Hidden, RouterInput)
