"""Routing pictures for `merger route --plot / --html`, drawn from a RouteReport (merger.moe.route):
per prompt, a layers × experts heatmap of the routing weight at the last token, the same for each
expert's load (its share of the routing weight over all the prompt's tokens), and a layers × tokens
map of each token's top-1 expert. PNG/SVG/PDF via matplotlib (the optional extra merger[plot]);
HTML is self-contained and needs nothing."""
from __future__ import annotations

import html
from pathlib import Path

from merger.errors import MergerError
from merger.moe.route import PromptRoute, RouteReport

PLOT_INSTALL = "pip install 'merger[plot]'"
DPI = 100
# matplotlib's tab10: distinct colours for up to 10 experts (more cycle through them)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
HEAT_PX, ROW_TITLE_PX, LEGEND_PX, TOKEN_PX = 230, 40, 60, 18


def require_matplotlib() -> None:
    """MergerError naming the extra when matplotlib is missing; call it before any slow work."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise MergerError(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL} "
                          "(or write --html, which needs nothing)")


def last_token_weights(p: PromptRoute, n_experts: int) -> list[list[float]]:
    """[layer][expert]: the routing weight at the prompt's last token (0 for experts not picked)."""
    rows = []
    for lr in p.layers:
        row = [0.0] * n_experts
        for e, w in zip(lr.experts, lr.weights):
            row[e] = w
        rows.append(row)
    return rows


def shown_tokens(p: PromptRoute, max_tokens: int) -> int:
    return min(p.tokens, max_tokens)


def figure_pixels(report: RouteReport, max_tokens: int = 64) -> tuple[int, int]:
    """(width, height) in pixels of plot_report's picture: one band per prompt, its height set by the
    layer count, its width by the widest token map; fixed so a test can check the file."""
    tokens = max(shown_tokens(p, max_tokens) for p in report.prompts)
    width = 2 * HEAT_PX + max(300, TOKEN_PX * tokens) + 160
    layers = max(len(p.layers) for p in report.prompts)
    band = ROW_TITLE_PX + 140 + 9 * layers
    return width, LEGEND_PX + band * len(report.prompts)


def _piece(text: str, n: int = 8) -> str:
    text = text.replace("\n", "\u23ce").replace("\t", "\u21e5")
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def _label(name: str, n: int = 28) -> str:
    name = Path(name).name or name
    return name if len(name) <= n else name[:n - 1] + "\u2026"


def plot_report(report: RouteReport, path: str | Path, title: str | None = None, max_tokens: int = 64) -> Path:
    """Draw the report into `path` (PNG, or SVG/PDF by its suffix) and return the path.

    Without pyplot: a Figure with its own Agg canvas touches no global matplotlib state."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n_exp = len(report.experts)
    colours = [PALETTE[j % len(PALETTE)] for j in range(n_exp)]
    w_px, h_px = figure_pixels(report, max_tokens)
    fig = Figure(figsize=(w_px / DPI, h_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.legend(handles=[Patch(color=c, label=f"e{j} {_label(name)}") for j, (c, name) in
                        enumerate(zip(colours, report.experts))], loc="outside upper center",
               ncol=min(n_exp, 5), fontsize=8, frameon=False,
               title=title or f"routing, top-{report.top_k} of {n_exp} experts", title_fontsize=10)
    bands = fig.subfigures(len(report.prompts), 1, squeeze=False)[:, 0]
    for band, p in zip(bands, report.prompts):
        t = shown_tokens(p, max_tokens)
        axes = band.subplots(1, 3, width_ratios=[1, 1, max(300, TOKEN_PX * t) / HEAT_PX])
        band.suptitle(f"{_piece(p.prompt, 80)!s}  ({p.tokens} tokens)", fontsize=9, x=0.01, ha="left")
        layer_ids = [lr.layer for lr in p.layers]
        stride = max(1, len(layer_ids) // 8)
        heat = {"cmap": "Blues", "vmin": 0.0, "vmax": 1.0, "aspect": "auto", "interpolation": "nearest"}
        for ax, data, name in ((axes[0], last_token_weights(p, n_exp), "weight at the last token"),
                               (axes[1], [lr.share for lr in p.layers], "load: share over all tokens")):
            im = ax.imshow(data, **heat)
            ax.set_title(name, fontsize=8)
            ax.set_xticks(range(n_exp), [f"e{j}" for j in range(n_exp)], fontsize=7)
        for ax in axes:
            ax.set_yticks(range(0, len(layer_ids), stride), [str(i) for i in layer_ids[::stride]], fontsize=7)
        axes[0].set_ylabel("layer", fontsize=8)
        band.colorbar(im, ax=axes[:2], shrink=0.8, pad=0.02).ax.tick_params(labelsize=7)
        top = [lr.top1[:t] for lr in p.layers]
        cmap = ListedColormap(colours)
        axes[2].imshow(top, cmap=cmap, norm=BoundaryNorm([j - 0.5 for j in range(n_exp + 1)], n_exp),
                       aspect="auto", interpolation="nearest")
        axes[2].set_title("top-1 expert per token" + (f" (first {t})" if t < p.tokens else ""), fontsize=8)
        axes[2].set_xticks(range(t), [_piece(s) for s in p.pieces[:t]], rotation=90, fontsize=7)
    path = Path(path)
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as e:
        raise MergerError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def _heat_table(data: list[list[float]], layers: list[int], n_exp: int) -> str:
    head = "".join(f"<th>e{j}</th>" for j in range(n_exp))
    rows = []
    for i, row in zip(layers, data):
        cells = "".join(f'<td style="background:rgba(31,119,180,{w:.3f});color:{"#fff" if w > 0.6 else "#000"}">'
                        f'{w:.2f}</td>' if w >= 0.005 else "<td></td>" for w in row)
        rows.append(f"<tr><th>{i}</th>{cells}</tr>")
    return f"<table><tr><th>layer</th>{head}</tr>{''.join(rows)}</table>"


def html_report(report: RouteReport, title: str | None = None) -> str:
    """The report as one self-contained HTML page: per prompt the two heatmaps as tables, and its
    tokens coloured by the expert most layers pick first (hover: every layer's pick)."""
    n_exp = len(report.experts)
    colours = [PALETTE[j % len(PALETTE)] for j in range(n_exp)]
    title = title or f"routing, top-{report.top_k} of {n_exp} experts"
    legend = " ".join(f'<span class="tok" style="background:{c}">e{j}</span> {html.escape(str(name))}'
                      for j, (c, name) in enumerate(zip(colours, report.experts)))
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>\n"
             "<style>body{font:14px sans-serif;margin:2em} table{border-collapse:collapse;font:11px monospace;"
             "margin-right:2em} td,th{padding:1px 4px;border:1px solid #eee;text-align:center} "
             ".row{display:flex;align-items:flex-start} .tok{color:#fff;border-radius:3px;padding:1px 2px;"
             "margin:1px;white-space:pre;font-family:monospace;line-height:1.9}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{legend}</p>"]
    for p in report.prompts:
        layers = [lr.layer for lr in p.layers]
        spans = []
        for k, piece in enumerate(p.pieces):
            picks = [lr.top1[k] for lr in p.layers]
            best = max(range(n_exp), key=lambda e: (picks.count(e), -e))
            hover = "; ".join(f"layer {i}: e{e}" for i, e in zip(layers, picks))
            spans.append(f'<span class="tok" style="background:{colours[best]}" title="{html.escape(hover)}">'
                         f"{html.escape(piece)}</span>")
        parts += [f"<h2>{html.escape(_piece(p.prompt, 80))} <small>({p.tokens} tokens)</small></h2>",
                  f"<p>{''.join(spans)}</p>",
                  "<div class='row'><div><h3>weight at the last token</h3>"
                  f"{_heat_table(last_token_weights(p, n_exp), layers, n_exp)}</div>"
                  "<div><h3>load: share over all tokens</h3>"
                  f"{_heat_table([lr.share for lr in p.layers], layers, n_exp)}</div></div>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(report: RouteReport, path: str | Path, title: str | None = None) -> Path:
    path = Path(path)
    try:
        path.write_text(html_report(report, title), encoding="utf-8")
    except OSError as e:
        raise MergerError(f"cannot write {path}: {e.strerror or e}") from None
    return path
