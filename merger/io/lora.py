"""LoRA adapters folded into their base while it is read (`model: base+adapter`, PEFT's layout:
adapter_config.json + adapter_model.safetensors), so no merged copy of the base is written first.

For a targeted module the tensor read is W + s·B·A (transposed for `fan_in_fan_out`; for an
embedding (B·A)ᵀ), with s = lora_alpha / r, or lora_alpha / √r with `use_rslora`; `rank_pattern`
and `alpha_pattern` give per-module r and alpha as PEFT matches them. `modules_to_save` (and the
base embedding PEFT saves beside an embedding LoRA) replace the base's tensor. Variants that
change the math (DoRA, LoRA biases, trained biases, activated LoRA, ...) are refused."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from merger.errors import CheckpointError
from merger.io.checkpoint import Checkpoint, read_json
from merger.io.safetensors_file import SafetensorsFile

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                  r"lora_embedding_B|base_layer\.weight|weight)$")
# adapter_config.json options that change what the adapter computes: refused when set
_VARIANTS = ("use_dora", "lora_bias", "target_parameters", "trainable_token_indices", "layer_replication",
             "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config", "velora_config",
             "monteclora_config")


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The `rank_pattern`/`alpha_pattern` key PEFT applies to `module` (its regex matches the name's tail)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


class LoraAdapter:
    """An adapter's configuration and weights, checked: only plain LoRA, and shapes that fit."""

    def __init__(self, folder: Path, label: str, remote_header: dict[str, dict[str, Any]] | None = None):
        self.folder, self.label = Path(folder), label
        cfg_path = self.folder / CONFIG_NAME
        if not cfg_path.exists():
            raise CheckpointError(f"adapter {label!r}: {cfg_path} is missing; a LoRA reference `base+adapter` needs "
                                  f"a PEFT adapter folder (adapter_config.json and adapter_model.safetensors)")
        cfg = read_json(cfg_path, CONFIG_NAME)
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object")
        self.config = cfg
        self._check_kind(cfg, cfg_path)
        path = self.folder / WEIGHTS_NAME
        if not path.exists() and remote_header is None:
            raise CheckpointError(f"adapter {label!r}: {path} is missing (pickled adapter_model.bin is not read; "
                                  f"re-save the adapter with safe_serialization=True)")
        self.file = SafetensorsFile(path, remote_header)
        self.pairs: dict[str, dict[str, str]] = {}      # module -> {"A": key, "B": key}
        self.replace: dict[str, str] = {}                # base tensor name -> adapter key
        self.embedding: set[str] = set()
        for key in self.file.header:
            m = _KEY.match(key)
            if m is None:
                raise CheckpointError(f"{path}: tensor {key!r} is not a LoRA weight merger can fold (plain LoRA only); "
                                      f"is this a PEFT LoRA adapter?")
            module, part = m["module"], m["part"]
            if part in ("base_layer.weight", "weight"):
                self.replace[f"{module}.weight"] = key
                continue
            side = "A" if "_A" in part else "B"
            self.pairs.setdefault(module, {})[side] = key
            if "embedding" in part:
                self.embedding.add(module)
        for module, sides in self.pairs.items():
            if set(sides) != {"A", "B"}:
                raise CheckpointError(f"{path}: module {module} has lora_{''.join(sides)} but not both A and B")
        if not self.pairs and not self.replace:
            raise CheckpointError(f"{path}: holds no LoRA weights")

    def _check_kind(self, cfg: dict[str, Any], where: Path) -> None:
        kind = cfg.get("peft_type", "LORA")
        if str(kind).upper() != "LORA":
            raise CheckpointError(f"{where}: peft_type {kind!r} is not LoRA; only LoRA adapters can be folded")
        used = [k for k in _VARIANTS if cfg.get(k)]
        if cfg.get("bias", "none") != "none":
            used.append(f"bias: {cfg['bias']}")
        if used:
            raise CheckpointError(f"{where}: {', '.join(used)} is a LoRA variant merger cannot fold (plain LoRA only); "
                                  f"merge it with PEFT's merge_and_unload() and reference the merged model")
        for key in ("r", "lora_alpha"):
            v = cfg.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise CheckpointError(f"{where}: {key} {v!r} is not a positive number")
        for key in ("rank_pattern", "alpha_pattern"):
            pats = cfg.get(key) or {}
            if not isinstance(pats, dict):
                raise CheckpointError(f"{where}: {key} is not a mapping of module patterns to numbers")
            for p in pats:
                try:
                    re.compile(p)
                except re.error as e:
                    raise CheckpointError(f"{where}: {key} pattern {p!r} is not a regular expression ({e})") from None

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        cfg = self.config
        rk, ak = pattern_key(cfg.get("rank_pattern") or {}, module), pattern_key(cfg.get("alpha_pattern") or {}, module)
        r = (cfg["rank_pattern"][rk] if rk else cfg["r"])
        alpha = (cfg["alpha_pattern"][ak] if ak else cfg["lora_alpha"])
        return int(r), float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)

    def delta_shape(self, module: str) -> tuple[int, int]:
        a, b = (self.file.header[self.pairs[module][s]]["shape"] for s in ("A", "B"))
        if module in self.embedding:    # A [r, vocab], B [dim, r] -> (B·A)ᵀ [vocab, dim]
            return a[1], b[0]
        out = (b[0], a[1])              # B [out, r] · A [r, in]
        return out[::-1] if self.config.get("fan_in_fan_out") else out

    def delta(self, module: str) -> torch.Tensor:
        """s·B·A in float32, in the orientation of the base tensor."""
        a = self.file.get(self.pairs[module]["A"]).float()
        b = self.file.get(self.pairs[module]["B"]).float()
        _, scale = self.rank_and_scale(module)
        d = b @ a
        if module in self.embedding or self.config.get("fan_in_fan_out"):
            d = d.t()
        return d.mul_(scale)


class LoraCheckpoint:
    """A base checkpoint seen through an adapter: the base's names, shapes, dtypes and config, with each
    targeted tensor read as base + delta (or replaced). Checked against the base when opened."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter, label: str):
        self.base, self.adapter, self.label = base, adapter, label
        self.path, self.config, self.names = base.path, base.config, base.names
        self.tied, self.num_layers = base.tied, base.num_layers
        self.remote = base.remote
        self.folded: dict[str, str] = {}
        where = f"model {label!r}"
        targets = adapter.config.get("target_modules")
        if isinstance(targets, list):
            for t in targets:
                if not any(n == f"{t}.weight" or n.endswith(f".{t}.weight") for n in base.names):
                    raise CheckpointError(f"{where}: target module {t!r} of the adapter is not in the base; is the "
                                          f"adapter for another architecture?")
        for module in adapter.pairs:
            name = f"{module}.weight"
            if not base.has(name):
                raise CheckpointError(f"{where}: the adapter has LoRA weights for {module}, which the base lacks; is "
                                      f"the adapter for another base?")
            r, _ = adapter.rank_and_scale(module)
            a_rank = adapter.file.header[adapter.pairs[module]["A"]]["shape"][0]
            b_rank = adapter.file.header[adapter.pairs[module]["B"]]["shape"][-1]
            if not a_rank == b_rank == r:
                raise CheckpointError(f"{where}: {module} has LoRA rank {a_rank}/{b_rank} (A/B) but adapter_config.json "
                                      f"gives r = {r}; the adapter files do not belong together")
            if tuple(adapter.delta_shape(module)) != tuple(base.shape(name)):
                raise CheckpointError(f"{where}: the LoRA for {module} makes {list(adapter.delta_shape(module))} but "
                                      f"the base tensor is {list(base.shape(name))}; is the adapter for another base?")
            self.folded[name] = module
        for name, key in adapter.replace.items():
            if not base.has(name) or tuple(adapter.file.header[key]["shape"]) != tuple(base.shape(name)):
                raise CheckpointError(f"{where}: the adapter replaces {name} with a tensor of shape "
                                      f"{adapter.file.header[key]['shape']}, which does not fit the base")

    def has(self, name: str) -> bool:
        return self.base.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    def embed_name(self) -> str:
        return self.base.embed_name()

    def get(self, name: str) -> torch.Tensor:
        real = self.base.embed_name() if (self.tied and name == "lm_head.weight") else name
        key = self.adapter.replace.get(real)
        t = self.adapter.file.get(key).to(self.base.dtype(real)) if key else self.base.get(real)
        module = self.folded.get(real)
        if module is None:
            return t
        return (t.float() + self.adapter.delta(module)).to(t.dtype)

    def close(self) -> None:
        self.base.close()
        self.adapter.file.close()
