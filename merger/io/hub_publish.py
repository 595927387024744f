"""`merger publish` and `merger build --push-to`: upload an output folder, with its model card, to a
Hub repo in one commit (the repo and branch are created when missing). Nothing local is modified.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from merger.errors import HubError
from merger.io.hub import bounded_requests, endpoint_of, hub_failure, offline_of, token_of
from merger.io.refs import parse_reference


def check_repo_id(repo_id: str) -> str:
    parsed = parse_reference(repo_id)
    if parsed is None or parsed[1] is not None:
        raise HubError(f"repo id {repo_id!r}: expected org/name (letters, digits, '-', '_', '.'); "
                       f"give a branch with --revision")
    return repo_id


def publish_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str = "main",
                   commit_message: str | None = None, options: dict[str, Any] | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` in one commit, README.md model card included.
    Every request gets `options["timeout"]` (see merger.io.hub.RequestLimits). Returns the commit URL."""
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
    api = HfApi(endpoint=endpoint, token=token_of(options))
    with bounded_requests(options) as limits:
        try:
            # private=None: the namespace's default; an existing repo keeps its visibility either way
            repo_id = api.create_repo(repo_id, private=private or None, exist_ok=True).repo_id
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(repo_id, ops, revision=revision,
                                     commit_message=commit_message or f"Upload {folder.name} (made with merger)")
        except Exception as e:
            if limits.expired:
                raise limits.failure(f"publish {repo_id}", endpoint, publish=True) from None
            raise hub_failure(e, f"publish {repo_id}", repo_id, revision, endpoint) from None
    return str(info.commit_url)
