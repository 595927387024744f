"""Multi-stage recipe files (mergekit-multi's format): YAML documents separated by `---`, each but the
final one with a `name:` that later documents use as a model reference. The final document (the
unnamed one, else the last) builds into OUT_DIR, the others into `--intermediate-dir`.

The whole file is checked before anything is built: names, dependencies (no cycles), and every
stage planned as `merger validate` plans a recipe, against the *planned* outputs of the stages it
uses (their config, tokenizer and tensor headers, written to a scratch folder). A stage whose recipe
and inputs are unchanged (a content hash kept in its output) is not rebuilt."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger import __version__
from merger.errors import RecipeError
from merger.pipeline import Prepared, build_recipe, prepare
from merger.recipe_file import load_documents, read_text, recipe_from_data

STAGE_FILE = ".merger-stage.json"  # hidden: never published, never mistaken for model data


@dataclass
class Stage:
    index: int                     # 1-based document number
    name: str | None
    recipe: Any
    text: str
    needs: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"stage {self.name!r}" if self.name else f"document {self.index}"


@dataclass
class Pipeline:
    path: Path
    text: str
    stages: list[Stage]            # build order: every stage after those it uses; the final one last

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"{where}: name: give the stage a non-empty name")
    if name in (".", "..") or any(c in name for c in "/\\\x00\n") or name.startswith("."):
        raise RecipeError(f"{where}: name: {name!r} must be a plain folder name (no slashes, not hidden): the "
                          f"stage is built into --intermediate-dir/{name}")
    return name


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and check a recipe file of one or more documents; RecipeError names the document."""
    path = Path(path)
    text = read_text(path)
    docs = load_documents(text, path)
    if len(docs) == 1:
        data, doc_text = docs[0]
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping (merge_method:, models: ...), not "
                              f"{type(data).__name__}")
        recipe = recipe_from_data(data, text, path, str(path))
        return Pipeline(path, text, [Stage(1, data.get("name"), recipe, text)])
    stages: list[Stage] = []
    unnamed: list[int] = []
    for k, (data, doc_text) in enumerate(docs, start=1):
        where = f"{path}: document {k}"
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: a recipe is a YAML mapping, not {type(data).__name__}")
        name = data.get("name")
        if name is None:
            unnamed.append(k)
        else:
            name = _check_name(name, where)
            if any(s.name == name for s in stages):
                raise RecipeError(f"{where}: name: {name!r} is used by two documents; give each stage its own name")
        label = f"{path} (document {k}{', ' + repr(name) if name else ''})"
        stages.append(Stage(k, name, recipe_from_data(data, doc_text, path, label), doc_text))
    if len(unnamed) > 1:
        raise RecipeError(f"{path}: documents {', '.join(map(str, unnamed))} have no name; only the final stage "
                          f"may be unnamed: name the others")
    final = next((s for s in stages if s.name is None), stages[-1])
    names = {s.name for s in stages if s.name}
    for s in stages:
        s.needs = [r for r in s.recipe.model_refs() if r in names]
        if s.name in s.needs:
            raise RecipeError(f"{path}: document {s.index}: stage {s.name!r} uses itself as a model")
    return Pipeline(path, text, _order(stages, final, path))


def _order(stages: list[Stage], final: Stage, path: Path) -> list[Stage]:
    """Dependency order (file order among independent stages), the final stage last."""
    by_name = {s.name: s for s in stages if s.name}
    users = [s for s in stages if final.name and final.name in s.needs and s is not final]
    if users:
        raise RecipeError(f"{path}: the final stage ({final.label}) is used by {users[0].label}; the final "
                          f"stage is the one nothing else uses (unnamed, or the last document)")
    done: list[Stage] = []
    state: dict[int, str] = {}

    def visit(s: Stage, chain: list[str]) -> None:
        if state.get(s.index) == "done":
            return
        if state.get(s.index) == "open":
            cycle = chain[chain.index(s.name):] + [s.name]
            raise RecipeError(f"{path}: stages {' -> '.join(map(repr, cycle))} use each other in a cycle; break it")
        state[s.index] = "open"
        for need in s.needs:
            visit(by_name[need], chain + [s.name or "?"])
        state[s.index] = "done"
        done.append(s)

    for s in stages:
        if s is not final:
            visit(s, [])
    visit(final, [])
    return done


# --- checking the whole file, then building ------------------------------------------------------

def _planned_output(prepared: Prepared, folder: Path) -> dict[str, dict[str, Any]]:
    """Write a stage's planned config.json and tokenizer into `folder`; return its planned safetensors header."""
    from merger.io.writer import TensorSpec, planned_header

    plan = prepared.plan
    (folder / "config.json").write_text(json.dumps(plan.config))
    plan.tokenizer.write(folder)
    return {"model.safetensors": planned_header([TensorSpec(t.name, t.shape, t.dtype) for t in plan.tensors])}


def check_pipeline(pipe: Pipeline, options: dict[str, Any], seed: int = 0,
                   echo: Callable[[str], None] | None = None) -> list[Prepared]:
    """Plan every stage (headers only), later stages against the planned outputs of earlier ones."""
    out: list[Prepared] = []
    with tempfile.TemporaryDirectory(prefix="merger-stages-") as scratch:
        stages: dict[str, Path] = {}
        remote: dict[str, Any] = {}
        for s in pipe.stages:
            opts = {**options, "headers_only": True, "stages": stages, "remote_headers": dict(remote)}
            prepared = prepare(s.recipe, opts, label=str(pipe.path) if len(pipe.stages) == 1 else
                               f"{pipe.path} ({s.label})", seed=seed)
            for ck in prepared.checkpoints.values():
                ck.close()
            out.append(prepared)
            if echo:
                echo(f"{s.label}: {'; '.join(prepared.plan.summary)}")
            if s.name:
                folder = Path(scratch) / s.name
                folder.mkdir()
                remote[s.name] = _planned_output(prepared, folder)
                stages[s.name] = folder
    return out


def fingerprint(path: Path) -> str:
    """What a stage's input is, cheaply: file names, sizes and modification times of its folder."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for p in sorted(path.iterdir()) if path.is_dir() else [path]:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def stage_key(stage: Stage, inputs: dict[str, str], settings: dict[str, Any]) -> str:
    data = {"recipe": stage.text, "inputs": inputs, "settings": settings, "merger": __version__}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _stored_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / STAGE_FILE).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def build_pipeline(pipe: Pipeline, out_dir: str | Path, *, intermediate_dir: str | Path | None = None,
                   force: bool = False, shard_bytes: int | None = None, seed: int = 0,
                   options: dict[str, Any] | None = None, progress: bool | None = None,
                   echo: Callable[[str], None] | None = None) -> Path:
    """Check the whole file, then build each stage not already built from the same inputs, then the final
    stage into `out_dir`."""
    from merger.io.writer import DEFAULT_SHARD_BYTES
    from merger.pipeline import resolve_models

    say = echo or (lambda m: print(m, file=sys.stderr))
    options = dict(options or {})
    shard_bytes = shard_bytes or DEFAULT_SHARD_BYTES
    check_pipeline(pipe, options, seed)
    out = Path(out_dir)
    inter = Path(intermediate_dir) if intermediate_dir else out.parent / f"{out.name}.stages"
    built: dict[str, Path] = {}
    keys: dict[str, str] = {}
    settings = {"seed": seed, "shard_bytes": shard_bytes, "allow_pickle": bool(options.get("allow_pickle"))}
    for s in pipe.stages:
        opts = {**options, "stages": dict(built)}
        if s is pipe.final:
            build_recipe(s.recipe, out, force=force, shard_bytes=shard_bytes, seed=seed, options=opts,
                         label=f"{pipe.path} ({s.label})", progress=progress, recipe_text=pipe.text)
            return out
        refs = [r for r in s.recipe.model_refs() if r not in built]
        ropts = {**opts, "headers_only": True}
        paths = resolve_models(refs, ropts)
        inputs = {r: keys[r] for r in s.needs} | {r: fingerprint(p) for r, p in paths.items()}
        inputs |= {f"adapter:{r}": fingerprint(p) for r, p in (ropts.get("adapters") or {}).items()}
        key = keys[s.name] = stage_key(s, inputs, settings)
        folder = inter / s.name
        if _stored_key(folder) == key:
            say(f"{s.label}: unchanged since its last build, reused {folder}")
        else:
            say(f"{s.label}: building into {folder}")
            os.makedirs(inter, exist_ok=True)
            build_recipe(s.recipe, folder, force=folder.exists(), shard_bytes=shard_bytes, seed=seed, options=opts,
                         label=f"{pipe.path} ({s.label})", progress=progress,
                         extra_files={STAGE_FILE: json.dumps({"key": key, "stage": s.name}) + "\n"})
        built[s.name] = folder
    return out
