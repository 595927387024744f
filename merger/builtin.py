"""The default plugin: registers every built-in method, gate initializer and resolver through
the same public hooks a third-party plugin uses."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from merger.errors import CheckpointError
from merger.hookspecs import hookimpl
from merger.methods.arcee_fusion import ArceeFusion
from merger.methods.linear import Linear
from merger.methods.passthrough import Passthrough
from merger.methods.ram import Ram, RamPlusTL
from merger.methods.karcher import Karcher
from merger.methods.model_stock import ModelStock
from merger.methods.multislerp import MultiSlerp
from merger.methods.nearswap import NearSwap
from merger.methods.sce import Sce
from merger.methods.slerp import NuSlerp, Slerp
from merger.methods.task_arithmetic import FAMILY
from merger.moe.gates import BUILTIN_GATES


@hookimpl
def merger_register_methods(register) -> None:
    for cls in (Linear, *FAMILY, Slerp, NuSlerp, MultiSlerp, Karcher, ModelStock, Sce, NearSwap, Passthrough,
                Ram, RamPlusTL, ArceeFusion):
        register(cls)


@hookimpl
def merger_register_gate_initializers(register) -> None:
    for cls in BUILTIN_GATES:
        register(cls)


@hookimpl
def merger_resolve_model(reference: str, options: dict[str, Any]) -> Path | None:
    """A local folder: absolute, or relative to options['base_dir'] (default: current folder).
    A .gguf file (or a folder holding one and no config.json) becomes a converted-once cached folder."""
    try:
        path = Path(reference).expanduser()
    except RuntimeError:  # `~nosuchuser/x`
        user = reference.split("/", 1)[0]
        raise CheckpointError(f"model {reference!r}: {user} is not a user on this machine; give the folder's "
                              f"path or a Hub repo id (org/name)") from None
    if not path.is_absolute():
        path = Path(options.get("base_dir") or ".") / path
    if not path.exists():
        return None
    from merger.io.gguf_convert import resolve_gguf

    return resolve_gguf(path, options) or path


@hookimpl(specname="merger_resolve_model", trylast=True)
def resolve_hub_model(reference: str, options: dict[str, Any]) -> Path | None:
    """A Hub repo id `org/name[@revision]`, downloaded into the HF cache. Tried last, after the
    local folders and any plugin resolver; a missing local-looking path never reaches the network."""
    from merger.io.hub_fetch import resolve_hub_model as resolve

    return resolve(reference, options)
