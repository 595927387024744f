"""Built-in gate initializers: random, uniform_random, cheap_embed, hidden (mergekit-moe's modes),
router_input, which builds each row from the vector the router actually multiplies at run time (layer
i's post-attention RMSNorm output; `hidden` uses the residual stream entering layer i, before attention,
the norm and its per-channel weights), and calibrated, which fits the rows to every prompt token."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from merger.moe.base import GateContext, GateInitializer
from merger.moe.calibrate import fit_rows, pick_tokens

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
        return prompt_rows(ctx, lambda p: ctx.layer_states(p)[self.state])


def prompt_rows(ctx: GateContext, states) -> torch.Tensor:
    """[L, E, D]: per expert, mean last-token state of its positive prompts minus that of its negative
    prompts, L2-normalised per layer; `states(prompt)` gives a prompt's [L, T, D]."""
    def f(prompts: tuple[str, ...]) -> torch.Tensor:
        return torch.stack([states(p)[:, -1, :] for p in prompts]).mean(dim=0)  # [L, D]

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


class Calibrated(GateInitializer):
    """router_input rows, then fitted (merger.moe.calibrate) so that each layer's softmax picks every
    positive-prompt token's expert. A shared expert's row (a sigmoid gate, not in the softmax) stays
    router_input's."""

    name = "calibrated"
    description = ("router_input rows fitted per layer (logistic regression, L-BFGS) so the router picks "
                   "each prompt token's expert; negative prompts push their expert down")
    needs_prompts = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        steps: int = Field(200, ge=1, le=10_000)           # L-BFGS iterations (full batch)
        weight_decay: float = Field(1e-3, ge=0, le=10)     # on the rows, in units of the mean token norm
        learning_rate: float = Field(1.0, gt=0, le=10)     # L-BFGS step length (strong-Wolfe line search)
        tokens: Literal["all", "last"] | PositiveInt = "all"  # which prompt tokens train: all, last, or last k
        negative_weight: float = Field(1.0, ge=0, le=100)  # weight of the negative prompts' push-down term
        margin: float = Field(4.0, gt=0, le=20)            # median training token: its expert's logit - the next

    def init_gates(self, ctx: GateContext) -> torch.Tensor:
        p = ctx.params
        prefix = ctx.prefix_tokens
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def run(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            """(last-token state [L, 1, D], training tokens [L, n, D]) of a prompt, its model run done once."""
            if prompt not in seen:
                s = ctx.layer_states(prompt)["mlp_input"]
                seen[prompt] = s[:, -1:].clone(), pick_tokens(s, p.tokens, prefix).clone()
            return seen[prompt]

        init = prompt_rows(ctx, lambda q: run(q)[0])
        routed = [j for j, e in enumerate(ctx.experts) if not e.where.startswith("shared_experts")]
        if len(routed) < 2:
            return init

        def tokens_of(prompts: tuple[str, ...]) -> torch.Tensor | None:
            return torch.cat([run(q)[1] for q in prompts], dim=1) if prompts else None  # [L, N, D]

        fitted = fit_rows([tokens_of(ctx.experts[j].positive) for j in routed],
                          [tokens_of(ctx.experts[j].negative) for j in routed], init[:, routed],
                          steps=p.steps, weight_decay=p.weight_decay, learning_rate=p.learning_rate,
                          negative_weight=p.negative_weight, margin=p.margin)
        out = init.clone()
        out[:, routed] = fitted
        return out


BUILTIN_GATES = (Random, UniformRandom, CheapEmbed, Hidden, RouterInput, Calibrated)
