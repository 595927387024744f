"""transformers (and llama.cpp) vs merger's engine on the same synthetic checkpoints: a dense Llama and
a Mixtral-layout MoE made of it (each expert = the dense MLP plus seeded noise), bf16 and fp32, batch 1.
With --family, one synthetic model of that family instead, built by transformers' own config and model
classes (seeded random init, saved in bf16): qwen2, qwen3, qwen3_moe, gemma2, gemma3, phi3.

With --checkpoint DIR (repeatable), those folders instead. With --llama-cpp, llama.cpp too, through
llama-cpp-python in the interpreter --llama-cpp-python names (a venv of its own; "baseline not installed"
when none imports it), on GGUFs from --gguf-dir or made by llama.cpp's own --convert-script.

Prints medians (and ranges) over --repeat rounds taken in turn, of prefill tokens/s for each --prefill
length timed alone and of decode tokens/s, the ratios, and each engine's share of the memory-bandwidth floor
of decode (bytes of weights one token reads / a read bandwidth measured just before and after each round, since
a shared machine's bandwidth moves while the bench runs); --load N decodes again beside N CPU-bound
nice-19 processes and reports it against quiet. Every engine decodes greedily, feeding back its own
tokens, and the bench counts those equal to ours. In bf16 the engines round differently, and a random
model's near-tied logits then pick different greedy tokens.
    python3 bench/generate.py                    # hidden 2048, 6 layers, 4 experts top-2, 128 + 32 tokens
    python3 bench/generate.py --hidden 1024 --intermediate 2816 --layers 8 --prompt-tokens 512
    python3 bench/generate.py --family gemma2 --hidden 256 --intermediate 512 --layers 2 --vocab 1024
    python3 bench/generate.py --tokenizer ./smollm2 --llama-cpp --llama-cpp-python /venv/bin/python \
        --convert-script llama.cpp/convert_hf_to_gguf.py   # hidden 2048 against llama.cpp too
    python3 bench/generate.py --checkpoint ./smollm2 --llama-cpp --llama-cpp-python /venv/bin/python \
        --convert-script llama.cpp/convert_hf_to_gguf.py --prefill 128,512 --new-tokens 64 --load 2
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from merger import synth
from merger.engine import calibrate, native, step, weights
from merger.engine.generate import generate_ids
from merger.engine.model import load_model
from merger.io.dtypes import parse_dtype
from merger.io.hf import copy_tokenizer, write_config
from merger.io.writer import write_tensors


def make_models(root: Path, a: argparse.Namespace) -> dict[str, Path]:
    """Write (or reuse) the dense and MoE checkpoints in bf16, generated layer by layer."""
    cfg = synth.llama_config(hidden=a.hidden, layers=a.layers, heads=a.hidden // 128, kv_heads=a.hidden // 512,
                             intermediate=a.intermediate, vocab=a.vocab, max_positions=4096)
    moe_cfg = {**cfg, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
               "num_local_experts": a.experts, "num_experts_per_tok": a.top_k, "sliding_window": None}
    paths = {"dense": root / "dense", "moe": root / "moe"}
    stamp = json.dumps([cfg, moe_cfg, str(a.tokenizer)], sort_keys=True)
    if all((p / "bench.json").is_file() and (p / "bench.json").read_text() == stamp for p in paths.values()):
        return paths
    g = torch.Generator().manual_seed(0)

    def lin(o: int, i: int) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) / i ** 0.5).bfloat16()

    d, f, v = a.hidden, a.intermediate, a.vocab
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)  # the bench's own folder: no shard of another size may stay
        p.mkdir(parents=True)
    writers: dict[str, dict[str, torch.Tensor]] = {k: {} for k in paths}
    both = list(writers.values())
    for w in both:
        w["model.embed_tokens.weight"] = torch.randn(v, d, generator=g).bfloat16()
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shared = {"input_layernorm.weight": torch.ones(d).bfloat16(), "self_attn.q_proj.weight": lin(d, d),
                  "self_attn.k_proj.weight": lin(kv, d), "self_attn.v_proj.weight": lin(kv, d),
                  "self_attn.o_proj.weight": lin(d, d), "post_attention_layernorm.weight": torch.ones(d).bfloat16()}
        for name, t in shared.items():
            for w in both:
                w[p + name] = t
        mlp = {"gate_proj": lin(f, d), "up_proj": lin(f, d), "down_proj": lin(d, f)}
        for name, t in mlp.items():
            writers["dense"][f"{p}mlp.{name}.weight"] = t
        writers["moe"][p + "block_sparse_moe.gate.weight"] = lin(a.experts, d)
        for j in range(a.experts):
            for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                t = mlp[theirs]
                noisy = (t.float() + 0.1 * t.float().std() * torch.randn(t.shape, generator=g)).bfloat16()
                writers["moe"][f"{p}block_sparse_moe.experts.{j}.{ours}.weight"] = noisy
    norm, head = torch.ones(d).bfloat16(), lin(v, d)
    for w in both:
        w["model.norm.weight"] = norm
        w["lm_head.weight"] = head
    for (k, p), c in zip(paths.items(), (cfg, moe_cfg)):
        write_tensors(p, writers[k], 2 * 10**9)
        write_config(p, c, torch.bfloat16)
        write_tokenizer(p, a)
        (p / "bench.json").write_text(stamp)
    return paths


def write_tokenizer(path: Path, a: argparse.Namespace) -> None:
    """--tokenizer's files (a real tokenizer, which llama.cpp's converter recognises), else a synthetic one."""
    if a.tokenizer is None:
        synth.write_tokenizer(path, 512)
    else:
        copy_tokenizer(a.tokenizer, path)


# --family -> (transformers config class, model class, config fields beyond the shared sizes)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"moe": True}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"query_pre_attn_scalar": 128, "sliding_window": 64}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"query_pre_attn_scalar": 128, "sliding_window": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def make_family_model(root: Path, a: argparse.Namespace) -> dict[str, Path]:
    """Write (or reuse) one bf16 checkpoint of --family, built by transformers' classes from a seeded init."""
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[a.family]
    extra = dict(extra)
    sizes = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                 num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 128),
                 num_key_value_heads=max(1, a.hidden // 512), head_dim=128, max_position_embeddings=4096,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if extra.pop("moe", False):
        sizes.update(num_experts=a.experts, num_experts_per_tok=a.top_k, moe_intermediate_size=a.intermediate)
    path = root / a.family
    stamp = json.dumps([a.family, sizes, extra, str(a.tokenizer)], sort_keys=True)
    if (path / "bench.json").is_file() and (path / "bench.json").read_text() == stamp:
        return {a.family: path}
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**sizes, **extra))
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, a)
    (path / "bench.json").write_text(stamp)
    return {a.family: path}


class Roof:
    """Bytes/s of a streaming read (a sum over 1 GiB), best of `reads`: the roof decode can reach. The buffer
    sits on huge pages where the engine's weights do (merger.engine.weights.empty), so the roof is theirs. On a
    shared machine it moves with the neighbours' traffic (here 31-62 GB/s from one minute to the next), so each
    decode round is set against the roof read just before and after it, not against one figure for the run."""

    def __init__(self):
        self.buf = weights.empty((2**28,), torch.float32, torch.device("cpu")).fill_(1.0)
        self.buf.sum()

    def read(self, reads: int = 2) -> float:
        return self.buf.nbytes / min(_timed(self.buf.sum) for _ in range(reads))

    def around(self, run):
        """run() (a round's dict), with "roof": the better read of the two beside it."""
        before = self.read()
        out = run()
        out["roof"] = max(before, self.read())
        return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_bytes(model) -> int:
    """Weight bytes one decode token reads: every layer weight, routed experts only for top_k of E."""
    total = model.output.numel() * model.output.element_size() + model.norm.weight.nbytes
    for layer in model.layers:
        routed = hasattr(layer.ffn, "router")  # stacked experts [E, ...], in rows or in panels
        for name, p in layer.named_parameters():
            frac = 1.0
            if routed and (name.startswith("ffn.w13") or name.startswith("ffn.w2")):
                frac = model.config.top_k / model.config.num_experts
            total += int(p.nbytes * frac)
    return total


def _prefill_and_decode(run_one, tokens: list[int], lengths: list[int], prompt_len: int, new: int) -> dict:
    """One round for an engine: prefill alone of the first n tokens for each length, then a decode of `new`
    tokens after the first prompt_len. run_one(ids, n) -> (new ids, prefill s, decode s)."""
    out: dict = {"prefill": {}}
    for n in lengths:
        _, prefill_s, _ = run_one(tokens[:n], 1)
        out["prefill"][n] = n / prefill_s
    ids, prefill_s, decode_s = run_one(tokens[:prompt_len], new)
    out.update(decode=(len(ids) - 1) / decode_s, ids=ids)
    return out


def ours_runner(path: Path, dtype: torch.dtype, tokens: list[int], lengths: list[int], prompt_len: int, new: int):
    """Load the engine's model; return a function doing one timed round, the model's decode bytes, and whether
    decode runs as one native call per token."""
    model = load_model(path, dtype)
    generate_ids(model, tokens[:8], 3)  # warm-up: first-call allocations, oneDNN primitive caches

    def run() -> dict:
        return _prefill_and_decode(lambda ids, n: generate_ids(model, ids, n), tokens, lengths, prompt_len, new)

    return run, decode_bytes(model), step.unsupported(model, 1) is None


def hf_runner(path: Path, dtype: torch.dtype, tokens: list[int], lengths: list[int], prompt_len: int, new: int,
              experts_impl: str | None):
    import transformers

    kw = {"experts_implementation": experts_impl} if experts_impl else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()
    model.generation_config.eos_token_id = None  # both engines run the full length
    stamps: list[float] = []

    class Stamp(transformers.LogitsProcessor):
        """Called once per new token, right after the forward that produced its logits."""
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    def run_one(ids: list[int], n: int) -> tuple[list[int], float, float]:
        stamps.clear()
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, do_sample=False, max_new_tokens=n, pad_token_id=0,
                                 attention_mask=torch.ones_like(x),
                                 logits_processor=transformers.LogitsProcessorList([Stamp()]))
        return out[0, len(ids):].tolist(), stamps[0] - t, stamps[-1] - stamps[0]

    run_one(tokens[:8], 3)
    return lambda: _prefill_and_decode(run_one, tokens, lengths, prompt_len, new)


# llama.cpp through llama-cpp-python, in the interpreter that has it (it needs no torch): a worker that loads
# the GGUF once, then runs one round per line on stdin and answers with one JSON line
LLAMA_WORKER = r"""
import json, sys, time
import llama_cpp
import numpy as np
a = json.loads(sys.argv[1])
llm = llama_cpp.Llama(model_path=a["gguf"], n_threads=a["threads"], n_threads_batch=a["threads"], n_ctx=a["ctx"],
                      n_batch=512, n_ubatch=512, verbose=False)
prompt, vocab = a["prompt"], llm.n_vocab()

def greedy():  # the argmax of the last position's logits, as our greedy decode picks
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

def timed_eval(ids):
    t = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - t

def one_round():
    out = {"prefill": {}}
    for n in a["lengths"]:
        llm.reset()
        out["prefill"][n] = n / timed_eval(prompt[:n])
    llm.reset()
    llm.eval(prompt[:a["prompt_len"]])
    ids, t = [greedy()], time.perf_counter()
    for _ in range(a["new"] - 1):  # one token at a time, each fed back as ours are (llama-bench's tg feeds one)
        llm.eval([ids[-1]])
        ids.append(greedy())
    out["decode"] = (a["new"] - 1) / (time.perf_counter() - t)
    out["ids"] = ids
    return out

one_round()
print(json.dumps({"ready": llama_cpp.__version__}), flush=True)
for line in sys.stdin:
    print(json.dumps(one_round()), flush=True)
"""


def find_llama_python(given: str | None) -> str | None:
    """An interpreter that imports llama_cpp: the one given, else this one; None if neither does."""
    for python in ([given] if given else []) + [sys.executable]:
        ok = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
        if ok:
            return python
    return None


def gguf_for(path: Path, dtype: torch.dtype, a: argparse.Namespace) -> Path | None:
    """The checkpoint as a GGUF of this dtype for llama.cpp: from --gguf-dir (NAME-bf16.gguf / NAME-f32.gguf),
    else converted once by llama.cpp's convert_hf_to_gguf.py (--convert-script) into the workdir."""
    kind = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[dtype]
    name = f"{path.name}-{kind}.gguf"
    for folder in ([a.gguf_dir] if a.gguf_dir else []) + [a.workdir / "gguf"]:
        if (folder / name).is_file():
            return folder / name
    if not a.convert_script:
        return None
    out = a.workdir / "gguf" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    script = Path(a.convert_script)
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    done = subprocess.run([a.convert_python or sys.executable, str(script), str(path), "--outtype", kind,
                           "--outfile", str(out)], env=env, capture_output=True, text=True)
    if done.returncode:
        print(f"  llama.cpp: converting {path} failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return out


class LlamaRunner:
    """One llama.cpp worker process per checkpoint and dtype, run in turn with the other engines."""

    def __init__(self, python: str, gguf: Path, tokens: list[int], lengths: list[int], prompt_len: int, new: int,
                 threads: int):
        args = {"gguf": str(gguf), "threads": threads, "ctx": max(lengths + [prompt_len]) + new + 8,
                "prompt": tokens, "prompt_len": prompt_len, "lengths": lengths, "new": new}
        self.proc = subprocess.Popen([python, "-c", LLAMA_WORKER, json.dumps(args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self.proc.stdout.readline())["ready"]

    def __call__(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        out["prefill"] = {int(k): v for k, v in out["prefill"].items()}
        return out

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Load:
    """`count` CPU-bound processes at nice 19 beside the benchmark, for as long as the with-block runs."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                       preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 19))
                      for _ in range(self.count)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a checkpoint folder whose tokenizer (and vocab size) the synthetic models take, so that "
                         "llama.cpp's converter recognises it (its own synthetic tokenizer it does not)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt before the timed decode")
    ap.add_argument("--prefill", default=None, help="prefill lengths timed alone, e.g. 128,512 "
                                                    "(default: --prompt-tokens)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--family", choices=sorted(FAMILIES), default=None,
                    help="one synthetic model of this family instead of the dense Llama and its MoE")
    ap.add_argument("--checkpoint", type=Path, action="append", default=[],
                    help="a checkpoint folder to time instead of the synthetic ones (repeatable)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--hf-experts", default=None, help="transformers experts_implementation (default: its own)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per engine, taken in turn; medians reported")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--llama-cpp", action="store_true", help="time llama.cpp (llama-cpp-python) in the same run")
    ap.add_argument("--llama-cpp-python", default=None, help="an interpreter with llama_cpp (another venv)")
    ap.add_argument("--gguf-dir", type=Path, default=None, help="GGUFs named NAME-bf16.gguf / NAME-f32.gguf")
    ap.add_argument("--convert-script", default=None, help="llama.cpp's convert_hf_to_gguf.py, to make them")
    ap.add_argument("--convert-python", default=None, help="the interpreter for --convert-script")
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="decode again beside N CPU-bound processes at nice 19, and report it against quiet")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "merger-bench-engine")
    a = ap.parse_args()
    if a.tokenizer is not None:
        a.vocab = json.loads((a.tokenizer / "config.json").read_text())["vocab_size"]
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; building checkpoints in {a.workdir}")
    print(native.status())
    if a.checkpoint:
        paths = {p.name: p for p in a.checkpoint}
        kinds = list(paths)
    else:
        paths = make_family_model(a.workdir, a) if a.family else make_models(a.workdir, a)
        kinds = list(paths) if a.family else a.models.split(",")
    lengths = [int(n) for n in (a.prefill or str(a.prompt_tokens)).split(",")]
    llama_python = None
    if a.llama_cpp:
        llama_python = find_llama_python(a.llama_cpp_python)
        if llama_python is None:
            print("llama.cpp: baseline not installed (no interpreter imports llama_cpp; pass --llama-cpp-python)")
    print(calibrate.describe())
    roof = Roof()
    bw = roof.read(5)
    print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (other processes skew every figure)")
    top = max(lengths + [a.prompt_tokens])
    vocab = min(json.loads((paths[k] / "config.json").read_text())["vocab_size"] for k in kinds)
    tokens = torch.randint(3, min(vocab, 512), (top,), generator=torch.Generator().manual_seed(1)).tolist()
    for kind in kinds:
        for dname in a.dtypes.split(","):
            dtype = parse_dtype(dname)
            # the engines loaded side by side and run in turn, so load from other processes hits all alike
            run_ours, nbytes, stepped = ours_runner(paths[kind], dtype, tokens, lengths, a.prompt_tokens,
                                                    a.new_tokens)
            runners = {"ours": run_ours}
            if not a.skip_hf:
                runners["transformers"] = hf_runner(paths[kind], dtype, tokens, lengths, a.prompt_tokens,
                                                    a.new_tokens, a.hf_experts)
            llama = None
            if llama_python is not None:
                gguf = gguf_for(paths[kind], dtype, a)
                if gguf is None:
                    print(f"  llama.cpp: no GGUF for {kind} {dname} (give --gguf-dir or --convert-script)")
                else:
                    llama = runners["llama.cpp"] = LlamaRunner(llama_python, gguf, tokens, lengths,
                                                               a.prompt_tokens, a.new_tokens, threads)
            rounds: dict[str, list[dict]] = {name: [] for name in runners}
            for _ in range(a.repeat):
                for name, run in runners.items():
                    rounds[name].append(roof.around(run))
            loaded: dict[str, list[dict]] = {}
            if a.load:
                with Load(a.load):
                    for _ in range(a.repeat):
                        for name in ("ours", "llama.cpp"):
                            if name in runners:
                                loaded.setdefault(name, []).append(runners[name]())
            if llama is not None:
                llama.close()
            del run_ours, runners
            gc.collect()
            _print_rows(kind, dname, rounds, loaded, nbytes, a, stepped)


def _print_rows(kind: str, dname: str, rounds: dict[str, list[dict]], loaded: dict[str, list[dict]], nbytes: int,
                a: argparse.Namespace, stepped: bool) -> None:
    roofs = [r["roof"] for rs in rounds.values() for r in rs]
    floor = statistics.median(roofs) / nbytes
    print(f"\n[{kind} {dname}] decode reads {nbytes / 1e9:.3f} GB/token; floor {floor:.1f} tok/s at the median "
          f"roof ({min(roofs) / 1e9:.0f}-{max(roofs) / 1e9:.0f} GB/s beside the rounds); "
          f"decode {'one native call per token' if stepped else 'per op'}; medians (range) of {a.repeat} rounds")
    names = list(rounds)
    lengths = sorted(rounds["ours"][0]["prefill"])

    def row(label: str, pick) -> None:
        cells, med = [], {}
        for name in names:
            m, lo, hi = _stats([pick(r) for r in rounds[name]])
            med[name] = m
            cells.append(f"{name} {m:7.1f} ({lo:.0f}-{hi:.0f})")
        ratios = "  ".join(f"ours/{n} {med['ours'] / med[n]:.2f}x" for n in names[1:])
        print(f"  {label:13s} " + "  ".join(cells) + ("  " + ratios if ratios else ""))

    for n in lengths:
        row(f"prefill {n}", lambda r, n=n: r["prefill"][n])
    row("decode tok/s", lambda r: r["decode"])
    share = {name: statistics.median(r["decode"] * nbytes / r["roof"] for r in rs) for name, rs in rounds.items()}
    # the shares' ratio: the engines compared at equal bandwidth, where the tok/s ratio also holds the swings
    ratios = "".join(f"; ours/{n} {share['ours'] / share[n]:.2f}x" for n in names[1:])
    print("  decode at " + ", ".join(f"{name} {100 * v:.0f}%" for name, v in share.items())
          + f" of the bandwidth floor (each round against the roof read beside it; medians{ratios})")
    for name in names[1:]:  # llama.cpp's own math differs: its tokens agree with ours up to a first near-tie
        same = sum(x == y for x, y in zip(rounds["ours"][0]["ids"], rounds[name][0]["ids"]))
        print(f"  greedy tokens equal to {name}'s: {same}/{a.new_tokens}")
    for name, rs in loaded.items():
        m, lo, hi = _stats([r["decode"] for r in rs])
        quiet = statistics.median(r["decode"] for r in rounds[name])
        print(f"  under load ({a.load} x nice 19): {name} decode {m:.1f} ({lo:.0f}-{hi:.0f}) tok/s, "
              f"{100 * m / quiet:.0f}% of quiet")


if __name__ == "__main__":
    main()
