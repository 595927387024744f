"""Vocabularies: `tokenizer_source` (base, a model, union), the `tokenizer:` block and `chat_template`.
Every aligned embedding row is recomputed here from the input tensors and the token strings; the
outputs load in transformers, whose tokenizer maps the added tokens to the rows built for them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close
from typer.testing import CliRunner

from merger import synth
from merger.cli import app

from cli_checks import assert_one_line_error
from vocab_models import ROWS, token_ids, variant

runner = CliRunner()


@pytest.fixture(scope="module")
def vm(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """base (512 tokens); chatml (+2 special tokens); other (ids shuffled, + a regular token only it has);
    perm (base with its ids shuffled: the same function); padded (8 rows past its tokenizer)."""
    root = tmp_path_factory.mktemp("vocab")
    m = {"base": tiny_models["base"]}
    m["chatml"] = variant(tiny_models["ft_a"], root / "chatml", added=("<|im_start|>", "<|im_end|>"), seed=1)
    m["other"] = variant(tiny_models["ft_b"], root / "other", regular=("zzqx",), permute=7, seed=2)
    m["perm"] = variant(tiny_models["base"], root / "perm", permute=3, seed=3)
    m["padded"] = variant(tiny_models["ft_c"], root / "padded", pad_rows=8, seed=4)
    return m


def build(tmp_path: Path, recipe: dict, name: str = "out") -> tuple[Path, str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = runner.invoke(app, ["build", str(path), str(tmp_path / name), "-q"])
    assert res.exit_code == 0, res.output
    return tmp_path / name, res.stderr


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def linear(models: list[Path], weights_: list[float], **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": w}}
                                                 for m, w in zip(models, weights_)], **extra}


def expected_rows(out_ids: dict[str, int], rows: int, inputs: list[Path], base: Path | None, name: str,
                  force: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each input's rows in the output order, recomputed from the rule: own row, else the base's, else
    the only model's, else the mean of those that have it, else zero; `force` rows replace every input's."""
    tensors = [weights(p)[name] for p in inputs]
    vocabs = [token_ids(p) for p in inputs]
    base_i = inputs.index(base) if base in inputs else None
    out = []
    for k, (t, v) in enumerate(zip(tensors, vocabs)):
        a = torch.zeros((rows, t.shape[1]))
        for tok, j in out_ids.items():
            if force and tok in force:
                a[j] = force[tok]
            elif tok in v and v[tok] < t.shape[0]:
                a[j] = t[v[tok]]
            elif base_i is not None and tok in vocabs[base_i]:
                a[j] = tensors[base_i][vocabs[base_i][tok]]
            else:
                have = [tensors[i][vocabs[i][tok]] for i in range(len(inputs)) if tok in vocabs[i]]
                a[j] = torch.stack(have).mean(0) if have else 0
        out.append(a)
    return out


def test_a_permuted_copy_merges_back_into_the_original(tmp_path, vm):
    """union of a model and a copy of itself with shuffled ids: every output tensor equals the original's."""
    out, _ = build(tmp_path, linear([vm["base"], vm["perm"]], [0.5, 0.5], tokenizer_source="union"))
    got, ref = weights(out), weights(vm["base"])
    assert set(got) == set(ref)
    for name in ref:
        assert_close(got[name], ref[name], atol=1e-6, rtol=1e-6)
    assert token_ids(out) == token_ids(vm["base"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 512


def test_union_rows_equal_the_recomputed_alignment(tmp_path, vm):
    models = [vm["base"], vm["chatml"], vm["other"]]
    w = [0.5, 0.3, 0.2]
    out, err = build(tmp_path, linear(models, w, base_model=str(vm["base"]), tokenizer_source="union"))
    ids = token_ids(out)
    base_ids = token_ids(vm["base"])
    # the base's tokens keep their ids; then the regular token only `other` has; then the added ones
    assert all(ids[t] == i for t, i in base_ids.items())
    assert [t for t, _ in sorted(ids.items(), key=lambda kv: kv[1])][512:] == ["zzqx", "<|im_start|>", "<|im_end|>"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 515
    got = weights(out)
    for name in ROWS:
        rows = expected_rows(ids, 515, models, vm["base"], name)
        want = sum(wi * r for wi, r in zip(w, rows)) / sum(w)
        assert got[name].shape == (515, 64)
        assert_close(got[name], want, atol=1e-6, rtol=1e-6)
    # every other tensor is the plain linear merge
    inputs = [weights(p) for p in models]
    name = "model.layers.2.mlp.down_proj.weight"
    assert_close(got[name], sum(wi * t[name] for wi, t in zip(w, inputs)) / sum(w), atol=1e-6, rtol=1e-6)


def test_transformers_loads_the_union_and_encodes_added_tokens_to_their_rows(tmp_path, vm):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    models = [vm["base"], vm["chatml"]]
    out, _ = build(tmp_path, linear(models, [0.6, 0.4], tokenizer_source="union", chat_template="chatml"))
    tok = AutoTokenizer.from_pretrained(out)
    ids = token_ids(out)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [ids["<|im_start|>"], ids["<|im_end|>"]]
    enc = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert enc[0] == ids["<|im_start|>"] and enc[-1] == ids["<|im_end|>"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # the reference: the same config, its weights recomputed here from the inputs
    inputs = [weights(p) for p in models]
    state = {n: (0.6 * inputs[0][n] + 0.4 * inputs[1][n]) for n in inputs[0] if n not in ROWS}
    for name in ROWS:
        rows = expected_rows(ids, 514, models, None, name)
        state[name] = 0.6 * rows[0] + 0.4 * rows[1]
    ref = LlamaForCausalLM(LlamaConfig(**{**json.loads((out / "config.json").read_text())}))
    ref.load_state_dict(state, strict=False)
    x = torch.tensor([enc])
    with torch.no_grad():
        assert_close(model(x).logits, ref.float()(x).logits, atol=1e-5, rtol=1e-5)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokens_block_sources_force_and_padding(tmp_path, vm):
    models = [vm["base"], vm["chatml"]]
    r = {"merge_method": "linear", "base_model": str(vm["base"]),
         "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, [0.5, 0.5])],
         "tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": {
             "<|im_start|>": {"source": str(vm["chatml"]), "force": True},
             "<|im_end|>": {"source": {"kind": "model_token", "model": str(vm["base"]), "token": "</s>"}},
             "<new_tok>": {"source": {"kind": "zero"}}}}}
    out, _ = build(tmp_path, r)
    ids = token_ids(out)
    cfg = json.loads((out / "config.json").read_text())
    assert len(ids) == 515 and cfg["vocab_size"] == 576 and ids["<new_tok>"] == 514
    got = weights(out)["model.embed_tokens.weight"]
    base_w, chat_w = weights(vm["base"])["model.embed_tokens.weight"], weights(vm["chatml"])["model.embed_tokens.weight"]
    chat_ids = token_ids(vm["chatml"])
    assert got.shape == (576, 64) and torch.count_nonzero(got[515:]) == 0  # padding rows are zero
    # forced: both inputs take chatml's row, so the merge is that row
    assert_close(got[ids["<|im_start|>"]], chat_w[chat_ids["<|im_start|>"]])
    # not forced: chatml keeps its own row, the base gets its </s> row
    assert_close(got[ids["<|im_end|>"]], 0.5 * chat_w[chat_ids["<|im_end|>"]] + 0.5 * base_w[2])
    assert torch.count_nonzero(got[ids["<new_tok>"]]) == 0
    assert_close(got[5], 0.5 * base_w[5] + 0.5 * chat_w[5])


def test_base_source_aligns_reordered_inputs(tmp_path, vm):
    """tokenizer_source: base keeps the base's vocabulary; an input with shuffled ids is aligned to it."""
    out, _ = build(tmp_path, linear([vm["base"], vm["other"]], [0.5, 0.5], base_model=str(vm["base"]),
                                    tokenizer_source="base"))
    ids = token_ids(out)
    assert ids == token_ids(vm["base"]) and json.loads((out / "config.json").read_text())["vocab_size"] == 512
    for name in ROWS:
        rows = expected_rows(ids, 512, [vm["base"], vm["other"]], vm["base"], name)
        assert_close(weights(out)[name], 0.5 * rows[0] + 0.5 * rows[1], atol=1e-6, rtol=1e-6)


def test_padding_rows_are_not_carried_and_say_so(tmp_path, vm):
    out, err = build(tmp_path, linear([vm["base"], vm["padded"]], [0.5, 0.5], tokenizer_source="union"))
    assert "520 embedding rows for 512 tokens" in err and "padding" in err
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 512
    rows = expected_rows(token_ids(out), 512, [vm["base"], vm["padded"]], None, "lm_head.weight")
    assert_close(weights(out)["lm_head.weight"], 0.5 * rows[0] + 0.5 * rows[1], atol=1e-6, rtol=1e-6)


def test_tokens_past_vocab_size_are_left_out_with_a_warning(tmp_path, vm):
    short = variant(vm["base"], tmp_path / "short", added=("<a>", "<b>"), past_rows=1, seed=9)
    out, err = build(tmp_path, linear([vm["base"], short], [0.5, 0.5], tokenizer_source="union"))
    assert "'<b>'" in err and "past its vocab_size 513" in err
    ids = token_ids(out)
    assert "<a>" in ids and "<b>" not in ids


def test_tied_embeddings_align_the_embedding_only(tmp_path, tiny_models):
    base = synth.make_llama(tmp_path / "tb", seed=0, tie=True)
    synth.make_llama(tmp_path / "ta", seed=1, base=base, tie=True)
    chat = variant(tmp_path / "ta", tmp_path / "tc", added=("<|x|>",), seed=5)
    out, _ = build(tmp_path, linear([tmp_path / "tb", chat], [0.5, 0.5], tokenizer_source="union"))
    got = weights(out)
    assert "lm_head.weight" not in got and got["model.embed_tokens.weight"].shape == (513, 64)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_chat_template_auto_and_generate_chat(tmp_path, vm, tiny_models):
    out, _ = build(tmp_path, linear([vm["base"], tiny_models["ft_a"]], [0.5, 0.5], chat_template="auto"))
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == synth.CHAT_TEMPLATE and (out / "chat_template.jinja").read_text() == synth.CHAT_TEMPLATE
    res = runner.invoke(app, ["generate", str(out), "hi", "--chat", "-n", "2", "--json"])
    assert res.exit_code == 0, res.output
    from merger.engine.tokenizer import load_tokenizer

    rendered = load_tokenizer(out).apply_chat_template([{"role": "user", "content": "hi"}])
    assert json.loads(res.stdout)["prompt_tokens"] == len(load_tokenizer(out).encode(rendered))


@pytest.mark.parametrize("name, starts", [("llama3", "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"),
                                          ("mistral", "<s>[INST] hi [/INST]"),
                                          ("alpaca", "### Instruction:\nhi\n\n### Response:\n")])
def test_builtin_templates_render_in_transformers(tmp_path, vm, name, starts):
    from transformers import AutoTokenizer

    out, _ = build(tmp_path, linear([vm["base"]], [1.0], chat_template=name))
    text = AutoTokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                  add_generation_prompt=True)
    assert text.startswith(starts), text


def run_fail(tmp_path: Path, recipe: dict, *needles: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = runner.invoke(app, ["build", str(path), str(tmp_path / "bad"), "-q"])
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "bad", *needles)
    val = runner.invoke(app, ["validate", str(path)])
    assert val.exit_code == 1 and val.stderr == res.stderr


def test_bad_vocabulary_recipes(tmp_path, vm):
    two = [vm["base"], vm["chatml"]]
    run_fail(tmp_path, linear(two, [1, 1], tokenizer_source="union", tokenizer={"source": "union"}),
             "tokenizer_source", "not both")
    run_fail(tmp_path, linear(two, [1, 1], tokenizer={"tokens": {"<|im_start|>": {"source": str(vm["base"])}}}),
             "tokenizer.tokens.<|im_start|>.source", "has no token '<|im_start|>'")
    run_fail(tmp_path, linear(two, [1, 1], tokenizer={"tokens": {"<x>": {"source": {
        "kind": "model_token", "model": str(vm["chatml"]), "token": "<nope>"}}}}),
             "tokenizer.tokens.<x>.source.token", "no token '<nope>'")
    run_fail(tmp_path, linear(two, [1, 1], chat_template="chatmll"), "chat_template", "unknown template 'chatmll'")
    run_fail(tmp_path, linear(two, [1, 1], chat_template="{% for m in messages %}"), "chat_template", "Jinja")
    run_fail(tmp_path, linear(two, [1, 1], tokenizer={"pad_to_multiple_of": 0}), "tokenizer.pad_to_multiple_of")


def test_validate_describes_the_union(tmp_path, vm):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(linear([vm["base"], vm["chatml"]], [1, 1], tokenizer_source="union")))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and "union of the inputs' vocabularies" in res.stdout
    assert "2 added ('<|im_start|>' from" in res.stdout


def test_moe_tokenizer_source_must_share_the_base_vocabulary(tmp_path, vm, tiny_models):
    r = {"base_model": str(tiny_models["base"]), "gate_mode": "random", "tokenizer_source": str(vm["perm"]),
         "experts": [{"source_model": str(tiny_models["ft_a"])}, {"source_model": str(tiny_models["ft_b"])}]}
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(r))
    res = runner.invoke(app, ["build", str(path), str(tmp_path / "moe"), "-q"])
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "moe", "tokenizer_source", "another vocabulary",
                          "is id")
