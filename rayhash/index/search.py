"""Exact top-k over index shards with ties broken by key, so results never depend on how codes are sharded.

Each shard answers with its own exact top-k by (distance, key): FAISS returns the nearest codes with ties in
arbitrary order, so a shard asks for more than k and, while the tie group at its k-th distance may continue past
what FAISS returned, asks again with twice as many. Merging exact per-shard (or per-actor) top-k lists by
(distance, key) gives the exact global top-k (:mod:`rayhash.index.merge`).

Inside a :class:`ShardGroup` (the shards of one process) keys are replaced by their rank in the group's sorted key
table, and a candidate by the single integer ``distance * stride + rank``: selecting and merging are then plain
integer sorts, and keys are looked up only for the k winners. What differs between index types (probing tables,
widening hash lookups, merging shards, GPU copies) is each type's :class:`rayhash.index.types.IndexKind`.
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rayhash import storage
from rayhash.index.gpu import gpu_copy, gpu_search
from rayhash.index.merge import EMPTY, SENTINEL, smallest
from rayhash.index.types import check_params, kind
from rayhash.layout import IndexDir
from rayhash.runtime import get_logger

log = get_logger("rayhash.index")
HEAP_MARGIN = 0.9  # the heap k-selection is used only when measured at least 10 % faster than counting


class Shard:
    """One loaded index shard: the FAISS index (plus a GPU copy for flat shards when faiss sees GPUs) and its
    id map (keys as a numpy unicode array, labels int32). The :class:`ShardGroup` that holds the shard replaces
    the id map by ``rank``, each id's rank in the group's sorted key table."""

    def __init__(self, name: str, index, keys: np.ndarray, labels: np.ndarray, index_type: str,
                 params: dict[str, Any], use_gpu: bool = True):
        self.name, self.keys, self.labels = name, keys, labels
        self.index_type, self.kind, self.params = index_type, kind(index_type), params
        self.ntotal = int(index.ntotal)
        self.rank = np.arange(self.ntotal, dtype=np.int64)
        self.stride = self.ntotal + 1
        self.overfetch = 2  # first FAISS call asks for overfetch*k+8; doubled while ties often run past that
        self.key_ordered = False  # ids in key order (see ShardGroup._merge): FAISS's top-k is exact as it is
        self.mih = None  # mih: its tables (rayhash.index.mih.MultiIndex), built by IndexKind.prepare
        self._selection = {False: (0.0, 0), True: (0.0, 0)}  # use_heap -> (summed s/query, batches): see below
        if type(index).__name__ == "IndexBinaryMultiHash" and self.kind.merged:
            # mih shards written by earlier rayhash versions hold a FAISS IndexBinaryMultiHash: only its codes serve;
            # the multi-hash index is kept, as it owns them
            self._multihash, index = index, index.storage
        self.index = self.scan = index  # scan: what a k-NN scan searches
        self.kind.configure(index, params)
        self.gpu_index = gpu_copy(index) if use_gpu and self.kind.gpu else None

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
        if params:  # open(**search_params): checked like the manifest's own
            where = f"ShardedIndex.open({', '.join(f'{k}={v!r}' for k, v in params.items())})"
            params = check_params(manifest["index_type"], {**manifest["params"], **params}, bits, where,
                                  "pass a value in that range")
        return cls(entry["index"], index, keys, labels, manifest["index_type"], params or manifest["params"],
                   use_gpu)

    def codes(self) -> np.ndarray:
        """The shard's packed codes (n, bits/8): a view of the FAISS index's storage, no copy."""
        import faiss

        codes = faiss.rev_swig_ptr(self.scan.xb.data(), self.ntotal * self.scan.code_size)
        return codes.reshape(self.ntotal, self.scan.code_size)

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k of this shard by (distance, key): (nq, k) int64 ``distance * stride + rank``, sorted,
        ``EMPTY`` where the shard has fewer than k codes."""
        if not self.ntotal:
            return np.full((len(q), k), EMPTY, np.int64)
        return self.kind.knn(self, q, k)

    def range_search(self, q: np.ndarray, radius: int) -> tuple[np.ndarray, ...]:
        """All codes with distance <= radius: ``(qid, distances, ranks)`` (unsorted)."""
        if not self.ntotal:
            return np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int64)
        return self.kind.range(self, q, radius)

    def faiss_range(self, q: np.ndarray, radius: int) -> tuple[np.ndarray, ...]:
        """``range_search`` of the shard's FAISS index (as its type has set it up): ``(qid, distances, ranks)``."""
        lims, d, i = self.index.range_search(q, radius + 1)  # faiss: strictly below the threshold
        return np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64))), d.astype(np.int32), self.rank[i]

    def _candidates(self, d: np.ndarray, i: np.ndarray) -> np.ndarray:
        """FAISS's (distances, ids) as int64 ``distance * stride + rank``, ``EMPTY`` where FAISS found none (-1)."""
        valid = i >= 0
        return np.where(valid, d.astype(np.int64) * self.stride + self.rank[np.where(valid, i, 0)], EMPTY)

    def _topk_within(self, q: np.ndarray, kth: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k by (distance, rank) of queries that have at least k codes within their ``kth`` distance:
        one range search to the largest of them, then each query's k smallest within its own."""
        qid, rd, ranks = self.scan_range(q, int(kth.max()))
        keep = rd <= kth[qid]
        qid, c = qid[keep], rd[keep].astype(np.int64) * self.stride + ranks[keep]
        order = np.lexsort((c, qid))
        qid, c = qid[order], c[order]
        return c[np.searchsorted(qid, np.arange(len(q)))[:, None] + np.arange(k)]

    def scan_range(self, q: np.ndarray, radius: int) -> tuple[np.ndarray, ...]:
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

    def scan_knn(self, q: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k by scanning (FAISS over the shard's codes, ties completed by key); as :meth:`search`."""
        if self.key_ordered and self.gpu_index is None:
            d, i = self._key_ordered_search(q, min(k, self.ntotal))
            return smallest(self._candidates(d, i), k)
        kk = min(self.ntotal, self.overfetch * k + 8)
        d, i = gpu_search(self.gpu_index, self.scan, q, kk)
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
            if s.ntotal:
                s.kind.prepare(s)  # mih: tables built and a scan timed as the group loads, not by its first query
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
        from rayhash.index.types import make_faiss_index

        kinds = {s.index_type for s in shards}
        if (not shards or len(kinds) != 1 or not shards[0].kind.merged
                or any(s.gpu_index is not None for s in shards)):
            return shards
        kind, d = kinds.pop(), shards[0].scan.d
        codes = np.concatenate([s.codes() for s in shards])
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
        missing = c == EMPTY
        rank = np.where(missing, self.stride - 1, c % self.stride)
        d = np.where(missing, SENTINEL, c // self.stride).astype(np.int32)
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
