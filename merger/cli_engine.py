"""The engine's commands, `merger generate` and `merger route`: parse, call merger.engine / merger.moe.route,
print. merger/cli.py registers them wrapped in its `user_errors` (this module does not import merger.cli),
so every MergerError raised here is one line on stderr and exit 1."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from merger.errors import MergerError


def dtype_option(name: str | None, error: type[Exception] = MergerError):
    """--dtype as a torch dtype (None: the checkpoint's), or one `error` line."""
    from merger.io.dtypes import parse_dtype

    try:
        return parse_dtype(name) if name else None
    except ValueError as e:
        raise error(f"--dtype: {e}") from None


def device_option(device: str, error: type[Exception] = MergerError) -> str:
    """--device checked (cpu or cuda[:n]), or one `error` line."""
    if device != "cpu" and not device.startswith("cuda"):
        raise error(f"--device: unknown device {device!r}; use cpu or cuda")
    return device


def generate_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model folder: config.json, safetensors, tokenizer.json.")],
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens; 0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling probability mass; 1 = off.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line instead of streaming.")] = False,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16; default: the checkpoint's.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Generate text with the bundled engine (the families README's "Inference engine" lists: Llama, Mistral,
    Mixtral, Qwen2/3 and their MoEs, Gemma 2/3, Phi-3)."""
    from merger.engine.generate import generate as run_generation
    from merger.engine.model import load_model
    from merger.engine.sampling import check_params
    from merger.engine.tokenizer import check_text, load_tokenizer

    torch_dtype, device = dtype_option(dtype), device_option(device)
    check_params(temperature, top_k, top_p, max_new_tokens, seed)  # before a large model loads
    check_text(prompt, "prompt")
    model, tok = load_model(model_dir, torch_dtype, device), load_tokenizer(model_dir)
    stream = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    res = run_generation(model, tok, prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, stream)
    if as_json:
        typer.echo(json.dumps(res.to_dict()))
        return
    typer.echo("")
    typer.echo(f"{len(res.token_ids)} tokens after a {res.prompt_tokens}-token prompt: prefill "
               f"{res.prefill_s:.2f}s, decode {res.decode_tokens_per_s:.1f} tokens/s", err=True)


def route_cmd(
    model_dir: Annotated[Path, typer.Argument(help="An MoE folder (Mixtral, Qwen2-MoE or Qwen3-MoE layout).")],
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts to route.")],
    dtype: Annotated[Optional[str], typer.Option(help="Run in this dtype (default: the checkpoint's).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda[:n].")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the routing into this PNG (.svg, .pdf): "
                                                               "heatmaps per prompt; needs merger[plot].")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Also write the routing as one HTML page.")] = None,
) -> None:
    """Show which experts each layer routes each prompt to, and with what weight."""
    from merger.moe.route import format_report, route_report

    torch_dtype, device = dtype_option(dtype), device_option(device)
    if plot:
        from merger.moe.plot import require_matplotlib

        require_matplotlib()  # before the model loads: a missing extra fails at once
    report = route_report(model_dir, prompts, dtype=torch_dtype, device=device)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    title = f"routing of {model_dir.resolve().name}"
    if plot:
        from merger.moe.plot import plot_report

        typer.echo(f"wrote {plot_report(report, plot, title=title)}", err=True)
    if html:
        from merger.moe.plot import write_html

        typer.echo(f"wrote {write_html(report, html, title=title)}", err=True)
