"""Tiny seeded checkpoints (Llama layout) and a small BPE tokenizer, made offline.

They power `merger demo` and the tests: a base model and "fine-tunes" that are the base plus
seeded noise, written as standard Hugging Face folders that transformers loads as they are.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from merger.io.hf import write_config
from merger.io.writer import write_tensors

_CORPUS = """\
Once upon a time there was a little fox who lived at the edge of a quiet forest. Every morning the
fox walked to the river, drank the cold water and watched the birds. One day a storm came and the
river rose over its banks, and the fox helped the rabbits carry their children to the hill.
The king said to the people of the town that the harvest would be good this year. They sang and
danced in the square until the stars came out, and the old woman told stories about the sea.
def add(a, b):
    return a + b

import numpy as np
x = np.zeros((3, 4), dtype=np.float32)
for i in range(10):
    print(i * i)
class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
The derivative of x squared is two x. The integral of a constant c over an interval of length L
is c times L. Prime numbers are 2, 3, 5, 7, 11, 13 and so on; there are infinitely many of them.
Question: what is the capital of France? Answer: Paris. Question: how many legs has a spider? Eight.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.lru_cache(maxsize=4)
def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on the embedded corpus; BOS `<s>` is prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def write_tokenizer(path: Path, vocab_size: int = 512) -> None:
    tok = make_tokenizer(vocab_size)
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": 1, "eos_token_id": 2}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def llama_config(hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 128, vocab: int = 512, tie: bool = False,
                 max_positions: int = 512, model_type: str = "llama", **extra: Any) -> dict[str, Any]:
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    cfg = {
        "architectures": [arch], "model_type": model_type, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    if model_type == "mistral":
        cfg["sliding_window"] = None
    cfg.update(extra)
    return cfg


def random_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded float32 weights in Llama's tensor layout, scaled so logits are well spread."""
    g = torch.Generator().manual_seed(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / in_f**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(d, generator=g)

    w = {"model.embed_tokens.weight": torch.randn(v, d, generator=g)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = lin(q, d)
        w[p + "self_attn.k_proj.weight"] = lin(kv, d)
        w[p + "self_attn.v_proj.weight"] = lin(kv, d)
        w[p + "self_attn.o_proj.weight"] = lin(d, q)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = lin(f, d)
        w[p + "mlp.up_proj.weight"] = lin(f, d)
        w[p + "mlp.down_proj.weight"] = lin(d, f)
    w["model.norm.weight"] = norm()
    if not config.get("tie_word_embeddings", False):
        w["lm_head.weight"] = lin(v, d)
    return w


def perturb(weights: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A seeded 'fine-tune': each tensor plus noise of `scale` times its own std."""
    g = torch.Generator().manual_seed(seed)
    return {k: t + scale * t.float().std() * torch.randn(t.shape, generator=g) for k, t in weights.items()}


def write_checkpoint(path: str | Path, config: dict[str, Any], weights: dict[str, torch.Tensor],
                     dtype: torch.dtype = torch.float32, max_shard_bytes: int | None = None,
                     tokenizer: bool = True) -> Path:
    """Write a Hugging Face folder: config, (sharded) safetensors, tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tensors(path, {name: t.to(dtype) for name, t in weights.items()}, max_shard_bytes or 10**12)
    write_config(path, config, dtype)
    if tokenizer:
        write_tokenizer(path, config["vocab_size"])
    return path


def make_llama(path: str | Path, seed: int = 0, base: dict[str, torch.Tensor] | None = None,
               noise: float = 0.1, dtype: torch.dtype = torch.float32, **config_kw: Any) -> dict[str, torch.Tensor]:
    """Write a tiny Llama at `path` (a perturbed copy of `base` if given); returns its float32 weights."""
    cfg = llama_config(**config_kw)
    weights = perturb(base, seed, noise) if base is not None else random_weights(cfg, seed)
    write_checkpoint(path, cfg, weights, dtype=dtype)
    return weights
