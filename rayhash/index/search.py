"""Exact top-k over index shards with ties broken by key, so results never depend on how codes are sharded.

Each shard answers with its own exact top-k by (distance, key): FAISS returns the nearest codes with ties in
arbitrary order, so a shard asks for more than k and, while the tie group at its k-th distance may continue past
what FAISS returned, asks again with twice as many. Merging exact per-shard (or per-actor) top-k lists by
(distance, key) gives the exact global top-k.

Inside a :class:`ShardGroup` (the shards of one process) keys are replaced by their rank in the group's sorted key
table, and a candidate by the single integer ``distance * stride + rank``: selecting and merging are then plain
integer sorts, and keys are looked up only for the k winners. Between groups (Ray actors) candidates travel with
their keys as fixed-width numpy unicode arrays (C-speed sorting).
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rayhash import storage
from rayhash.index.types import configure
from rayhash.layout import IndexDir
from rayhash.runtime import get_logger, ray_gave_no_gpu

_SENTINEL = np.iinfo(np.int32).max
_EMPTY = np.iinfo(np.int64).max  # integer candidate slot with no code
log = get_logger("rayhash.index")

GPU_MAX_K = 2048  # faiss GPU k-selection limit


@dataclass
class SearchResult:
    """Per query the k nearest codes: ``distances`` int32 (nq,k), ``keys`` object (nq,k), ``labels`` int32 (nq,k).
    Rows are sorted by (distance, key); missing hits (fewer than k reachable) have distance -1, key None."""

    distances: np.ndarray
    keys: np.ndarray
    labels: np.ndarray


@dataclass
class RangeResult:
    """All codes within a Hamming radius, per query ``i`` in ``[lims[i], lims[i+1])``, sorted by (distance, key)."""

    lims: np.ndarray
    distances: np.ndarray
    keys: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.lims) - 1

    def __getitem__(self, i: int) -> SearchResult:
        a, b = self.lims[i], self.lims[i + 1]
        return SearchResult(self.distances[a:b], self.keys[a:b], self.labels[a:b])


def select_topk(d: np.ndarray, keys: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Row-wise top-k of candidate lists by (distance, key); invalid candidates carry distance ``_SENTINEL``."""
    nq, w = d.shape
    if w < k:
        pad = ((0, 0), (0, k - w))
        d, keys, labels = np.pad(d, pad, constant_values=_SENTINEL), np.pad(keys, pad), np.pad(labels, pad,
                                                                                                  constant_values=-1)
    order = np.lexsort((keys, d), axis=-1)[:, :k]
    return tuple(np.take_along_axis(a, order, axis=1) for a in (d, keys, labels))


def finish(d: np.ndarray, keys: np.ndarray, labels: np.ndarray) -> SearchResult:
    """Candidate arrays (sentinel-padded, unicode keys) -> public :class:`SearchResult`."""
    missing = d == _SENTINEL
    out_keys = keys.astype(object)
    out_keys[missing] = None
    return SearchResult(np.where(missing, -1, d).astype(np.int32), out_keys,
                        np.where(missing, -1, labels).astype(np.int32))


def merge_topk(parts: list[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, ...]:
    """Merge exact per-part top-k candidate triples into the exact top-k."""
    if len(parts) == 1:
        return select_topk(*parts[0], k)
    d = np.concatenate([p[0] for p in parts], axis=1)
    keys = np.concatenate([p[1] for p in parts], axis=1)
    labels = np.concatenate([p[2] for p in parts], axis=1)
    return select_topk(d, keys, labels, k)


def merge_ranges(parts: list[tuple[np.ndarray, ...]], nq: int) -> tuple[np.ndarray, ...]:
    """Merge per-part range results ``(qid, distances, keys, labels)`` sorted by (query, distance, key)."""
    qid, d, keys, labels = (np.concatenate([p[i] for p in parts]) for i in range(4))
    order = np.lexsort((keys, d, qid))
    return tuple(a[order] for a in (qid, d, keys, labels))


def ranges_to_result(qid: np.ndarray, d: np.ndarray, keys: np.ndarray, labels: np.ndarray, nq: int) -> RangeResult:
    lims = np.searchsorted(qid, np.arange(nq + 1)).astype(np.int64)
    return RangeResult(lims, d.astype(np.int32), keys.astype(object), labels.astype(np.int32))


_GPU_RES = None


# The compute capabilities each faiss GPU wheel has kernels for, read from the wheels with `cuobjdump --list-elf`
# and `--list-ptx`: (lowest, highest), highest None when the wheel carries PTX that newer GPUs JIT-compile.
FAISS_GPU_WHEELS = {
    "faiss-gpu-cu12": ((7, 0), (8, 9)),  # 1.14.1.post1: SASS for sm_70 and sm_80, no PTX; CUDA 12 (H100: aborts)
    "faiss-gpu-cuvs": ((7, 5), None),    # 1.15.1: SASS for sm_75, 80, 86, 89, 90 and compute_90 PTX; CUDA 13.2
}
_GPU_LOCK = threading.Lock()  # FAISS GPU indices are not thread-safe, even for searches: one search at a time


def faiss_gpu_wheel() -> tuple[str, tuple[int, int], tuple[int, int] | None] | None:
    """(distribution, lowest, highest compute capability) of the installed faiss GPU wheel, when it is one of
    :data:`FAISS_GPU_WHEELS`; None for faiss-cpu, conda or source builds (whose targets pip metadata cannot tell)."""
    from importlib.metadata import PackageNotFoundError, version

    for name, (low, high) in FAISS_GPU_WHEELS.items():
        try:
            version(name)
        except PackageNotFoundError:
            continue
        return name, low, high
    return None


def faiss_gpu_usable() -> bool:
    """Whether flat shards may be copied to a GPU here: faiss sees a GPU, Ray gave this worker one (or this is a
    driver), and the GPU is one the installed faiss wheel has kernels for. On another GPU (faiss-gpu-cu12 on an
    H100, compute capability 9.0) the first kernel launch would abort the process inside FAISS, with no Python
    exception to fall back from, so the CPU index is used and a warning says so; ``RAYHASH_FAISS_GPU=force``
    overrides."""
    import faiss

    if ray_gave_no_gpu() or not hasattr(faiss, "GpuIndexBinaryFlat") or faiss.get_num_gpus() == 0:
        return False
    cc = gpu_capability()
    if cc is None:  # cannot tell which GPU this is
        return False
    wheel = faiss_gpu_wheel()
    if wheel and os.environ.get("RAYHASH_FAISS_GPU") != "force":
        name, low, high = wheel
        if cc < low or (high is not None and cc > high):
            top = f"{high[0]}.{high[1]}" if high else "newer"
            log.warning("GPU compute capability %d.%d is outside what %s has kernels for (%d.%d to %s): searching on "
                        "CPU. faiss-gpu-cuvs 1.15 (CUDA 13.2) covers 7.5 to 9.0 and newer; RAYHASH_FAISS_GPU=force "
                        "skips this check", *cc, name, *low, top)
            return False
    return True


def gpu_capability(device: int = 0) -> tuple[int, int] | None:
    """Compute capability of visible GPU ``device`` from the CUDA driver (libcuda), or None. Read through the driver
    API, not torch: torch's wheel brings its own CUDA runtime (13 for torch 2.14 from PyPI) and faiss-gpu-cu12 brings
    CUDA 12; an index process imports faiss only, so it never holds two CUDA runtimes."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), device):
            return None
        if (cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
                or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)):  # ..._MINOR
            return None
        return major.value, minor.value
    except OSError:  # no NVIDIA driver on this machine
        return None


def _gpu_resources():
    global _GPU_RES
    import faiss

    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


class Shard:
    """One loaded index shard: the FAISS index (plus a GPU copy for flat shards when faiss sees GPUs) and its
    id map (keys as a numpy unicode array, labels int32). The :class:`ShardGroup` that holds the shard replaces
    the id map by ``rank``, each id's rank in the group's sorted key table."""

    def __init__(self, name: str, index, keys: np.ndarray, labels: np.ndarray, index_type: str,
                 params: dict[str, Any], use_gpu: bool = True):
        import faiss

        self.name, self.index, self.keys, self.labels = name, index, keys, labels
        self.index_type, self.params = index_type, params
        self.ntotal = int(index.ntotal)
        self.rank = np.arange(self.ntotal, dtype=np.int64)
        self.stride = self.ntotal + 1
        self.overfetch = 2  # first FAISS call asks for overfetch*k+8; doubled while ties often run past that
        self.key_ordered = False  # ids in key order (see ShardGroup._merge): FAISS's top-k is exact as it is
        self._mih = None  # mih: its tables (MultiIndex), built on first use (see tables())
        self._mih_calls = 0  # mih: batches searched
        self._cost = {"probe": None, "scan": None}  # mih: measured seconds per query of each path (see _mih_search)
        self._selection = {False: (0.0, 0), True: (0.0, 0)}  # use_heap -> (summed s/query, batches): see below
        if index_type == "mih" and hasattr(index, "storage"):
            # mih shards written by earlier rayhash versions hold a FAISS IndexBinaryMultiHash: only its codes serve;
            # the multi-hash index is kept, as it owns them
            self._multihash, index = index, index.storage
            self.index = index
        configure(index, index_type, params)
        self.scan = index  # what a k-NN scan searches
        self.gpu_index = None
        if use_gpu and index_type == "flat" and faiss_gpu_usable():
            self.gpu_index = faiss.GpuIndexBinaryFlat(_gpu_resources(), index)

    @classmethod
    def load(cls, index_dir: str, entry: dict[str, Any], manifest: dict[str, Any], *, verify: bool = True,
             use_gpu: bool = True, params: dict[str, Any] | None = None) -> "Shard":
        """Load and verify one shard (sha256 of both files, code width, index type, row counts).

        Both files are read straight into memory from wherever they are (local or object store) and the index is
        built from those bytes: nothing is copied to local disk, so an index on object storage leaves no files
        behind on the nodes that open it. Peak memory while loading: the shard's files plus the loaded shard."""
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        bits = manifest["bits"]
        data = {}
        for field in ("index", "idmap"):
            uri = IndexDir.of(index_dir).member(entry[field], IndexDir.MANIFEST)
            if not storage.exists(uri):
                raise FileNotFoundError(f"{uri}: shard file listed in manifest.json is missing; restore it or "
                                        "rebuild the index with `rayhash index build`")
            data[field] = storage.read_bytes(uri)
            if verify and hashlib.sha256(data[field]).hexdigest() != entry[f"{field}_sha256"]:
                raise ValueError(f"{uri}: sha256 does not match manifest.json — the shard file is corrupted or was "
                                 "modified; rebuild the index with `rayhash index build`")
        uri = IndexDir.of(index_dir).member(entry["index"], IndexDir.MANIFEST)
        try:
            index = faiss.deserialize_index_binary(np.frombuffer(data.pop("index"), dtype=np.uint8))
        except RuntimeError as e:
            raise ValueError(f"{uri}: FAISS cannot read this file ({str(e).splitlines()[-1][:120]}); it is "
                             "corrupted — rebuild the index with `rayhash index build`") from e
        if index.d != bits:
            raise ValueError(f"{uri}: holds {index.d}-bit codes but manifest.json says bits={bits}; the manifest does "
                             "not belong to these shards — rebuild the index")
        expected = manifest.get("faiss_class")
        if expected and type(index).__name__ != expected:
            raise ValueError(f"{uri}: is a {type(index).__name__} but manifest.json says index_type="
                             f"{manifest['index_type']!r} ({expected}); rebuild the index")
        ids = pq.read_table(pa.BufferReader(data.pop("idmap")))
        if not (ids.num_rows == index.ntotal == entry["count"]):
            raise ValueError(f"{uri}: {index.ntotal} codes, id map {ids.num_rows} rows, manifest count "
                             f"{entry['count']} — inconsistent shard; rebuild the index")
        keys = np.asarray(ids.column("key").to_pylist(), dtype=str)
        labels = ids.column("label").to_numpy(zero_copy_only=False).astype(np.int32)
        return cls(entry["index"], index, keys, labels, manifest["index_type"],
                   {**manifest["params"], **(params or {})}, use_gpu)

    def _faiss_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.gpu_index is not None and k <= GPU_MAX_K:
            with _GPU_LOCK:
                return self.gpu_index.search(q, k)
        return self.scan.search(q, k)  # k > 2048 on GPU shards: the CPU copy answers

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k of this shard by (distance, key): (nq, k) int64 ``distance * stride + rank``, sorted,
        ``_EMPTY`` where the shard has fewer than k codes."""
        if not self.ntotal:
            return np.full((len(q), k), _EMPTY, np.int64)
        if self.index_type == "mih":
            return self._mih_search(q, k)
        return self._scan_search(q, k)

    def tables(self):
        """The multi-index hash tables over this shard's codes (:class:`rayhash.index.mih.MultiIndex`), built once,
        after a :class:`ShardGroup` has ranked the keys."""
        import faiss

        from rayhash.index.mih import MultiIndex

        if self._mih is None:
            codes = faiss.rev_swig_ptr(self.scan.xb.data(), self.ntotal * self.scan.code_size)  # a view, no copy
            self._mih = MultiIndex(codes.reshape(self.ntotal, self.scan.code_size), self.rank, self.stride,
                                   self.params.get("nhash"))
        return self._mih

    def _mih_search(self, q: np.ndarray, k: int) -> np.ndarray:
        """Multi-index hashing (:mod:`rayhash.index.mih`): exact, each query probing with the radius it needs, and
        queries whose probes would cost more than half a scan scanned instead.

        Which path a batch takes is decided by measured time per query: the first batch probes, the next scans
        (unless the first one's fallback scans already timed it), then each batch takes the cheaper. While probing
        costs more than it saves (codes far apart: random ones, or queries whose neighbours are many bits away)
        every 8th batch probes again, so the choice follows the queries."""
        from rayhash.index.mih import default_threads

        self._mih_calls += 1
        probe, scan = self._cost["probe"], self._cost["scan"]
        if probe is not None and (scan is None or (probe > scan and self._mih_calls % 8)):
            return self._timed_scan(q, k)
        t0 = time.perf_counter()
        out = np.full((len(q), k), _EMPTY, np.int64)
        out[:, :min(k, self.ntotal)], gave_up = self.tables().search(q, min(k, self.ntotal), default_threads())
        rows = np.flatnonzero(gave_up)
        if len(rows):
            # a handful of queries would overstate a scan's cost per query: timed only from 16 on
            out[rows] = self._timed_scan(q[rows], k, keep=len(rows) >= 16)
        self._cost["probe"] = (time.perf_counter() - t0) / max(1, len(q))
        return out

    def _timed_scan(self, q: np.ndarray, k: int, keep: bool = True) -> np.ndarray:
        """``_scan_search``; with ``keep``, its time per query becomes the scan's cost for :meth:`_mih_search`."""
        t0 = time.perf_counter()
        out = self._scan_search(q, k)
        if keep:
            self._cost["scan"] = (time.perf_counter() - t0) / max(1, len(q))
        return out

    def _candidates(self, d: np.ndarray, i: np.ndarray) -> np.ndarray:
        """FAISS's (distances, ids) as int64 ``distance * stride + rank``, ``_EMPTY`` where FAISS found none (-1)."""
        valid = i >= 0
        return np.where(valid, d.astype(np.int64) * self.stride + self.rank[np.where(valid, i, 0)], _EMPTY)

    def _topk_within(self, q: np.ndarray, kth: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k by (distance, rank) of queries that have at least k codes within their ``kth`` distance:
        one range search to the largest of them, then each query's k smallest within its own."""
        qid, rd, ranks = self._scan_range(q, int(kth.max()))
        keep = rd <= kth[qid]
        qid, c = qid[keep], rd[keep].astype(np.int64) * self.stride + ranks[keep]
        order = np.lexsort((c, qid))
        qid, c = qid[order], c[order]
        return c[np.searchsorted(qid, np.arange(len(q)))[:, None] + np.arange(k)]

    def _scan_range(self, q: np.ndarray, radius: int) -> tuple[np.ndarray, ...]:
        """``range_search`` by scanning the shard's codes: ``(qid, distances, ranks)``."""
        lims, rd, ri = self.scan.range_search(q, radius + 1)  # faiss: strictly below
        return np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64))), rd, self.rank[ri]

    def _key_ordered_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of a key-ordered flat index with the faster of its two k-selections, both exact by
        (distance, id): counting (``use_heap=False``) wins on random codes, the heap on clustered ones (many codes
        near the query cut its candidate lists short). Each is timed per query on live batches: both are tried
        first, then the faster is used and the other re-tried every 32nd batch, so a change in the queries is seen.
        The heap must beat counting by ``1 - HEAP_MARGIN`` to be used: on a quiet machine counting wins by 5-10 % on
        most codes, so a noisy first timing must not switch to the heap for 31 batches."""
        stats = self._selection
        calls = sum(n for _, n in stats.values())
        untried = [h for h, (_, n) in stats.items() if n == 0]
        if untried:
            heap = untried[0]
        else:
            avg = {h: total / n for h, (total, n) in stats.items()}
            best = avg[True] < HEAP_MARGIN * avg[False]
            heap = best if calls % 32 else not best
        self.scan.use_heap = heap
        t0 = time.perf_counter()
        out = self.scan.search(q, k)
        per_query = (time.perf_counter() - t0) / max(1, len(q))
        total, n = stats[heap]
        stats[heap] = (per_query, 1) if n >= 8 else (total + per_query, n + 1)  # recent average (resets after 8)
        return out

    def _scan_search(self, q: np.ndarray, k: int) -> np.ndarray:
        if self.key_ordered and self.gpu_index is None:
            d, i = self._key_ordered_search(q, min(k, self.ntotal))
            return smallest(self._candidates(d, i), k)
        kk = min(self.ntotal, self.overfetch * k + 8)
        d, i = self._faiss_search(q, kk)
        top = smallest(self._candidates(d, i), k)
        # The tie group at the k-th distance may continue past the kk-th hit. Those rows take everything within
        # their k-th distance from one range search (one more scan, however long the tie group) and their top-k
        # by (distance, key) from it.
        rows = np.flatnonzero((kk < self.ntotal) & (i[:, -1] >= 0) & (d[:, -1] == d[:, min(k, kk) - 1]))
        if len(rows):
            if len(rows) > len(q) // 32 and self.overfetch < 64:
                self.overfetch *= 2  # fewer rows need the extra scan next time
            top[rows] = self._topk_within(q[rows], d[rows, k - 1].astype(np.int64), k)
        return top

    def range_search(self, q: np.ndarray, radius: int) -> tuple[np.ndarray, ...]:
        """All codes with distance <= radius: ``(qid, distances, ranks)`` (unsorted).

        Hash indices widen ``nflip`` for the call so that the lookup is exact within the radius; mih probes its
        tables unless their probes alone would cost more than a scan."""
        if self.index_type == "mih":
            if self.ntotal and self.tables().probe_cost(radius) < self.ntotal:
                from rayhash.index.mih import default_threads

                qid, d, ranks = self.tables().range_search(q, radius, default_threads())
                return qid, d.astype(np.int32), ranks
            return self._scan_range(q, radius)
        index = self.index
        saved = getattr(index, "nflip", None)
        if self.index_type == "hash":
            index.nflip = max(saved, radius)
        elif self.index_type == "multihash":
            index.nflip = max(saved, math.ceil((radius + 1) / int(index.nhash)) - 1)
        try:
            lims, d, i = index.range_search(q, radius + 1)  # faiss: strictly below the threshold
        finally:
            if saved is not None:
                index.nflip = saved
        qid = np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64)))
        return qid, d.astype(np.int32), self.rank[i]


HEAP_MARGIN = 0.9  # the heap k-selection is used only when measured at least 10 % faster than counting


def smallest(c: np.ndarray, k: int) -> np.ndarray:
    """Row-wise k smallest of an int64 candidate matrix, sorted, padded with ``_EMPTY`` to k columns."""
    if c.shape[1] > k:
        c = np.partition(c, k - 1, axis=1)[:, :k]
    c = np.sort(c, axis=1)
    if c.shape[1] < k:
        c = np.pad(c, ((0, 0), (0, k - c.shape[1])), constant_values=_EMPTY)
    return c


class ShardGroup:
    """Several shards answered together (threads over shards, FAISS releases the GIL). Keys are ranked over the
    whole group once at load, so that shards return and merge integer candidates (see the module docstring)."""

    def __init__(self, shards: list[Shard], threads: int | None = None):
        keys = np.concatenate([s.keys for s in shards]) if shards else np.array([], str)
        labels = np.concatenate([s.labels for s in shards]) if shards else np.array([], np.int32)
        order = np.argsort(keys, kind="stable")
        rank = np.empty(len(keys), np.int64)
        rank[order] = np.arange(len(keys))
        # sorted key/label tables plus one last row ("", -1) that empty candidate slots look up
        self.sorted_keys = np.append(keys[order], "")
        self.sorted_labels = np.append(labels[order], np.int32(-1)).astype(np.int32)
        self.stride = len(keys) + 1
        offsets = np.cumsum([0] + [s.ntotal for s in shards])
        for s, a in zip(shards, offsets):  # the group's sorted tables replace the shards' own copies
            s.rank, s.stride, s.keys, s.labels = rank[a:a + s.ntotal], self.stride, None, None
        self.shards = self._merge(shards)
        for s in self.shards:
            if s.index_type == "mih" and s.ntotal:
                s.tables()  # built as the group loads, not by its first query
        # threads over shards; one (merged) index: FAISS's own threads do the work
        self.threads = max(1, min(len(self.shards), threads or os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    @staticmethod
    def _merge(shards: list[Shard]) -> list[Shard]:
        """CPU flat shards, or mih shards, become one FAISS index of their type over all their codes, in key order.
        Flat: one search call per batch instead of one per shard plus a merge (FAISS parallelises over queries
        itself), and FAISS's k-selections (counting, and the heap, which breaks ties by id) keep the lowest ids
        among equal distances, which in key order are the lowest keys, so its top-k is already the exact top-k by
        (distance, key): no over-fetch, no second scan for ties; a group is as fast as a single IndexBinaryFlat at
        every size. Mih: the probes per query are per index, not per code, so one index over the group's codes
        (its tables sized for all of them) probes once where n shards probe n times. Other types, and GPU shards,
        stay as they are."""
        import faiss

        from rayhash.index.types import make_faiss_index

        kinds = {s.index_type for s in shards}
        if not shards or len(kinds) != 1 or kinds - {"flat", "mih"} or any(s.gpu_index is not None for s in shards):
            return shards
        kind, d = kinds.pop(), shards[0].scan.d
        codes = np.concatenate([faiss.vector_to_array(s.scan.xb).reshape(s.ntotal, d // 8) for s in shards])
        rank = np.concatenate([s.rank for s in shards])
        for s in shards:
            s.index = s.scan = None  # the shards' own copies go as the merged index is built
        order = np.argsort(rank, kind="stable")
        codes = np.ascontiguousarray(codes[order])
        merged = make_faiss_index(kind, d, shards[0].params, codes)
        del codes
        one = Shard(f"{shards[0].name}..{shards[-1].name}", merged, np.empty(0, str), np.empty(0, np.int32), kind,
                    shards[0].params, use_gpu=False)
        one.rank, one.stride, one.key_ordered = rank[order], shards[0].stride, True
        return [one]

    @classmethod
    def load(cls, index_dir: str, entries: list[dict], manifest: dict, threads: int | None = None,
             **kwargs: Any) -> "ShardGroup":
        return cls([Shard.load(index_dir, e, manifest, **kwargs) for e in entries], threads)

    def _map(self, fn, *args):
        if self._pool is None:
            return [fn(s, *args) for s in self.shards]
        return list(self._pool.map(lambda s: fn(s, *args), self.shards))

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        """Exact top-k as candidate arrays ``(distances, keys, labels)`` (sentinel-padded, unicode keys)."""
        parts = self._map(Shard.search, q, k)
        c = parts[0] if len(parts) == 1 else smallest(np.concatenate(parts, axis=1), k)
        missing = c == _EMPTY
        rank = np.where(missing, self.stride - 1, c % self.stride)
        d = np.where(missing, _SENTINEL, c // self.stride).astype(np.int32)
        return d, self.sorted_keys[rank], self.sorted_labels[rank]

    def range_search(self, q: np.ndarray, radius: int) -> tuple[np.ndarray, ...]:
        """``(qid, distances, keys, labels)`` of all codes within ``radius``, sorted by (query, distance, key)."""
        qid, d, rank = (np.concatenate(a) for a in zip(*self._map(Shard.range_search, q, radius)))
        order = np.lexsort((rank, d, qid))
        rank = rank[order]
        return qid[order], d[order], self.sorted_keys[rank], self.sorted_labels[rank]

    def labels(self) -> np.ndarray:
        """Labels in shard order."""
        return self.sorted_labels[self._shard_order()]

    def keys(self) -> np.ndarray:
        """Keys in shard order."""
        return self.sorted_keys[self._shard_order()]

    def _shard_order(self) -> np.ndarray:
        return np.concatenate([s.rank for s in self.shards]) if self.shards else np.array([], np.int64)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
