"""The registry listings behind `merger methods`, `merger gates` and `merger plugins`: rows built from
the plugin registries, printed as a terminal table or as the Markdown tables the README carries."""
from __future__ import annotations

import sys
from typing import Any

from merger import plugins


def method_rows() -> list[dict[str, str]]:
    rows = []
    for name, cls in sorted(plugins.methods().items()):
        rows.append({
            "name": name,
            "parameters": ", ".join(_fields(cls.Params, "")),
            "per-model": ", ".join(_fields(cls.ModelParams, "")),
            "base_model": {"none": "no", "optional": "optional", "required": "required"}[cls.base],
            "reference": cls.reference,
            "plugin": getattr(cls, "_merger_plugin", "?"),
        })
    return rows


def _fields(model: Any, prefix: str) -> list[str]:
    out = []
    for fname, f in model.model_fields.items():
        key = f.alias or fname
        out.append(f"{prefix}{key}" + (" (required)" if f.is_required() else f"={f.default!r}"))
    return out


def print_table(table: Any) -> None:
    """Print a rich table whole: names fold rather than end in an ellipsis (they are copied into
    recipes), and piped output is not squeezed to 80 columns (it is grepped)."""
    from rich.console import Console

    for col in table.columns:
        col.overflow = "fold"
    Console(width=None if sys.stdout.isatty() else 10_000).print(table)


def markdown_table(rows: list[dict[str, str]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(r[c].replace("|", "\\|") or "—" for c in columns) + " |")
    return "\n".join(lines)


def show_registry(rows: list[dict[str, str]], cols: list[str], markdown: bool) -> None:
    """A registry listing: Markdown (the README's tables) or a terminal table with the plugin column."""
    if markdown:
        print(markdown_table(rows, cols))
        return
    from rich.table import Table

    table = Table(*cols, "plugin")
    for r in rows:
        table.add_row(*(r[c] for c in cols), r["plugin"])
    print_table(table)


def gate_rows() -> list[dict[str, str]]:
    return [{"name": name, "prompts": "required" if cls.needs_prompts else "no",
             "parameters": ", ".join(_fields(cls.Params, "")), "description": cls.description,
             "plugin": getattr(cls, "_merger_plugin", "?")}
            for name, cls in sorted(plugins.gate_initializers().items())]
