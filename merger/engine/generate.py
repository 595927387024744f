"""Text generation: prefill the prompt into a preallocated KV cache, then decode one token at a time,
streaming UTF-8-safe text pieces and timing both phases.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from merger.engine import panels
from merger.engine.model import ContextError, Transformer
from merger.engine.sampling import check_params, sample
from merger.engine.tokenizer import StreamDecoder, Tokenizer, check_text
from merger.errors import CheckpointError


@dataclass
class GenerationResult:
    token_ids: list[int]          # the new tokens only (a final EOS included)
    text: str                     # their text, special tokens skipped
    prompt_tokens: int
    prefill_s: float              # prompt forward + first token
    decode_s: float               # every later token
    decode_tokens_per_s: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, chat: bool = False,
             stream: Callable[[str], None] | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt` (wrapped in the chat template if `chat`).

    top_k 0 / None and top_p 1 / None mean off; a bad parameter or prompt is a one-line MergerError."""
    check_params(temperature, top_k, top_p, max_new_tokens, seed)
    check_text(prompt, "prompt")
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
    decoder = StreamDecoder(tokenizer)

    def on_token(tok: int) -> None:
        piece = decoder.push(tok)
        if piece:
            stream(piece)

    new, prefill_s, decode_s = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed,
                                            tokenizer.eos_token_ids,
                                            on_token if stream is not None else None)
    if stream is not None:
        tail = decoder.flush()
        if tail:
            stream(tail)
    steps = max(len(new) - 1, 0)
    return GenerationResult(token_ids=new, text=tokenizer.decode(new), prompt_tokens=len(ids),
                            prefill_s=prefill_s, decode_s=decode_s,
                            decode_tokens_per_s=steps / decode_s if decode_s > 0 else 0.0)


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_ids: set[int] | frozenset[int] = frozenset(),
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], float, float]:
    """Token-level loop: (new token ids, prefill seconds, decode seconds). Stops after an EOS id."""
    check_params(temperature, top_k, top_p, max_new_tokens, seed)
    context, vocab = model.config.max_position_embeddings, model.config.vocab_size
    if not prompt_ids:
        raise ContextError("the prompt encodes to no tokens; give a non-empty prompt")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise CheckpointError(f"the prompt holds token id {bad} but the model's vocab_size is {vocab} (config.json); "
                              "use the tokenizer that belongs to this model")
    if len(prompt_ids) >= context:
        raise ContextError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context} "
                           "(max_position_embeddings in config.json); shorten the prompt")
    max_new = min(max_new_tokens, context - len(prompt_ids))
    if max_new <= 0:
        return [], 0.0, 0.0
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
    # longrope (Phi-3): the first step past the switch recomputes every key with the long factors, as
    # transformers' Phi-3 generation does, instead of extending a cache rotated with the short ones
    refill_at = model.config.rope.switch
    panels.apply(model)  # decode reads wide weights faster in column panels (a no-op once they are)
    # the last new token is never fed back, so the cache needs one position less
    model.setup_cache(1, len(prompt_ids) + max_new - 1)
    x = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    new: list[int] = []
    t0 = time.perf_counter()
    logits = model(x, start_pos=0, last_only=True)[0, -1]
    pos = len(prompt_ids)
    prefill_s = decode_start = 0.0
    while True:
        tok = sample(logits, temperature, top_k, top_p, gen)
        new.append(tok)
        if len(new) == 1:
            prefill_s = time.perf_counter() - t0
            decode_start = time.perf_counter()
        if on_token is not None:
            on_token(tok)
        if tok in eos_token_ids or len(new) >= max_new:
            break
        if pos == refill_at:
            every = torch.tensor([list(prompt_ids) + new], device=model.device)
            logits = model(every, start_pos=0, last_only=True)[0, -1]
        else:
            logits = model(torch.tensor([[tok]], device=model.device), start_pos=pos)[0, -1]
        pos += 1
    decode_s = time.perf_counter() - decode_start if len(new) > 1 else 0.0
    model.cache = None  # free the KV memory between calls
    return new, prefill_s, decode_s
