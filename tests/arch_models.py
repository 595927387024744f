"""Tiny seeded checkpoints of every family the engine runs beyond Llama/Mixtral, made with transformers' own
config and model classes (the independent reference), weights spread so logits, routing and soft-caps matter.

`build(name, path)` writes one: config.json + model.safetensors (save_pretrained) + merger's 512-token BPE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from merger import synth

VOCAB = 512
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(8)],
             "long_factor": [1.5 + 0.3 * i for i in range(8)]}

# name -> (transformers config class, model class, config fields beyond _COMMON)
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # Qwen2.5-style: tied, sliding window from layer max_window_layers on (transformers' Qwen2 rule)
    "qwen2_sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       norm_topk_prob=True, mlp_only_layers=[1])),
    # hidden 72: sqrt(72) = 8.485 rounds to 8.5 in bf16, so the embedding scale's rounding shows
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(hidden_size=72, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                    attn_logit_softcapping=2.0, final_logit_softcapping=10.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                    sliding_window_pattern=2, rope_theta=100000.0, rope_local_base_freq=1000.0,
                    rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # longrope switches from short to long factors past 16 positions, in the middle of a greedy run
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(original_max_position_embeddings=16, rope_scaling=_LONGROPE, sliding_window=10)),
    # Phi-4-mini style: only part of each head rotates
    "phi3_partial": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.5)),
    # Mistral-Nemo style: head_dim 24 != hidden 64 / 4 heads
    "mistral_nemo": ("MistralConfig", "MistralForCausalLM", dict(head_dim=24, sliding_window=None)),
}


def spread(model: torch.nn.Module, seed: int, zero_centred_norms: bool) -> None:
    """transformers' init (std 0.02) gives near-uniform routing and tiny logits; spread the weights instead.
    Gemma's norms scale by (1 + w), so theirs are drawn around 0 rather than 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (0.0 if zero_centred_norms else 1.0))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def build(name: str, path: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write model `name` of MODELS (config fields overridden by `overrides`) to `path`, seeded."""
    import transformers

    cfg_cls, model_cls, extra = MODELS[name]
    cfg = getattr(transformers, cfg_cls)(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    spread(model, seed, zero_centred_norms=name.startswith("gemma"))
    model.save_pretrained(path, safe_serialization=True)
    synth.write_tokenizer(path, VOCAB)
    return path
