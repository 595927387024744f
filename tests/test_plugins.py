"""The plugin system as users meet it: throwaway plugins registered in-process (and unregistered),
one-off plugin files (--plugin, recipe `plugins:`), the MERGER_LOAD_PLUGINS allow-list, and every
broken-plugin case reported as one line naming the plugin."""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from merger import GateInitializer, MergeMethod, hookimpl, plugins
from merger.cli import app
from merger.errors import PluginError

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_registry():
    """Whatever a test registers (directly, through --plugin or a recipe) is unregistered after it."""
    plugins.load_plugins()
    before = {name for name, _ in plugins.pm.list_name_plugin()}
    try:
        yield
    finally:
        for name, _ in plugins.pm.list_name_plugin():
            if name not in before:
                plugins.unregister_plugin(name)


class Registers:
    """A plugin object registering the given method and gate classes through the public hooks."""

    def __init__(self, methods: tuple[type, ...] = (), gates: tuple[type, ...] = ()):
        self.methods, self.gates = methods, gates

    @hookimpl
    def merger_register_methods(self, register) -> None:
        for cls in self.methods:
            register(cls)

    @hookimpl
    def merger_register_gate_initializers(self, register) -> None:
        for cls in self.gates:
            register(cls)


class Scaled(MergeMethod):
    """mean(θᵢ) · scale: a throwaway method with one global and one per-model parameter."""

    name = "scaled_mean"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scale: float = 1.0

    class ModelParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weight: float = 1.0

    def merge(self, tensors, base, params, model_params, ctx):
        return params.scale * sum(p.weight * t for p, t in zip(model_params, tensors)) / len(tensors)


def one_line_error(args: list[str], *needles: str) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def recipe(tmp_path: Path, method: str, models: list[Path], **extra: Any) -> Path:
    data = {"merge_method": method, "models": [{"model": str(m)} for m in models], **extra}
    return write(tmp_path / "recipe.yaml", yaml.safe_dump(data))


# --- registering, listing, unregistering -----------------------------------------------------
def test_registered_plugin_is_listed_then_gone(tmp_path):
    with plugins.registered(Registers(methods=(Scaled,)), "throwaway"):
        assert plugins.methods()["scaled_mean"] is Scaled
        res = runner.invoke(app, ["methods"])
        assert res.exit_code == 0 and "scaled_mean" in res.stdout and "scale=1.0" in res.stdout
        rows = json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)
        row = next(r for r in rows if r["name"] == "throwaway")
        assert row["registered"] == ["method:scaled_mean"] and row["distribution"] == "in-process"
        assert row["hooks"] == ["merger_register_gate_initializers", "merger_register_methods"]
    assert "scaled_mean" not in plugins.methods()


def test_registered_method_builds_with_its_parameters(tmp_path, tiny_models, load_weights):
    path = recipe(tmp_path, "scaled_mean", [tiny_models["ft_a"], tiny_models["ft_b"]], parameters={"scale": 0.5})
    data = yaml.safe_load(path.read_text())
    data["models"][1]["parameters"] = {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 2.0}]}
    path.write_text(yaml.safe_dump(data))
    with plugins.registered(Registers(methods=(Scaled,)), "throwaway"):
        res = runner.invoke(app, ["build", str(path), str(tmp_path / "out"), "-q"])
        assert res.exit_code == 0, res.output
    a, b, out = (load_weights(p) for p in (tiny_models["ft_a"], tiny_models["ft_b"], tmp_path / "out"))
    for name, got in out.items():
        wb = 3.0 if "mlp" in name else 2.0  # ft_b's filter list, matched against its tensor names
        torch.testing.assert_close(got, 0.5 * (a[name] + wb * b[name]) / 2, msg=name)


# --- one-off plugin files -------------------------------------------------------------------
SCALED_FILE = '''
    import merger
    from pydantic import BaseModel, ConfigDict


    class Negated(merger.MergeMethod):
        name = "negated_sum"

        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            factor: float = 1.0

        def merge(self, tensors, base, params, model_params, ctx):
            return -params.factor * sum(tensors)


    @merger.hookimpl
    def merger_register_methods(register):
        register(Negated)
'''


def test_plugin_option_loads_a_file(tmp_path):
    f = write(tmp_path / "negated.py", SCALED_FILE)
    res = runner.invoke(app, ["methods", "--plugin", str(f)])
    assert res.exit_code == 0 and "negated_sum" in res.stdout and f"file:{f.resolve()}" in res.stdout
    rows = json.loads(runner.invoke(app, ["plugins", "--json", "--plugin", str(f)]).stdout)
    row = next(r for r in rows if r["name"] == f"file:{f.resolve()}")
    assert row["registered"] == ["method:negated_sum"] and row["distribution"] == "file"


def test_recipe_plugins_resolve_against_the_recipe_folder(tmp_path, tiny_models, load_weights, monkeypatch):
    write(tmp_path / "recipes" / "lib" / "negated.py", SCALED_FILE)
    path = recipe(tmp_path / "recipes", "negated_sum", [tiny_models["ft_a"], tiny_models["ft_b"]],
                  plugins=["lib/negated.py"], parameters={"factor": 2.0})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the recipe, not to the current folder
    res = runner.invoke(app, ["build", str(path), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    a, b, out = (load_weights(p) for p in (tiny_models["ft_a"], tiny_models["ft_b"], tmp_path / "out"))
    for name, got in out.items():
        torch.testing.assert_close(got, -2.0 * (a[name] + b[name]), msg=name)


def test_recipe_plugin_file_missing(tmp_path, tiny_models):
    path = recipe(tmp_path, "linear", [tiny_models["ft_a"]], plugins=["nope.py"])
    one_line_error(["validate", str(path)], "recipe.yaml: plugins[0]", "nope.py", "not found")


def test_recipe_plugins_must_be_a_list(tmp_path, tiny_models):
    path = recipe(tmp_path, "linear", [tiny_models["ft_a"]], plugins="mine.py")
    one_line_error(["validate", str(path)], "plugins:", "list of .py files")


def test_plugin_option_rejects_non_python_file(tmp_path):
    one_line_error(["methods", "--plugin", str(write(tmp_path / "x.txt", "hi"))], "not a .py file")


# --- broken plugins at load time --------------------------------------------------------------
@pytest.mark.parametrize("source, needles", [
    ("import no_such_module_xyz\n", ["failed to import", "ModuleNotFoundError", "no_such_module_xyz"]),
    ("import merger\n@merger.hookimpl\ndef merger_register_method(register):\n    pass\n",
     ["implements 'merger_register_method'", "did you mean 'merger_register_methods'"]),
    ("import merger\n@merger.hookimpl(specname='merger_resolve_modle')\ndef find(reference, options):\n    pass\n",
     ["implements 'merger_resolve_modle'", "did you mean 'merger_resolve_model'"]),
    ("def merger_register_methods(register):\n    pass\n",
     ["merger_register_methods is not marked", "@merger.hookimpl"]),
    ("import merger\n@merger.hookimpl\ndef merger_register_methods(reg):\n    pass\n",
     ["asks for 'reg'", "its arguments are: register"]),
    ("import merger\n@merger.hookimpl\ndef merger_register_methods(register):\n    register(object)\n",
     ["without a `name`"]),
    ("import merger\n@merger.hookimpl\ndef merger_register_methods(register):\n    1 / 0\n",
     ["failed in merger_register_methods", "ZeroDivisionError"]),
])
def test_broken_plugin_file_is_one_line_naming_it(tmp_path, source, needles):
    f = write(tmp_path / "broken.py", source)
    one_line_error(["methods", "--plugin", str(f)], str(f.resolve()), *needles)


def test_broken_plugin_object_leaves_nothing_registered():
    class Typo:
        @hookimpl
        def merger_register_gate_initializer(self, register):
            pass

    with pytest.raises(PluginError, match="plugin 'typo' implements 'merger_register_gate_initializer'.*"
                                          "did you mean 'merger_register_gate_initializers'"):
        plugins.register_plugin(Typo(), "typo")
    assert plugins.pm.get_plugin("typo") is None
    plugins.check_plugins()  # nothing pending: the registry is usable


def test_duplicate_name_names_both_plugins():
    class Again(Scaled):
        pass

    with plugins.registered(Registers(methods=(Scaled,)), "first"), \
            plugins.registered(Registers(methods=(Again,)), "second"):
        with pytest.raises(PluginError, match="'scaled_mean' is registered twice: by plugin 'first' and by "
                                              "plugin 'second'"):
            plugins.methods()


def test_duplicate_of_a_builtin_in_the_cli(tmp_path):
    f = write(tmp_path / "mine.py", SCALED_FILE.replace('"negated_sum"', '"linear"'))
    one_line_error(["methods", "--plugin", str(f)], "'linear' is registered twice", "'merger.builtin'",
                   f"'file:{f.resolve()}'")


# --- broken methods and gate initializers at run time ------------------------------------------
def broken_method(behaviour):
    class Broken(MergeMethod):
        name = "broken"

        def merge(self, tensors, base, params, model_params, ctx):
            return behaviour(tensors[0])
    return Broken


def _raise(exc: Exception):
    def f(t):
        raise exc
    return f


@pytest.mark.parametrize("behaviour, needles", [
    (lambda t: t[..., :1], ["returned shape", "expected [512, 64]"]),
    (lambda t: t.long(), ["returned dtype torch.int64", "floating"]),
    (lambda t: t * float("nan"), ["NaN/inf"]),
    (lambda t: t.tolist(), ["returned list", "not a torch.Tensor"]),
    (lambda t: t.to("meta"), ["on meta", ".cpu()"]),
    (_raise(ZeroDivisionError("boom\nsecond line")), ["failed on tensor", "ZeroDivisionError: boom"]),
    (_raise(ValueError("alpha must be below 1\nmore detail")), ["on tensor", "alpha must be below 1"]),
])
def test_misbehaving_method_is_one_line_naming_it(tmp_path, tiny_models, behaviour, needles):
    path = recipe(tmp_path, "broken", [tiny_models["ft_a"], tiny_models["ft_b"]])
    with plugins.registered(Registers(methods=(broken_method(behaviour),)), "shaky"):
        line = one_line_error(["build", str(path), str(tmp_path / "out"), "-q"],
                              "merge method 'broken' (plugin 'shaky')", "model.embed_tokens.weight", *needles)
    assert "second line" not in line and "more detail" not in line
    assert not (tmp_path / "out").exists()


def broken_gate(behaviour):
    class BrokenGate(GateInitializer):
        name = "broken_gate"

        def init_gates(self, ctx):
            return behaviour(ctx)
    return BrokenGate


@pytest.mark.parametrize("behaviour, needles", [
    (lambda ctx: torch.zeros(ctx.num_layers, ctx.num_experts + 1, ctx.hidden_size),
     ["returned [4, 3, 64]", "expected a tensor of shape [4, 2, 64]"]),
    (lambda ctx: torch.full((ctx.num_layers, ctx.num_experts, ctx.hidden_size), float("nan")), ["non-finite"]),
    (_raise(ZeroDivisionError("boom\nsecond line")), ["failed: ZeroDivisionError: boom"]),
    (_raise(ValueError("needs 2+ experts\nmore detail")), [": needs 2+ experts"]),
])
def test_misbehaving_gate_initializer_is_one_line_naming_it(tmp_path, tiny_models, behaviour, needles):
    data = {"base_model": str(tiny_models["base"]), "gate_mode": "broken_gate", "experts_per_token": 1,
            "experts": [{"source_model": str(tiny_models["ft_a"])}, {"source_model": str(tiny_models["ft_b"])}]}
    path = write(tmp_path / "moe.yaml", yaml.safe_dump(data))
    with plugins.registered(Registers(gates=(broken_gate(behaviour),)), "wobbly"):
        line = one_line_error(["build", str(path), str(tmp_path / "out"), "-q"],
                              "gate initializer 'broken_gate' (plugin 'wobbly')", *needles)
    assert "second line" not in line and "more detail" not in line
    assert not (tmp_path / "out").exists()


# --- MERGER_LOAD_PLUGINS and entry points --------------------------------------------------------
@dataclass
class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: name, value, dist and load()."""

    name: str
    value: str
    dist: Any

    def load(self) -> Any:
        import importlib

        return importlib.import_module(self.value)


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch):
    """Three installed 'packages': two good plugins and one that fails to import."""
    for mod, method in (("fake_ep_alpha", "alpha_method"), ("fake_ep_beta", "beta_method")):
        write(tmp_path / "eps" / f"{mod}.py", SCALED_FILE.replace('"negated_sum"', f'"{method}"'))
    write(tmp_path / "eps" / "fake_ep_broken.py", "raise RuntimeError('missing CUDA toolkit')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "eps"))
    eps = [FakeEntryPoint("alpha", "fake_ep_alpha", SimpleNamespace(name="merger-alpha", version="1.2.3")),
           FakeEntryPoint("beta", "fake_ep_beta", SimpleNamespace(name="merger-beta", version="0.4")),
           FakeEntryPoint("broken", "fake_ep_broken", SimpleNamespace(name="merger-broken", version="9"))]
    monkeypatch.setattr(plugins, "installed_entry_points", lambda: eps)
    return eps


def loaded_names() -> set[str]:
    return {name for name, _ in plugins.pm.list_name_plugin()}


def test_entry_points_are_not_loaded_under_pytest(fake_entry_points, monkeypatch):
    monkeypatch.delenv(plugins.ENV_ALLOW, raising=False)
    assert plugins.allowed_entry_points() == []
    monkeypatch.delitem(__import__("sys").modules, "pytest")  # as in the `merger` executable
    assert [ep.name for ep in plugins.allowed_entry_points()] == ["alpha", "beta", "broken"]


def test_allow_list_loads_only_the_named_plugins(fake_entry_points, monkeypatch):
    monkeypatch.setenv(plugins.ENV_ALLOW, " alpha , ")
    plugins.load_entry_points()
    assert {"alpha"} <= loaded_names() and not {"beta", "broken"} & loaded_names()
    assert "alpha_method" in plugins.methods() and "beta_method" not in plugins.methods()
    rows = {r["name"]: r for r in json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)}
    assert rows["alpha"] | {"module": None} == {
        "name": "alpha", "distribution": "merger-alpha", "version": "1.2.3", "loaded": True, "module": None,
        "hooks": ["merger_register_methods"], "registered": ["method:alpha_method"]}
    assert rows["beta"]["loaded"] is False and rows["beta"]["registered"] == []
    assert "(not loaded: MERGER_LOAD_PLUGINS)" in runner.invoke(app, ["plugins"]).stdout


def test_empty_allow_list_loads_none(fake_entry_points, monkeypatch):
    monkeypatch.setenv(plugins.ENV_ALLOW, "")
    plugins.load_entry_points()
    assert not {"alpha", "beta", "broken"} & loaded_names()


def test_broken_entry_point_names_it_and_the_escape_hatch(fake_entry_points, monkeypatch):
    monkeypatch.setenv(plugins.ENV_ALLOW, "alpha,broken")
    with pytest.raises(PluginError, match=r"plugin 'broken' \(fake_ep_broken\) failed to import: RuntimeError: "
                                          r"missing CUDA toolkit; .*MERGER_LOAD_PLUGINS"):
        plugins.load_entry_points()
    assert "broken" not in loaded_names()


def test_load_plugins_reports_a_broken_plugin_every_time(fake_entry_points, monkeypatch):
    monkeypatch.setattr(plugins, "_loaded", False)  # as in a fresh process
    monkeypatch.setenv(plugins.ENV_ALLOW, "broken")
    for _ in range(2):  # a library caller that catches the first error is not left half-loaded
        with pytest.raises(PluginError, match="plugin 'broken'"):
            plugins.load_plugins()


def test_allow_list_with_an_unknown_name(fake_entry_points, monkeypatch):
    monkeypatch.setenv(plugins.ENV_ALLOW, "alpha,gamma")
    with pytest.raises(PluginError, match="MERGER_LOAD_PLUGINS names 'gamma', which no installed package "
                                          r"provides \(installed plugins: alpha, beta, broken\)"):
        plugins.load_entry_points()


def test_two_packages_with_one_plugin_name(fake_entry_points, monkeypatch):
    fake_entry_points.append(FakeEntryPoint("alpha", "fake_ep_beta", SimpleNamespace(name="other-alpha",
                                                                                      version="1")))
    monkeypatch.setenv(plugins.ENV_ALLOW, "alpha")
    with pytest.raises(PluginError, match="'alpha' is provided by two packages, 'merger-alpha' and 'other-alpha'"):
        plugins.load_entry_points()
