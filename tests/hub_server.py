"""A loopback Hugging Face Hub for tests: the endpoints the real huggingface_hub client uses to
create repos, commit files (base64 "regular" or LFS "basic" uploads), read repo info and trees,
and download files (whole, or a byte range). Tests can make chosen requests stall (never answered).
Standard library only; see /work/shared/hub-protocol.md for the contract.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_NAME = r"[A-Za-z0-9][\w.-]*"
_REPO = rf"(?P<repo>{_NAME}/{_NAME})"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    data: bytes
    lfs: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.data)}
        if self.lfs:
            pointer = lfs_pointer(self.sha256, len(self.data))
            entry["oid"] = git_blob_sha1(pointer)
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(pointer)}
        else:
            entry["oid"] = git_blob_sha1(self.data)
        return entry

    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.data)


@dataclass
class Repo:
    private: bool = False
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        """A branch, a full sha, or a unique sha prefix of at least 7 characters (like git)."""
        if rev in self.refs:
            return self.refs[rev]
        if SHA_RE.match(rev) and rev in self.commits:
            return rev
        if len(rev) >= 7 and re.fullmatch(r"[0-9a-f]+", rev):
            hits = [sha for sha in self.commits if sha.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None

    def commit(self, parent: str | None, files: dict[str, Blob], message: str) -> str:
        tree = {p: (b.etag(), b.lfs) for p, b in sorted(files.items())}
        sha = hashlib.sha1(json.dumps([parent, message, tree]).encode()).hexdigest()
        self.commits[sha] = files
        return sha


class HubState:
    """Everything the server knows; tests inspect and configure it directly."""

    def __init__(self, upload_mode: str = "regular", token: str | None = None):
        self.upload_mode = upload_mode      # "regular": every file base64; "lfs": weights and big files by LFS
        self.token = token                  # when set, writes need `Authorization: Bearer <token>`
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str, str | None]] = []  # (method, path, Range header) of each request
        # stall(method, path): True -> the request is never answered (until the server stops);
        # a number -> answered after that many seconds; False/0/None -> answered at once
        self.stall: Callable[[str, str], bool | float | None] | None = None
        self.stall_body_after: int | None = None  # file GETs send this many body bytes, then stall
        self.honour_ranges = True  # False: answer 200 with the whole file, like a server without Range support
        # True: LFS blobs are advertised as Xet-stored (X-Xet-Hash and a token refresh route on resolve,
        # xetHash in the tree), as the Hub does for Xet repos; the server has no Xet CAS behind them
        self.xet = False
        self.lock = threading.Lock()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, Blob]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    def add_repo(self, repo_id: str, files: dict[str, bytes], lfs: tuple[str, ...] = (".safetensors", ".bin"),
                 private: bool = False) -> str:
        """Seed a repo (one commit on main) without going through the client; returns the commit sha.
        Files ending in `lfs` are stored as LFS blobs, like the Hub stores weights."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            blobs = {path: Blob(data, lfs=path.endswith(lfs)) for path, data in files.items()}
            repo.refs["main"] = repo.commit(repo.refs.get("main"), blobs, f"add {len(files)} files")
            return repo.refs["main"]


class HubError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = ""):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # --- plumbing ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", body_limit: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body if body_limit is None else body[:body_limit])

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        token = self.server.state.token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _need_write(self) -> None:
        if not self._authorized():
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404 if repo is None else 401, "RepoNotFound", "Repository not found")
        return repo

    def _rev(self, repo: Repo, rev: str) -> str:
        sha = repo.resolve(unquote(rev))
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    def _dispatch(self) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        with state.lock:
            state.requests.append((self.command, url.path))
            state.ranges.append((self.command, url.path, self.headers.get("Range")))
        delay = state.stall(self.command, url.path) if state.stall is not None else None
        if delay is True:
            self.server.closing.wait(120)  # hold the connection without a byte of answer
            self.close_connection = True
            return
        if delay:
            self.server.closing.wait(float(delay))
        for method, pattern, fn in ROUTES:
            m = re.fullmatch(pattern, url.path)
            if m and method == self.command or (m and method == "GET" and self.command == "HEAD"):
                try:
                    fn(self, parse_qs(url.query), **m.groupdict())
                except HubError as e:
                    headers = {"X-Error-Message": e.message}
                    if e.code:
                        headers["X-Error-Code"] = e.code
                    self._send(e.status, json.dumps({"error": e.message}).encode(), headers)
                return
        self._send(404, b'{"error": "no such endpoint"}')

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    # --- publish ----------------------------------------------------------------------------
    def create_repo(self, query) -> None:
        self._need_write()
        body = json.loads(self._body())
        repo_id = f"{body.get('organization') or 'testuser'}/{body['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        state = self.server.state
        with state.lock:
            if repo_id in state.repos:
                return self._json({"error": "You already created this model repo", "url": url}, 409)
            # huggingface_hub 2.x sends `visibility`; older clients sent `private`
            repo = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
            repo.refs["main"] = repo.commit(None, {}, "initial commit")
            state.repos[repo_id] = repo
        self._json({"url": url, "name": repo_id})

    def validate_yaml(self, query) -> None:
        content = json.loads(self._body())["content"]
        errors = []
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if m:
            try:
                if not isinstance(yaml.safe_load(m.group(1)), dict):
                    errors.append({"message": "metadata is not a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return self._json({"errors": errors}, 400)
        self._json({"errors": [], "warnings": []})

    def preupload(self, query, repo: str, rev: str) -> None:
        self._need_write()
        self._repo(repo)
        files = json.loads(self._body())["files"]
        lfs = self.server.state.upload_mode == "lfs"

        def mode(f: dict) -> str:  # like the Hub: weights and large files go through LFS
            big = f["path"].endswith((".safetensors", ".bin", ".pt")) or f["size"] >= 10_000
            return "lfs" if lfs and big else "regular"

        self._json({"files": [{"path": f["path"], "uploadMode": mode(f), "shouldIgnore": False, "oid": None}
                              for f in files]})

    def lfs_batch(self, query, repo: str) -> None:
        self._need_write()
        self._repo(repo)
        body = json.loads(self._body())
        objects = []
        for obj in body["objects"]:
            out = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.server.state.lfs_objects:
                out["actions"] = {"upload": {"href": f"{self.server.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(out)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_put(self, query, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, None, "sha256 mismatch")
        self.server.state.lfs_objects[oid] = data
        self._send(200)

    def create_branch(self, query, repo: str, branch: str) -> None:
        self._need_write()
        r = self._repo(repo)
        if unquote(branch) in r.refs:
            raise HubError(409, None, "Reference already exists")
        body = json.loads(self._body() or b"{}")
        r.refs[unquote(branch)] = self._rev(r, body.get("startingPoint") or "main")
        self._json({})

    def commit(self, query, repo: str, rev: str) -> None:
        self._need_write()
        r = self._repo(repo)
        branch = unquote(rev)
        if branch not in r.refs:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        parent = r.refs[branch]
        files = dict(r.commits[parent])
        summary = ""
        for line in self._body().decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                data = self.server.state.lfs_objects.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise HubError(422, None, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = Blob(data, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
        with self.server.state.lock:
            sha = r.commit(parent, files, summary)
            r.refs[branch] = sha
        self._json({"commitUrl": f"{self.server.endpoint}/{repo}/commit/{sha}", "commitOid": sha})

    # --- read / download --------------------------------------------------------------------
    def model_info(self, query, repo: str, rev: str = "main") -> None:
        r = self._repo(repo)
        sha = self._rev(r, rev)
        self._json({"id": repo, "modelId": repo, "sha": sha, "private": r.private,
                    "siblings": [{"rfilename": p} for p in sorted(r.commits[sha])]})

    def tree(self, query, repo: str, rev: str) -> None:
        r = self._repo(repo)
        files = r.commits[self._rev(r, rev)]
        entries = [files[p].tree_entry(p) for p in sorted(files)]
        if self.server.state.xet:
            for entry in entries:
                if "lfs" in entry:
                    entry["xetHash"] = entry["lfs"]["oid"]
        self._json(entries)

    def resolve(self, query, repo: str, rev: str, path: str) -> None:
        r = self._repo(repo)
        sha = self._rev(r, rev)
        blob = r.commits[sha].get(unquote(path))
        if blob is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist")
        data = blob.data
        status, headers = 200, {"X-Repo-Commit": sha, "ETag": f'"{blob.etag()}"', "Accept-Ranges": "bytes"}
        if self.server.state.xet and blob.lfs:
            headers["X-Xet-Hash"] = blob.sha256  # 64 hex digits, as a Xet file hash has
            headers["X-Xet-Refresh-Route"] = f"/api/models/{repo}/xet-read-token/{sha}"
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if m and self.command == "GET" and (m.group(1) or m.group(2)) and self.server.state.honour_ranges:
            if m.group(1):
                start, end = int(m.group(1)), min(int(m.group(2) or len(data) - 1), len(data) - 1)
            else:  # bytes=-N: the last N bytes
                start, end = max(len(data) - int(m.group(2)), 0), len(data) - 1
            if start >= len(data) or start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        cut = self.server.state.stall_body_after
        if cut is not None and self.command == "GET" and cut < len(data):
            self._send(status, data, headers, content_type="application/octet-stream", body_limit=cut)
            self.wfile.flush()
            self.server.closing.wait(120)
            self.close_connection = True
            return
        self._send(status, data, headers, content_type="application/octet-stream")


ROUTES = [
    ("POST", r"/api/repos/create", Handler.create_repo),
    ("POST", r"/api/validate-yaml", Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", Handler.commit),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", Handler.create_branch),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", Handler.lfs_put),
    ("GET", rf"/api/models/{_REPO}", Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)", Handler.tree),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Handler.resolve),
]


class HubServer(ThreadingHTTPServer):
    """`with HubServer() as hub:` serves on 127.0.0.1 at a free port; `hub.endpoint` is its URL."""

    daemon_threads = True

    def __init__(self, upload_mode: str = "regular", token: str | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(upload_mode, token)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.closing = threading.Event()  # releases stalled requests
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()
