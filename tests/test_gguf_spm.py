"""Tokenizers rebuilt from GGUF metadata beyond byte-level BPE with Llama 3's split: SentencePiece
vocabularies (`tokenizer.ggml.model == "llama"`, Gemma- and Llama-2-style, tiny ones laid out as llama.cpp
stores them) and Qwen2's pre-tokenizer, each against transformers' own tokenizer built from the same file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_gguf_arch import GEMMA_USER, add_tokenizer, spm_vocab

gguf = pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'merger[gguf]'")
transformers = pytest.importorskip("transformers")

from merger.io.gguf import GGUFFile  # noqa: E402
from merger.io.gguf_spm import spm_merges  # noqa: E402
from merger.io.gguf_tokenizer import build_tokenizer, write_tokenizer_files  # noqa: E402

TEXTS = ["Once upon a time there was a little fox.", "def add(a, b):\n    return a + b\n",
         "Question: what is 2 + 2? Answer: 4", "spaces  and\tand\nnewlines  ", "unseen wörds ünïcode ✓ 日本",
         "x = 12345 + 678;\r\n  y", "don't WON'T it's", "a   b    c\n\n\nd", "The king said <b>hello</b>.",
         "In 2024, 12345 apples cost $3.50.", "", "emoji 🤖 and \x00 control"]


def tokenizer_gguf(path: Path, arch: str, kind: str, n: int = 512) -> Path:
    """A GGUF holding the metadata only (no tensors): enough for both tokenizers."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-6)
    add_tokenizer(w, kind, n, arch)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _both(tmp_path: Path, arch: str, kind: str):
    src = tokenizer_gguf(tmp_path / "t.gguf", arch, kind)
    with GGUFFile(src) as f:
        md = f.metadata
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    return build_tokenizer(md), ref, md


def test_gemma_sentencepiece_encodes_and_decodes_like_transformers(tmp_path):
    ours, ref, md = _both(tmp_path, "gemma3", "spm")
    texts = TEXTS + ["<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", " leading", "trailing "]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        assert ids[0] == 2 and ours.decode(ids[1:], skip_special_tokens=False) == text  # <bos>, add_bos_token
    # llama.cpp stores the user-defined "▁▁" as two spaces; they stay one token, the words keep no prefix
    enc = ours.encode("a  fox", add_special_tokens=False)
    assert enc.ids[1] == md["tokenizer.ggml.tokens"].index("  ") and enc.tokens[2][0] == "f"
    # unseen characters fall back to their UTF-8 bytes
    assert ours.encode("✓", add_special_tokens=False).tokens == ["<0xE2>", "<0x9C>", "<0x93>"]


def test_llama_sentencepiece_adds_a_space_before_each_text_run(tmp_path):
    """Llama 2 / Mistral v0.1 vocabularies: `add_space_prefix` (default true) puts a U+2581 before text.
    On plain text this is transformers' tokenizer; after an inline special token or before leading
    whitespace we follow llama.cpp (and the original SentencePiece encoding of each run): a prefix per run."""
    ours, ref, _ = _both(tmp_path, "llama", "spm")
    plain = [t for t in TEXTS if t and not t[0].isspace()]
    for text in plain:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True) == text
    runs = ["Hello there", "</s>", "second run"]
    alone = [ours.encode(r, add_special_tokens=False).ids for r in runs]
    assert ours.encode("".join(runs)).ids == [1] + alone[0] + [2] + alone[2]
    assert ours.encode(" hi", add_special_tokens=False).tokens[0] == "▁"  # the prefix, then "▁hi"


def test_merges_rank_user_defined_pieces_first_then_by_score():
    pieces = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "▁▁", "▁"]
    scores = [0.0, -10, -11, -12, -1, -2, -3, -1000, -9]
    types = [2, 1, 1, 1, 1, 1, 1, 4, 1]
    assert spm_merges(pieces, scores, types) == [("▁", "▁"), ("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]


def test_sentencepiece_vocabulary_is_laid_out_like_llama_cpp():
    """The test vocabulary itself: what the tests above rely on."""
    pieces, scores, types = spm_vocab(512, "gemma")
    assert len(pieces) == len(set(pieces)) == 512
    assert pieces[6:11] == GEMMA_USER and set(types[11:267]) == {6}
    normal = [s for s, t in zip(scores, types) if t == 1]
    assert len(normal) > 150 and normal == sorted(normal, reverse=True)


def test_qwen2_pre_tokenizer_splits_digits_and_composes_text(tmp_path):
    from merger import synth

    ours, ref, _ = _both(tmp_path, "qwen2", "gpt2")
    texts = TEXTS + ["x = 12345 + 678;\r\n  y", "it's 3.14159!", "don't WON'T"]
    base = synth.make_tokenizer(512)
    assert any(ours.encode(t).ids != base.encode(t, add_special_tokens=False).ids for t in texts)
    for text in texts:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
    assert ours.encode("2024", add_special_tokens=False).tokens == ["2", "0", "2", "4"]
    assert ours.encode("e\u0301t\u00e9").ids == ref("\u00e9t\u00e9")["input_ids"]  # NFC, as Qwen's tokenizer.json


def test_sentencepiece_tokenizer_config_and_generation_config(tmp_path):
    src = tokenizer_gguf(tmp_path / "t.gguf", "gemma3", "spm")
    with GGUFFile(src) as f:
        md = f.metadata
    (tmp_path / "out").mkdir()
    write_tokenizer_files(md, tmp_path / "out", 128)
    tcfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["unk_token"], tcfg["pad_token"]) == ("<bos>", "<eos>", "<unk>",
                                                                                          "<pad>")
    assert tcfg["add_bos_token"] is True and tcfg["add_eos_token"] is False
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, [1, 5], 0)  # + <end_of_turn>
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
