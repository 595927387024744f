"""Names of torch dtypes as they appear in recipes and config.json (`torch_dtype`)."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def parse_dtype(name: str) -> torch.dtype:
    """Map 'bfloat16' / 'bf16' / 'torch.bfloat16' to a torch dtype; ValueError for anything else."""
    key = str(name).removeprefix("torch.").lower()
    key = _ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
