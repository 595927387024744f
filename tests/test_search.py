"""`merger search`: on two tiny models whose linear merge at a known weight is a model planted to predict a
text, a seeded TPE search finds that weight; a SQLite study resumes without redoing trials; a trial whose
build fails is a FAIL trial with its reason; bad spaces and a missing optuna are one line, exit 1."""
from __future__ import annotations

import sys

import pytest
import yaml
from typer.testing import CliRunner

from merger.evaluate.planted import make_linear_pair
from merger.evaluate.report import evaluate
from merger.evaluate.texts import Text

from test_eval_cli import cli_app, one_line_error

optuna = pytest.importorskip("optuna")

runner = CliRunner()
TEXT = " ".join(["Once upon a time the little fox walked home."] * 4)
BEST = 0.3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    a, b = make_linear_pair(root, TEXT, best=BEST)
    (root / "held_out.txt").write_text(TEXT)
    return root, a, b


def write(tmp_path, recipe: dict, space: str) -> tuple[str, str]:
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "space.yaml").write_text(space)
    return str(tmp_path / "recipe.yaml"), str(tmp_path / "space.yaml")


def linear(a, b, w: float = 0.5) -> dict:
    # normalised weights (w, 1 - BEST): the merge is the planted model at w = BEST
    return {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": w}},
                                                 {"model": str(b), "parameters": {"weight": 1 - BEST}}]}


def trials_of(db: str, study: str):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{db}").get_trials()


def test_the_known_best_weight_is_real(pair, tmp_path):
    """Independent of any search: scoring merges on a grid puts the minimum at BEST."""
    from merger.pipeline import build_recipe
    from merger.recipe_file import load_recipe

    root, a, b = pair
    ppl = {}
    for w in (0.1, 0.2, 0.3, 0.4, 0.5):
        rp, _ = write(tmp_path, linear(a, b, w), "{}")
        build_recipe(load_recipe(rp), tmp_path / f"m{w}", progress=False)
        ppl[w] = evaluate([tmp_path / f"m{w}"], [Text("t", TEXT, "test")], window=64).models[0].domains[0].ppl
    assert min(ppl, key=ppl.get) == BEST and ppl[0.2] > ppl[0.3] * 1.05 < ppl[0.4]


def test_search_finds_the_weight_and_resumes_from_sqlite(pair, tmp_path):
    root, a, b = pair
    recipe, space = write(tmp_path, linear(a, b), "models[0].parameters.weight: [0.0, 1.0]\n")
    db = tmp_path / "study.db"
    args = ["search", recipe, "--space", space, "--text", str(root / "held_out.txt"), "--window", "64",
            "--storage", f"sqlite:///{db}", "--study", "s1", "--seed", "0", "--out", str(tmp_path / "best"),
            "--save-recipe", str(tmp_path / "best.yaml")]
    res = runner.invoke(cli_app(), [*args, "--trials", "20"])
    assert res.exit_code == 0, res.stderr
    trials = trials_of(db, "s1")
    assert len(trials) == 20 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    best = yaml.safe_load(res.stdout)
    weight = best["models"][0]["parameters"]["weight"]
    assert abs(weight - BEST) <= 0.1, weight
    assert yaml.safe_load((tmp_path / "best.yaml").read_text()) == best
    assert best["models"][1] == linear(a, b)["models"][1]   # only the searched field changed
    # --out holds the final build of the best recipe: it scores the best trial's value
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{db}")
    got = evaluate([tmp_path / "best"], [Text("held_out", TEXT, "t")], window=64).models[0].domains[0].ppl
    assert got == pytest.approx(study.best_value, rel=1e-6)
    numbers = [t.number for t in trials]
    # resuming: 20 finished, asked for 25, runs 5 more and leaves the first 20 as they were
    res = runner.invoke(cli_app(), [*args, "--trials", "25", "--force"])
    assert res.exit_code == 0, res.stderr
    again = trials_of(db, "s1")
    assert len(again) == 25 and [t.number for t in again[:20]] == numbers
    assert [t.params for t in again[:20]] == [t.params for t in trials]
    assert "20 of 25 trials already finished" in res.stderr
    assert sum(line.startswith("trial ") for line in res.stderr.splitlines()) == 5
    # asking for what the study already has runs nothing
    res = runner.invoke(cli_app(), [*args, "--trials", "25", "--force"])
    assert res.exit_code == 0 and len(trials_of(db, "s1")) == 25


def test_a_failing_build_is_a_failed_trial_and_the_search_goes_on(pair, tmp_path):
    root, a, b = pair
    recipe = {"merge_method": "della", "base_model": str(b),
              "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.3}}]}
    # della needs 0 < density ± epsilon < 1: densities under 0.3 or over 0.7 cannot build
    recipe_path, space = write(tmp_path, recipe, "models[0].parameters.density: [0.05, 0.95]\n")
    db = tmp_path / "della.db"
    res = runner.invoke(cli_app(), ["search", recipe_path, "--space", space, "--trials", "12", "--sampler", "random",
                                    "--text", str(root / "held_out.txt"), "--window", "64",
                                    "--storage", f"sqlite:///{db}", "--study", "d"])
    assert res.exit_code == 0, res.stderr
    trials = trials_of(db, "d")
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 12 and failed and complete
    for t in failed:
        d = t.params["models[0].parameters.density"]
        assert not 0.3 < d < 0.7
        reason = t.user_attrs["fail_reason"]
        assert "della needs 0 < density ± epsilon < 1" in reason and "\n" not in reason
        assert f"trial {t.number} failed" in res.stderr
    assert all(0.3 < t.params["models[0].parameters.density"] < 0.7 for t in complete)


def test_kl_objective_and_cmaes(pair, tmp_path):
    root, a, b = pair
    recipe, space = write(tmp_path, linear(a, b), "models[0].parameters.weight: [0.0, 1.0]\n")
    res = runner.invoke(cli_app(), ["search", recipe, "--space", space, "--trials", "4", "--objective",
                                    f"kl:{b}", "--text", str(root / "held_out.txt"), "--window", "64",
                                    "--sampler", "cmaes"])
    assert res.exit_code == 0, res.stderr
    # KL to b is smallest where the merge is b: weight 0 on a; its value is the trial's mean KL(b ‖ merge)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("trial ")]
    assert len(lines) == 4
    values = {float(ln.split("=")[1].split(" ")[0]): float(ln.split("-> ")[1].split(" ")[0]) for ln in lines}
    assert min(values, key=values.get) == min(values)


def test_space_errors(pair, tmp_path):
    root, a, b = pair
    cases = [
        ("models[5].parameters.weight: [0.0, 1.0]\n", ["space.yaml", "models[5]", "it lists 2"]),
        ("parameters.densty: [0.1, 0.9]\n", ["space.yaml", "parameters.densty", "no parameter 'densty'"]),
        ("models[0].parameters.density: [0.2, 1.5]\n", ["models[0].parameters.density", "upper end 1.5"]),
        ("models[0].weight: [0.0, 1.0]\n", ["models[0].weight"]),
        ("merge_method: [ties, lineer]\n", ["merge_method", "choice 'lineer'", "unknown method"]),
        ("models[0].parameters.weight: [1.0, 0.0]\n", ["low 1.0 and high 0.0"]),
        ("models[0].parameters.weight: [0.1, 0.5, 0.9]\n", ["{choices:"]),
        ("- a\n", ["a search space is a YAML mapping"]),
    ]
    recipe = {"merge_method": "ties", "base_model": str(b),
              "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}}, {"model": str(b)}]}
    for space, needles in cases:
        rp, sp = write(tmp_path, recipe, space)
        one_line_error(runner.invoke(cli_app(), ["search", rp, "--space", sp, "--trials", "2"]), *needles)


def test_categorical_method_and_a_new_parameter_pass_the_check(pair, tmp_path):
    from merger.evaluate.space import check_space, load_space

    root, a, b = pair
    recipe = {"merge_method": "ties", "base_model": str(b),
              "models": [{"model": str(a), "parameters": {"weight": 1.0}}]}
    rp, sp = write(tmp_path, recipe, "merge_method: [ties, dare_ties]\nparameters.density: {low: 0.2, high: 0.9}\n"
                                     "parameters.normalize: {choices: [true, false]}\n")
    dims, _ = load_space(sp)
    assert [(d.kind, d.choices or (d.low, d.high)) for d in dims] == [
        ("categorical", ("ties", "dare_ties")), ("float", (0.2, 0.9)), ("categorical", (True, False))]
    check_space(yaml.safe_load(open(rp)), dims, sp, rp)


def test_optuna_missing_names_the_extra(pair, tmp_path, monkeypatch):
    root, a, b = pair
    rp, sp = write(tmp_path, linear(a, b), "models[0].parameters.weight: [0.0, 1.0]\n")
    monkeypatch.setitem(sys.modules, "optuna", None)   # `import optuna` raises ImportError
    one_line_error(runner.invoke(cli_app(), ["search", rp, "--space", sp]), "pip install 'merger[search]'")


def test_a_study_with_other_inputs_is_not_resumed(pair, tmp_path):
    root, a, b = pair
    rp, sp = write(tmp_path, linear(a, b), "models[0].parameters.weight: [0.0, 1.0]\n")
    args = ["search", rp, "--space", sp, "--trials", "2", "--text", str(root / "held_out.txt"), "--window", "64",
            "--storage", f"sqlite:///{tmp_path / 's.db'}", "--study", "x"]
    assert runner.invoke(cli_app(), args).exit_code == 0
    (tmp_path / "space.yaml").write_text("models[0].parameters.weight: [0.0, 0.5]\n")
    one_line_error(runner.invoke(cli_app(), args), "study 'x'", "different space", "new --study")


def test_a_storage_that_cannot_open_is_one_line(pair, tmp_path):
    root, a, b = pair
    rp, sp = write(tmp_path, linear(a, b), "models[0].parameters.weight: [0.0, 1.0]\n")
    args = ["search", rp, "--space", sp, "--trials", "1", "--text", str(root / "held_out.txt")]
    one_line_error(runner.invoke(cli_app(), [*args, "--storage", "nosuchdb://host/db"]), "--storage nosuchdb://host/db")
    one_line_error(runner.invoke(cli_app(), [*args, "--objective", "ppl+kl"]), "--objective", "'kl'")
    one_line_error(runner.invoke(cli_app(), [*args, "--sampler", "grid"]), "--sampler 'grid'")


def test_an_interrupted_trial_is_run_again_on_resume(pair, tmp_path, monkeypatch):
    from merger.evaluate import search as search_mod

    root, a, b = pair
    rp, sp = write(tmp_path, linear(a, b), "models[0].parameters.weight: [0.0, 1.0]\n")
    kw = dict(texts=[Text("t", TEXT, "test")], window=64, storage=f"sqlite:///{tmp_path / 'i.db'}",
              study_name="i", echo=lambda m: None)
    real = search_mod.TrialScorer.__call__
    calls = []

    def flaky(self, model_dir):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, model_dir)

    monkeypatch.setattr(search_mod.TrialScorer, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        search_mod.search(rp, sp, trials=4, **kw)
    states = [t.state for t in trials_of(tmp_path / "i.db", "i")]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]
    res = search_mod.search(rp, sp, trials=4, **kw)     # the interrupted trial is not finished: 2 more run
    assert (res.ran, res.complete, res.failed) == (2, 4, 1)
