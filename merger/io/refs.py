"""What a recipe's model reference is: a Hub repo id `org/name[@revision]`, or a local path.
Pure string and path checks, shared by the resolvers, the card writer and the output checks."""
from __future__ import annotations

import re
from pathlib import Path

_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[\w])?"
REF_RE = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[\w][\w./-]{{0,199}}))?")


def parse_reference(reference: str) -> tuple[str, str | None] | None:
    """'org/name@rev' -> ('org/name', 'rev'); None when it cannot be a Hub repo id."""
    m = REF_RE.fullmatch(reference)
    if not m or "--" in m["repo"] or ".." in m["repo"]:
        return None
    return m["repo"], m["rev"]


def split_lora(reference: str, base_dir: str | None) -> tuple[str, str] | None:
    """'base+adapter' -> ('base', 'adapter') (mergekit's LoRA reference); None for a plain reference,
    including a local path that itself contains '+'."""
    if "+" not in reference or (Path(base_dir or ".") / reference).exists():
        return None
    base, _, adapter = reference.partition("+")
    if not base or not adapter or "+" in adapter:
        return None
    return base, adapter


def meant_as_local(reference: str, base_dir: str | None) -> bool:
    """A reference whose first folder exists locally (`models/ft-a` with ./models present) is a
    missing local folder, not a repo id: never send it to the network."""
    first = reference.split("/", 1)[0]
    return (Path(base_dir or ".") / first).is_dir()
