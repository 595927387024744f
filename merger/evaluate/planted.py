"""Tiny checkpoints that predict a given text (for the tests, the examples and the demo): a seeded Llama
whose blocks add nothing (o_proj and down_proj zero) and whose lm_head row for each token b points at
the normalised embedding of the token a that precedes b in the text, so logit(b | a) = `scale` and
every other logit is about `scale`·cos(e_a, e_a') ≈ 0. Its perplexity on that text is close to 1."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from merger import synth


def planted_weights(text: str, seed: int = 0, scale: float = 30.0,
                    **config_kw: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, float32 weights) of a model that predicts `text` as synth's tokenizer encodes it (BOS first).
    A token followed by different tokens in the text predicts the one that follows it most often."""
    cfg = synth.llama_config(**config_kw)
    ids = synth.make_tokenizer(cfg["vocab_size"]).encode(text).ids
    follows: dict[int, Counter] = {}
    for a, b in zip(ids, ids[1:]):
        follows.setdefault(a, Counter())[b] += 1
    w = synth.random_weights(cfg, seed)
    for name in w:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w[name] = torch.zeros_like(w[name])  # every block is the identity on the residual stream
    d = cfg["hidden_size"]
    w["model.norm.weight"] = torch.ones(d)
    emb = w["model.embed_tokens.weight"]
    head = torch.zeros(cfg["vocab_size"], d)
    for a, counts in follows.items():
        b = counts.most_common(1)[0][0]
        # final RMSNorm maps e_a to e_a·sqrt(d)/|e_a|: this row gives it logit `scale`
        head[b] += scale * emb[a] / (emb[a].norm() * d ** 0.5)
    if cfg.get("tie_word_embeddings"):
        raise ValueError("a planted model needs its own lm_head (tie_word_embeddings false)")
    w["lm_head.weight"] = head
    return cfg, w


def make_planted_llama(path: str | Path, text: str, seed: int = 0, scale: float = 30.0,
                       **config_kw: Any) -> dict[str, torch.Tensor]:
    """Write the planted model at `path` (config, safetensors, synth's tokenizer); returns its weights."""
    cfg, w = planted_weights(text, seed, scale, **config_kw)
    synth.write_checkpoint(path, cfg, w)
    return w


def make_linear_pair(root: str | Path, text: str, best: float = 0.3, noise: float = 20.0, seed: int = 0,
                     scale: float = 8.0, **config_kw: Any) -> tuple[Path, Path]:
    """Two models a, b whose linear merge with weights (best, 1 − best) is the planted model for `text`:
    they differ from it only in lm_head, a = P + D and b = P − D·best/(1 − best) for a seeded random D
    (logit noise of std `noise` per unit), so a merge with normalised weight α on a has lm_head
    H + D·(α − (1 − α)·best/(1 − best)): exact at α = best, noisier the further α is from it."""
    if not 0 < best < 1:
        raise ValueError(f"best must be inside (0, 1), got {best}")
    root = Path(root)
    cfg, w = planted_weights(text, seed, scale, **config_kw)
    g = torch.Generator().manual_seed(seed + 1)
    head = w["lm_head.weight"]
    d = noise * torch.randn(head.shape, generator=g) / cfg["hidden_size"] ** 0.5
    a, b = root / "a", root / "b"
    synth.write_checkpoint(a, cfg, {**w, "lm_head.weight": head + d})
    synth.write_checkpoint(b, cfg, {**w, "lm_head.weight": head - d * (best / (1 - best))})
    return a, b
