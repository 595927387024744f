"""GGUF files of Qwen2, Qwen3 and Gemma 3: tiny seeded transformers models (tests/arch_models.py) exported
here the way llama.cpp's convert_hf_to_gguf.py does it (tensor names from the gguf package's own map, no
q/k permutation for these NEOX-rope families, 1 added to Gemma's norms, its metadata keys) must convert
back to the source model's tensors and config, equal transformers' own GGUF loading, and run in merger's
engine with transformers' logits and greedy tokens."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import build
from typer.testing import CliRunner

from merger import synth

gguf = pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'merger[gguf]'")
transformers = pytest.importorskip("transformers")

from merger.cli import app  # noqa: E402
from merger.io.gguf_convert import convert_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
ARCHS = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma3": gguf.MODEL_ARCH.GEMMA3}
# Qwen3's head_dim 128 != hidden / heads, as in the real models (transformers' GGUF loader assumes 128).
# Gemma 3 as llama.cpp assumes it (it stores neither): a global layer every 6th, local rope base 10000.
SOURCES = {"qwen2": {}, "qwen3": dict(head_dim=128), "gemma3": dict(num_hidden_layers=6, sliding_window_pattern=6,
                                                     rope_local_base_freq=10000.0)}
NAMES = list(SOURCES)
GEMMA_USER = ["\n", "\n\n", "  ", "   ", "<b>"]  # user-defined pieces, as llama.cpp writes them (spaces)


def read_folder(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def spm_vocab(n: int, style: str = "gemma") -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-BPE vocabulary of exactly `n` pieces laid out as llama.cpp stores one: control
    pieces, user-defined ones (Gemma), 256 byte pieces, then merged pieces in merge order (score -rank)
    and single characters last. The merges are learned on synth's corpus by `tokenizers`' BPE trainer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if style == "gemma":
        head = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<start_of_turn>", 3), ("<end_of_turn>", 3)]
        head += [(t, 4) for t in GEMMA_USER]
    else:  # Llama 2 / Mistral v0.1
        head = [("<unk>", 2), ("<s>", 3), ("</s>", 3)]
    pieces = [t for t, _ in head] + [f"<0x{b:02X}>" for b in range(256)]
    types = [ty for _, ty in head] + [6] * 256
    scores = [-1000.0 if ty == 4 else 0.0 for ty in types]
    lines = [" ".join(line.split()) for line in synth._CORPUS.splitlines()]  # no newlines, no runs of spaces
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always" if style == "llama" else "never")
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=n - len(pieces), show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merged = ["".join(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    chars = sorted((t for t in model["vocab"] if len(t) == 1), key=model["vocab"].get)
    normal = (merged + chars)[: n - len(pieces)]
    pieces += normal
    scores += [-float(i) for i in range(len(normal))]
    types += [1] * len(normal)
    while len(pieces) < n:  # Gemma pads its vocabulary with unused control pieces
        pieces.append(f"<unused{len(pieces)}>")
        scores.append(-1000.0)
        types.append(3)
    return pieces, scores, types


def add_tokenizer(w, kind: str, n: int, arch: str = "gemma3") -> None:
    """tokenizer.* metadata: synth's byte-level BPE ('gpt2', Qwen's pre-tokenizer) or a SentencePiece one."""
    if kind == "gpt2":
        tok = synth.make_tokenizer(n)
        vocab = tok.get_vocab()
        tokens = sorted(vocab, key=vocab.get)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in synth.SPECIAL_TOKENS else 1 for t in tokens])
        w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)  # as Qwen's files say
        return
    style = "gemma" if arch.startswith("gemma") else "llama"
    pieces, scores, types = spm_vocab(n, style)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if style == "gemma":
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)  # llama.cpp's Gemma3Model.set_vocab
    else:
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)


def export_gguf(src: Path, path: Path, arch: str, qtype=Q.F32, tokenizer: str | None = None,
                gguf_arch: str | None = None, drop: tuple[str, ...] = (), extra: dict | None = None) -> Path:
    """The source folder as llama.cpp's converter writes it (the parts these families use)."""
    cfg = transformers.AutoConfig.from_pretrained(src)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w = gguf.GGUFWriter(str(path), gguf_arch or gguf.MODEL_ARCH_NAMES[ARCHS[arch]])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if "head_dim" in json.loads((src / "config.json").read_text()):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    for key, value in (extra or {}).items():
        getattr(w, key)(*value)
    if tokenizer:
        add_tokenizer(w, tokenizer, cfg.vocab_size, arch)
    names = gguf.get_tensor_name_map(ARCHS[arch], cfg.num_hidden_layers)
    for name, t in read_folder(src).items():
        base, suffix = name.rsplit(".", 1)
        gname = f"{names.get_name(base)}.{suffix}"
        if any(d in gname for d in drop):
            continue
        a = t.float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + np.float32(1)  # Gemma3RMSNorm scales by (1 + w): llama.cpp stores 1 + w
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gname, a.astype(np.float32))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    return {name: build(name, root / name, seed=3 + i, **SOURCES[name]) for i, name in enumerate(NAMES)}


def _hf(folder: Path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()


IDS = torch.randint(3, 512, (1, 14), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_f32_gguf_converts_back_to_the_source_model(sources, tmp_path, name):
    src = sources[name]
    out = convert_gguf(export_gguf(src, tmp_path / "m.gguf", name), tmp_path / "hf", tokenizer=False)
    got, want = read_folder(out), read_folder(src)
    assert set(got) == set(want)
    for key, t in want.items():
        if name == "gemma3" and key.endswith("norm.weight"):  # (w + 1) - 1 in float32, as a converter must
            torch.testing.assert_close(got[key], (t + 1) - 1, rtol=0, atol=0)
            torch.testing.assert_close(got[key], t, rtol=0, atol=2**-24)
        else:
            assert torch.equal(got[key], t), key
    ours, ref = transformers.AutoConfig.from_pretrained(out), transformers.AutoConfig.from_pretrained(src)
    assert ours.model_type == ref.model_type and ours.architectures == ref.architectures
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings", "rope_parameters", "sliding_window", "layer_types",
                "query_pre_attn_scalar", "hidden_activation", "final_logit_softcapping", "attention_bias"):
        assert getattr(ours, key, None) == getattr(ref, key, None), key
    head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads  # Qwen2 has none
    assert (getattr(ours, "head_dim", None) or ours.hidden_size // ours.num_attention_heads) == head_dim
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)  # stored as float32
    with torch.no_grad():
        torch.testing.assert_close(_hf(out)(IDS).logits, _hf(src)(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_quantized_gguf_equals_transformers_gguf_loading(sources, tmp_path, name):
    """An independent reader: transformers' dequantizer, name map and Gemma norm fix, on a Q8_0 file."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    src = export_gguf(sources[name], tmp_path / "m.gguf", name, Q.Q8_0, tokenizer="gpt2" if "qwen" in name else "spm")
    out = convert_gguf(src, tmp_path / "hf")
    ref = _hf(tmp_path, gguf_file="m.gguf")
    want, got = ref.state_dict(), _hf(out).state_dict()
    assert set(want) == set(got)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    orig = read_folder(sources[name])
    assert all((got[k] != orig[k]).any() for k in got if k.endswith("proj.weight"))  # really quantized


@pytest.mark.parametrize("name", NAMES)
def test_engine_on_the_converted_folder_matches_transformers(sources, tmp_path, name):
    from merger.engine.generate import generate_ids
    from merger.engine.model import load_model

    kind = "gpt2" if "qwen" in name else "spm"
    out = convert_gguf(export_gguf(sources[name], tmp_path / "m.gguf", name, Q.Q8_0, tokenizer=kind), tmp_path / "hf")
    ref = _hf(out)
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        want = ref(IDS).logits
    got = load_model(out)(IDS)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
    prompt = IDS[:, :8]  # 24 new tokens run past Gemma's window of 6
    expect = ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                          pad_token_id=0)[0, 8:].tolist()
    new, _, _ = generate_ids(load_model(out), prompt[0].tolist(), 24)
    assert new == expect


def test_gemma3_config_follows_llama_cpp_defaults(sources, tmp_path):
    """No window: every layer global. The 62-layer 27B scales queries by hidden/heads, not head_dim."""
    from merger.io.gguf import GGUFFile
    from merger.io.gguf_arch import hf_config

    src = export_gguf(sources["gemma3"], tmp_path / "m.gguf", "gemma3")
    with GGUFFile(src) as f:
        md, tensors = dict(f.metadata), f.tensors
    cfg = hf_config(md, tensors, src)
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (cfg["sliding_window"], cfg["rope_local_base_freq"], cfg["query_pre_attn_scalar"]) == (6, 10000.0, 16)
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0} and cfg["rope_theta"] == 100000.0
    del md["gemma3.attention.sliding_window"]
    assert hf_config(md, tensors, src)["layer_types"] == ["full_attention"] * 6
    md.update({"gemma3.block_count": 62, "gemma3.attention.key_length": 8, "gemma3.attention.value_length": 8})
    assert hf_config(md, tensors, src)["query_pre_attn_scalar"] == 64 // 4


# --- errors: one line naming the file and what to do ------------------------------------------------

def _convert(src: Path, out: Path) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["convert", str(src), str(out)])
    return res.exit_code, res.output


@pytest.mark.parametrize("case", ["qwen2_no_bias", "yarn", "moe", "stray"])
def test_unsupported_files_fail_with_one_line(sources, tmp_path, case):
    name, kw = "qwen2", {}
    if case == "qwen2_no_bias":
        kw, expect = dict(drop=(".bias",)), "no tensor for model.layers.0.self_attn.q_proj.bias"
    elif case == "yarn":
        kw = dict(extra={"add_rope_scaling_type": (gguf.RopeScalingType.YARN,), "add_rope_scaling_factor": (4.0,)})
        expect = "rope scaling 'yarn' is not supported"
    elif case == "moe":
        kw, expect = dict(gguf_arch="qwen3moe"), "architecture 'qwen3moe' is not supported"
    else:  # a Qwen3 file (q/k norms) claiming to be Qwen2
        name, kw = "qwen3", dict(gguf_arch="qwen2")
        expect = "tensor 'blk.0.attn_k_norm.weight' has no place in a Qwen2ForCausalLM checkpoint"
    src = export_gguf(sources[name], tmp_path / "m.gguf", name, **kw)
    code, output = _convert(src, tmp_path / "hf")
    assert code == 1 and output.count("\n") == 1 and expect in output and str(src) in output, output
    assert not (tmp_path / "hf").exists()
