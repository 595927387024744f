"""Router rows fitted to the prompts (`gate_mode: calibrated`): per layer, multinomial logistic
regression of each prompt token's router input (the post-attention-norm state) onto its expert, with
weight decay, full-batch L-BFGS in float32 from the `router_input` rows; tokens of an expert's
negative prompts are pushed away from it by a -log(1 - p) term. No random numbers are drawn, so the
rows depend on the prompts and the base alone (the same for every --random-seed)."""
from __future__ import annotations

import torch

# Largest logit gap the fitted rows may produce on a training token (a safety cap after the margin
# scaling): e^-30 ≈ 1e-13 is certainty already; larger rows only magnify bfloat16's rounding of x.
MAX_LOGIT_GAP = 30.0


def _log_not(z: torch.Tensor, e: int) -> torch.Tensor:
    """log(1 - softmax(z)[..., e]) computed stably, for logits z [..., E]."""
    rest = torch.cat([z[..., :e], z[..., e + 1:]], dim=-1)
    return torch.logsumexp(rest, dim=-1) - torch.logsumexp(z, dim=-1)


def fit_rows(positives: list[torch.Tensor], negatives: list[torch.Tensor | None], init: torch.Tensor,
             steps: int = 200, weight_decay: float = 1e-3, learning_rate: float = 1.0,
             negative_weight: float = 1.0, margin: float | None = 4.0) -> torch.Tensor:
    """Fit router rows W [L, E, D] so softmax(W x) picks expert e for every state x in positives[e].

    positives[e]: [L, N_e, D] router inputs of expert e's prompt tokens (N_e >= 1); negatives[e]:
    [L, M_e, D] or None. init: [L, E, D] starting rows (any scale). The loss per layer is the
    class-balanced cross-entropy (each expert's tokens weigh the same in total, so an expert with long
    prompts gets no larger share of the router) + negative_weight × the mean -log(1 - p_e) over expert
    e's negative tokens + weight_decay / 2 × |V|², where V = W × s and s is the layer's mean token
    norm: the fit is then scale-free (the same weight decay suits every layer and model). The layers
    are independent, so one L-BFGS run minimises their sum.

    The fit fixes the rows' directions; their scale sets how confident routing is. With `margin`, each
    layer's rows are then scaled so that the median training token's logit for its expert beats the
    best other expert's by `margin` (4: ~55x its weight), whatever the weight decay left; where the
    median token is misrouted the fit's scale stays. Finally no training token's logits may span more
    than MAX_LOGIT_GAP. Returns float32 rows [L, E, D].
    """
    n_exp = init.shape[1]
    pos = [p.float() for p in positives]
    neg = [None if n is None or n.shape[1] == 0 else n.float() for n in negatives]
    every = torch.cat(pos + [n for n in neg if n is not None], dim=1)  # [L, N, D]
    scale = every.norm(dim=-1).mean(dim=1).clamp(min=1e-8)[:, None, None]  # [L, 1, 1]
    pos = [p / scale for p in pos]
    neg = [None if n is None else n / scale for n in neg]

    v0 = init.float() * scale
    v0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # unit rows: logits start within ±|x̂| ≈ 1
    v = v0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], lr=learning_rate, max_iter=steps, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        total = 0.5 * weight_decay * (v * v).sum()
        for e in range(n_exp):
            z = pos[e] @ v.transpose(1, 2)  # [L, N_e, E]
            total = total - torch.log_softmax(z, dim=-1)[..., e].mean(dim=1).sum() / n_exp
            if neg[e] is not None:
                zn = neg[e] @ v.transpose(1, 2)
                total = total - negative_weight * _log_not(zn, e).mean(dim=1).sum() / n_exp
        return total

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    fitted = v.detach()
    if not torch.isfinite(fitted).all():  # a line search that blew up: keep the starting rows
        fitted = v0
    with torch.no_grad():
        if margin is not None:
            fitted = fitted * _margin_factor(pos, fitted, margin)
        z = every / scale @ fitted.transpose(1, 2)                  # [L, N, E]
        gap = (z.amax(dim=-1) - z.amin(dim=-1)).amax(dim=1)         # [L]
        shrink = (MAX_LOGIT_GAP / gap.clamp(min=1e-8)).clamp(max=1.0)[:, None, None]
    return (fitted * shrink / scale).contiguous()


def _margin_factor(pos: list[torch.Tensor], v: torch.Tensor, margin: float) -> torch.Tensor:
    """[L, 1, 1]: the factor that makes each layer's median positive-token margin equal `margin`
    (1 where that median is not positive: scaling cannot fix a misrouted majority)."""
    margins = []
    for e, x in enumerate(pos):
        z = x @ v.transpose(1, 2)                                   # [L, N_e, E]
        other = torch.cat([z[..., :e], z[..., e + 1:]], dim=-1).amax(dim=-1)
        margins.append(z[..., e] - other)                           # [L, N_e]
    med = torch.cat(margins, dim=1).median(dim=1).values            # [L]
    return torch.where(med > 0, margin / med.clamp(min=1e-8), torch.ones_like(med))[:, None, None]


def pick_tokens(states: torch.Tensor, tokens: str | int, prefix: int) -> torch.Tensor:
    """The positions of one prompt's states [L, T, D] that count as training tokens: `all` (every
    token after the BOS prefix, which is the same state for every prompt), `last`, or the last k."""
    own = states[:, prefix:] if states.shape[1] > prefix else states[:, -1:]
    if tokens == "all":
        return own
    k = 1 if tokens == "last" else int(tokens)
    return own[:, -k:]
