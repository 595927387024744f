"""Hugging Face Hub I/O: models referenced as `org/name[@revision]` are fetched into the HF cache,
and `publish` uploads an output folder (with its model card) in one commit.

The endpoint, cache folder and offline switch are read from the environment at call time and
passed to huggingface_hub explicitly (the library reads them once, at import).
"""
from __future__ import annotations

import json
import os
import re
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from merger.errors import HubError
from merger.io.checkpoint import INDEX_NAME, PICKLE_INDEX_NAME, SINGLE_NAME, is_pickle_weights
from merger.io.hf import TOKENIZER_FILES

DEFAULT_ENDPOINT = "https://huggingface.co"
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[\w])?"
REF_RE = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[\w][\w./-]{{0,199}}))?")
# Weights, configs, tokenizer and chat template; README.md only for the input's license.
FETCH_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "README.md",
                  *(name for name in TOKENIZER_FILES if not name.endswith(".json"))]
_TRUE = {"1", "ON", "YES", "TRUE"}


def parse_reference(reference: str) -> tuple[str, str | None] | None:
    """'org/name@rev' -> ('org/name', 'rev'); None when it cannot be a Hub repo id."""
    m = REF_RE.fullmatch(reference)
    if not m or "--" in m["repo"] or ".." in m["repo"]:
        return None
    return m["repo"], m["rev"]


def endpoint_of(options: dict[str, Any]) -> str:
    return (options.get("endpoint") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_of(options: dict[str, Any]) -> bool:
    if options.get("offline") is not None:
        return bool(options["offline"])
    return any((os.environ.get(k) or "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir_of(options: dict[str, Any]) -> str:
    if options.get("cache_dir"):
        return str(options["cache_dir"])
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _token(options: dict[str, Any]) -> str | bool | None:
    # None lets huggingface_hub look in its usual places (HF_TOKEN, the cached login).
    return options.get("token")


def meant_as_local(reference: str, base_dir: str | None) -> bool:
    """A reference whose first folder exists locally (`models/ft-a` with ./models present) is a
    missing local folder, not a repo id: never send it to the network."""
    first = reference.split("/", 1)[0]
    return (Path(base_dir or ".") / first).is_dir()


def resolve_hub_model(reference: str, options: dict[str, Any]) -> Path | None:
    """Download (or find in the cache) what a merge needs from repo `org/name[@rev]`."""
    parsed = parse_reference(reference)
    if parsed is None or meant_as_local(reference, options.get("base_dir")):
        return None
    repo_id, revision = parsed
    endpoint = endpoint_of(options)
    offline = offline_of(options)
    try:
        folder = _cached(repo_id, revision, options) if offline else _download(repo_id, revision, endpoint, options)
    except HubError:
        raise
    except Exception as e:  # huggingface_hub's errors are OSErrors; each one gets its own line
        raise hub_failure(e, f"model {reference!r}", repo_id, revision, endpoint, offline) from None
    if folder is None:
        raise HubError(f"model {reference!r}: {repo_id} is not in the Hugging Face cache "
                       f"({cache_dir_of(options)}) and offline mode is on (HF_HUB_OFFLINE); unset it to download")
    _check_snapshot(reference, folder, bool(options.get("allow_pickle")))
    return folder


def _download(repo_id: str, revision: str | None, endpoint: str, options: dict[str, Any]) -> Path:
    from huggingface_hub import HfApi, errors, hf_hub_download, snapshot_download

    api = HfApi(endpoint=endpoint, token=_token(options))
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
                               endpoint=endpoint, token=_token(options))
        return sorted(set(json.loads(Path(path).read_text())["weight_map"].values()))

    files = choose_files([s.rfilename for s in info.siblings or []], where, bool(options.get("allow_pickle")),
                         read_index)
    bar = _one_bar(where, options.get("progress"))
    try:
        # The user's revision (not the sha) so the cache records refs/<revision> for offline use.
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir_of(options), endpoint=endpoint,
                                 token=_token(options), allow_patterns=files, tqdm_class=bar)
    finally:
        bar.close_all()
    return Path(path)


def choose_files(files: list[str], where: str, allow_pickle: bool, read_index: Any) -> list[str]:
    """The top-level files a merge reads, chosen the way Checkpoint reads a folder: the shards an
    index names, else model.safetensors, else every *.safetensors; pickles only if allowed.
    Repos that also carry e.g. consolidated.safetensors or GGUF files download no more."""
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
    return weights + extra


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


def hub_failure(e: Exception, what: str, repo_id: str, revision: str | None, endpoint: str,
                offline: bool = False) -> HubError:
    """One line per failure kind: repo or revision missing, refused credentials, no network."""
    from huggingface_hub import errors as hfe

    status = getattr(getattr(e, "response", None), "status_code", None)
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, hfe.GatedRepoError):
        return HubError(f"{what}: {repo_id} is gated on {endpoint}; accept its terms on the repo page and {login}")
    if isinstance(e, hfe.RevisionNotFoundError):
        return HubError(f"{what}: revision {revision or 'main'!r} not found in {repo_id}; "
                        f"check the branch, tag or commit after '@'")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return HubError(f"{what}: no local folder or Hub repository {repo_id} on {endpoint}; check the "
                        f"path or repo id (private repos need a token: {login})")
    if isinstance(e, hfe.HfHubHTTPError) and status in (401, 403):
        access = "write access" if what.startswith("publish") else f"access to {repo_id}"
        return HubError(f"{what}: {endpoint} refused the credentials (HTTP {status}); "
                        f"{login} with a token that has {access}")
    if isinstance(e, hfe.HfHubHTTPError):
        detail = (getattr(e, "server_message", "") or "").splitlines()
        return HubError(f"{what}: {endpoint} answered HTTP {status} for {repo_id}"
                        f"{': ' + detail[0] if detail else ''}; try again later")
    cause = e.__cause__ or e.__context__
    if isinstance(e, hfe.LocalEntryNotFoundError) and (offline or isinstance(cause, hfe.OfflineModeIsEnabled)):
        return HubError(f"{what}: {repo_id} is not in the Hugging Face cache and offline mode is on "
                        f"(HF_HUB_OFFLINE); unset it to download, or run once online")
    if isinstance(e, hfe.LocalEntryNotFoundError) and isinstance(cause, hfe.HfHubHTTPError):
        return hub_failure(cause, what, repo_id, revision, endpoint, offline)
    if isinstance(e, (hfe.HTTPError, hfe.LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return HubError(f"{what}: cannot reach the Hub at {endpoint} ({type(cause or e).__name__}); check "
                        f"the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached models only")
    return HubError(f"{what}: Hub request failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def check_repo_id(repo_id: str) -> str:
    parsed = parse_reference(repo_id)
    if parsed is None or parsed[1] is not None:
        raise HubError(f"repo id {repo_id!r}: expected org/name (letters, digits, '-', '_', '.'); "
                       f"give a branch with --revision")
    return repo_id


def publish_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str = "main",
                   commit_message: str | None = None, options: dict[str, Any] | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` in one commit, README.md model card included.
    Nothing local is modified. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from merger.card import publish_files

    options = dict(options or {})
    folder = Path(folder)
    check_repo_id(repo_id)
    files, overrides = publish_files(folder)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=overrides.get(rel, str(folder / rel)))
           for rel in files]
    endpoint = endpoint_of(options)
    if offline_of(options):
        raise HubError(f"publish {repo_id}: offline mode is on (HF_HUB_OFFLINE); unset it to upload")
    api = HfApi(endpoint=endpoint, token=_token(options))
    try:
        # private=None: the namespace's default; an existing repo keeps its visibility either way
        repo_id = api.create_repo(repo_id, private=private or None, exist_ok=True).repo_id
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, ops, revision=revision,
                                 commit_message=commit_message or f"Upload {folder.name} (made with merger)")
    except Exception as e:
        raise hub_failure(e, f"publish {repo_id}", repo_id, revision, endpoint) from None
    return str(info.commit_url)
