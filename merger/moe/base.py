"""The GateInitializer contract: a name, a typed Params model, and one function producing the
router weights of every layer, shape (layers, experts, hidden), float32."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class GateInitializer:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    # True when every expert must carry positive_prompts for this mode.
    needs_prompts: ClassVar[bool] = False

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def init_gates(self, ctx: Any) -> torch.Tensor:
        """Return router weights (layers, experts, hidden) in float32."""
        raise NotImplementedError
