"""The evaluation's user errors (kept here, beside their users, until merger/errors.py takes them):
one line each, printed by the CLI without a traceback, exit 1."""
from __future__ import annotations

from merger.errors import MergerError


class EvalError(MergerError):
    """A text, window or model pairing that `merger eval` cannot score as asked."""


class SearchError(MergerError):
    """A search space, objective, storage or sampler that `merger search` cannot run."""


SEARCH_EXTRA = "pip install 'merger[search]'"


def need_optuna():
    """The optuna module, or a one-line SearchError naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise SearchError(f"`merger search` needs optuna, which is not installed; run {SEARCH_EXTRA}") from None
    return optuna
