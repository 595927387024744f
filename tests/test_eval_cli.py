"""`merger eval` on the command line: the table and the JSON carry the library's numbers, and bad input
(empty or too-short text, vocabularies that differ under --against, a bad option) is one line, exit 1."""
from __future__ import annotations

import json
import shutil

import typer
from typer.testing import CliRunner

from merger import cli, synth
from merger.cli_eval import eval_cmd, search_cmd
from merger.evaluate.report import evaluate
from merger.evaluate.texts import Text, read_text_file

runner = CliRunner()


def cli_app() -> typer.Typer:
    """merger's app once merger/cli.py registers the commands; until then the same registration on a copy."""
    if {"eval", "search"} <= {c.name for c in cli.app.registered_commands}:
        return cli.app
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=cli.OneLineErrors)
    app.command("eval")(cli.user_errors(eval_cmd))
    app.command("search")(cli.user_errors(search_cmd))
    return app


def one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 1, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_json_carries_the_library_numbers(tiny_models, tmp_path):
    text = tmp_path / "my_domain.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 12)
    res = runner.invoke(cli_app(), ["eval", str(tiny_models["ft_a"]), "--against", str(tiny_models["base"]),
                                    str(tiny_models["ft_b"]), "--text", str(text), "--json", "--window", "64"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert [(m["model"], m["role"]) for m in data["models"]] == [(str(tiny_models["ft_a"]), "merged"),
                                                                  (str(tiny_models["base"]), "parent"),
                                                                  (str(tiny_models["ft_b"]), "parent")]
    ref = evaluate([tiny_models["ft_a"], tiny_models["base"], tiny_models["ft_b"]], [read_text_file(text)],
                   against=True, window=64)
    for got, want in zip(data["models"], ref.models):
        assert got["window"] == 64 and got["stride"] == 32
        d, w = got["domains"][0], want.domains[0]
        assert d["domain"] == "my_domain" and d["tokens"] == w.tokens
        assert (d["nll"], d["ppl"], d["kl"], d["agreement"]) == (w.nll, w.ppl, w.kl, w.agreement)
    assert data["models"][0]["domains"][0]["kl"] is None
    assert data["models"][1]["domains"][0]["kl"] > 0


def test_table_lists_every_domain_and_the_window(tiny_models):
    res = runner.invoke(cli_app(), ["eval", str(tiny_models["base"])])   # the built-in texts, whole
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["model", "domain", "tokens", "nll", "ppl"]
    assert [ln.split()[-4] for ln in lines[2:7]] == ["prose", "code", "qa", "math", "(all)"]
    assert lines[-1] == "(window 512, stride 256 tokens)"   # min(context 512, --window 1024)
    assert res.stderr == ""  # no progress bar when stderr is not a terminal


def test_empty_text(tiny_models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    one_line_error(runner.invoke(cli_app(), ["eval", str(tiny_models["base"]), "--text", str(empty)]),
                   "empty.txt", "empty")


def test_text_shorter_than_two_tokens(tiny_models, tmp_path):
    model = tmp_path / "no-bos"
    shutil.copytree(tiny_models["base"], model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    short = tmp_path / "short.txt"
    short.write_text("a")
    one_line_error(runner.invoke(cli_app(), ["eval", str(model), "--text", str(short)]),
                   "'short'", "1 token", "at least two")


def test_different_vocabularies_under_against(tiny_models, tmp_path):
    small = tmp_path / "small-vocab"
    synth.make_llama(small, seed=3, vocab=256)
    one_line_error(runner.invoke(cli_app(), ["eval", str(tiny_models["base"]), "--against", str(small)]),
                   "vocab_size 256", "512", "share a vocabulary")


def test_same_size_but_a_different_tokenizer_under_against(tiny_models, tmp_path):
    other = tmp_path / "other-tok"
    shutil.copytree(tiny_models["ft_a"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]   # two ids swapped: same size, different ids
    (other / "tokenizer.json").write_text(json.dumps(tj))
    one_line_error(runner.invoke(cli_app(), ["eval", str(tiny_models["base"]), "--against", str(other)]),
                   "different tokenizers", "share a tokenizer")


def test_other_bad_input(tiny_models, tmp_path):
    base = str(tiny_models["base"])
    app = cli_app()
    one_line_error(runner.invoke(app, ["eval", base, "--against"]), "--against", "parents")
    one_line_error(runner.invoke(app, ["eval", base, "--text", str(tmp_path / "nope.txt")]), "nope.txt", "not found")
    one_line_error(runner.invoke(app, ["eval", base, "--dtype", "int8"]), "--dtype", "int8")
    one_line_error(runner.invoke(app, ["eval", base, "--window", "1"]), "--window 1")
    one_line_error(runner.invoke(app, ["eval", str(tmp_path)]), "not a model folder")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    one_line_error(runner.invoke(app, ["eval", base, "--text", str(bad)]), "not UTF-8")


def test_two_texts_with_the_same_name_are_labelled_by_path(tiny_models, tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "notes.txt").write_text(f"notes from {d}: the fox walked home.")
    x, y = str(tmp_path / "x" / "notes.txt"), str(tmp_path / "y" / "notes.txt")
    res = runner.invoke(cli_app(), ["eval", str(tiny_models["base"]), "--json", "--text", x, "--text", y])
    assert res.exit_code == 0, res.stderr
    names = [d["domain"] for d in json.loads(res.stdout)["models"][0]["domains"]]
    assert names == [x, y]


def test_library_and_text_objects_agree(tiny_models):
    t = Text("t", "The king said to the people of the town that the harvest would be good.", "test")
    a = evaluate([tiny_models["base"]], [t]).models[0].domains[0]
    b = evaluate([tiny_models["base"]], [t], window=4).models[0].domains[0]
    assert a.tokens == b.tokens and abs(a.nll - b.nll) > 1e-3   # a smaller window: less context, other numbers


def test_help_states_the_window_and_stride():
    res = runner.invoke(cli_app(), ["eval", "--help"], env={"COLUMNS": "200"})
    text = " ".join(res.stdout.split())
    assert "min(the model's context, --window)" in text and "stride = window/2" in text
    assert "each token is scored once" in text


def test_progress_goes_to_stderr_for_long_texts_only(capsys):
    from merger.evaluate.report import ProgressLine

    bar = ProgressLine(enabled=True).start("scoring m on prose")
    bar(10, 20)
    bar(20, 20)
    assert capsys.readouterr().err == ""          # done within ProgressLine.DELAY: never drawn
    bar.start("scoring m on prose").t0 -= 1.0     # a text that has taken a second so far
    bar(10, 20)
    err = capsys.readouterr().err
    assert err.startswith("\r\033[Kscoring m on prose: 10/20 tokens, ") and "\n" not in err
    bar(20, 20)
    assert capsys.readouterr().err == "\r\033[K"  # erased when done: the table follows cleanly
    silent = ProgressLine(enabled=None)            # stderr is not a terminal under pytest: nothing
    silent.start("x").t0 -= 1.0
    silent(1, 2)
    assert capsys.readouterr().err == ""
