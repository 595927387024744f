"""Routing report (`merger route`): for each prompt, which experts each layer's router picks at the
last token and with what weight, plus each expert's share of the routing weight over all tokens.
Router probabilities come from the router's own input (the engine's post-attention-norm states)
and the checkpoint's gate rows: softmax in float32, top-k, renormalised as the model does."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from merger.errors import CheckpointError, MergerError
from merger.card import RECIPE_NAME
from merger.io.checkpoint import Checkpoint
from merger.moe.base import bos_text, gate_prompt_ids


@dataclass
class LayerRoute:
    layer: int
    experts: list[int]   # top-k at the last token, best first
    weights: list[float]  # their routing weights (renormalised when the model renormalises)
    share: list[float]   # per expert: its routing weight averaged over all tokens (0 where not picked)
    top1: list[int]      # per token: the expert with the largest routing weight


@dataclass
class PromptRoute:
    prompt: str
    tokens: int
    layers: list[LayerRoute]
    pieces: list[str]    # per token: its text (the BOS as its token string)


@dataclass
class RouteReport:
    experts: list[str]   # a label per expert (its source model when merger built the folder)
    top_k: int
    prompts: list[PromptRoute]

    def to_dict(self) -> dict:
        return asdict(self)


def moe_layers(cfg: dict) -> list[int]:
    """Layers with a router: all of a Mixtral; Qwen2-MoE may keep some dense (its sparse step, mlp_only_layers)."""
    n = int(cfg.get("num_hidden_layers", 0))
    if cfg.get("model_type") not in ("qwen2_moe", "qwen3_moe"):
        return list(range(n))
    step, dense = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def router_weights(ck: Checkpoint, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each MoE layer's router [E, D], whichever of the two layouts (or transformers 5's names) holds it."""
    out = {}
    for i in layers:
        for name in (f"model.layers.{i}.block_sparse_moe.gate.weight", f"model.layers.{i}.mlp.gate.weight"):
            if ck.has(name):
                out[i] = ck.get(name).float()
                break
        else:
            raise CheckpointError(f"model {ck.label!r}: layer {i} has no router (block_sparse_moe.gate.weight or "
                                  f"mlp.gate.weight); `merger route` needs a Mixtral or Qwen2-MoE checkpoint")
    return out


def expert_labels(path: Path, n: int) -> list[str]:
    """Source models from the recipe merger saved beside the weights, else e0, e1, ..."""
    try:
        data = yaml.safe_load((path / RECIPE_NAME).read_text())
        labels = [str(e["source_model"]) for e in data["experts"]]
        if len(labels) == n:
            return labels
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass
    return [f"expert {j}" for j in range(n)]


def route_probabilities(states: torch.Tensor, router: torch.Tensor, top_k: int,
                        normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """states [T, D], router [E, D] -> (dense weights [T, E], top weights [T, k], top experts [T, k])."""
    probs = torch.softmax(states.float() @ router.float().T, dim=-1)  # [T, E]
    top_w, top_e = torch.topk(probs, top_k, dim=-1)
    if normalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    dense = torch.zeros_like(probs).scatter(-1, top_e, top_w)
    return dense, top_w, top_e


def route_report(model_dir: str | Path, prompts: list[str], dtype: torch.dtype | None = None,
                 device: str = "cpu") -> RouteReport:
    """Run each prompt through the engine, tokenised as the gates were built (the tokenizer's bos_token
    text + the prompt, merger.moe.base.gate_prompt_ids), and report routing."""
    from merger.engine.model import load_model
    from merger.engine.tokenizer import load_tokenizer

    path = Path(model_dir)
    ck = Checkpoint(path)
    mt = ck.config.get("model_type")
    if mt not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        raise MergerError(f"{path}: model_type {mt!r} is not an MoE; `merger route` reads Mixtral, Qwen2-MoE or "
                          f"Qwen3-MoE checkpoints (build one with `merger build moe.yaml OUT`)")
    if not prompts:
        raise MergerError("give at least one prompt to route")
    top_k = int(ck.config.get("num_experts_per_tok", 2))
    normalize = mt == "mixtral" or bool(ck.config.get("norm_topk_prob", False))
    routers = router_weights(ck, moe_layers(ck.config))
    if not routers:
        raise MergerError(f"{path}: no layer has routed experts; nothing to report")
    model = load_model(path, dtype=dtype, device=device)
    tok = load_tokenizer(path)
    out = []
    for prompt in prompts:
        ids = gate_prompt_ids(tok, prompt, path)
        if not ids:
            raise MergerError("an empty prompt has no tokens to route (this tokenizer has no bos_token); give some text")
        states = model.layer_states(torch.tensor([ids], dtype=torch.long, device=device))["mlp_input"].cpu()
        layers = []
        for i, router in routers.items():
            dense, top_w, top_e = route_probabilities(states[i], router, top_k, normalize)
            layers.append(LayerRoute(layer=i, experts=top_e[-1].tolist(), weights=top_w[-1].tolist(),
                                     share=dense.mean(dim=0).tolist(), top1=top_e[:, 0].tolist()))
        out.append(PromptRoute(prompt=prompt, tokens=len(ids), layers=layers, pieces=token_pieces(tok, ids, path)))
    n_experts = next(iter(routers.values())).shape[0]
    return RouteReport(experts=expert_labels(path, n_experts), top_k=top_k, prompts=out)


def token_pieces(tok, ids: list[int], path: Path) -> list[str]:
    """Each token's own text; a special token that decodes to nothing (the BOS) shows its token string."""
    bos = bos_text(tok, path)
    return [tok.decode([i]) or (bos if k == 0 and bos else f"<{i}>") for k, i in enumerate(ids)]


def format_report(report: RouteReport) -> str:
    """Plain text: a legend of experts, then per prompt one line per layer."""
    lines = ["experts: " + ", ".join(f"e{j} = {name}" for j, name in enumerate(report.experts))]
    for p in report.prompts:
        lines += ["", f"{p.prompt!r} ({p.tokens} tokens): top-{report.top_k} at the last token | "
                      f"share of routing weight over all tokens"]
        for lr in p.layers:
            picked = ", ".join(f"e{e} {w:.3f}" for e, w in zip(lr.experts, lr.weights))
            share = " ".join(f"e{j} {s:.2f}" for j, s in enumerate(lr.share))
            lines.append(f"  layer {lr.layer:>2}: {picked:<{11 * report.top_k}} | {share}")
    return "\n".join(lines)
