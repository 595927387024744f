"""Header-only resolution (what `merger validate` uses): a Hub model's small files come into the HF
cache, its weights stay on the Hub and only their safetensors headers are read, by range requests.
The Checkpoint built from those headers has the names, shapes and dtypes of the real one."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from safetensors.torch import save

from merger.errors import CheckpointError, HubError, MergerError
from merger.io.checkpoint import Checkpoint
from merger.io.hub_fetch import resolve_hub_model

TOKEN = "loopback-test-token"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer(token=TOKEN) as server:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        yield server


def model_files(sharded: bool) -> dict[str, bytes]:
    """A 2-layer model in three dtypes with its tokenizer and card, plus files a merge never reads
    (consolidated.safetensors, a pickle); sharded: two shards and an index."""
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "tie_word_embeddings": True}
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(32, 8, generator=g).to(torch.bfloat16),
               "model.norm.weight": torch.ones(8, dtype=torch.float16)}
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(8, 12, generator=g).to(torch.float16)
    files = {"config.json": json.dumps(config).encode(), "tokenizer.json": b'{"model": {}}',
             "README.md": b"---\nlicense: mit\n---\n", "consolidated.safetensors": save(tensors),
             "pytorch_model.bin": b"never fetched"}
    if not sharded:
        return files | {"model.safetensors": save(tensors, metadata={"format": "pt"})}
    names = sorted(tensors)
    shards = {f"model-0000{k + 1}-of-00002.safetensors": {n: tensors[n] for n in names[k::2]} for k in range(2)}
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    return files | {"model.safetensors.index.json": json.dumps(index).encode(),
                    **{f: save(part) for f, part in shards.items()}}


def weights_of(files: dict[str, bytes]) -> dict[str, bytes]:
    return {n: d for n, d in files.items() if n.startswith("model") and n.endswith(".safetensors")}


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def options(hub: HubServer, tmp_path: Path, **extra) -> dict:
    return {"endpoint": hub.endpoint, "cache_dir": str(tmp_path / "cache"), "token": TOKEN, "timeout": 10, **extra}


def cached_bytes(tmp_path: Path) -> list[bytes]:
    return [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def weight_requests(hub: HubServer) -> list[tuple[str, str, str | None]]:
    return [r for r in hub.state.ranges if r[1].endswith(".safetensors")]


def assert_same_tensors(remote: Checkpoint, local: Checkpoint) -> None:
    assert remote.names == local.names and remote.tied and local.tied
    for name in [*local.names, "lm_head.weight"]:
        assert remote.shape(name) == local.shape(name) and remote.dtype(name) == local.dtype(name), name
        assert remote.nbytes(name) == local.nbytes(name), name


@pytest.mark.parametrize("sharded", [False, True])
def test_headers_only_reads_the_weights_headers_by_range(hub, tmp_path, sharded):
    files = model_files(sharded)
    sha = hub.state.add_repo("org/model", files)
    opts = options(hub, tmp_path, headers_only=True)
    folder = resolve_hub_model("org/model", opts)
    assert folder.name == sha

    weights = weights_of(files)
    assert set(opts["remote_headers"]["org/model"]) == set(weights)
    remote = Checkpoint(folder, label="org/model", remote_headers=opts["remote_headers"]["org/model"])
    assert_same_tensors(remote, Checkpoint(write_folder(tmp_path / "local", files)))
    with pytest.raises(CheckpointError, match="headers only"):
        remote.get("model.norm.weight")

    # The small files came down; not one weight file (nor the files a merge never reads).
    assert {p.name for p in folder.iterdir()} == {"config.json", "tokenizer.json", "README.md"} | (
        {"model.safetensors.index.json"} if sharded else set())
    stored = cached_bytes(tmp_path)
    assert not [data for data in files.values() if data in stored and len(data) > 1000]
    assert not any(p.name.endswith(".safetensors") for p in (tmp_path / "cache").rglob("*"))

    # The server saw two small range GETs per weight file: the length, then exactly the header.
    seen = weight_requests(hub)
    assert sorted({path.rsplit("/", 1)[1] for _, path, _ in seen}) == sorted(weights)
    for name, data in weights.items():
        (n,) = struct.unpack("<Q", data[:8])
        ranges = [r for m, path, r in seen if path.endswith("/" + name) and m == "GET"]
        assert ranges == ["bytes=0-7", f"bytes=8-{8 + n - 1}"], (name, ranges)
    assert all(m == "GET" and r for m, _, r in seen)


def test_headers_only_after_a_full_download_reads_the_cache(hub, tmp_path):
    files = model_files(sharded=True)
    hub.state.add_repo("org/model", files)
    full = resolve_hub_model("org/model", options(hub, tmp_path))
    assert all((full / name).is_file() for name in weights_of(files))
    before = len(hub.state.ranges)
    opts = options(hub, tmp_path, headers_only=True)
    assert resolve_hub_model("org/model", opts) == full
    assert "org/model" not in opts.get("remote_headers", {})  # a plain local Checkpoint
    assert [path for _, path, _ in hub.state.ranges[before:]] == ["/api/models/org/model"]  # model info only


def test_headers_only_offline_uses_the_cache(hub, tmp_path, monkeypatch):
    hub.state.add_repo("org/model", model_files(sharded=False))
    hub.state.add_repo("org/validated", model_files(sharded=False))
    resolve_hub_model("org/validated", options(hub, tmp_path, headers_only=True))
    full = resolve_hub_model("org/model", options(hub, tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.state.requests)
    assert resolve_hub_model("org/model", options(hub, tmp_path, headers_only=True)) == full
    with pytest.raises(HubError) as info:  # only headers were read for it: the cache cannot serve it
        resolve_hub_model("org/validated", options(hub, tmp_path, headers_only=True))
    assert len(str(info.value).splitlines()) == 1 and "not in the Hugging Face cache" in str(info.value)
    assert len(hub.state.requests) == before


def test_server_without_range_support_reads_only_the_header(hub, tmp_path):
    files = model_files(sharded=False)
    hub.state.add_repo("org/model", files)
    hub.state.honour_ranges = False
    opts = options(hub, tmp_path, headers_only=True)
    folder = resolve_hub_model("org/model", opts)
    remote = Checkpoint(folder, label="org/model", remote_headers=opts["remote_headers"]["org/model"])
    assert_same_tensors(remote, Checkpoint(write_folder(tmp_path / "local", files)))
    assert not any(p.name.endswith(".safetensors") for p in (tmp_path / "cache").rglob("*"))


def corrupt(data: bytes, kind: str) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n]
    if kind == "not json":
        return data[:8] + b"{" * n + data[8 + n:]
    if kind == "length past the end":
        return struct.pack("<Q", len(data)) + data[8:]
    if kind == "short file":
        return data[:5]
    bad = re.sub(rb'"data_offsets":\[0,(\d+)\]', lambda m: b'"data_offsets":[0,%d]' % (int(m[1]) + 4), header, 1)
    assert bad != header and len(bad) > n - 4
    bad = bad[:n].ljust(n)  # keep the length; a truncated JSON or padded spaces, both must be refused
    return data[:8] + bad + data[8 + n:]


@pytest.mark.parametrize("kind", ["not json", "length past the end", "short file", "bad offsets"])
def test_corrupt_remote_header_is_one_line(hub, tmp_path, kind):
    files = model_files(sharded=False)
    files["model.safetensors"] = corrupt(files["model.safetensors"], kind)
    hub.state.add_repo("org/bad", files)
    with pytest.raises(MergerError) as info:
        resolve_hub_model("org/bad", options(hub, tmp_path, headers_only=True))
    message = str(info.value)
    assert isinstance(info.value, CheckpointError) and len(message.splitlines()) == 1, message
    assert message.startswith("model 'org/bad': model.safetensors in org/bad@") and "not a valid safetensors" in message


def test_pickle_only_repo_with_headers_only(hub, tmp_path):
    """Pickles have no header to read remotely: with allow_pickle they are downloaded, as for a build."""
    files = {"config.json": model_files(False)["config.json"], "pytorch_model.bin": b"pickle bytes"}
    hub.state.add_repo("org/pickled", files)
    with pytest.raises(HubError, match="--allow-pickle"):
        resolve_hub_model("org/pickled", options(hub, tmp_path, headers_only=True))
    opts = options(hub, tmp_path, headers_only=True, allow_pickle=True)
    folder = resolve_hub_model("org/pickled", opts)
    assert (folder / "pytorch_model.bin").read_bytes() == b"pickle bytes"
    assert "org/pickled" not in opts.get("remote_headers", {})
