"""The GateInitializer contract: a name, a typed Params model, and one function producing the
router weights of every layer, shape (layers, experts, hidden), float32, from a GateContext
(shapes, each expert's prompts, a seeded generator, lazy access to the base model's embedding,
tokenizer and per-layer hidden states through merger's own engine)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from merger.errors import MergerError, RecipeError


def bos_text(tokenizer: Any, path: Path | None = None) -> str:
    """The tokenizer's `bos_token` string (tokenizer_config.json, else special_tokens_map.json, where
    transformers also looks), or "" when it names none (e.g. Qwen2)."""
    bos = tokenizer.special.get("bos_token")
    if bos is None and path is not None and (path / "special_tokens_map.json").is_file():
        try:
            value = json.loads((path / "special_tokens_map.json").read_text(encoding="utf-8")).get("bos_token")
        except (OSError, ValueError, AttributeError):
            value = None
        bos = value.get("content") if isinstance(value, dict) else value
    return bos if isinstance(bos, str) else ""


def gate_prompt_ids(tokenizer: Any, prompt: str, path: Path | None = None) -> list[int]:
    """A gate prompt's token ids as mergekit-moe makes them: the text `bos_token + prompt` encoded with no
    special tokens added. So the BOS is there even where tokenizer_config says `add_bos_token: false`
    (SmolLM2, many ChatML and Qwen models), and the tokenizer sees the BOS text, exactly as mergekit's does."""
    return list(tokenizer.encode(bos_text(tokenizer, path) + prompt, add_bos=False))


@dataclass(frozen=True)
class ExpertPrompts:
    """One router row to initialise: `where` names it in the recipe (e.g. `experts[1]`)."""

    where: str
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()


@dataclass
class GateContext:
    """Everything an initializer may use. The base model and tokenizer load on first use only,
    so modes that need neither (random) never read a tensor of the base."""

    num_layers: int
    hidden_size: int
    experts: list[ExpertPrompts]
    generator: torch.Generator
    params: BaseModel
    base_path: Path
    embed_reader: Any = None            # callable () -> [V, D] tensor, set by the composer
    weight_reader: Any = None           # callable (row | None, tensor name) -> tensor, set by the composer
    _tokenizer: Any = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def tokenize(self, prompt: str) -> list[int]:
        """The tokenizer's bos_token text + the prompt, no other special tokens (mergekit's
        tokenisation, see gate_prompt_ids)."""
        if self._tokenizer is None:
            from merger.engine.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.base_path)
        return gate_prompt_ids(self._tokenizer, prompt, self.base_path)

    @property
    def prefix_tokens(self) -> int:
        """How many ids tokenize() puts before every prompt's own (1 with a bos_token, else 0)."""
        return len(self.tokenize(""))

    def embedding(self) -> torch.Tensor:
        """The base's input embedding [V, D] in float32."""
        return self.embed_reader().float()

    def weight(self, name: str, row: int | None = None) -> torch.Tensor:
        """One tensor, float32, read lazily: of the base model (row None) or of the source model
        of router row `row` (an index into `experts`), e.g. for initializers that derive routers
        from what fine-tuning changed in each expert."""
        if self.weight_reader is None:
            raise RuntimeError("this GateContext was built without a weight_reader")
        return self.weight_reader(row, name).float()

    def layer_states(self, prompt: str) -> dict[str, torch.Tensor]:
        """The base model's per-layer states for tokenize(prompt): {"layer_input", "mlp_input"}, float32 [L, T, D]."""
        if self._model is None:
            from merger.engine.model import load_model

            # the base's own dtype, as the MoE will run: a float32 copy of a 7B model would need
            # twice the memory, and the engine hands back float32 states either way
            self._model = load_model(self.base_path)
        ids = torch.tensor([self.tokenize(prompt)], dtype=torch.long)
        try:
            return self._model.layer_states(ids)
        except MergerError as e:  # e.g. a prompt longer than the context: say which prompt
            raise RecipeError(f"prompt {_short(prompt)}: {e}") from None

    def release(self) -> None:
        """Drop the base model before the output is written (it can be as large as one expert)."""
        self._model = None


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


class GateInitializer:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    # True when every expert must carry positive_prompts for this mode.
    needs_prompts: ClassVar[bool] = False

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def init_gates(self, ctx: GateContext) -> torch.Tensor:
        """Return router weights (layers, experts, hidden) in float32."""
        raise NotImplementedError
