"""The vocabulary part of a merge plan: which output vocabulary, which tensors are embedding rows to
align (embed_tokens, lm_head), one TokenTable per set of models merged into such a tensor, the
readers that hand the merge method aligned tensors, and the tokenizer files to write. Reads only
tokenizer files and configs, never tensor data."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from merger.engine.tokenizer import read_chat_template
from merger.errors import RecipeError, warn
from merger.io.checkpoint import Checkpoint
from merger.recipe import MergeRecipe
from merger.vocab.align import TokenTable
from merger.vocab.output import OutputVocab, output_vocab
from merger.vocab.read import Vocab, read_vocab
from merger.vocab.templates import TemplateChoiceError, resolve_template
from merger.vocab.write import TokenizerFiles

Reader = Callable[[torch.dtype], tuple[list[torch.Tensor], torch.Tensor | None]]


def is_embedding(name: str) -> bool:
    """Tensors with one row per token: the input embedding and the output head."""
    return name.endswith("embed_tokens.weight") or name in ("lm_head.weight", "transformer.wte.weight")


def chat_template_for(recipe: MergeRecipe, folders: list[Path], label: str) -> str | None:
    if recipe.chat_template is None:
        return None
    try:
        tpl = resolve_template(recipe.chat_template, (read_chat_template(f) for f in folders))
    except TemplateChoiceError as e:
        raise RecipeError(f"{label}: chat_template: {e}") from None
    if tpl is None:
        warn("chat_template: auto found no chat template in any input; the output keeps its tokenizer's own")
    return tpl


class VocabPlan:
    """Built when the recipe sets `tokenizer_source` or a `tokenizer:` block (else no alignment happens,
    as in mergekit: the base's tokenizer is copied and every embedding must match it)."""

    def __init__(self, recipe: MergeRecipe, ckpts: dict[str, Checkpoint], reference: str, label: str):
        self.label = label
        self.base = recipe.base_model
        spec = recipe.tokenizer
        self.specs = dict((spec.tokens or {}) if spec else {})
        refs = recipe.model_refs()
        self.vocabs = {ref: read_vocab(ref, ckpts[ref].path, ckpts[ref].config) for ref in refs}
        mode = recipe.vocab_source
        if mode in ("base", "union"):
            first = self.vocabs[self.base or reference]
        else:
            first = self.vocabs[mode]
        ordered = [first] + [v for r, v in self.vocabs.items() if v is not first]
        pad = spec.pad_to_multiple_of if spec else None
        self.out: OutputVocab = output_vocab("union" if mode == "union" else first.ref, first, ordered,
                                             list(self.specs), pad)
        self._tables: dict[tuple[str, ...], TokenTable] = {}
        self._warned: set[str] = set()

    def summary(self) -> str:
        return self.out.describe()

    def tokenizer_files(self, chat_template: str | None) -> TokenizerFiles:
        return TokenizerFiles(self.out.source.folder, self.out, chat_template)

    def table(self, members: list[str]) -> TokenTable:
        key = tuple(dict.fromkeys(members))
        if key not in self._tables:
            for ref in key:
                self._warn_rows(self.vocabs[ref])
            self._tables[key] = TokenTable(self.out, [self.vocabs[r] for r in key], self.base, self.specs, self.label)
            missing = self._tables[key].unsourced
            if missing:
                warn(f"{len(missing)} output token(s) ({', '.join(map(repr, missing[:3]))}) are in none of the merged "
                     f"models; their embedding rows are zero")
        return self._tables[key]

    def _warn_rows(self, v: Vocab) -> None:
        if v.ref in self._warned:
            return
        self._warned.add(v.ref)
        if v.dropped:
            warn(f"model {v.ref!r}: {len(v.dropped)} token(s) ({', '.join(map(repr, v.dropped[:3]))}) have ids at or "
                 f"past its vocab_size {v.rows}; they have no embedding and are left out")
        elif v.length < v.rows:
            warn(f"model {v.ref!r}: {v.rows} embedding rows for {v.length} tokens; the {v.rows - v.length} padding "
                 f"rows are not carried over")

    def check_rows(self, ck: Checkpoint, ref: str, name: str) -> None:
        rows = ck.shape(name)[0]
        if rows < self.vocabs[ref].rows:
            raise RecipeError(f"{self.label}: model {ref!r}: {name} has {rows} rows but config.json's vocab_size "
                              f"is {self.vocabs[ref].rows}; fix vocab_size")

    def reader(self, inputs: list[tuple[str, Checkpoint, str]], base: tuple[str, Checkpoint, str] | None) -> Reader:
        """Reads every member's tensor, computes the default rows, then aligns one member at a time,
        releasing its original: the inputs, the defaults and one aligned tensor at most, at once."""
        members = inputs + ([base] if base else [])
        table = self.table([ref for ref, _, _ in members])

        def read(dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            originals = [ck.get(name) for _, ck, name in members]
            defaults = table.default_rows({ref: t for (ref, _, _), t in zip(members, originals)})
            aligned = []
            for k, (ref, _, _) in enumerate(members):
                aligned.append(table.align(ref, originals[k], defaults).to(dtype))
                originals[k] = None  # type: ignore[call-overload]
            return aligned[:len(inputs)], (aligned[-1] if base else None)

        return read
