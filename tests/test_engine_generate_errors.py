"""Generation parameters and prompts the engine cannot use are one-line MergerErrors, from generate() /
generate_ids() and from `merger generate`: NaN / infinite / negative temperature, top_p outside (0, 1],
negative top_k or max_new_tokens, seeds torch cannot take, and prompts that are not valid UTF-8."""
from __future__ import annotations

from pathlib import Path

import pytest
from cli_checks import assert_one_line_error

from merger import synth
from merger.engine.generate import generate, generate_ids
from merger.engine.model import load_model
from merger.engine.sampling import SamplingError
from merger.engine.tokenizer import TextError, load_tokenizer
from merger.errors import CheckpointError, MergerError

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "llama"
    synth.make_llama(path, seed=0)
    return path


@pytest.fixture(scope="module")
def loaded(llama):
    return load_model(llama), load_tokenizer(llama)


# (keyword arguments of generate(), text the message must hold)
BAD = [
    ({"temperature": NAN}, "temperature nan is not a finite number >= 0"),
    ({"temperature": INF}, "temperature inf"),
    ({"temperature": -INF}, "temperature -inf"),
    ({"temperature": -0.5}, "temperature -0.5"),
    ({"top_p": NAN}, "top_p nan is outside (0, 1]"),
    ({"top_p": 1.5}, "top_p 1.5 is outside (0, 1]"),
    ({"top_p": 0.0}, "top_p 0.0"),
    ({"top_p": -0.2}, "top_p -0.2"),
    ({"top_k": -1}, "top_k -1 is not a whole number >= 0"),
    ({"top_k": 2.5}, "top_k 2.5"),
    ({"max_new_tokens": -1}, "max_new_tokens -1 is not a whole number >= 0"),
    ({"seed": -1}, "seed -1 is outside 0..2**64-1"),
    ({"seed": 2**64}, "seed 18446744073709551616"),
    ({"seed": True}, "seed True"),
]


@pytest.mark.parametrize("kwargs,needle", BAD, ids=[f"{next(iter(k))}={next(iter(k.values()))}" for k, _ in BAD])
def test_bad_parameters_are_sampling_errors_before_any_work(loaded, kwargs, needle):
    model, tok = loaded
    args = {"max_new_tokens": 4, "temperature": 1.0, **kwargs}
    with pytest.raises(SamplingError) as e:
        generate(model, tok, "the fox", **args)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, MergerError)
    with pytest.raises(SamplingError, match="^" + needle.split()[0]):
        generate_ids(model, tok.encode("the fox"), **args)
    assert model.cache is None  # refused before the KV cache was made


def test_edge_values_are_accepted_with_their_meaning(loaded):
    model, tok = loaded
    assert generate(model, tok, "the fox", max_new_tokens=0).token_ids == []
    greedy = generate(model, tok, "the fox", max_new_tokens=6).token_ids
    assert len(greedy) == 6
    # the raw CLI values: top_k 0 and top_p 1 mean off, exactly as None does
    sampled = generate(model, tok, "the fox", 6, temperature=1.0, top_k=None, top_p=None, seed=2**64 - 1).token_ids
    assert generate(model, tok, "the fox", 6, temperature=1.0, top_k=0, top_p=1.0, seed=2**64 - 1).token_ids == sampled
    assert generate(model, tok, "the fox", 6, temperature=1.0, top_k=1, seed=0).token_ids == greedy


def test_a_prompt_with_an_undecodable_byte_is_a_text_error(loaded):
    model, tok = loaded
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 argv
    assert prompt == "caf\udce9"
    with pytest.raises(TextError, match=r"^prompt is not valid UTF-8 \(byte 0xe9 at character 3\)"):
        generate(model, tok, prompt, max_new_tokens=2)
    with pytest.raises(TextError, match=r"^prompt is not valid UTF-8"):
        generate(model, tok, prompt, max_new_tokens=2, chat=True)
    with pytest.raises(TextError, match=r"^text is not valid UTF-8 \(lone surrogate U\+D800 at character 1\)"):
        tok.encode("a\ud800")
    assert tok.decode(tok.encode("café", add_bos=False)) == "café"


def test_token_ids_outside_the_vocabulary_are_refused(loaded):
    model, _ = loaded
    with pytest.raises(CheckpointError, match="token id 512 but the model's vocab_size is 512"):
        generate_ids(model, [1, 512], 2)
    with pytest.raises(CheckpointError, match="token id -1"):
        generate_ids(model, [-1], 2)


def test_a_corrupt_eos_token_id_in_generation_config_is_a_checkpoint_error(tmp_path):
    synth.make_llama(tmp_path, seed=0)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, "x"]}')
    with pytest.raises(CheckpointError, match=r"generation_config.json: eos_token_id must be an integer >= 0, "
                                              r"got 'x'; fix that field"):
        load_tokenizer(tmp_path)


# --- through `merger generate` ------------------------------------------------------------------

def _cli(*args: str):
    from typer.testing import CliRunner

    from merger.cli import app

    return CliRunner().invoke(app, ["generate", *args])


CLI_BAD = [
    (["--temperature", "nan"], "temperature nan"),
    (["--temperature", "inf"], "temperature inf"),
    (["--temperature", "-1"], "temperature -1.0"),
    (["--top-p", "nan"], "top_p nan"),
    (["--top-p", "1.5"], "top_p 1.5"),
    (["--top-p", "-0.5"], "top_p -0.5"),
    (["--top-k", "-1"], "top_k -1"),
    (["-n", "-1"], "max_new_tokens -1"),
    (["--seed", "-1"], "seed -1"),
    (["--seed", str(2**64)], "seed 18446744073709551616"),
]


@pytest.mark.parametrize("args,needle", CLI_BAD)
def test_cli_bad_parameters_are_one_line(tmp_path, llama, args, needle):
    res = _cli(str(llama), "the fox", "-n", "2", *args)
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "none", needle)


def test_cli_prompt_with_an_undecodable_byte_is_one_line(tmp_path, llama):
    res = _cli(str(llama), "caf\udce9", "-n", "2")
    assert_one_line_error(res.exit_code, res.stderr, tmp_path / "none", "prompt is not valid UTF-8 (byte 0xe9")


def test_cli_zero_new_tokens_generates_nothing(llama):
    res = _cli(str(llama), "the fox", "-n", "0", "--json")
    assert res.exit_code == 0, res.stderr
    assert '"token_ids": []' in res.stdout
