"""MoE expert computation: the engine's decode path (views of the chosen experts) and grouped path
(token-slots sorted by expert, one matmul pair each) against transformers' Mixtral block run with its
per-expert loop ("eager") and with its default on CPU ("grouped_mm"), on the same random weights.
    python3 bench/moe_routing.py                     # E=8, k=2, D=2048, F=5632; T = 1, 4, 128, 512
    python3 bench/moe_routing.py --experts 4 --dtypes float32 --tokens 1,256
"""
from __future__ import annotations

import argparse
import time

import torch

from merger.engine import moe
from merger.io.dtypes import parse_dtype


def best_ms(fn, repeat: int, budget_s: float = 20.0) -> float:
    """Best of `repeat` runs (fewer if one run is slow), in milliseconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat and (not times or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def hf_block(router, w13, w2, top_k: int, impl: str):
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    e, two_f, d = w13.shape
    cfg = transformers.MixtralConfig(hidden_size=d, intermediate_size=two_f // 2, num_local_experts=e,
                                     num_experts_per_tok=top_k)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg).to(w13.dtype).eval()
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(w13)
        block.experts.down_proj.copy_(w2)
    return block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--tokens", default="1,4,128,512")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    e, d, f = a.experts, a.hidden, a.intermediate
    print(f"E={e} top-{a.top_k} D={d} F={f}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "milliseconds per MoE block call (best of runs), ratio = transformers eager / ours")
    for dname in a.dtypes.split(","):
        dt = parse_dtype(dname)
        router = (torch.randn(e, d, generator=g) / d ** 0.5).to(dt)
        w13 = (torch.randn(e, 2 * f, d, generator=g) / d ** 0.5).to(dt)
        w2 = (torch.randn(e, d, f, generator=g) / f ** 0.5).to(dt)
        blocks = {impl: hf_block(router, w13, w2, a.top_k, impl) for impl in ("eager", "grouped_mm")}
        for n in (int(t) for t in a.tokens.split(",")):
            x = torch.randn(1, n, d, generator=g).to(dt)
            flat = x[0]

            def ours(path):
                w, idx = moe.route(flat, router, a.top_k, True)
                return path(flat, w13, w2, w, idx).to(dt)

            with torch.inference_mode():
                ref = blocks["eager"](x)[0].float()
                row = {"decode": ours(moe.experts_decode), "grouped": ours(moe.experts_grouped)}
                err = max((v.float() - ref).abs().max().item() for v in row.values()) / ref.abs().max().item()
                ms = {name: best_ms(lambda p=p: ours(p), a.repeat)
                      for name, p in (("decode", moe.experts_decode), ("grouped", moe.experts_grouped))}
                for impl, block in blocks.items():
                    ms["hf " + impl] = best_ms(lambda b=block: b(x), a.repeat)
            fastest = min(ms["decode"], ms["grouped"])
            cells = "  ".join(f"{k} {v:9.2f}" for k, v in ms.items())
            print(f"{dname:8} T={n:<4} {cells}  ratio {ms['hf eager'] / fastest:5.2f}x  "
                  f"(vs hf grouped_mm {ms['hf grouped_mm'] / fastest:6.2f}x; max rel diff {err:.1e})")


if __name__ == "__main__":
    main()
