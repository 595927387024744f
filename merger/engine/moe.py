"""Top-k expert routing and the two ways to run the chosen experts.

`route`: router softmax in float32, top-k, optional renormalisation (Mixtral yes, Qwen2-MoE and Qwen3-MoE per
`norm_topk_prob`). `experts_decode` (few tokens) reads only the chosen experts' weight views;
`experts_grouped` (prefill) sorts token-slots by expert and runs one matmul pair per expert.
Shapes: T = tokens, k = experts per token, E = experts, D = hidden, F = expert FFN width.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from merger.engine.matmul import linear

DECODE_MAX_TOKENS = 4  # above this, sorting slots by expert beats the per-token Python loop
# config.json's hidden_act / hidden_activation -> the gate activation (transformers' ACT2FN entries)
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D], router [E, D] -> (weights [T, k] float32, experts [T, k] int64)."""
    # float32 logits too: bf16 rounding of the logits would flip near-tied expert choices
    probs = torch.softmax(F.linear(x.float(), router.float()), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)                # [T, k]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU of one expert: x [N, D], w13 [2F, D] (gate rows then up rows), w2 [D, F] -> [N, D]."""
    gate, up = linear(x, w13).chunk(2, dim=-1)  # [N, F] each
    return linear(F.silu(gate) * up, w2)


def experts_decode(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Few tokens: for each chosen expert, its rows of x through views w13[e], w2[e] -> float32 [T, D]."""
    rows_of: dict[int, list[tuple[int, int]]] = {}
    for t, row in enumerate(experts.tolist()):
        for j, e in enumerate(row):
            rows_of.setdefault(e, []).append((t, j))
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
    for e, slots in rows_of.items():
        if len(slots) == 1:  # the common batch-1 case: no gather, no index tensors
            t, j = slots[0]
            out[t] += expert_mlp(x[t:t + 1], w13[e], w2[e])[0].float() * weights[t, j]
            continue
        ts = torch.tensor([t for t, _ in slots], device=x.device)
        js = torch.tensor([j for _, j in slots], device=x.device)
        y = expert_mlp(x.index_select(0, ts), w13[e], w2[e]).float()  # [n, D]
        out.index_add_(0, ts, y * weights[ts, js][:, None])
    return out


def experts_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Many tokens: token-slots sorted by expert, one (up, down) matmul pair per used expert -> float32 [T, D]."""
    n_tok, k = experts.shape
    flat = experts.reshape(-1)                               # [T*k] expert of each slot
    order = torch.argsort(flat, stable=True)                 # [T*k] slots grouped by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    token = order // k                                       # [T*k] token of each sorted slot
    xs = x.index_select(0, token)                            # [T*k, D]
    ys = torch.empty(xs.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            ys[start:start + n] = expert_mlp(xs[start:start + n], w13[e], w2[e])
            start += n
    ys *= weights.reshape(-1)[order][:, None]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, ys)                      # [T, D]


class FeedForward(nn.Module):
    """Dense gated MLP, act(gate) * up (SwiGLU; GeGLU for Gemma), gate and up fused into one [2F, D] weight."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.w13 = nn.Parameter(torch.empty(2 * hidden, dim), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(dim, hidden), requires_grad=False)
        self.b13 = nn.Parameter(torch.empty(2 * hidden), requires_grad=False) if bias else None
        self.b2 = nn.Parameter(torch.empty(dim), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        gate, up = linear(x, self.w13, self.b13).chunk(2, dim=-1)
        return linear(self.act(gate) * up, self.w2, self.b2)


class MoEFeedForward(nn.Module):
    """Routed experts stacked as 3-D weights, plus Qwen2-MoE's optional sigmoid-gated shared expert."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, normalize: bool,
                 shared_hidden: int = 0):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.router = nn.Parameter(torch.empty(num_experts, dim), requires_grad=False)          # [E, D]
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim), requires_grad=False)  # [E, 2F, D]
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden), requires_grad=False)       # [E, D, F]
        self.shared = FeedForward(dim, shared_hidden) if shared_hidden else None
        self.shared_gate = nn.Parameter(torch.empty(1, dim), requires_grad=False) if shared_hidden else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        flat = x.reshape(-1, x.shape[-1])                                     # [B*T, D]
        weights, experts = route(flat, self.router, self.top_k, self.normalize)
        run = experts_decode if flat.shape[0] <= DECODE_MAX_TOKENS else experts_grouped
        out = run(flat, self.w13, self.w2, weights, experts)                  # float32 [B*T, D]
        if self.shared is not None:
            gate = torch.sigmoid(linear(flat, self.shared_gate))              # [B*T, 1]
            out += (gate * self.shared(flat)).float()
        return out.to(x.dtype).view_as(x)
