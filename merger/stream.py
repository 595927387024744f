"""Overlapped I/O for running a plan: while the main thread computes tensor k, a read-ahead thread reads
the inputs of the tensors after it and a writer thread writes tensor k-1, each in a syscall that
releases the GIL, so reading, merging and writing use both cores.

Reads go into pooled buffers that are reused once the tensor that read them has been written: a fresh
allocation per tensor would cost a page fault and a zeroed page for every 4 KiB (the kernel's time, not
the merge's). Everything in flight (pooled input buffers, the output being computed, outputs waiting to
be written) stays within one byte budget, (inputs + 2) x the largest tensor by default, whatever the
shard size. Each tensor is written at its planned offset and the shards are flushed to disk as the
writing goes, so the final fsync is short.
"""
from __future__ import annotations

import os
import queue
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch


SYNC_EVERY = 256 * 2**20  # bytes written between fdatasync calls: the disk works while the merge does


class Budget:
    """Bytes in flight; `take` blocks until they fit. The read-ahead leaves room for the main thread."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()
        self.closed = False

    def take(self, n: int, reserve: int = 0) -> bool:
        with self.cond:
            while not self.closed and self.used and self.used + n + reserve > self.limit:
                self.cond.wait()
            if self.closed:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class BufferPool:
    """Byte buffers handed out by size (the smallest free one that fits) and given back for reuse."""

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            fits = [b for b in self.free if b.numel() >= nbytes]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                self.free.remove(buf)
                return buf
            if self.free and sum(b.numel() for b in self.free) > 4 * nbytes:
                self.free.remove(min(self.free, key=lambda b: b.numel()))  # keep the pool from hoarding
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        with self.lock:
            self.free.append(buf)


class ReadAhead:
    """Reads each planned tensor's sources ahead of its turn. `take(ck, name)` hands a prefetched tensor
    to the job (or None: read it directly); `done(k)` releases tensor k's buffers once it is written."""

    def __init__(self, jobs: list[list[tuple[Any, str]]], budget: Budget, reserve: int, ahead: int = 8):
        self.jobs, self.budget, self.reserve, self.ahead = jobs, budget, reserve, ahead
        # how many more times each job may take each of its sources: a second read (e.g. a check after a
        # NaN) goes to the file itself
        self.left = [Counter((id(ck), name) for ck, name in srcs if hasattr(ck, "read_into")) for srcs in jobs]
        self.pool = BufferPool()
        self.ready: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.held: dict[int, list[tuple[torch.Tensor, int]]] = {}
        self.cond = threading.Condition()
        self.current = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="merger-read-ahead", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            for k, sources in enumerate(self.jobs):
                with self.cond:
                    while k > self.current + self.ahead and not self.budget.closed:
                        self.cond.wait()
                for ck, name in sources:
                    if self.budget.closed:
                        return
                    if not hasattr(ck, "read_into"):
                        continue  # a LoRA view or pickled weights: the job reads them itself
                    n = ck.nbytes(name)
                    if not self.budget.take(n, self.reserve if k > self.current else 0):
                        return
                    buf = self.pool.take(n)
                    t = ck.read_into(name, buf)
                    with self.cond:
                        self.ready.setdefault((id(ck), name), []).append(t)
                        self.held.setdefault(k, []).append((buf, n))
                        self.cond.notify_all()
        except BaseException as e:  # handed to the main thread, which reads the tensor itself and fails there
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def take(self, k: int, ck: Any, name: str) -> torch.Tensor | None:
        """Tensor `name` of `ck` for job k: prefetched (waiting for the read if it is under way)."""
        key = (id(ck), name)
        if k >= len(self.left) or not self.left[k][key]:
            return None
        self.left[k][key] -= 1
        with self.cond:
            while not self.ready.get((id(ck), name)) and self.error is None and self.thread.is_alive():
                self.cond.wait(0.5)
            got = self.ready.get((id(ck), name))
            return got.pop(0) if got else None

    def advance(self, k: int) -> None:
        with self.cond:
            self.current = k
            self.cond.notify_all()

    def done(self, k: int) -> None:
        for buf, n in self.held.pop(k, []):
            self.pool.give(buf)
            self.budget.give(n)

    def close(self) -> None:
        self.budget.close()
        with self.cond:
            self.cond.notify_all()
        self.thread.join(timeout=30)


class Writer:
    """Writes (name, tensor) pairs in a thread, flushing each shard every SYNC_EVERY bytes; `then` runs
    after each write (releasing the budget and the input buffers). The first error is re-raised."""

    def __init__(self, shards: Any, budget: Budget):
        self.shards, self.budget = shards, budget
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.unsynced: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run, name="merger-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            name, tensor, then = item
            try:
                if self.error is None:
                    fd = self.shards.write(name, tensor)
                    self.unsynced[fd] = self.unsynced.get(fd, 0) + tensor.numel() * tensor.element_size()
                    if self.unsynced[fd] >= SYNC_EVERY:
                        os.fdatasync(fd)
                        self.unsynced[fd] = 0
            except BaseException as e:
                self.error = e
            finally:
                del tensor
                then()

    def put(self, name: str, tensor: torch.Tensor, then: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((name, tensor, then))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
