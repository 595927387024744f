"""Models referenced as `org/name[@revision]`: the files a merge reads are fetched into the HF cache
(or found there offline). With `options["headers_only"]` (merger validate) the weights stay on the
Hub: only their safetensors headers are read, by HTTP range requests, into options["remote_headers"].
"""
from __future__ import annotations

import json
import re
import struct
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from merger.errors import CheckpointError, HubError, MergerError
from merger.io.checkpoint import INDEX_NAME, PICKLE_INDEX_NAME, SINGLE_NAME, is_pickle_weights
from merger.io.safetensors_file import MAX_HEADER_BYTES, parse_safetensors_header, read_safetensors_header
from merger.io.hf import TOKENIZER_FILES
from merger.io.hub import bounded_requests, cache_dir_of, endpoint_of, hub_failure, offline_of, token_of
from merger.io.refs import meant_as_local, parse_reference

# Weights, configs, tokenizer and chat template; README.md only for the input's license.
FETCH_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "README.md",
                  *(name for name in TOKENIZER_FILES if not name.endswith(".json"))]


def resolve_hub_model(reference: str, options: dict[str, Any]) -> Path | None:
    """Download (or find in the cache) what a merge needs from repo `org/name[@rev]`. With
    `options["headers_only"]` the weights are not downloaded unless already cached: their headers
    go to `options["remote_headers"][reference]` ({file: parsed header}) for Checkpoint."""
    parsed = parse_reference(reference)
    if parsed is None or meant_as_local(reference, options.get("base_dir")):
        return None
    repo_id, revision = parsed
    endpoint = endpoint_of(options)
    offline = offline_of(options)
    if isinstance(options.get("remote_headers"), dict):
        options["remote_headers"].pop(reference, None)  # never a stale entry from an earlier call
    with bounded_requests(options) as limits:
        try:
            folder = _cached(repo_id, revision, options) if offline else _download(reference, repo_id, revision,
                                                                                   endpoint, options)
        except MergerError:
            raise
        except Exception as e:  # huggingface_hub's errors are OSErrors; each one gets its own line
            if limits.expired:
                raise limits.failure(f"model {reference!r}", endpoint) from None
            raise hub_failure(e, f"model {reference!r}", repo_id, revision, endpoint, offline) from None
    if folder is None:
        raise HubError(f"model {reference!r}: {repo_id} is not in the Hugging Face cache "
                       f"({cache_dir_of(options)}) and offline mode is on (HF_HUB_OFFLINE); unset it to download")
    if reference not in (options.get("remote_headers") or {}):
        _check_snapshot(reference, folder, bool(options.get("allow_pickle")))
    return folder


def _download(reference: str, repo_id: str, revision: str | None, endpoint: str, options: dict[str, Any]) -> Path:
    from huggingface_hub import HfApi, errors, hf_hub_download

    api = HfApi(endpoint=endpoint, token=token_of(options))
    try:
        info = api.model_info(repo_id, revision=revision)
    except errors.HTTPError as e:
        if isinstance(e, errors.HfHubHTTPError):
            raise
        cached = _cached(repo_id, revision, options)  # network down: like huggingface_hub, use the cache
        if cached is None:
            raise
        return cached
    where = f"{repo_id}@{revision}" if revision else repo_id

    def read_index(name: str) -> list[str]:
        path = hf_hub_download(repo_id, name, revision=info.sha, cache_dir=cache_dir_of(options),
                               endpoint=endpoint, token=token_of(options))
        return sorted(set(json.loads(Path(path).read_text())["weight_map"].values()))

    weights, extra = weights_and_extras([s.rfilename for s in info.siblings or []], where,
                                        bool(options.get("allow_pickle")), read_index)
    snapshot = _snapshot_dir(repo_id, info.sha, options)
    if options.get("headers_only") and all(w.endswith(".safetensors") for w in weights):
        if all((snapshot / f).is_file() for f in weights + extra):
            return snapshot  # downloaded in full before: nothing to fetch
        if not all((snapshot / f).is_file() for f in weights):
            folder = _snapshot(repo_id, revision, endpoint, extra, where, options)
            options.setdefault("remote_headers", {})[reference] = _remote_headers(
                reference, repo_id, info.sha, weights, folder, endpoint, options)
            return folder
    # A full download; with headers_only too for pickle weights, which have no header to read remotely.
    return _snapshot(repo_id, revision, endpoint, weights + extra, where, options)


def _snapshot(repo_id: str, revision: str | None, endpoint: str, files: list[str], where: str,
              options: dict[str, Any]) -> Path:
    from huggingface_hub import snapshot_download

    bar = _one_bar(where, options.get("progress"))
    try:
        # The user's revision (not the sha) so the cache records refs/<revision> for offline use.
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir_of(options), endpoint=endpoint,
                                 token=token_of(options), allow_patterns=files or None,
                                 ignore_patterns=None if files else ["*"], tqdm_class=bar)
    finally:
        bar.close_all()
    return Path(path)


def choose_files(files: list[str], where: str, allow_pickle: bool, read_index: Any) -> list[str]:
    """The top-level files a merge reads, chosen the way Checkpoint reads a folder: the shards an
    index names, else model.safetensors, else every *.safetensors; pickles only if allowed.
    Repos that also carry e.g. consolidated.safetensors or GGUF files download no more."""
    weights, extra = weights_and_extras(files, where, allow_pickle, read_index)
    return weights + extra


def weights_and_extras(files: list[str], where: str, allow_pickle: bool, read_index: Any) -> tuple[list[str],
                                                                                                  list[str]]:
    """choose_files, split: (the weight files, the small files beside them: configs, tokenizer, card)."""
    top = [f for f in files if "/" not in f]
    if INDEX_NAME in top:
        weights = read_index(INDEX_NAME)
    elif SINGLE_NAME in top:
        weights = [SINGLE_NAME]
    else:
        weights = [f for f in top if f.endswith(".safetensors")]
    if not weights:
        pickles = [f for f in top if is_pickle_weights(f)]
        if not pickles:
            raise HubError(f"model {where!r}: the repository has no *.safetensors weights (files: "
                           f"{', '.join(top[:8]) or 'none'}); choose a repo or revision with safetensors")
        if not allow_pickle:
            raise HubError(f"model {where!r}: the repository has only pickle weights ({', '.join(pickles[:3])}); "
                           f"pass --allow-pickle to load them with torch.load(weights_only=True), "
                           f"or use a safetensors conversion")
        weights = read_index(PICKLE_INDEX_NAME) if PICKLE_INDEX_NAME in top else pickles
    extra = [f for f in top if f not in weights and any(fnmatch(f, p) for p in FETCH_PATTERNS[1:])]
    return weights, extra


def _remote_headers(reference: str, repo_id: str, sha: str, weights: list[str], folder: Path, endpoint: str,
                    options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{weight file: parsed safetensors header}, read by range requests (a cached file is read locally)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    if not (folder / "config.json").is_file():
        raise HubError(f"model {reference!r}: the repository has no config.json; a model folder needs one")
    headers = {**build_hf_headers(token=token_of(options)), "Accept-Encoding": "identity"}
    found = {}
    for name in weights:
        if (folder / name).is_file():
            found[name] = read_safetensors_header(folder / name)
            continue
        url = hf_hub_url(repo_id, name, revision=sha, endpoint=endpoint)
        try:
            raw, size = _read_range(url, headers, 0, 8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
            if n is None:
                raise ValueError("file shorter than its 8-byte header length")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} exceeds the file size {size}")
            raw = _read_range(url, headers, 8, n)[0] if n else b""
            if len(raw) != n:
                raise ValueError(f"the Hub sent {len(raw)} of the header's {n} bytes")
            found[name] = parse_safetensors_header(raw, size - 8 - n)
        except ValueError as e:
            raise CheckpointError(f"model {reference!r}: {name} in {repo_id}@{sha[:12]} is not a valid safetensors "
                                  f"file ({e}); pin another revision with @ or tell the repo's owner") from None
    return found


def _read_range(url: str, headers: dict[str, str], start: int, length: int) -> tuple[bytes, int]:
    """Bytes [start, start+length) of a file on the Hub, and the file's size. A server that ignores
    Range (200) is read only as far as needed, then the connection is dropped."""
    from huggingface_hub import get_hf_file_metadata, get_session
    from huggingface_hub.utils import hf_raise_for_status

    with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={start}-{start + length - 1}"}) as r:
        if r.status_code >= 400:
            r.read()
            hf_raise_for_status(r)
        m = re.fullmatch(r"bytes \d+-\d+/(\d+)", r.headers.get("Content-Range") or "")
        size = int(m.group(1)) if m else (None if r.status_code == 206 else int(r.headers.get("Content-Length", -1)))
        skip = 0 if r.status_code == 206 else start
        data = bytearray()
        for chunk in r.iter_bytes():
            data += chunk
            if len(data) >= skip + length:
                break
    if size is None or size < 0:
        size = get_hf_file_metadata(url, headers=headers).size
        if size is None:
            raise ValueError("the Hub did not tell its size")
    return bytes(data[skip:skip + length]), size


def _snapshot_dir(repo_id: str, sha: str, options: dict[str, Any]) -> Path:
    return Path(cache_dir_of(options)) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / sha


def _cached(repo_id: str, revision: str | None, options: dict[str, Any]) -> Path | None:
    """The cached snapshot for a revision, from the HF cache layout
    (models--org--name/refs/<revision> holds the commit; snapshots/<commit>/ the files)."""
    root = Path(cache_dir_of(options)) / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    ref = root / "refs" / rev
    sha = ref.read_text().strip() if ref.is_file() else rev
    if (root / "snapshots" / sha).is_dir():
        return root / "snapshots" / sha
    hits = list((root / "snapshots").glob(rev + "*")) if re.fullmatch(r"[0-9a-f]{7,40}", rev) else []
    return hits[0] if len(hits) == 1 else None


def _check_snapshot(reference: str, folder: Path, allow_pickle: bool) -> None:
    # A repo where nothing matched the patterns yields a folder that does not exist.
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if is_pickle_weights(n)]
    if pickles and allow_pickle:
        return
    if pickles:
        raise HubError(f"model {reference!r}: only pickle weights ({', '.join(pickles[:3])}); "
                       f"pass --allow-pickle to load them with torch.load(weights_only=True)")
    if "config.json" in names:  # the small files of an earlier headers-only resolve (merger validate)
        raise HubError(f"model {reference!r}: its weights are not in the Hugging Face cache (only their headers "
                       f"were read) and the Hub cannot be reached; go online (unset HF_HUB_OFFLINE) to download them")
    raise HubError(f"model {reference!r}: no *.safetensors weights were found in the repository; "
                   f"choose a repo or revision with safetensors")


def _one_bar(label: str, enabled: bool | None) -> type:
    """A tqdm class for snapshot_download that shows a single byte counter named for the repo
    (its per-file and file-count bars stay hidden); hidden entirely off a terminal."""
    from tqdm.auto import tqdm

    made: list[Any] = []

    class OneBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            shown = str(kwargs.get("desc") or "").startswith("Reconstructing")
            kwargs.pop("bar_format", None)
            kwargs["desc"] = f"downloading {label}"
            kwargs["disable"] = True if (enabled is False or not shown) else None  # None: tty only
            super().__init__(*args, **kwargs)
            made.append(self)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool | None:
            if not self.total and not self.n:
                return True  # nothing to download (yet): print nothing, e.g. when all is cached
            return super().display(msg, pos)

        def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
            pass  # keep the repo's name on the line

        set_description_str = set_description

        @staticmethod
        def close_all() -> None:
            # snapshot_download leaves its byte bar open; finish it, and erase it if all was cached.
            for bar in made:
                bar.leave = bar.n > 0
                bar.close()

    return OneBar
