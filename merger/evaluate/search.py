"""`merger search` as a library call: optuna varies the fields a space file names; each trial builds its
recipe into a temp folder (removed afterwards) and is scored with `merger eval`'s code for the objective
(`ppl`, `nll`, `kl:PARENT`, or a weighted sum). A failed build is a FAIL trial with its one-line reason and
the search goes on; with a storage URL rerunning resumes the study and several machines can share it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merger.errors import MergerError, SearchError
from merger.evaluate.report import DEFAULT_WINDOW, model_window, same_vocabulary
from merger.evaluate.score import CACHE_BYTES, LogProbs, PairScore, TextScore, score, score_pair
from merger.evaluate.space import absolute_plugins, apply, check_space, load_space
from merger.evaluate.texts import Text, builtin_texts, encode

SAMPLERS = ("tpe", "cmaes", "random")
_TERM = re.compile(r"\s*(?:([0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*\*\s*)?(nll|ppl|kl:(.+))\s*", re.IGNORECASE)

SEARCH_EXTRA = "pip install 'merger[search]'"


def need_optuna():
    """The optuna module, or a one-line SearchError naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise SearchError(f"`merger search` needs optuna, which is not installed; run {SEARCH_EXTRA}") from None
    return optuna



@dataclass(frozen=True)
class Term:
    weight: float
    metric: str              # "nll", "ppl" or "kl"
    parent: Path | None = None


def parse_objective(text: str) -> list[Term]:
    """`ppl`, `nll`, `kl:./ft-a`, or a sum of weighted terms: `0.7*nll+0.3*kl:./ft-a` (minimised)."""
    terms = []
    for part in text.split("+"):
        m = _TERM.fullmatch(part)
        if not m:
            raise SearchError(f"--objective {text!r}: {part.strip()!r} is not a term; use ppl, nll or kl:PARENT_DIR, "
                              "optionally weighted and summed (0.7*nll+0.3*kl:./ft-a)")
        metric = m.group(2).split(":")[0].lower()
        parent = Path(m.group(3).strip()) if m.group(3) else None
        if parent is not None and not (parent / "config.json").is_file():
            raise SearchError(f"--objective {text!r}: {parent} is not a model folder (no config.json)")
        terms.append(Term(float(m.group(1) or 1.0), metric, parent))
    return terms


class TrialScorer:
    """Scores built trial models on the texts for the objective. Parents named by `kl:` terms stay loaded
    for the whole search and their log-probs are computed once (kept when they fit, score.CACHE_BYTES)."""

    def __init__(self, texts: list[Text], terms: list[Term], dtype=None, device: str = "cpu",
                 window: int = DEFAULT_WINDOW):
        from merger.engine.model import load_model
        from merger.engine.tokenizer import load_tokenizer

        self.texts, self.terms, self.dtype, self.device, self.window = texts, terms, dtype, device, window
        self.parents: dict[Path, tuple[Any, list[list[int]]]] = {}
        self.streams: dict[Path, list[LogProbs]] = {}
        for p in dict.fromkeys(t.parent for t in terms if t.parent is not None):
            model, tok = load_model(p, dtype, device), load_tokenizer(p)
            self.parents[p] = (model, [encode(tok, t, model.config.vocab_size, str(p)) for t in texts])
            self.window = min(self.window, model_window(p, window))

    def parent_streams(self, p: Path, window: int) -> list[LogProbs]:
        """The parent's log-prob streams at this window (made once; again only if a trial's context is shorter)."""
        if p not in self.streams or self.streams[p][0].window != window:
            model, ids = self.parents[p]
            self.streams[p] = [LogProbs(model, i, window) for i in ids]
        return self.streams[p]

    def __call__(self, model_dir: Path) -> tuple[float, dict[str, float]]:
        from merger.engine.model import load_model
        from merger.engine.tokenizer import load_tokenizer

        for p in self.parents:
            same_vocabulary(model_dir, p)
        w = model_window(model_dir, self.window)
        model, tok = load_model(model_dir, self.dtype, self.device), load_tokenizer(model_dir)
        total, pairs = TextScore(), {p: PairScore() for p in self.parents}
        for k, text in enumerate(self.texts):
            ids = encode(tok, text, model.config.vocab_size, str(model_dir))
            # several parents read the trial's stream several times: keep it then
            stream = LogProbs(model, ids, w, cache_bytes=CACHE_BYTES if len(self.parents) > 1 else 0)
            if not self.parents:
                total.add(score(ids, stream))
            for j, p in enumerate(self.parents):
                if self.parents[p][1][k] != ids:
                    raise SearchError(f"text {text.name!r} encodes differently for the trial model and {p}; "
                                      "kl: needs models that share a tokenizer")
                m, _, pair = score_pair(ids, stream, self.parent_streams(p, w)[k])
                pairs[p].add(pair)
                if j == 0:
                    total.add(m)
        del model
        metrics = {"nll": total.nll, "ppl": total.ppl, "tokens": float(total.tokens)}
        metrics.update({f"kl:{p}": s.kl for p, s in pairs.items()})
        value = sum(t.weight * (metrics[t.metric] if t.parent is None else metrics[f"kl:{t.parent}"])
                    for t in self.terms)
        if not math.isfinite(value):
            raise MergerError(f"the trial model scores a non-finite objective ({value}); its logits overflow")
        return value, metrics


@dataclass
class SearchResult:
    study: str
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    recipe_yaml: str            # the best recipe, ready to build
    complete: int
    failed: int
    ran: int                    # trials this call ran (a resumed study ran fewer)
    out: Path | None = None


def make_sampler(optuna, name: str, seed: int | None):
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:  # optuna's CmaEsSampler needs it
            raise SearchError(f"--sampler cmaes needs the cmaes package, which is not installed; run {SEARCH_EXTRA}")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise SearchError(f"--sampler {name!r}: use one of {', '.join(SAMPLERS)}")


def open_storage(optuna, url: str | None):
    if url is None:
        return None
    try:  # heartbeats: a trial whose process died is marked failed, so a resumed study does not wait on it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except Exception as e:  # sqlalchemy raises many types (bad URL, no driver, no server)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SearchError(f"--storage {url}: cannot open the study database ({first})") from None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _finished(trial, states) -> bool:
    """Completed, or failed for a reason of its recipe (`fail_reason`). A trial that failed otherwise (its
    process was killed and the heartbeat gave it up, Ctrl-C, a crash) is not finished: a resume reruns it."""
    complete, fail = states
    return trial.state == complete or (trial.state == fail and "fail_reason" in trial.user_attrs)


def search(recipe_path: str | Path, space_path: str | Path, trials: int = 40, texts: list[Text] | None = None,
           objective: str = "ppl", storage: str | None = None, study_name: str | None = None,
           sampler: str = "tpe", seed: int | None = 0, out: str | Path | None = None, force: bool = False,
           dtype=None, device: str = "cpu", window: int = DEFAULT_WINDOW, random_seed: int = 0,
           work_dir: str | Path | None = None, echo: Callable[[str], None] | None = None) -> SearchResult:
    """Run (or resume) a study of `trials` finished trials and return the best; with `out`, build it there."""
    from merger.io.output import check_output
    from merger.pipeline import build_recipe, local_inputs, protected_files
    from merger.recipe_file import load_recipe, read_yaml, recipe_from_data

    optuna = need_optuna()
    echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))
    if trials < 1:
        raise SearchError(f"--trials {trials}: run at least one trial")
    recipe_path = Path(recipe_path)
    raw, recipe_text = read_yaml(recipe_path)
    # the recipe itself must be valid (validation may rewrite the mapping it is given: a copy)
    recipe = recipe_from_data(copy.deepcopy(raw), recipe_text, recipe_path, str(recipe_path))
    base = absolute_plugins(raw, recipe_path)
    dims, space_text = load_space(space_path)
    check_space(base, dims, str(space_path), str(recipe_path))
    terms = parse_objective(objective)
    texts = list(texts) if texts else builtin_texts()
    if out is not None:  # an output that cannot be written fails now, not after the search
        folders, files = local_inputs(recipe.model_refs(), None)
        files.update(protected_files(recipe))
        check_output(out, force, folders, files)
    make_sampler(optuna, sampler, seed)  # a missing cmaes fails before the study opens
    scorer = TrialScorer(texts, terms, dtype, device, window)
    fingerprint = {"recipe": _sha(recipe_text), "space": _sha(space_text), "objective": objective,
                   "texts": _sha("\0".join(t.text for t in texts))}
    name = study_name or f"{recipe_path.stem}-search"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials are reported below, one line each
    try:
        study = optuna.create_study(study_name=name, storage=open_storage(optuna, storage),
                                    sampler=make_sampler(optuna, sampler, seed), direction="minimize",
                                    load_if_exists=True)
        known = study.user_attrs.get("merger")
        if known is None:
            study.set_user_attr("merger", fingerprint)
        elif known != fingerprint:
            what = ", ".join(k for k in fingerprint if known.get(k) != fingerprint[k])
            raise SearchError(f"study {name!r} in {storage} was run with a different {what}; resume it with the "
                              "same inputs, or give a new --study name")
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        done = sum(_finished(t, states) for t in study.get_trials(deepcopy=False))
        if done:
            echo(f"study {name!r}: {done} of {trials} trials already finished")
        work = Path(work_dir) if work_dir is not None else None

        def run_trial(trial) -> float:
            values = {d.name: d.suggest(trial) for d in dims}
            with tempfile.TemporaryDirectory(prefix="merger-trial-", dir=work) as tmp:
                trial_recipe = Path(tmp) / "recipe.yaml"
                warned = io.StringIO()
                try:
                    trial_recipe.write_text(yaml.safe_dump(apply(base, dims, values, str(space_path)), sort_keys=False))
                    with contextlib.redirect_stderr(warned):  # kept with the trial instead of repeated each time
                        build_recipe(load_recipe(trial_recipe), Path(tmp) / "model", seed=random_seed,
                                     options={"progress": False}, label=f"trial {trial.number}", progress=False)
                    value, metrics = scorer(Path(tmp) / "model")
                except MergerError as e:
                    reason = str(e).replace(str(trial_recipe), f"{recipe_path} (trial {trial.number})")
                    trial.set_user_attr("fail_reason", " ".join(reason.split()))
                    raise
                finally:
                    lines = [ln.replace(str(trial_recipe), f"{recipe_path} (trial {trial.number})")
                             for ln in warned.getvalue().splitlines() if ln.strip()]
                    if lines:
                        trial.set_user_attr("warnings", lines)
            for k, v in metrics.items():
                trial.set_user_attr(k, v)
            return value

        def report(study, trial) -> None:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
            if trial.state == optuna.trial.TrialState.COMPLETE:
                best = study.best_trial
                echo(f"trial {trial.number}: {shown} -> {trial.value:.6g} (best {best.value:.6g}, trial {best.number})")
            else:
                echo(f"trial {trial.number} failed: {shown}: {trial.user_attrs.get('fail_reason', trial.state.name)}")
            if sum(_finished(t, states) for t in study.get_trials(deepcopy=False)) >= trials:
                study.stop()  # other machines on the same study may have finished the rest

        before = len(study.get_trials(deepcopy=False))
        if done < trials:
            study.optimize(run_trial, n_trials=trials - done, catch=(MergerError,), callbacks=[report])
        all_trials = study.get_trials(deepcopy=False)
        complete = [t for t in all_trials if t.state == optuna.trial.TrialState.COMPLETE]
        failed = [t for t in all_trials if t.state == optuna.trial.TrialState.FAIL]
        if not complete:
            first = next((t.user_attrs.get("fail_reason") for t in failed if t.user_attrs.get("fail_reason")), None)
            raise SearchError(f"no trial of study {name!r} completed ({len(failed)} failed)"
                              + (f"; the first failure: {first}" if first else ""))
        best = study.best_trial
    finally:
        optuna.logging.set_verbosity(verbosity)
    best_data = apply(raw, dims, best.params, str(space_path))
    header = (f"# merger search: best of {len(complete)} completed trials of study {name!r} (trial {best.number}, "
              f"objective {objective} = {best.value:.6g})\n")
    result = SearchResult(name, best.number, best.value, dict(best.params),
                          header + yaml.safe_dump(best_data, sort_keys=False), len(complete), len(failed),
                          len(all_trials) - before)
    if out is not None:
        with tempfile.TemporaryDirectory(prefix="merger-best-", dir=work) as tmp:
            best_recipe = Path(tmp) / "recipe.yaml"
            best_recipe.write_text(header + yaml.safe_dump(apply(base, dims, best.params, str(space_path)),
                                                           sort_keys=False))
            result.out = build_recipe(load_recipe(best_recipe), out, force=force, seed=random_seed,
                                      options={"progress": False}, label=str(recipe_path), progress=False)
    return result


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if not isinstance(v, str) else v
