"""Model cards (README.md): the front matter the Hub reads (base_model, tags, library_name,
license), a short human section naming the method and its paper (or the experts and gate
mode), and the saved recipe verbatim. An existing card body (the MoE card) is kept as it is.
Cards and saved recipes never carry local absolute paths or tokens: see `scrub`."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from merger.errors import CheckpointError

CARD_NAME = "README.md"
RECIPE_NAME = "merger_config.yml"
_FRONT_RE = re.compile(r"\A---[ \t]*\n(.*?)^---[ \t]*\n?", re.S | re.M)
_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
# A YAML value or list item that is an absolute (or home-relative) path: `model: /a/b`, `- ~/x`.
_ABS_VALUE_RE = re.compile(
    r"""(?m)((?:^|[:\-][ \t]+|[\[,][ \t]*)["']?)((?:~|[A-Za-z]:)?[/\\](?![/\\])[^\s"',\]#]*)""")


# --- scrubbing -----------------------------------------------------------------------------------
def _local_name(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1] or path


def _is_absolute(ref: str) -> bool:
    return ref.startswith(("/", "\\", "~")) or bool(re.match(r"[A-Za-z]:[\\/]", ref))


def scrub(text: str, refs: list[str] = ()) -> str:
    """Replace absolute local paths by their last component and drop anything shaped like a token."""
    for ref in sorted({r for r in refs if _is_absolute(r)}, key=len, reverse=True):
        text = text.replace(ref, _local_name(ref))
    text = _ABS_VALUE_RE.sub(lambda m: m.group(1) + _local_name(m.group(2)), text)
    for root in {str(Path.home()), os.getcwd()} - {"/", ""}:
        text = text.replace(root + os.sep, "")
    return _TOKEN_RE.sub("<token removed>", text)


def recipe_refs(data: dict[str, Any]) -> list[str]:
    """Every model reference of a raw recipe mapping (merge or MoE), plus plugin file paths."""
    refs = [data.get("base_model")]
    refs += [m.get("model") for m in data.get("models") or [] if isinstance(m, dict)]
    for s in data.get("slices") or []:
        refs += [src.get("model") for src in (s or {}).get("sources") or [] if isinstance(src, dict)]
    for key in ("experts", "shared_experts"):
        refs += [e.get("source_model") for e in data.get(key) or [] if isinstance(e, dict)]
    tok = data.get("tokenizer") if isinstance(data.get("tokenizer"), dict) else {}
    for source in (data.get("tokenizer_source"), tok.get("source")):
        if source not in (None, "base", "union"):
            refs.append(source)
    for spec in (tok.get("tokens") or {}).values() if isinstance(tok.get("tokens"), dict) else ():
        source = spec.get("source") if isinstance(spec, dict) else None
        refs.append(source.get("model") if isinstance(source, dict) else source)
    refs += [p for p in data.get("plugins") or []]
    return list(dict.fromkeys(r for r in refs if isinstance(r, str) and r))


def _load_recipe_text(text: str | None) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text or "")
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def scrub_recipe(text: str) -> str:
    return scrub(text, recipe_refs(_load_recipe_text(text)))


# --- front matter --------------------------------------------------------------------------------
def split_front_matter(text: str) -> tuple[dict[str, Any] | None, str]:
    """(metadata, body) of a card; metadata is None when there is no parseable front matter."""
    m = _FRONT_RE.match(text)
    if not m:
        return None, text
    try:
        meta = yaml.safe_load(m.group(1) or "") or {}
    except yaml.YAMLError:
        return None, text[m.end():]
    return (meta if isinstance(meta, dict) else None), text[m.end():]


def hub_inputs(refs: list[str], paths: dict[str, Path] | None, base_dir: str | None) -> dict[str, str]:
    """{reference: repo id} for the inputs that came from the Hub (not a local folder); both parts of a
    LoRA reference `base+adapter` count (keyed `ref` and `ref+`)."""
    from merger.io.refs import meant_as_local, parse_reference, split_lora

    out = {}
    for ref in refs:
        if paths is not None and ref not in paths:
            continue
        lora = split_lora(ref, base_dir)
        for key, part in ((ref, lora[0]), (ref + "+", lora[1])) if lora else ((ref, ref),):
            parsed = parse_reference(part)
            if parsed is None or meant_as_local(part, base_dir) or (Path(base_dir or ".") / part).exists():
                continue
            out[key] = parsed[0]
    return out


def input_license(path: Path) -> str | None:
    """The `license` in an input's own card, if it has one."""
    try:
        meta, _ = split_front_matter((path / CARD_NAME).read_text())
    except (OSError, UnicodeDecodeError):
        return None
    lic = (meta or {}).get("license")
    return lic if isinstance(lic, str) else None


def front_matter(data: dict[str, Any], hub_ids: list[str], license: str | None,
                 existing: dict[str, Any] | None) -> dict[str, Any]:
    """The card's metadata: what `existing` has, plus the keys the Hub needs for a merge."""
    meta = dict(existing or {})
    is_moe = "experts" in data
    if hub_ids and not meta.get("base_model"):
        meta["base_model"] = list(dict.fromkeys(hub_ids))
    if meta.get("base_model"):
        meta.setdefault("base_model_relation", "merge")
    tags = meta.get("tags") if isinstance(meta.get("tags"), list) else ([meta["tags"]] if meta.get("tags") else [])
    wanted = ["merge", "merger"] + (["moe"] if is_moe else [data["merge_method"]] if data.get("merge_method") else [])
    meta["tags"] = list(dict.fromkeys([*tags, *wanted]))
    meta.setdefault("library_name", "transformers")
    if license and not meta.get("license"):
        meta["license"] = license
    return meta


def with_front_matter(text: str, meta: dict[str, Any]) -> str:
    """`text` with its front matter replaced by `meta`; unchanged when it already says the same."""
    old, body = split_front_matter(text)
    if old == meta:
        return text
    head = yaml.safe_dump(meta, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"---\n{head}---\n{body if body.startswith(chr(10)) else chr(10) + body}"


# --- card bodies ---------------------------------------------------------------------------------
MAX_CARD_RECIPE = 64 * 1024  # a longer recipe (long prompt lists) stays in merger_config.yml only


def recipe_block(text: str) -> list[str]:
    """The recipe as a fenced YAML block for a card (a prompt may hold a code fence), or a pointer to
    merger_config.yml when it is too long to show."""
    if len(text) > MAX_CARD_RECIPE:
        return [f"The recipe ({len(text) // 1024} KiB) is too long to show here; see `{RECIPE_NAME}`."]
    fence = "````" if "```" in text else "```"
    return [fence + "yaml", text.rstrip("\n"), fence]


def _input_line(ref: str, hub: dict[str, str], paths: dict[str, Path] | None, role: str) -> str:
    shown = _local_name(ref) if _is_absolute(ref) else ref
    if ref in hub:
        sha = paths[ref].name if paths and paths[ref].parent.name == "snapshots" else None
        where = f"[{hub[ref]}](https://huggingface.co/{hub[ref]})" + (f", commit `{sha[:12]}`" if sha else "")
    else:
        where = "local folder"
    return f"- `{shown}` ({where}){role}"


def card_body(data: dict[str, Any], recipe_text: str, title: str, hub: dict[str, str],
              paths: dict[str, Path] | None) -> str:
    """Markdown for a merge (method, paper, inputs) or an MoE (experts, gate mode), then the recipe."""
    lines = [f"# {title}", ""]
    if not data:
        return "\n".join(lines + ["Published with merger.", ""])
    if "experts" in data:
        experts = [e.get("source_model", "?") for e in data.get("experts") or [] if isinstance(e, dict)]
        lines += ["A Mixture of Experts composed with merger: the base model donates attention, norms and "
                  "embeddings, each expert its MLP.", "",
                  f"- gate mode: `{data.get('gate_mode', 'hidden')}`",
                  f"- experts per token: {data.get('experts_per_token', 2)} of {len(experts)}", "",
                  "## Models", "", _input_line(str(data.get("base_model")), hub, paths, " — base")]
        lines += [_input_line(ref, hub, paths, f" — expert {j}") for j, ref in enumerate(experts)]
    else:
        from merger import plugins

        name = str(data.get("merge_method"))
        method = plugins.methods().get(name)
        what = getattr(method, "description", "") or ""
        paper = getattr(method, "reference", "") or ""
        lines += ["A merge of pre-trained language models made with merger.", "", "## Method", "",
                  f"**{name}**" + (f": {what}." if what else ".") + (f" Paper: <{paper}>." if paper else ""),
                  "", "## Models", ""]
        base = data.get("base_model")
        lines += [_input_line(ref, hub, paths, " — base" if ref == base else "")
                  for ref in recipe_refs({k: data.get(k) for k in ("base_model", "models", "slices")})]
    lines += ["", "## Recipe", "", "The recipe, as saved in `merger_config.yml`:", "", *recipe_block(recipe_text), ""]
    return "\n".join(lines)


# --- entry points --------------------------------------------------------------------------------
def finish_card(dst: Path, title: str, paths: dict[str, Path] | None = None,
                base_dir: str | None = None) -> None:
    """Write dst/README.md for the output in `dst`: keep an existing card's body (the MoE card),
    set the front matter, or write the merge card; scrub paths and tokens. Idempotent."""
    dst = Path(dst)
    recipe_text = _read(dst / RECIPE_NAME) or ""
    text = card_text(dst, _load_recipe_text(recipe_text), recipe_text, title, paths, base_dir)
    card = dst / CARD_NAME
    if _read(card) != text:  # replace, never half-write: this may run on a finished output
        tmp = dst / f".{CARD_NAME}.merger-tmp"
        tmp.write_text(text)
        os.replace(tmp, card)


def card_text(dst: Path, data: dict[str, Any], recipe_text: str, title: str,
              paths: dict[str, Path] | None, base_dir: str | None) -> str:
    refs = recipe_refs(data)
    models = [r for r in refs if r not in (data.get("plugins") or [])]
    existing = _read(dst / CARD_NAME)
    meta, body = split_front_matter(existing) if existing is not None else (None, None)
    # A card merger finished at build time was classified where the inputs resolved: publishing
    # (no paths) from another working folder must not turn local `models/x` into Hub ids.
    finished = paths is None and meta is not None and "merger" in (meta.get("tags") or [])
    hub = {} if finished else hub_inputs(models, paths, base_dir)
    licenses = {input_license(paths[r]) for r in models if r in paths} if paths else {None}
    license = licenses.pop() if len(licenses) == 1 else None
    if body is None:
        body = card_body(data, recipe_text, title, hub, paths)
    text = with_front_matter(existing if existing is not None else "\n" + body,
                             front_matter(data, list(hub.values()), license, meta))
    return scrub(text, refs)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def publish_files(folder: Path) -> tuple[list[str], dict[str, bytes]]:
    """The files to upload (relative, hidden ones skipped) and the bytes that replace some of them:
    README.md with the right front matter and merger_config.yml, both scrubbed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; publish the OUT_DIR of `merger build`")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: needs config.json and *.safetensors weights; "
                              f"publish the OUT_DIR of `merger build`")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    overrides: dict[str, bytes] = {}
    recipe_text = _read(folder / RECIPE_NAME)
    if recipe_text is not None:
        overrides[RECIPE_NAME] = scrub_recipe(recipe_text).encode()
    data = _load_recipe_text(recipe_text)
    text = card_text(folder, data, scrub_recipe(recipe_text or ""), data.get("name") or folder.resolve().name,
                     None, None)
    overrides[CARD_NAME] = text.encode()
    if CARD_NAME not in files:
        files.append(CARD_NAME)
    return files, overrides
