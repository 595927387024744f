"""Every Hub request has a timeout: a Hub that accepts connections and never answers (or stalls on
one kind of request) fails resolve_hub_model and publish_folder within a few seconds, with one line
naming the timeout; huggingface_hub's retries stay capped; HF_HUB_ETAG_TIMEOUT and
HF_HUB_DOWNLOAD_TIMEOUT set by the user are kept; no state leaks into the next call."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import _http
from hub_server import HubServer
from safetensors.torch import save

from merger.errors import HubError
from merger.io.hub import DEFAULT_TIMEOUT, RequestLimits, timeout_of
from merger.io.hub_fetch import resolve_hub_model
from merger.io.hub_publish import publish_folder

TOKEN = "loopback-test-token"
LIMIT_S = 15  # generous: a capped failure takes about one or two timeouts of 1 s


@pytest.fixture
def silent_hub():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer(token=TOKEN) as server:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT",
                    "HF_HUB_DOWNLOAD_TIMEOUT"):
            monkeypatch.delenv(var, raising=False)
        yield server


def model_files(sharded: bool = False) -> dict[str, bytes]:
    """config.json and the weights of a 2-layer model (two shards and an index when `sharded`)."""
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8}
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g),
               **{f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8, 8, generator=g) for i in range(2)}}
    if not sharded:
        return {"config.json": json.dumps(config).encode(), "model.safetensors": save(tensors)}
    names = sorted(tensors)
    shards = {f"model-0000{k + 1}-of-00002.safetensors": {n: tensors[n] for n in names[k::2]} for k in range(2)}
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    return {"config.json": json.dumps(config).encode(), "model.safetensors.index.json": json.dumps(index).encode(),
            **{f: save(part) for f, part in shards.items()}}


def options(endpoint: str, tmp_path: Path, **extra) -> dict:
    return {"endpoint": endpoint, "cache_dir": str(tmp_path / "cache"), "token": TOKEN, **extra}


def out_folder(tmp_path: Path) -> Path:
    out = tmp_path / "merged"
    out.mkdir()
    for name, data in model_files().items():
        (out / name).write_bytes(data)
    return out


def failure(fn, *args, **kwargs) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(HubError) as info:
        fn(*args, **kwargs)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message, elapsed


def test_resolve_from_a_silent_hub_times_out(silent_hub, tmp_path):
    message, elapsed = failure(resolve_hub_model, "org/model", options(silent_hub, tmp_path, timeout=1))
    assert elapsed < LIMIT_S
    assert message.startswith("model 'org/model': the Hub at " + silent_hub + " did not answer within 1 s")
    assert "--timeout" in message and "HF_HUB_OFFLINE=1" in message


def test_publish_to_a_silent_hub_times_out(silent_hub, tmp_path):
    message, elapsed = failure(publish_folder, out_folder(tmp_path), "org/x",
                               options=options(silent_hub, tmp_path, timeout=1))
    assert elapsed < LIMIT_S
    assert message.startswith(f"publish org/x: the Hub at {silent_hub} did not answer within 1 s")
    assert message.endswith("or raise --timeout")


def test_a_silent_hub_falls_back_to_the_cache(hub, silent_hub, tmp_path):
    hub.state.add_repo("org/model", model_files())
    folder = resolve_hub_model("org/model", options(hub.endpoint, tmp_path))
    start = time.monotonic()
    assert resolve_hub_model("org/model", options(silent_hub, tmp_path, timeout=1)) == folder
    assert time.monotonic() - start < LIMIT_S


@pytest.mark.parametrize("stalled", ["preupload", "commit"])
def test_publish_retries_are_capped(hub, tmp_path, stalled):
    """preupload goes through huggingface_hub's http_backoff (6 tries and 23 s of sleep uncapped);
    here the first timeout ends the call. The commit itself is one POST."""
    hub.state.stall = lambda method, path: method == "POST" and f"/{stalled}/" in path
    message, elapsed = failure(publish_folder, out_folder(tmp_path), "org/x",
                               options=options(hub.endpoint, tmp_path, timeout=1))
    assert elapsed < 6, elapsed
    assert "did not answer within 1 s" in message
    assert sum(1 for m, p in hub.state.requests if f"/{stalled}/" in p) <= 2


@pytest.mark.parametrize("stalled", ["HEAD", "GET"])
def test_resolve_retries_are_capped(hub, tmp_path, stalled):
    """hf_hub_download retries a timed-out HEAD with 60 s and backoff, http_get resumes a stalled
    download 5 times: capped, a stalled file costs about one timeout."""
    hub.state.add_repo("org/model", model_files(sharded=True))
    hub.state.stall = lambda method, path: method == stalled and "/resolve/" in path
    message, elapsed = failure(resolve_hub_model, "org/model", options(hub.endpoint, tmp_path, timeout=1))
    assert elapsed < 6, elapsed
    assert "did not answer within 1 s" in message


def test_a_download_stalled_midway_is_not_resumed_forever(hub, tmp_path):
    """http_get resumes a download that stalls between chunks (5 times, more while bytes arrive)."""
    files = model_files()
    hub.state.add_repo("org/model", files)
    hub.state.stall_body_after = 64
    message, elapsed = failure(resolve_hub_model, "org/model", options(hub.endpoint, tmp_path, timeout=1))
    assert elapsed < 6, elapsed
    assert "did not answer within 1 s" in message
    assert sum(1 for m, p in hub.state.requests if m == "GET" and "/resolve/" in p) <= 2 * len(files)


def test_user_etag_timeout_is_kept(hub, tmp_path, monkeypatch):
    """HF_HUB_ETAG_TIMEOUT (read into huggingface_hub.constants at import) applies to the HEAD
    requests; --timeout (30 s here) to the rest."""
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    hub.state.add_repo("org/model", model_files(sharded=True))
    hub.state.stall = lambda method, path: method == "HEAD" and "/resolve/" in path
    message, elapsed = failure(resolve_hub_model, "org/model", options(hub.endpoint, tmp_path, timeout=30))
    assert elapsed < 10, elapsed
    assert "did not answer within 1 s" in message and "raise HF_HUB_ETAG_TIMEOUT" in message


def test_user_download_timeout_is_kept(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    hub.state.add_repo("org/model", model_files())
    hub.state.stall = lambda method, path: method == "GET" and path.endswith(".safetensors")
    message, elapsed = failure(resolve_hub_model, "org/model", options(hub.endpoint, tmp_path, timeout=30))
    assert elapsed < 10, elapsed
    assert "did not answer within 1 s" in message and "raise HF_HUB_DOWNLOAD_TIMEOUT" in message


def test_each_call_gets_its_own_timeout(hub, silent_hub, tmp_path):
    """A slow Hub (1.5 s per answer on repo info) fails a 1 s call and serves a later 10 s one; the
    client factory in place before is back after every call, failed or not."""
    before = _http._GLOBAL_CLIENT_FACTORY
    hub.state.add_repo("org/model", model_files())
    hub.state.stall = lambda method, path: 1.5 if path.startswith("/api/models/") and "/tree/" not in path else 0
    message, _ = failure(resolve_hub_model, "org/model", options(hub.endpoint, tmp_path, timeout=1))
    assert "within 1 s" in message and _http._GLOBAL_CLIENT_FACTORY is before
    failure(publish_folder, out_folder(tmp_path), "org/x", options=options(silent_hub, tmp_path, timeout=1))
    assert _http._GLOBAL_CLIENT_FACTORY is before
    folder = resolve_hub_model("org/model", options(hub.endpoint, tmp_path, timeout=10))
    assert (folder / "model.safetensors").read_bytes() == model_files()["model.safetensors"]
    assert _http._GLOBAL_CLIENT_FACTORY is before


def test_timeout_option_is_checked_first(hub, tmp_path):
    assert timeout_of({}) == DEFAULT_TIMEOUT == 30.0 and timeout_of({"timeout": "2.5"}) == 2.5
    for bad in (0, -1, "soon", float("nan"), True):
        message, _ = failure(resolve_hub_model, "org/model", options(hub.endpoint, tmp_path, timeout=bad))
        assert message.startswith("--timeout") and "positive number of seconds" in message
    assert hub.state.requests == []


def test_explicit_request_timeouts_are_replaced_unless_the_user_set_them(monkeypatch):
    limits = RequestLimits(5)
    ext = {"timeout": {"connect": None, "read": None, "write": None, "pool": None}}
    assert limits.prepare(ext) == (5, "--timeout") and ext["timeout"]["read"] == 5
    ext = {"timeout": dict.fromkeys(("connect", "read", "write", "pool"), 60.0)}  # hf_hub_download's HEAD retry
    assert limits.prepare(ext) == (5, "--timeout") and ext["timeout"]["read"] == 5
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 7)
    limits = RequestLimits(5)
    ext = {"timeout": dict.fromkeys(("connect", "read", "write", "pool"), 7.0)}
    assert limits.prepare(ext) == (7, "HF_HUB_ETAG_TIMEOUT") and ext["timeout"]["read"] == 7
