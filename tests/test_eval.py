"""`merger eval`'s scoring against independent references: transformers' own loss and logits on the same
token ids (per window for strided texts), KL and agreement recomputed from transformers' distributions,
the window layout, and invariants (a model against itself, a planted model against a perturbed copy)."""
from __future__ import annotations

import math

import pytest
import torch

from merger import synth
from merger.engine.model import load_model
from merger.engine.tokenizer import load_tokenizer
from merger.evaluate.planted import make_planted_llama
from merger.evaluate.report import evaluate
from merger.evaluate.score import LogProbs, score, stride_of, token_logprobs, windows
from merger.evaluate.texts import DOMAINS, Text, builtin_texts

transformers = pytest.importorskip("transformers")

PLANTED = " ".join(["Once upon a time the little fox walked home."] * 6)


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_window_logprobs(model, ids: list[int], window: int) -> torch.Tensor:
    """log p(ids[t]) for t = 1..n-1, recomputed the HF perplexity guide's way: each window a fresh forward of
    ids[begin:end], scoring only the targets past the previous window's end."""
    out, prev = [], 1
    for begin in range(0, len(ids), stride_of(window)):
        end = min(begin + window, len(ids))
        x = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0].float(), -1)          # [end-begin, V]
        for t in range(max(prev, 1), end):
            out.append(logp[t - 1 - begin, ids[t]])
        prev = end
        if end == len(ids):
            break
    return torch.stack(out)


@pytest.mark.parametrize("n,window", [(2, 8), (9, 8), (10, 4), (57, 16), (64, 16), (100, 7), (5, 2)])
def test_windows_score_each_token_once_with_a_stride_of_context(n, window):
    ws = windows(n, window)
    targets = [t for w in ws for t in range(w.first, w.end)]
    assert targets == list(range(1, n))
    stride = stride_of(window)
    for k, w in enumerate(ws):
        assert w.end - w.begin <= window and w.begin <= w.first - 1
        if k:  # past the first window every scored token sees at least a stride of context
            assert w.first - w.begin >= stride


def test_nll_equals_transformers_loss(tiny_models):
    path = tiny_models["ft_a"]
    text = builtin_texts(["prose"])[0].text[:600]
    ids = load_tokenizer(path).encode(text)
    assert 100 < len(ids) <= 512
    with torch.no_grad():
        loss = hf_model(path)(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    report = evaluate([path], [Text("prose", text, "test")], dtype=torch.float32, window=512)
    d = report.models[0].domains[0]
    assert d.tokens == len(ids) - 1
    assert abs(d.nll - loss) <= 1e-4 * loss
    assert d.ppl == pytest.approx(math.exp(loss), rel=1e-4)


@pytest.mark.parametrize("window", [32, 33, 512])
def test_strided_windows_equal_a_per_window_recomputation(tiny_models, window):
    path = tiny_models["base"]
    ids = load_tokenizer(path).encode(builtin_texts(["code"])[0].text[:900])
    assert len(ids) > 4 * window or window == 512
    ours = token_logprobs(load_model(path, torch.float32), ids, window)
    ref = hf_window_logprobs(hf_model(path), ids, window)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_a_model_against_itself_has_kl_zero_and_agreement_one(tiny_models):
    p = tiny_models["ft_b"]
    texts = [Text(t.name, t.text[:300], t.source) for t in builtin_texts()]
    report = evaluate([p, p], texts, against=True, window=48)
    merged, parent = report.models
    assert [m.role for m in report.models] == ["merged", "parent"]
    for dm, dp in zip(merged.domains, parent.domains):
        assert dp.kl == 0.0 and dp.agreement == 1.0
        assert dm.nll == dp.nll and dm.tokens == dp.tokens > 50
    assert [d.domain for d in merged.domains] == list(DOMAINS)
    assert parent.total.kl == 0.0 and parent.total.tokens == sum(d.tokens for d in parent.domains)


def test_kl_and_agreement_match_transformers_distributions(tiny_models):
    merged, parent = tiny_models["ft_a"], tiny_models["base"]
    text = builtin_texts(["qa"])[0].text[:500]
    window = 64
    report = evaluate([merged, parent], [Text("qa", text, "test")], against=True, window=window)
    ids = load_tokenizer(merged).encode(text)
    hm, hp = hf_model(merged), hf_model(parent)
    kl, agree, n, prev = 0.0, 0, 0, 1
    for begin in range(0, len(ids), stride_of(window)):   # recomputed window by window
        end = min(begin + window, len(ids))
        x = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            lq = torch.log_softmax(hm(x).logits[0].double(), -1)
            lp = torch.log_softmax(hp(x).logits[0].double(), -1)
        rows = slice(max(prev, 1) - 1 - begin, end - 1 - begin)
        kl += float((lp[rows].exp() * (lp[rows] - lq[rows])).sum())
        agree += int((lp[rows].argmax(-1) == lq[rows].argmax(-1)).sum())
        n += lp[rows].shape[0]
        prev = end
        if end == len(ids):
            break
    d = report.models[1].domains[0]
    assert d.tokens == n == len(ids) - 1
    assert d.kl == pytest.approx(kl / n, rel=1e-3) and d.kl > 0.01
    assert d.agreement == pytest.approx(agree / n, abs=1.5 / n) and 0 < d.agreement < 1


def test_a_planted_model_beats_a_perturbed_copy(tmp_path):
    weights = make_planted_llama(tmp_path / "planted", PLANTED, scale=8.0)
    synth.write_checkpoint(tmp_path / "perturbed", synth.llama_config(), synth.perturb(weights, 7, 1.0))
    synth.make_llama(tmp_path / "random", seed=7)
    report = evaluate([tmp_path / "planted", tmp_path / "perturbed", tmp_path / "random"],
                      [Text("fox", PLANTED, "test")], window=64)
    planted, perturbed, random = (m.domains[0] for m in report.models)
    assert planted.ppl < 1.25 < 2.0 < perturbed.ppl < 100 < random.ppl  # the text it was made to predict


def test_bfloat16_scores_close_to_float32(tiny_models):
    path = tiny_models["base"]
    text = [Text("math", builtin_texts(["math"])[0].text[:500], "test")]
    f32 = evaluate([path], text, dtype=torch.float32, window=64).models[0].domains[0]
    bf16 = evaluate([path], text, dtype=torch.bfloat16, window=64).models[0].domains[0]
    assert bf16.tokens == f32.tokens
    assert bf16.nll == pytest.approx(f32.nll, rel=2e-2) and bf16.nll != f32.nll


def test_a_kept_stream_does_not_run_the_model_again(tiny_models):
    model = load_model(tiny_models["base"], torch.float32)
    ids = load_tokenizer(tiny_models["base"]).encode(builtin_texts(["prose"])[0].text[:400])
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    kept, rerun = LogProbs(model, ids, 32), LogProbs(model, ids, 32, cache_bytes=0)
    first = score(ids, kept)
    n = len(calls)
    assert score(ids, kept) == first and len(calls) == n
    assert score(ids, rerun) == first and len(calls) == 2 * n


def test_demo_table_scores_the_inputs_and_the_merges(tmp_path):
    import shutil
    from pathlib import Path

    from merger.demo import run_demo
    from merger.evaluate.report import demo_table

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(Path(__file__).parent.parent / "recipes" / "linear.yaml", recipes / "linear.yaml")
    root = tmp_path / "demo"
    outs = run_demo(root, recipes=recipes, echo=lambda m: None)
    table = demo_table(root, outs, max_chars=500)
    lines = table.splitlines()
    assert lines[0].split() == ["model", "ppl", "prose", "ppl", "code", "ppl", "qa", "ppl", "math", "ppl", "(all)"]
    assert [ln.split()[0] for ln in lines[2:-1]] == ["models/base", "models/ft-a", "models/ft-b", "models/ft-c",
                                                      "out/linear"]
    texts = [Text(t.name, t.text[:500], t.source) for t in builtin_texts()]
    ref = evaluate([root / "out" / "linear"], texts, window=256).models[0]
    assert lines[-2].split()[1:] == [f"{d.ppl:.2f}" for d in ref.domains + [ref.total]]
    assert "merger eval MODEL --against PARENTS" in lines[-1]


def test_builtin_texts_ship_with_the_package():
    import tomllib
    from pathlib import Path

    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "data/*.txt" in project["tool"]["setuptools"]["package-data"]["merger.evaluate"]
    assert any(r.startswith("optuna") for r in project["project"]["optional-dependencies"]["search"])
    texts = builtin_texts()
    assert [t.name for t in texts] == ["prose", "code", "qa", "math"]
    sizes = [len(t.text.encode()) for t in texts]
    assert all(4000 < s < 20000 for s in sizes) and 20000 < sum(sizes) < 60000
    sources = (root / "merger" / "evaluate" / "data" / "SOURCES.md").read_text()
    assert all(f"| {t.name} | {DOMAINS[t.name][0]} |" in sources for t in texts)
