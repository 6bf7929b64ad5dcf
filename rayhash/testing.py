"""Test hooks, in one place and out of the production paths: stand-ins for hardware this machine may lack.

``fake_faiss_gpu`` replaces faiss's GPU classes with CPU-backed fakes that fail the way the real ones fail, so the
GPU search path (shard copies, the one-search-at-a-time lock, the k limit, the capability gate) runs and is
checked on a CPU-only machine. :func:`hooks` builds the instrumentation that tests pass to ``train`` and
``encode_dataset`` (trace what workers saw, kill a worker, crash the encode driver). Nothing in ``rayhash``
imports this module.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from rayhash.hooks import Hooks

GPU_MAX_K = 2048  # faiss GPU k-selection limit (GPU_MAX_SELECTION_K)


class FakeGpuStats:
    """What the fakes saw: searches run on the 'GPU', the largest k asked, concurrent calls refused."""

    def __init__(self) -> None:
        self.searches, self.max_k, self.indices = 0, 0, 0


class _FakeResources:
    """``StandardGpuResources``: one stream and scratch memory, shared by every index made with it; two searches
    at once on it corrupt each other's scratch space (here: the second raises)."""

    def __init__(self) -> None:
        self.busy = threading.Lock()


def _fake_index_class(stats: FakeGpuStats, capability: tuple[int, int], low: tuple[int, int],
                      high: tuple[int, int] | None):
    class FakeGpuIndexBinaryFlat:
        """``GpuIndexBinaryFlat`` backed by numpy: exact distances, ties in arbitrary order (as GPU k-selection
        returns them), ``k > 2048`` refused, concurrent use of its resources refused, and on a GPU newer than the
        wheel's kernels the process aborts (no Python exception), as faiss-gpu-cu12 does on compute capability 9.0."""

        def __init__(self, resources: _FakeResources, cpu_index) -> None:
            if capability < low or (high is not None and capability > high):
                os.abort()  # "no kernel image is available for execution on the device", then abort()
            self.resources, self.d, self.ntotal = resources, cpu_index.d, cpu_index.ntotal
            self.codes = cpu_index.reconstruct_n(0, cpu_index.ntotal) if cpu_index.ntotal else np.zeros(
                (0, cpu_index.d // 8), np.uint8)
            self.rng = np.random.default_rng(0)
            stats.indices += 1

        def search(self, q: np.ndarray, k: int):
            if k > GPU_MAX_K:
                raise RuntimeError(f"Error in GpuIndexBinaryFlat::search: k must be <= {GPU_MAX_K} "
                                   "(GPU_MAX_SELECTION_K)")
            if not self.resources.busy.acquire(blocking=False):
                raise RuntimeError("FakeGpuIndexBinaryFlat: two searches at once on one StandardGpuResources "
                                   "(a real GPU index would return corrupted results or crash)")
            try:
                stats.searches += 1
                stats.max_k = max(stats.max_k, k)
                dist = np.unpackbits(q[:, None, :] ^ self.codes[None, :, :], axis=2).sum(axis=2)
                tiebreak = self.rng.random(dist.shape)  # GPU k-selection: ties come back in no particular order
                order = np.lexsort((tiebreak, dist), axis=1)[:, :k]
                d = np.take_along_axis(dist, order, axis=1).astype(np.int32)
                ids = order.astype(np.int64)
                if k > self.ntotal:
                    pad = k - self.ntotal
                    d = np.concatenate([d, np.full((len(q), pad), np.iinfo(np.int32).max, np.int32)], axis=1)
                    ids = np.concatenate([ids, np.full((len(q), pad), -1, np.int64)], axis=1)
                return d, ids
            finally:
                self.resources.busy.release()

    return FakeGpuIndexBinaryFlat


@contextlib.contextmanager
def fake_faiss_gpu(capability: tuple[int, int] = (8, 0), wheel: str = "faiss-gpu-cu12") -> Iterator[FakeGpuStats]:
    """Within the block, faiss is the GPU ``wheel`` (one of ``rayhash.index.gpu.FAISS_GPU_WHEELS``) with one 'GPU'
    of ``capability``: ``get_num_gpus() == 1``, ``StandardGpuResources`` and ``GpuIndexBinaryFlat`` are the fakes
    above (aborting the process where that wheel has no kernels), and the CUDA driver reports ``capability``.
    Yields the stats."""
    import faiss

    from rayhash.index import gpu as search

    stats = FakeGpuStats()
    low, high = search.FAISS_GPU_WHEELS[wheel]
    saved = {name: getattr(faiss, name, None) for name in ("get_num_gpus", "StandardGpuResources",
                                                           "GpuIndexBinaryFlat")}
    saved_cc, saved_res, saved_wheel = search.gpu_capability, search._GPU_RES, search.faiss_gpu_wheel
    faiss.get_num_gpus = lambda: 1
    faiss.StandardGpuResources = _FakeResources
    faiss.GpuIndexBinaryFlat = _fake_index_class(stats, capability, low, high)
    search.gpu_capability = lambda device=0: capability
    search.faiss_gpu_wheel = lambda: (wheel, low, high)
    search._GPU_RES = None
    try:
        yield stats
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(faiss, name)
            else:
                setattr(faiss, name, value)
        search.gpu_capability, search._GPU_RES, search.faiss_gpu_wheel = saved_cc, saved_res, saved_wheel


@dataclass(frozen=True)
class _TestHooks(Hooks):
    """What :func:`hooks` builds: records, fails and crashes at the points :class:`rayhash.hooks.Hooks` names."""

    trace_dir: str | None = None
    fail_at: tuple[int, int, str] | None = None  # (rank, step, marker file)
    crash_after_output: int | None = None

    def train_step(self, rank: int, step: int) -> None:
        if self.fail_at is None:
            return
        fail_rank, fail_step, marker = self.fail_at
        if (rank, step) == (fail_rank, fail_step) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies as a lost node's would: no clean-up, no exception

    def train_restored(self, rank: int, epoch: int, step: int, fingerprint: dict[str, float]) -> None:
        self._write(f"restore-rank{rank}-{time.time_ns()}", {"epoch": epoch, "step": step, **fingerprint})

    def train_epoch(self, rank: int, epoch: int, labels: list[int], node: str) -> None:
        self._write(f"epoch{epoch}-rank{rank}", {"labels": labels, "node": node})

    def encode_output(self, written: int) -> None:
        if self.crash_after_output == written:
            os._exit(137)  # the encode driver dies mid-run, as a killed job does

    def _write(self, name: str, obj: dict) -> None:
        if self.trace_dir:
            from rayhash import storage

            storage.write_json(storage.join(self.trace_dir, name + ".json"), obj)


def hooks(trace: str | os.PathLike | None = None, fail_at: tuple[int, int, str | os.PathLike] | None = None,
          crash_after_output: int | None = None) -> Hooks:
    """Test hooks for ``train(..., hooks=)`` and ``encode_dataset(..., hooks=)``:
    ``trace``: each worker writes ``epoch<E>-rank<R>.json`` (labels seen, node) and ``restore-rank<R>-*.json``
    (epoch, step, weight and optimizer sums) into this folder; ``fail_at=(rank, step, marker)``: that worker exits
    before that global step, once (the marker file records it); ``crash_after_output=N``: the encode driver exits
    with status 137 right after writing its N-th code shard."""
    fail = None if fail_at is None else (int(fail_at[0]), int(fail_at[1]), str(fail_at[2]))
    return _TestHooks(wants_labels=trace is not None, trace_dir=None if trace is None else str(trace),
                      fail_at=fail, crash_after_output=crash_after_output)
