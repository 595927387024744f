"""transformers vs merger's engine, in one process, on the same synthetic checkpoints: a dense Llama and
a Mixtral-layout MoE made of it (each expert = the dense MLP plus seeded noise), bf16 and fp32, batch 1.
With --family, one synthetic model of that family instead, built by transformers' own config and model
classes (seeded random init, saved in bf16): qwen2, qwen3, qwen3_moe, gemma2, gemma3, phi3.

Prints prefill and decode tokens/s of both, the ratios, end-to-end time, and the memory-bandwidth floor
of decode (bytes of weights one token reads / a read bandwidth measured here). Decode is memory-bound in
both engines, so the end-to-end ratio depends on the mix of --prompt-tokens and --new-tokens. In bf16 the
two engines round differently, and a random model's near-tied logits then pick different greedy tokens.
    python3 bench/generate.py                    # hidden 2048, 6 layers, 4 experts top-2, 128 + 32 tokens
    python3 bench/generate.py --hidden 1024 --intermediate 2816 --layers 8 --prompt-tokens 512
    python3 bench/generate.py --family gemma2 --hidden 256 --intermediate 512 --layers 2 --vocab 1024
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from merger import synth
from merger.engine import native, weights
from merger.engine.generate import generate_ids
from merger.engine.model import load_model
from merger.io.dtypes import parse_dtype
from merger.io.hf import write_config
from merger.io.writer import write_tensors


def make_models(root: Path, a: argparse.Namespace) -> dict[str, Path]:
    """Write (or reuse) the dense and MoE checkpoints in bf16, generated layer by layer."""
    cfg = synth.llama_config(hidden=a.hidden, layers=a.layers, heads=a.hidden // 128, kv_heads=a.hidden // 512,
                             intermediate=a.intermediate, vocab=a.vocab, max_positions=4096)
    moe_cfg = {**cfg, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
               "num_local_experts": a.experts, "num_experts_per_tok": a.top_k, "sliding_window": None}
    paths = {"dense": root / "dense", "moe": root / "moe"}
    stamp = json.dumps([cfg, moe_cfg], sort_keys=True)
    if all((p / "bench.json").is_file() and (p / "bench.json").read_text() == stamp for p in paths.values()):
        return paths
    g = torch.Generator().manual_seed(0)

    def lin(o: int, i: int) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) / i ** 0.5).bfloat16()

    d, f, v = a.hidden, a.intermediate, a.vocab
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
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
        synth.write_tokenizer(p, 512)
        (p / "bench.json").write_text(stamp)
    return paths


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
    stamp = json.dumps([a.family, sizes, extra], sort_keys=True)
    if (path / "bench.json").is_file() and (path / "bench.json").read_text() == stamp:
        return {a.family: path}
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**sizes, **extra))
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    synth.write_tokenizer(path, 512)
    (path / "bench.json").write_text(stamp)
    return {a.family: path}


def read_bandwidth() -> float:
    """Bytes/s of a streaming read (sum over 1 GiB), best of 5: the roof decode can reach. The buffer sits on
    huge pages where the engine's weights do (merger.engine.weights.empty), so the roof is theirs."""
    buf = weights.empty((2**28,), torch.float32, torch.device("cpu")).fill_(1.0)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(5))
    del buf
    return 2**30 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_bytes(model) -> int:
    """Weight bytes one decode token reads: every layer weight, routed experts only for top_k of E."""
    total = model.output.numel() * model.output.element_size() + model.norm.weight.nbytes
    for layer in model.layers:
        for name, p in layer.named_parameters():
            frac = 1.0
            if name.startswith("ffn.w13") or name.startswith("ffn.w2"):
                frac = model.config.top_k / model.config.num_experts if p.dim() == 3 else 1.0
            total += int(p.nbytes * frac)
    return total


def ours_runner(path: Path, dtype: torch.dtype, prompt: list[int], new: int):
    """Load the engine's model; return a function doing one timed run, and the model's decode bytes."""
    model = load_model(path, dtype)
    generate_ids(model, prompt[:8], 3)  # warm-up: first-call allocations, oneDNN primitive caches

    def run() -> tuple[float, float, float, list[int]]:
        t = time.perf_counter()
        ids, prefill_s, decode_s = generate_ids(model, prompt, new)
        return prefill_s, decode_s, time.perf_counter() - t, ids

    return run, decode_bytes(model)


def hf_runner(path: Path, dtype: torch.dtype, prompt: list[int], new: int, experts_impl: str | None):
    import transformers

    kw = {"experts_implementation": experts_impl} if experts_impl else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()
    model.generation_config.eos_token_id = None  # both engines run the full length
    x = torch.tensor([prompt])
    stamps: list[float] = []

    class Stamp(transformers.LogitsProcessor):
        """Called once per new token, right after the forward that produced its logits."""
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    def run() -> tuple[float, float, float, list[int]]:
        stamps.clear()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, do_sample=False, max_new_tokens=new, pad_token_id=0,
                                 logits_processor=transformers.LogitsProcessorList([Stamp()]))
        total = time.perf_counter() - t
        return stamps[0] - t, stamps[-1] - stamps[0], total, out[0, len(prompt):].tolist()

    with torch.inference_mode():
        model.generate(x[:, :8], do_sample=False, max_new_tokens=3, pad_token_id=0)
    return run


def _best(runs: list[tuple[float, float, float, list[int]]], prompt_len: int) -> dict:
    """Fastest of the repeats for each phase: the machine may be shared, noise only ever adds time."""
    prefill_s, decode_s, total_s = (min(r[i] for r in runs) for i in range(3))
    steps = len(runs[0][3]) - 1
    return {"prefill_tps": prompt_len / prefill_s, "decode_tps": steps / decode_s, "total_s": total_s,
            "ids": runs[0][3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--family", choices=sorted(FAMILIES), default=None,
                    help="one synthetic model of this family instead of the dense Llama and its MoE")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--hf-experts", default=None, help="transformers experts_implementation (default: its own)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per engine; the fastest counts")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "merger-bench-engine")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; building checkpoints in {a.workdir}")
    print(native.status())
    paths = make_family_model(a.workdir, a) if a.family else make_models(a.workdir, a)
    kinds = list(paths) if a.family else a.models.split(",")
    bw = read_bandwidth()
    print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (other processes skew every figure)")
    prompt = torch.randint(3, 512, (a.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    for kind in kinds:
        for dname in a.dtypes.split(","):
            dtype = parse_dtype(dname)
            # both engines loaded side by side and run alternately, so load from other processes
            # hits both alike; the fastest of the repeats counts for each
            run_ours, nbytes = ours_runner(paths[kind], dtype, prompt, a.new_tokens)
            run_hf = None if a.skip_hf else hf_runner(paths[kind], dtype, prompt, a.new_tokens, a.hf_experts)
            runs_ours, runs_hf = [], []
            for _ in range(a.repeat):
                runs_ours.append(run_ours())
                if run_hf is not None:
                    runs_hf.append(run_hf())
            ours = {**_best(runs_ours, len(prompt)), "bytes": nbytes}
            hf = _best(runs_hf, len(prompt)) if runs_hf else None
            del run_ours, run_hf
            gc.collect()
            bw = max(bw, read_bandwidth())  # the best read seen so far is the roof
            floor_tps = bw / ours["bytes"]
            same = "-" if hf is None else sum(x == y for x, y in zip(ours["ids"], hf["ids"]))
            _print_row(kind, dname, ours, hf, floor_tps, same, a.new_tokens)


def _print_row(kind: str, dname: str, ours: dict, hf: dict | None, floor_tps: float, same, n: int) -> None:
    def ratio(key: str, inverse: bool = False) -> str:
        if hf is None:
            return "-"
        return f"{(hf[key] / ours[key]) if inverse else (ours[key] / hf[key]):.2f}x"

    hf_v = (lambda k: f"{hf[k]:.1f}") if hf else (lambda k: "-")
    print(f"\n[{kind} {dname}] decode reads {ours['bytes'] / 1e9:.2f} GB/token; floor {floor_tps:.1f} tok/s")
    print(f"  prefill tok/s  ours {ours['prefill_tps']:8.1f}  transformers {hf_v('prefill_tps'):>8}  "
          f"ratio {ratio('prefill_tps')}")
    print(f"  decode  tok/s  ours {ours['decode_tps']:8.2f}  transformers {hf_v('decode_tps'):>8}  "
          f"ratio {ratio('decode_tps')}  ({100 * ours['decode_tps'] / floor_tps:.0f}% of the bandwidth floor)")
    print(f"  end-to-end s   ours {ours['total_s']:8.2f}  transformers {hf_v('total_s'):>8}  "
          f"ratio {ratio('total_s', inverse=True)}  (greedy tokens equal: {same}/{n})")


if __name__ == "__main__":
    main()
