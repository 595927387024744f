"""Routing pictures (`merger route --plot / --html`, merger.moe.plot): the PNG's pixel size and what
its token map shows, the HTML's numbers, and the one-line error when matplotlib is missing."""
from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from merger.cli import app
from merger.errors import MergerError
from merger.moe.plot import PALETTE, PLOT_INSTALL, figure_pixels, html_report, plot_report, require_matplotlib
from merger.moe.route import route_report
from test_moe import CODE, MATH, STORY, build, expert, moe

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason=PLOT_INSTALL)
PROMPTS = ["def add(a, b):\n    return a + b", "Once upon a time there was a little fox"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models):
    m = tiny_models
    out = build(tmp_path_factory.mktemp("plot"), moe(m["base"], expert(m["ft_a"], CODE), expert(m["ft_b"], STORY),
                                                     expert(m["ft_c"], MATH), gate_mode="calibrated"))
    return out, route_report(out, PROMPTS)


def read_png(path):
    from PIL import Image

    with Image.open(path) as im:
        raw = im.convert("RGB").tobytes()
    return im.size, [tuple(raw[k:k + 3]) for k in range(0, len(raw), 3)]


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[k:k + 2], 16) for k in (1, 3, 5))


@needs_matplotlib
def test_png_size_and_token_map(built, tmp_path):
    _, report = built
    path = plot_report(report, tmp_path / "routing.png")
    size, pixels = read_png(path)
    # 2 heatmaps of 230 px + a token map of max(300, 18 px per token) + 160; per prompt 40 + 140 + 9 px
    # per layer (4), + 60 for the legend
    assert size == figure_pixels(report) == (2 * 230 + 300 + 160, 60 + 2 * (40 + 140 + 9 * 4))
    counts = Counter(pixels)
    white = counts[(255, 255, 255)]
    assert 0.2 < 1 - white / len(pixels) < 0.9  # drawn on, not a solid block
    # the token maps paint each (layer, token) cell in its top-1 expert's colour: the expert picked
    # first most often owns the most pixels, the one picked least the fewest (the legend adds a
    # same-size patch to each)
    cells = Counter(e for p in report.prompts for lr in p.layers for e in lr.top1)
    area = {e: counts[hex_rgb(PALETTE[e])] for e in range(len(report.experts))}
    assert sorted(area, key=area.get) == sorted(cells, key=cells.get) and min(area.values()) > 0


@needs_matplotlib
def test_cli_writes_png_and_html(built, tmp_path):
    out, report = built
    png, page = tmp_path / "r.png", tmp_path / "r.html"
    res = CliRunner().invoke(app, ["route", str(out), *PROMPTS, "--plot", str(png), "--html", str(page)])
    assert res.exit_code == 0, res.stderr
    assert read_png(png)[0] == figure_pixels(report)
    assert page.read_text() == html_report(report, title=f"routing of {out.name}")


def test_missing_matplotlib_is_one_line_naming_the_extra(built, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MergerError) as err:
        require_matplotlib()
    assert str(err.value) == ("--plot needs matplotlib, which is not installed: pip install 'merger[plot]' "
                              "(or write --html, which needs nothing)")
    res = CliRunner().invoke(app, ["route", str(built[0]), "x", "--plot", str(tmp_path / "r.png")])
    assert res.exit_code == 1 and res.stderr.strip() == f"error: {err.value}"
    assert not (tmp_path / "r.png").exists()


class Cells(HTMLParser):
    """Text of every <td>, and the tokens' <span class="tok"> texts, in document order."""

    def __init__(self):
        super().__init__()
        self.cells, self.tokens, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "td" or (tag == "span" and ("class", "tok") in attrs):
            self._in = tag
            (self.cells if tag == "td" else self.tokens).append("")

    def handle_endtag(self, tag):
        self._in = None if tag == self._in else self._in

    def handle_data(self, data):
        if self._in:
            (self.cells if self._in == "td" else self.tokens)[-1] += data


def test_html_tables_carry_the_report_numbers(built):
    _, report = built
    parser = Cells()
    parser.feed(html_report(report))
    n_exp = len(report.experts)
    want_cells, want_tokens = [], []
    for p in report.prompts:
        want_tokens += p.pieces
        for lr in p.layers:
            dense = dict(zip(lr.experts, lr.weights))
            want_cells += [f"{dense.get(e, 0.0):.2f}" if dense.get(e, 0.0) >= 0.005 else "" for e in range(n_exp)]
        want_cells += [f"{s:.2f}" if s >= 0.005 else "" for lr in p.layers for s in lr.share]
    assert parser.cells == want_cells
    # the legend's expert chips come first, then every token of every prompt, in order
    assert parser.tokens == [f"e{j}" for j in range(n_exp)] + want_tokens
    assert "".join(report.prompts[1].pieces[1:]) == PROMPTS[1]
    assert re.search(r"layer 0: e\d", html_report(report))
