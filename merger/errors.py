"""User-facing errors and warnings. The CLI prints any MergerError as one line (no traceback) and
exits 1; a warning is one `warning:` line on stderr and the work goes on."""
from __future__ import annotations

import sys


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class MergerError(Exception):
    """Base of every error caused by user input; the message says what to do next."""


class RecipeError(MergerError):
    """The recipe file is unreadable or invalid; the message carries the YAML path."""


class CheckpointError(MergerError):
    """An input checkpoint is missing, corrupt, or inconsistent with the others."""


class PluginError(MergerError):
    """A plugin failed to load, registered a duplicate name, or misbehaved at run time."""


class OutputError(MergerError):
    """The output location cannot be written (exists without --force, not writable...)."""


class HubError(MergerError):
    """A Hugging Face Hub repository cannot be found, read, downloaded or written."""


class EvalError(MergerError):
    """A text, window or model pairing that `merger eval` cannot score as asked."""


class SearchError(MergerError):
    """A search space, objective, storage or sampler that `merger search` cannot run."""
