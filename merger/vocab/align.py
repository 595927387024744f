"""Embedding rows aligned to the output vocabulary by token string, for one merged tensor
(embed_tokens or lm_head) and the models that take part in it.

Each input's rows are permuted into the output's order. A token an input lacks gets the row of the
token's source: `tokenizer.tokens.<tok>.source` when given (a model, another token of a model, or
zero), else the base's row if the base has the token, else the only model that has it, else the mean
of those that have it, else zero. `force: true` gives every input the source row. Rows past the
vocabulary (pad_to_multiple_of) are zero. Memory: the inputs' tensors, the few default rows, and one
aligned tensor at a time while the inputs are released."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from merger.errors import RecipeError
from merger.recipe import ModelTokenSource, TokenSpec, ZeroSource
from merger.vocab.output import OutputVocab
from merger.vocab.read import Vocab


@dataclass(frozen=True)
class RowSource:
    """Where one output token's default row comes from: a mean over (model, row) pairs (one pair: a
    copy), or zero when `rows` is empty."""

    rows: tuple[tuple[str, int], ...]


class TokenTable:
    """Per output id: each member's own row (or -1) and the default row source where one is needed."""

    def __init__(self, out: OutputVocab, members: list[Vocab], base: str | None, specs: dict[str, TokenSpec],
                 label: str):
        self.out, self.members = out, {v.ref: v for v in members}
        self.perm: dict[str, torch.Tensor] = {}
        for v in members:
            p = torch.full((out.size,), -1, dtype=torch.long)
            for tok, j in out.tokens.items():
                i = v.ids.get(tok)
                if i is not None:
                    p[j] = i
            self.perm[v.ref] = p
        self.forced = torch.zeros(out.size, dtype=torch.bool)
        self.sources: dict[int, RowSource] = {}
        self.unsourced: list[str] = []
        for tok, j in out.tokens.items():
            spec = specs.get(tok)
            if spec is not None and spec.force:
                self.forced[j] = True
            missing = any(int(self.perm[v.ref][j]) < 0 for v in members)
            if not (missing or self.forced[j]):
                continue
            if spec is not None and spec.source is not None:
                self.sources[j] = self._given(tok, spec.source, label)
            else:
                self.sources[j] = self._default(tok, j, base)
                if not self.sources[j].rows:
                    self.unsourced.append(tok)

    def _given(self, tok: str, source: object, label: str) -> RowSource:
        where = f"{label}: tokenizer.tokens.{tok}.source"
        if isinstance(source, ZeroSource):
            return RowSource(())
        model = source.model if isinstance(source, ModelTokenSource) else str(source)
        v = self.members.get(model)
        if v is None:
            raise RecipeError(f"{where}: model {model!r} does not take part in merging the embeddings; use one of "
                              f"{', '.join(map(repr, self.members))}")
        if isinstance(source, ModelTokenSource):
            if source.token is not None:
                if source.token not in v.ids:
                    raise RecipeError(f"{where}.token: {model!r} has no token {source.token!r}")
                return RowSource(((model, v.ids[source.token]),))
            if source.token_id >= v.rows:
                raise RecipeError(f"{where}.token_id: {source.token_id} is past {model!r}'s {v.rows} rows")
            return RowSource(((model, source.token_id),))
        if tok not in v.ids:
            raise RecipeError(f"{where}: {model!r} has no token {tok!r}; name a model that has it, or use "
                              f"{{kind: model_token, model, token}} or {{kind: zero}}")
        return RowSource(((model, v.ids[tok]),))

    def _default(self, tok: str, j: int, base: str | None) -> RowSource:
        if base in self.members and int(self.perm[base][j]) >= 0:
            return RowSource(((base, int(self.perm[base][j])),))
        have = tuple((ref, int(p[j])) for ref, p in self.perm.items() if int(p[j]) >= 0)
        return RowSource(have)

    def is_identity(self, ref: str, rows: int) -> bool:
        """True when `ref`'s tensor already is the aligned one (same order and size, nothing forced)."""
        p = self.perm[ref]
        return (rows == self.out.rows == self.out.size and torch.equal(p, torch.arange(self.out.size))
                and not bool(self.forced.any()))

    def default_rows(self, tensors: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Each needed default row, computed once from the members' original tensors (means in float32)."""
        out: dict[int, torch.Tensor] = {}
        width = next(iter(tensors.values())).shape[1]
        for j, src in self.sources.items():
            if not src.rows:
                out[j] = torch.zeros(width)
            elif len(src.rows) == 1:
                ref, i = src.rows[0]
                out[j] = tensors[ref][i].to(torch.float32, copy=True)  # a copy: the originals are released
            else:
                out[j] = torch.stack([tensors[ref][i].float() for ref, i in src.rows]).mean(dim=0)
        return out

    def align(self, ref: str, tensor: torch.Tensor, defaults: dict[int, torch.Tensor]) -> torch.Tensor:
        """`ref`'s rows in the output order, [rows, width], in the tensor's dtype."""
        if self.is_identity(ref, tensor.shape[0]):
            return tensor
        p = self.perm[ref]
        out = torch.zeros((self.out.rows, tensor.shape[1]), dtype=tensor.dtype)
        own = (p >= 0) & ~self.forced
        idx = own.nonzero().flatten()
        out[idx] = tensor[p[idx]]
        for j, row in defaults.items():
            if not bool(own[j]):
                out[j] = row.to(tensor.dtype)
        return out
