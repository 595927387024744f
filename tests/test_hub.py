"""Hub features against a loopback Hub (tests/hub_server.py) driven by the real huggingface_hub
client: build from repo ids (identical to building from the folders), publish and download back
byte for byte, model cards, pickle refusal, and one line per failure. Nothing leaves 127.0.0.1."""
from __future__ import annotations

import json
import socket
from unittest import mock
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, constants, snapshot_download
from hub_server import HubServer
from safetensors import safe_open
from typer.testing import CliRunner

from merger import synth
from merger.card import split_front_matter
from merger.cli import app
from merger.io.hub_fetch import choose_files

TOKEN = "loopback-test-token"
LICENSE_CARD = b"---\nlicense: apache-2.0\n---\n# a tiny test model\n"
runner = CliRunner()


@pytest.fixture
def hub(request, tmp_path, monkeypatch):
    """A running loopback Hub (regular uploads unless parametrized with "lfs"), with a fresh HF
    cache, a dummy token and the working folder in tmp_path. merger's own uploads take the LFS path
    although hf_xet is installed (merger.io.hub.bounded_requests)."""
    mode = getattr(request, "param", "regular")
    with HubServer(mode, token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.chdir(tmp_path)
        yield server


def upload(server: HubServer, repo_id: str, folder: Path | None = None, extra: dict[str, bytes] | None = None,
           skip: tuple[str, ...] = ()) -> str:
    """Push a folder's files (minus `skip`) plus `extra` files as one commit; returns the commit sha."""
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    api.create_repo(repo_id, exist_ok=True)
    ops = [CommitOperationAdd(p.name, str(p)) for p in sorted((folder or Path()).iterdir())
           if folder and p.is_file() and p.name not in skip]
    ops += [CommitOperationAdd(name, data) for name, data in (extra or {}).items()]
    with mock.patch.object(constants, "HF_HUB_DISABLE_XET", True):  # LFS files would go through xet otherwise
        return api.create_commit(repo_id, ops, commit_message="upload").oid


@pytest.fixture
def hub_models(hub, tiny_models, load_weights, tmp_path):
    """org/base, org/ft-a, org/ft-b on the loopback Hub with a license card each. org/ft-b holds
    the same tensors sharded (with an index), plus files a merge must not download."""
    sharded = tmp_path / "ft_b_sharded"
    config = json.loads((tiny_models["ft_b"] / "config.json").read_text())
    synth.write_checkpoint(sharded, config, load_weights(tiny_models["ft_b"]), max_shard_bytes=300_000)
    unneeded = {"consolidated.safetensors": (tiny_models["ft_b"] / "model.safetensors").read_bytes(),
                "pytorch_model.bin": b"not needed", "model.gguf": b"not needed either"}
    shas = {}
    for name, folder in (("base", tiny_models["base"]), ("ft-a", tiny_models["ft_a"]), ("ft-b", sharded)):
        extra = {"README.md": LICENSE_CARD} | (unneeded if name == "ft-b" else {})
        shas[name] = upload(hub, f"org/{name}", folder, extra)
    assert "model.safetensors.index.json" in hub.state.files("org/ft-b")
    return shas


def build(recipe: dict, out: Path, *extra: str):
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return runner.invoke(app, ["build", str(path), str(out), "-q", *extra])


def task_arithmetic(base: str, a: str, b: str) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.4}}],
            "dtype": "float32"}


def read_card(folder: Path) -> tuple[dict, str]:
    meta, body = split_front_matter((folder / "README.md").read_text())
    assert meta is not None, "README.md has no parseable front matter"
    return meta, body


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_weights(a: Path, b: Path) -> None:
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        assert fa.metadata() == fb.metadata() and list(fa.keys()) == list(fb.keys())
        for name in fa.keys():
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


def assert_one_line_error(res, out: Path | None, *needles: str) -> str:
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if "merger-tmp" in p.name]
    return lines[0]


# --- build from repo ids -------------------------------------------------------------------------
def test_build_from_repo_ids_matches_local_build(hub, hub_models, tiny_models, tmp_path):
    pinned = f"org/ft-a@{hub_models['ft-a'][:7]}"  # a short commit sha, as users write it
    res = build(task_arithmetic("org/base", pinned, "org/ft-b"), tmp_path / "from_hub")
    assert res.exit_code == 0, res.output
    res = build(task_arithmetic(str(tiny_models["base"]), str(tiny_models["ft_a"]), str(tiny_models["ft_b"])),
                tmp_path / "from_local")
    assert res.exit_code == 0, res.output

    remote, local = files_of(tmp_path / "from_hub"), files_of(tmp_path / "from_local")
    assert set(remote) == set(local)
    # README.md and merger_config.yml name the inputs; safetensors writes its metadata map in
    # random order, so weights are compared tensor by tensor (bitwise) plus that metadata.
    for name in set(local) - {"README.md", "merger_config.yml", "model.safetensors"}:
        assert remote[name] == local[name], name
    assert_same_weights(tmp_path / "from_hub", tmp_path / "from_local")

    # Only what a merge needs came down: no pickle, no gguf, into the temporary HF cache.
    cache = tmp_path / "hf_home" / "hub"
    fetched = {p.name for p in cache.rglob("*") if p.is_file() or p.is_symlink()}
    assert {"model.safetensors", "model-00001-of-00003.safetensors", "tokenizer.json"} <= fetched
    assert not {"pytorch_model.bin", "model.gguf", "consolidated.safetensors"} & fetched
    snapshot = cache / "models--org--ft-a" / "snapshots" / hub_models["ft-a"]
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_models["ft_a"] / "model.safetensors").read_bytes()

    meta, body = read_card(tmp_path / "from_hub")
    assert meta["base_model"] == ["org/base", "org/ft-a", "org/ft-b"]
    assert {"merge", "merger", "task_arithmetic"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert "https://arxiv.org/abs/2212.04089" in body  # task arithmetic's paper, from the method class
    assert (tmp_path / "from_hub" / "merger_config.yml").read_text() in body  # the recipe verbatim
    assert hub_models["ft-a"][:12] in body  # the commit each input came from


def test_xet_stored_inputs_come_down_over_http_under_the_timeout(hub, hub_models, tiny_models, tmp_path):
    """A Hub that advertises Xet storage: hf_xet's transfers run outside the HTTP client that carries
    --timeout, so merger downloads those files over plain HTTP (the Hub serves them there too)."""
    hub.state.xet = True
    for repo in hub.state.repos.values():  # weights stored as LFS, as the Hub stores them
        for files in repo.commits.values():
            for path, blob in files.items():
                blob.lfs = path.endswith(".safetensors")
    res = build(task_arithmetic("org/base", "org/ft-a", "org/ft-b"), tmp_path / "from_hub")
    assert res.exit_code == 0, res.output
    assert not [path for _, path in hub.state.requests if "xet" in path]
    snapshot = tmp_path / "hf_home" / "hub" / "models--org--ft-a" / "snapshots" / hub_models["ft-a"]
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_models["ft_a"] / "model.safetensors").read_bytes()


def test_local_build_card_has_no_absolute_paths(tmp_path, tiny_models):
    res = build(task_arithmetic(str(tiny_models["base"]), str(tiny_models["ft_a"]), str(tiny_models["ft_b"])),
                tmp_path / "out")
    assert res.exit_code == 0, res.output
    root = str(tiny_models["base"].parent)
    for name in ("README.md", "merger_config.yml"):
        text = (tmp_path / "out" / name).read_text()
        assert root not in text and str(tmp_path) not in text, name
    saved = yaml.safe_load((tmp_path / "out" / "merger_config.yml").read_text())
    assert saved["base_model"] == "base" and [m["model"] for m in saved["models"]] == ["ft_a", "ft_b"]
    meta, body = read_card(tmp_path / "out")
    assert "base_model" not in meta and "license" not in meta  # no Hub inputs, no known license
    assert "`ft_a` (local folder)" in body


def test_offline_mode_uses_the_cache_only(hub, hub_models, tmp_path, monkeypatch):
    recipe = task_arithmetic("org/base", "org/ft-a", "org/ft-b")
    assert build(recipe, tmp_path / "online").exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.state.requests)
    res = build(recipe, tmp_path / "offline")
    assert res.exit_code == 0, res.output
    assert len(hub.state.requests) == before  # not one request
    assert_same_weights(tmp_path / "offline", tmp_path / "online")
    assert read_card(tmp_path / "offline")[0] == read_card(tmp_path / "online")[0]  # same base_model, license
    upload(hub, "org/never-fetched", tmp_path / "online")
    before = len(hub.state.requests)
    res = build(task_arithmetic("org/base", "org/ft-a", "org/never-fetched"), tmp_path / "out")
    assert_one_line_error(res, tmp_path / "out", "org/never-fetched", "not in the Hugging Face cache",
                          "HF_HUB_OFFLINE")
    assert len(hub.state.requests) == before


def test_choose_files_reads_like_checkpoint():
    files = ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "consolidated.safetensors", "onnx/model.safetensors", "onnx/config.json", "config.json",
             "tokenizer.model", "chat_template.jinja", "pytorch_model.bin", "training_args.bin", "model.gguf",
             "README.md", ".gitattributes"]
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    got = choose_files(files, "org/x", False, lambda name: shards)
    assert got == [*shards, "model.safetensors.index.json", "config.json", "tokenizer.model",
                   "chat_template.jinja", "README.md"]
    pickles = ["pytorch_model.bin", "training_args.bin", "config.json"]
    assert choose_files(pickles, "org/x", True, None) == ["pytorch_model.bin", "config.json"]


def test_network_down_after_download_uses_the_cache(hub, hub_models, tmp_path, monkeypatch):
    recipe = task_arithmetic("org/base", f"org/ft-a@{hub_models['ft-a'][:7]}", "org/ft-b")
    assert build(recipe, tmp_path / "online").exit_code == 0
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    res = build(recipe, tmp_path / "cached")
    assert res.exit_code == 0, res.output
    assert_same_weights(tmp_path / "cached", tmp_path / "online")


def test_missing_local_looking_path_never_asks_the_hub(hub, tiny_models, tmp_path):
    (tmp_path / "models").mkdir()
    res = build(task_arithmetic(str(tiny_models["base"]), "models/ft-x", str(tiny_models["ft_b"])), tmp_path / "out")
    assert_one_line_error(res, tmp_path / "out", "models/ft-x", "no such folder")
    assert hub.state.requests == []


# --- publish -------------------------------------------------------------------------------------
@pytest.mark.parametrize("hub", ["regular", "lfs"], indirect=True)
@pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # inside huggingface_hub's LFS upload
def test_publish_and_download_back_byte_for_byte(hub, tiny_models, tmp_path):
    out = tmp_path / "merged"
    assert build(task_arithmetic(str(tiny_models["base"]), str(tiny_models["ft_a"]), str(tiny_models["ft_b"])),
                 out).exit_code == 0
    before = files_of(out)
    res = runner.invoke(app, ["publish", str(out), "org/merged", "--commit-message", "first merge"])
    assert res.exit_code == 0, res.output
    assert files_of(out) == before  # publishing changes nothing locally

    stored = hub.state.files("org/merged")
    assert stored["model.safetensors"].lfs is (hub.state.upload_mode == "lfs")
    assert not stored["config.json"].lfs
    back = Path(snapshot_download("org/merged", endpoint=hub.endpoint, token=TOKEN,
                                  cache_dir=tmp_path / "download"))
    assert files_of(back) == before

    meta, _ = read_card(back)
    assert {"merge", "merger"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    # Publishing again into the existing repo is fine (create_repo exist_ok: the server answers 409).
    assert runner.invoke(app, ["publish", str(out), "org/merged"]).exit_code == 0


def test_build_push_to_private_repo_and_branch(hub, hub_models, tmp_path):
    out = tmp_path / "pushed"
    res = build(task_arithmetic("org/base", "org/ft-a", "org/ft-b"), out, "--push-to", "org/pushed", "--private")
    assert res.exit_code == 0, res.output
    assert hub.state.repos["org/pushed"].private
    back = Path(snapshot_download("org/pushed", endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "dl"))
    assert files_of(back) == files_of(out)
    meta, _ = read_card(back)
    assert meta["base_model"] == ["org/base", "org/ft-a", "org/ft-b"]

    res = runner.invoke(app, ["publish", str(out), "org/pushed", "--revision", "dev"])
    assert res.exit_code == 0, res.output
    repo = hub.state.repos["org/pushed"]
    assert repo.refs["dev"] != repo.refs["main"] and set(repo.commits[repo.refs["dev"]]) == set(files_of(out))


def test_moe_from_repo_ids_pushed_with_its_own_card(hub, hub_models, tmp_path):
    recipe = {"base_model": "org/base", "gate_mode": "random", "experts_per_token": 1,
              "experts": [{"source_model": "org/ft-a"}, {"source_model": "org/ft-b"}]}
    res = build(recipe, tmp_path / "moe", "--push-to", "org/moe")
    assert res.exit_code == 0, res.output
    back = Path(snapshot_download("org/moe", endpoint=hub.endpoint, token=TOKEN, cache_dir=tmp_path / "dl"))
    assert files_of(back) == files_of(tmp_path / "moe")
    meta, body = read_card(back)
    assert meta["base_model"] == ["org/base", "org/ft-a", "org/ft-b"] and meta["license"] == "apache-2.0"
    assert {"merge", "merger", "moe"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    # The MoE build's own card body is kept (merger.card would write "composed with merger").
    assert "composed with merger" not in body and "org/ft-b" in body and "random" in body


def test_publish_from_elsewhere_keeps_local_inputs_local(hub, tiny_models, tmp_path, monkeypatch):
    """Relative references like `models/base` look like repo ids; the card written at build time
    (where they resolved locally) is published as it is, from any working folder."""
    (tmp_path / "models").mkdir()
    for key in ("base", "ft_a", "ft_b"):
        (tmp_path / "models" / key).symlink_to(tiny_models[key])
    out = tmp_path / "merged"
    assert build(task_arithmetic("models/base", "models/ft_a", "models/ft_b"), out).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert runner.invoke(app, ["publish", str(out), "org/merged"]).exit_code == 0
    card = hub.state.files("org/merged")["README.md"].data
    assert card == (out / "README.md").read_bytes()
    assert "base_model" not in split_front_matter(card.decode())[0]


def test_publish_fixes_the_front_matter_of_a_foreign_card(hub, tiny_models, tmp_path):
    """A folder whose README.md lacks the front matter (a hand-written card) and whose saved
    recipe holds absolute paths: the upload keeps the card's body, adds the metadata, scrubs."""
    out = tmp_path / "merged"
    assert build(task_arithmetic(str(tiny_models["base"]), str(tiny_models["ft_a"]), str(tiny_models["ft_b"])),
                 out).exit_code == 0
    (out / "README.md").write_text(f"# Hand-written\n\nMerged from {tiny_models['ft_a']} with care.\n")
    (out / "merger_config.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_models['ft_a']}\n"
                                           f"  - model: org/other\n")
    assert runner.invoke(app, ["publish", str(out), "org/hand"]).exit_code == 0
    stored = hub.state.files("org/hand")
    card = stored["README.md"].data.decode()
    meta, body = split_front_matter(card)
    assert body.strip().startswith("# Hand-written") and "with care" in body
    assert meta["base_model"] == ["org/other"] and {"merge", "merger", "linear"} <= set(meta["tags"])
    for name in ("README.md", "merger_config.yml"):
        assert str(tmp_path) not in stored[name].data.decode(), name
    assert "model: ft_a" in stored["merger_config.yml"].data.decode()


# --- pickle weights ------------------------------------------------------------------------------
def pickled_repo(hub, tiny_models, load_weights, name: str, state) -> None:
    buf = Path(f"{name}.bin")
    torch.save(state, buf)
    upload(hub, f"org/{name}", tiny_models["ft_a"], {"pytorch_model.bin": buf.read_bytes()},
           skip=("model.safetensors",))


def test_pickle_only_repo_is_refused_then_loaded_with_allow_pickle(hub, hub_models, tiny_models, load_weights,
                                                                   tmp_path):
    pickled_repo(hub, tiny_models, load_weights, "pickled", load_weights(tiny_models["ft_a"]))
    recipe = task_arithmetic("org/base", "org/pickled", "org/ft-b")
    res = build(recipe, tmp_path / "out")
    assert_one_line_error(res, tmp_path / "out", "org/pickled", "pytorch_model.bin", "--allow-pickle")
    assert not list((tmp_path / "hf_home").rglob("pytorch_model.bin"))  # refused before downloading

    res = build(recipe, tmp_path / "out", "--allow-pickle")
    assert res.exit_code == 0, res.output
    assert build(task_arithmetic("org/base", "org/ft-a", "org/ft-b"), tmp_path / "ref").exit_code == 0
    assert_same_weights(tmp_path / "out", tmp_path / "ref")


class _TouchOnLoad:
    """Unpickling this runs Path.touch: only a loader without weights_only would do that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_allow_pickle_loads_with_weights_only(hub, hub_models, tiny_models, load_weights, tmp_path):
    marker = tmp_path / "code-ran"
    state = dict(load_weights(tiny_models["ft_a"]))
    state["extra"] = _TouchOnLoad(marker)
    pickled_repo(hub, tiny_models, load_weights, "evil", state)
    res = build(task_arithmetic("org/base", "org/evil", "org/ft-b"), tmp_path / "out", "--allow-pickle")
    assert_one_line_error(res, tmp_path / "out", "refused as pickle weights", "--allow-pickle")
    assert not marker.exists()


# --- one line per failure ------------------------------------------------------------------------
def test_repo_not_found(hub, hub_models, tmp_path):
    res = build(task_arithmetic("org/base", "org/ft-a", "org/nope"), tmp_path / "out")
    assert_one_line_error(res, tmp_path / "out", "org/nope", "no local folder or Hub repository")


def test_revision_not_found(hub, hub_models, tmp_path):
    res = build(task_arithmetic("org/base", "org/ft-a@no-such-branch", "org/ft-b"), tmp_path / "out")
    assert_one_line_error(res, tmp_path / "out", "revision 'no-such-branch' not found in org/ft-a")


def test_repo_without_safetensors(hub, hub_models, tiny_models, tmp_path):
    upload(hub, "org/configs-only", None, {"config.json": (tiny_models["base"] / "config.json").read_bytes()})
    res = build(task_arithmetic("org/base", "org/configs-only", "org/ft-b"), tmp_path / "out")
    assert_one_line_error(res, tmp_path / "out", "org/configs-only", "no *.safetensors")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_network_down(hub, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    res = build(task_arithmetic("org/base", "org/ft-a", "org/ft-b"), tmp_path / "out")
    assert_one_line_error(res, tmp_path / "out", "cannot reach the Hub", "HF_HUB_OFFLINE")
    assert build(task_arithmetic(str(tiny_models["base"]), str(tiny_models["ft_a"]), str(tiny_models["ft_b"])),
                 tmp_path / "local").exit_code == 0
    res = runner.invoke(app, ["publish", str(tmp_path / "local"), "org/x"])
    assert_one_line_error(res, None, "publish org/x", "cannot reach the Hub")


def test_auth_refused(hub, tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    assert build(task_arithmetic(str(tiny_models["base"]), str(tiny_models["ft_a"]), str(tiny_models["ft_b"])),
                 out).exit_code == 0
    before = files_of(out)
    monkeypatch.setenv("HF_TOKEN", "wrong-token")
    res = runner.invoke(app, ["publish", str(out), "org/merged"])
    line = assert_one_line_error(res, None, "refused the credentials (HTTP 401)", "HF_TOKEN")
    assert "wrong-token" not in line and "org/merged" not in hub.state.repos
    assert files_of(out) == before
    res = build(task_arithmetic(str(tiny_models["base"]), str(tiny_models["ft_a"]), str(tiny_models["ft_b"])),
                tmp_path / "again", "--push-to", "org/merged")
    assert_one_line_error(res, None, "built", "but publishing failed", "HTTP 401")
    assert (tmp_path / "again" / "model.safetensors").is_file()  # the build itself is complete


def test_bad_repo_id_fails_before_any_work(hub, tiny_models, tmp_path):
    res = build(task_arithmetic(str(tiny_models["base"]), str(tiny_models["ft_a"]), str(tiny_models["ft_b"])),
                tmp_path / "out", "--push-to", "not a repo")
    assert_one_line_error(res, tmp_path / "out", "'not a repo'", "org/name")
    assert hub.state.requests == []
    res = runner.invoke(app, ["publish", str(tmp_path / "missing"), "org/x"])
    assert_one_line_error(res, None, "missing", "merger build")


def test_model_card_of_an_moe_keeps_its_body(tmp_path, tiny_models):
    from merger.card import finish_card

    out = tmp_path / "moe"
    out.mkdir()
    (out / "merger_config.yml").write_text(yaml.safe_dump({
        "base_model": "org/base", "gate_mode": "random",
        "experts": [{"source_model": "org/ft-a"}, {"source_model": str(tiny_models["ft_b"])}]}))
    body = f"\n# My MoE\n\nExperts: org/ft-a and `{tiny_models['ft_b']}`.\n"
    (out / "README.md").write_text("---\ntags: [merge, moe, merger]\n---\n" + body)
    paths = {"org/base": tiny_models["base"], "org/ft-a": tiny_models["ft_a"],
             str(tiny_models["ft_b"]): tiny_models["ft_b"]}
    finish_card(out, "moe", paths, str(tmp_path))
    first = (out / "README.md").read_bytes()
    meta, new_body = split_front_matter(first.decode())
    assert meta["base_model"] == ["org/base", "org/ft-a"] and meta["tags"] == ["merge", "moe", "merger"]
    assert new_body == body.replace(str(tiny_models["ft_b"]), "ft_b")
    finish_card(out, "moe", paths, str(tmp_path))
    assert (out / "README.md").read_bytes() == first  # idempotent: publish re-checks the same card
