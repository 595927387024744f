"""The `merger eval` and `merger search` commands: parse, call merger.evaluate, print. merger/cli.py
registers them wrapped in its `user_errors` (this module does not import merger.cli: no import circle),
so every MergerError raised here is one line on stderr and exit 1."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from merger.cli_engine import device_option, dtype_option
from merger.errors import EvalError, SearchError

WINDOW_HELP = ("Window = min(the model's context, --window) tokens. Longer texts are scored in windows "
               "that start every stride = window/2 tokens: each token is scored once, with at least a "
               "stride of context (the Hugging Face perplexity recipe).")
TextOpt = Annotated[Optional[list[Path]], typer.Option(
    "--text", help="Score this UTF-8 file instead of the built-in texts (prose, code, qa, math); "
                   "repeatable, each file is one domain named after it.")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float32 or bfloat16 (float16 too); default: the checkpoint's.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda[:n].")]


def _texts(paths: list[Path] | None):
    from merger.evaluate.texts import read_text_file, unique_names

    return unique_names([read_text_file(p) for p in paths]) if paths else None


def eval_cmd(
    models: Annotated[list[Path], typer.Argument(
        help="Model folders. With --against, the first is the merge and the others its parents.")],
    against: Annotated[bool, typer.Option(
        "--against", help="Compare the first MODEL with each of the others: KL(parent ‖ merged) of the next-token "
                          "distributions and top-1 agreement (the models must share a vocabulary).")] = False,
    text: TextOpt = None,
    window: Annotated[int, typer.Option(help=WINDOW_HELP)] = 1024,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Score models on text with the bundled engine: tokens, mean negative log-likelihood and perplexity
    per text domain; with --against, how far a merge moved from each parent."""
    from merger.evaluate.report import evaluate

    torch_dtype, device = dtype_option(dtype, EvalError), device_option(device, EvalError)
    report = evaluate(models, _texts(text), against=against, dtype=torch_dtype, device=device, window=window,
                      progress=False if quiet else None)
    typer.echo(report.to_json() if as_json else report.format_table())


def search_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML whose parameters are searched.")],
    space: Annotated[Path, typer.Option(
        "--space", help="YAML: recipe path -> [low, high] (a float range), a list of choices, or {low, high, "
                        "log, step, type} / {choices: [...]}, e.g. `models[1].parameters.weight: [0, 1]`.")],
    trials: Annotated[int, typer.Option(
        help="Finished trials the study should have (a resumed study runs the rest).")] = 40,
    text: TextOpt = None,
    objective: Annotated[str, typer.Option(
        help="What to minimise: ppl or nll on the texts, kl:PARENT_DIR (mean KL(parent ‖ merge)), or a "
             "weighted sum such as 0.7*nll+0.3*kl:./ft-a.")] = "ppl",
    storage: Annotated[Optional[str], typer.Option(
        help="Optuna storage URL (sqlite:///study.db, postgresql://host/db): resumes the study without "
             "redoing finished trials; several machines with the same URL and --study share it.")] = None,
    study: Annotated[Optional[str], typer.Option(
        help="Study name in --storage (default: RECIPE's name + -search).")] = None,
    sampler: Annotated[str, typer.Option(help="tpe (default), cmaes or random.")] = "tpe",
    seed: Annotated[int, typer.Option(help="Sampler seed (give each machine sharing a study its own).")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Build the best recipe into this folder at the end.")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --out: replace it if it exists.")] = False,
    save_recipe: Annotated[Optional[Path], typer.Option(
        "--save-recipe", help="Also write the best recipe to this file (it is always printed on stdout).")] = None,
    window: Annotated[int, typer.Option(help=WINDOW_HELP)] = 1024,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    random_seed: Annotated[int, typer.Option(
        help="Seed of random merge methods (dare, della), the same for every trial.")] = 0,
    work_dir: Annotated[Optional[Path], typer.Option(
        help="Where trial builds go (default: the system temp folder).")] = None,
) -> None:
    """Search a recipe's parameters with optuna (needs merger[search]): build each trial into a temp
    folder, score it like `merger eval`, print the best recipe; a trial whose build fails is recorded as
    failed and the search goes on."""
    from merger.evaluate.search import need_optuna
    from merger.evaluate.search import search

    need_optuna()
    torch_dtype, device = dtype_option(dtype, SearchError), device_option(device, SearchError)
    if save_recipe is not None and save_recipe.exists() and not save_recipe.is_file():
        raise SearchError(f"--save-recipe {save_recipe}: exists and is not a file; give a file name")
    echo = lambda m: typer.echo(m, err=True)  # noqa: E731
    res = search(recipe, space, trials=trials, texts=_texts(text), objective=objective, storage=storage,
                 study_name=study, sampler=sampler, seed=seed, out=out, force=force, dtype=torch_dtype,
                 device=device, window=window, random_seed=random_seed, work_dir=work_dir, echo=echo)
    if save_recipe is not None:
        save_recipe.write_text(res.recipe_yaml, encoding="utf-8")
    shown = ", ".join(f"{k}={v}" for k, v in res.best_params.items())
    echo(f"best: trial {res.best_trial} of study {res.study!r} ({res.complete} completed, {res.failed} failed, "
         f"{res.ran} run now): {shown} -> {objective} {res.best_value:.6g}"
         + (f"; built {res.out}" if res.out else ""))
    sys.stdout.write(res.recipe_yaml)
