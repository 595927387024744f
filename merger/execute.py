"""Runs a BuildPlan into a staged folder: the shards are laid out and their space reserved, the
plan's prepare steps run (MoE router rows), then every tensor is computed, checked for finite values,
cast and streamed to its place; then config.json, the tokenizer files, the recipe and the model card.
Each input tensor is read when its output needs it and freed right after."""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from merger.card import RECIPE_NAME, finish_card, scrub_recipe
from merger.errors import CheckpointError, PluginError, RecipeError
from merger.io.writer import ShardWriter, TensorSpec
from merger.plan import BuildPlan, OutputTensor
from merger.stream import ReadAhead, Writer


class Progress:
    """Tensors done / total, MB written, MB/s and the time left, on stderr when it is a terminal."""

    def __init__(self, label: str, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.label = label
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int, nbytes: int, total_bytes: int | None = None) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and done < total):
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = nbytes / 1e6 / elapsed
        eta = ""
        if total_bytes and 0 < nbytes < total_bytes:
            eta = f", {(total_bytes - nbytes) / (nbytes / elapsed):.0f} s left"
        end = "\n" if done == total else ""
        print(f"\r{self.label}: {done}/{total} tensors, {nbytes / 1e6:.1f} MB, {rate:.1f} MB/s{eta}   ", end=end,
              file=sys.stderr, flush=True)


def _all_finite(t: torch.Tensor) -> bool:
    # min/max propagate NaN and show ±inf, without isfinite's tensor-sized bool temporary (14x faster).
    return not t.numel() or all(map(math.isfinite, (float(v) for v in torch.aminmax(t))))


def check_finite(t: OutputTensor, value: torch.Tensor, saved: torch.Tensor) -> None:
    """A NaN/inf in the output names its cause: a damaged input, an overflow of the saved dtype, or
    what computed it (a method and its parameters, a recipe knob)."""
    if _all_finite(saved):
        return
    for ck, name in t.sources:
        if not _all_finite(ck.get(name)):
            raise CheckpointError(f"model {ck.label!r}: tensor {name} holds NaN or inf values; the checkpoint is "
                                  f"damaged; re-download or re-save it")
    if _all_finite(value):
        peak = float(value.float().abs().max())
        raise RecipeError(f"tensor {t.name} reaches {peak:.3g}, beyond what {t.dtype} holds; save it as "
                          f"out_dtype bfloat16 or float32" + (f", or check {t.blame}" if t.blame else ""))
    what = t.blame or "the computation"
    cls = PluginError if what.startswith(("merge method", "gate")) else RecipeError
    raise cls(f"{what} produced NaN/inf in tensor {t.name} from finite inputs; check the parameters and the method")


def budget_for(tensors: list[OutputTensor]) -> int:
    """Bytes in flight at most: (inputs + 2) x the largest tensor read or written."""
    largest = max([t.dtype.itemsize * math.prod(t.shape) for t in tensors] +
                  [ck.nbytes(name) for t in tensors for ck, name in t.sources], default=1)
    inputs = max([len(t.sources) for t in tensors], default=1)
    return (inputs + 2) * largest


def default_workers() -> int:
    """One merge worker per core this process may use (at most 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def run_tensors(tensors: list[OutputTensor], shards: ShardWriter, progress: Progress | None = None,
                limit: int | None = None, workers: int | None = None) -> ReadAhead:
    """Compute every tensor while merger.stream reads ahead and writes behind. Each worker computes whole
    tensors on one core (torch's own threads are set to 1 meanwhile): no thread waits at another's
    barrier, which a busy workstation punishes, and every sum is taken in one order, so the result is the
    same bytes whatever the number of workers or cores. Returns the read-ahead, for its counts."""
    out_bytes = [t.dtype.itemsize * math.prod(t.shape) for t in tensors]
    ahead = ReadAhead([(t.sources, n) for t, n in zip(tensors, out_bytes)], limit or budget_for(tensors))
    checkpoints = {id(ck): ck for t in tensors for ck, _ in t.sources if hasattr(ck, "read_into")}
    for ck in checkpoints.values():
        ck.read_ahead = ahead
    writer = Writer(shards)
    intra = torch.get_num_threads()
    torch.set_num_threads(1)
    lock = threading.Lock()
    errors: list[tuple[int, BaseException]] = []
    done = [0]

    def work() -> None:
        torch.set_num_threads(1)  # BLAS libraries keep their thread count per calling thread
        while not errors and (k := ahead.claim()) is not None:
            t = tensors[k]
            try:
                ahead.begin(k)
                place = shards.mapped(t.name) if t.writes_out else None
                value = t.compute(out=place) if place is not None else t.compute()
                saved = value.to(t.dtype)
                check_finite(t, value, saved)
                in_place = (place is not None and saved.data_ptr() == place.data_ptr()
                            and saved.stride() == place.stride())  # the method returned ctx.out itself
                writer.put(t.name, None if in_place else saved, lambda k=k: ahead.release(k))
                del value, saved, place
            except BaseException as e:
                errors.append((k, e))
                ahead.close()  # wakes every thread waiting for memory or reads
                return
            finally:
                ahead.end()
            with lock:
                done[0] += 1
                if progress is not None:
                    progress(done[0], len(tensors), shards.written_bytes, shards.total_bytes)

    threads = [threading.Thread(target=work, name=f"merger-worker-{i}", daemon=True)
               for i in range((workers or default_workers()) - 1)]
    ahead.start()
    try:
        for th in threads:
            th.start()
        work()  # this thread is a worker too (Ctrl-C lands here)
        for th in threads:
            th.join()
    finally:
        ahead.close()  # after an error or Ctrl-C, the other workers finish the tensor in hand and stop
        for th in threads:
            if th.ident is not None:
                th.join()
        for ck in checkpoints.values():
            ck.read_ahead = None
        torch.set_num_threads(intra)
        try:
            writer.close()
        except BaseException:
            if not errors:
                raise
    if errors:  # the tensors before a failing one were claimed and finish, so this is the first in plan order
        raise min(errors, key=lambda ke: (not isinstance(ke[1], KeyboardInterrupt), ke[0]))[1]
    return ahead


def write_plan(plan: BuildPlan, dst: Path, shard_bytes: int, recipe: Any, title: str,
               paths: dict[str, Path], base_dir: str | None, progress: Progress | None = None,
               recipe_text: str | None = None, workers: int | None = None) -> list[str]:
    """Everything the plan describes, into the (staged) folder `dst`; returns the shard file names."""
    specs = [TensorSpec(t.name, t.shape, t.dtype) for t in plan.tensors]
    with ShardWriter(dst, specs, shard_bytes, plan.metadata) as writer:
        for step in plan.prepare:
            step()
        run_tensors(plan.tensors, writer, progress, workers=workers)
        files = writer.finish()
    (dst / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    plan.tokenizer.write(dst)
    save_recipe(dst, recipe, recipe_text)
    if plan.card_body is not None:
        (dst / "README.md").write_text(plan.card_body())
    finish_card(dst, title, paths, base_dir)
    return files


def save_recipe(dst: Path, recipe: Any, text: str | None = None) -> None:
    text = text if text is not None else getattr(recipe, "_source_text", None)
    if text is None:  # a recipe built in Python: typed parameter values dump in their YAML form
        text = yaml.safe_dump(recipe.model_dump(exclude_none=True, by_alias=True), sort_keys=False)
    (dst / RECIPE_NAME).write_text(scrub_recipe(text))  # no absolute paths or tokens leave the machine
