"""Query a sharded index from a driver: shards in this process (``mode="local"``) or spread over Ray actors, one per
group of shards sized to fit an actor's memory (``mode="ray"``, for indices bigger than one machine)."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np

from rayhash import settings
from rayhash.index.build import read_manifest
from rayhash.index.codes import CodeTable
from rayhash.index.merge import RangeResult, SearchResult, finish, merge_ranges, merge_topk, ranges_to_result
from rayhash.index.search import Shard, ShardGroup
from rayhash.index.types import kind, make_faiss_index
from rayhash.index.validate import integer
from rayhash.runtime import get_logger

log = get_logger("rayhash.index")


class ShardGroupActor:
    """A Ray actor holding a :class:`ShardGroup` (loaded and verified inside the actor)."""

    def load(self, index_dir: str, entries: list[dict], manifest: dict, load_kwargs: dict) -> int:
        self.group = ShardGroup.load(index_dir, entries, manifest, **load_kwargs)
        return self.group.ntotal

    def search(self, q: np.ndarray, k: int):
        return self.group.search(q, k)

    def range_search(self, q: np.ndarray, radius: int):
        return self.group.range_search(q, radius)

    def keys_labels(self):
        return self.group.keys(), self.group.labels()


def _shard_bytes(entry: dict, manifest: dict) -> int:
    """Rough resident size of a loaded shard: codes + unicode keys + labels, and what its type adds (mih: its
    tables, as many as the shard alone would get, at least what the group it joins gets)."""
    bits, n = manifest["bits"], entry["count"]
    return n * (bits // 8 + 4 * 32 + 4) + kind(manifest["index_type"]).table_bytes(bits, n)


def plan_groups(entries: list[dict], manifest: dict, actors: int | None, actor_memory: int) -> list[list[dict]]:
    """Contiguous groups of shards, each within ``actor_memory`` bytes (or exactly ``actors`` groups)."""
    sizes = [_shard_bytes(e, manifest) for e in entries]
    n = min(len(entries), actors or max(1, math.ceil(sum(sizes) / actor_memory)))
    bounds = np.linspace(0, len(entries), n + 1).round().astype(int)
    return [entries[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _start_actors(path: str, manifest: dict, groups: list[list[dict]], load_kwargs: dict,
                  resources: dict) -> list:
    """One actor per group, reserving the group's memory (Ray places it where that much is free); each loads and
    verifies its shards. A verification error is re-raised as itself (the clear message), the actors killed."""
    import ray

    handles, loads = [], []
    for entries in groups:
        mem = sum(_shard_bytes(e, manifest) for e in entries) + (64 << 20)
        handle = ray.remote(ShardGroupActor).options(memory=mem, scheduling_strategy="SPREAD", **resources).remote()
        handles.append(handle)
        loads.append(handle.load.remote(path, entries, manifest, load_kwargs))
    wait_s = settings.ACTOR_START_TIMEOUT.number()
    try:
        ray.get(loads, timeout=wait_s)
    except ray.exceptions.GetTimeoutError:
        for h in handles:
            ray.kill(h)
        raise TimeoutError(
            f"{path}: {len(groups)} index actor(s) asking for {resources} and up to "
            f"{max(sum(_shard_bytes(e, manifest) for e in g) for g in groups) >> 20} MiB each were not all "
            f"placed within {wait_s:.0f} s (the cluster has {ray.cluster_resources()}); pass fewer actors, "
            "actor_gpus=0, or add nodes (RAYHASH_ACTOR_START_TIMEOUT sets the wait)") from None
    except ray.exceptions.RayTaskError as e:
        for h in handles:
            ray.kill(h)
        raise (e.cause if isinstance(e.cause, Exception) else e) from None
    return handles


class ShardedIndex:
    """A sharded FAISS binary index opened for search (see :meth:`open`)."""

    def __init__(self, path: str, manifest: dict, mode: str, group: ShardGroup | None = None,
                 actors: list | None = None, checkpoint: str | None = None):
        self.path, self.manifest, self.mode = path, manifest, mode
        self._group, self._actors = group, actors or []
        self.checkpoint = checkpoint or manifest.get("checkpoint")
        self._encoder = None

    @classmethod
    def open(cls, path_or_uri: str, mode: str = "local", checkpoint: str | None = None, verify: bool = True, *,
             threads: int | None = None, actors: int | None = None, actor_memory: int = 8 << 30,
             actor_cpus: float = 1, actor_gpus: float | None = None, use_gpu: bool = True,
             address: str | None = None,
             **search_params: Any) -> "ShardedIndex":
        """Open an index folder (local path or s3:// gs:// URI), verifying every shard's sha256, code width and
        index type against ``manifest.json``.

        ``mode="local"``: all shards in this process, searched by ``threads`` threads. ``mode="ray"``: shards
        grouped to fit ``actor_memory`` bytes per actor (or into ``actors`` groups); each group is loaded by one Ray
        actor reserving that memory, so Ray places it on a node with room (``actor_gpus`` per actor, default for flat
        indices when the cluster has GPUs: one each, or an equal share when there are more groups than GPUs; its
        shards then search as ``GpuIndexBinaryFlat``). Actors that cannot be placed within
        ``$RAYHASH_ACTOR_START_TIMEOUT`` seconds (900) fail with the resources they asked for.
        ``search_params`` override the build's search-time parameters (``nprobe`` for ivf, ``nflip`` for hash
        types). ``checkpoint`` (default: the one recorded in the manifest) is used by :meth:`search_images`."""
        path = str(path_or_uri)
        manifest = read_manifest(path)
        load_kwargs = {"verify": verify, "use_gpu": use_gpu, "params": search_params}
        if not manifest["shards"]:
            raise ValueError(f"{path}: manifest.json lists no shards; rebuild the index")
        if mode == "local":
            group = ShardGroup.load(path, manifest["shards"], manifest, threads=threads, **load_kwargs)
            index = cls(path, manifest, mode, group=group, checkpoint=checkpoint)
        elif mode == "ray":
            from rayhash.runtime import cluster_gpus, cluster_has_gpus, init_ray

            init_ray(address)
            groups = plan_groups(manifest["shards"], manifest, actors, actor_memory)
            if actor_gpus is None:  # one GPU per group, or an equal share when there are more groups than GPUs
                gpus = cluster_gpus()
                share = min(1.0, math.floor(gpus / len(groups) * 1e4) / 1e4)  # Ray counts GPUs in 1e-4 units
                actor_gpus = share if use_gpu and kind(manifest["index_type"]).gpu and cluster_has_gpus() else 0
            handles = _start_actors(path, manifest, groups, {**load_kwargs, "threads": threads},
                                    {"num_cpus": actor_cpus, "num_gpus": actor_gpus})
            log.info("index %s: %d shards on %d Ray actors", path, len(manifest["shards"]), len(handles))
            index = cls(path, manifest, mode, actors=handles, checkpoint=checkpoint)
        else:
            raise ValueError(f"mode must be 'local' or 'ray', got {mode!r}")
        if checkpoint is not None:
            index._check_encoder()
        return index

    @classmethod
    def from_codes(cls, table: CodeTable, checkpoint: str | None = None, *, use_gpu: bool = True) -> "ShardedIndex":
        """An exact flat index over a :class:`CodeTable`, held in this process (one shard, no files written):
        searched like an opened index, ties broken by key. ``checkpoint``: the run that produced the codes."""
        if not len(table):
            raise ValueError("from_codes needs at least one code")
        shard = Shard("<memory>", make_faiss_index("flat", table.bits, {}, table.codes),
                      np.asarray(table.keys, dtype=str), np.asarray(table.labels, dtype=np.int32), "flat", {}, use_gpu)
        manifest = {"bits": table.bits, "index_type": "flat", "params": {}, "checkpoint": checkpoint,
                    "ntotal": len(table), "shards": [{"index": "<memory>", "count": len(table)}]}
        return cls("<memory>", manifest, "local", group=ShardGroup([shard], threads=1), checkpoint=checkpoint)

    # ------------------------------------------------------------------ properties
    @property
    def bits(self) -> int:
        return int(self.manifest["bits"])

    @property
    def ntotal(self) -> int:
        return int(self.manifest["ntotal"])

    @property
    def index_type(self) -> str:
        return self.manifest["index_type"]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def label_names(self) -> list[str]:
        """The dataset's class names (label i is ``label_names[i]``; empty when it has none)."""
        return list(self.manifest.get("label_names") or [])

    # ------------------------------------------------------------------ queries
    def _queries(self, q: Any) -> np.ndarray:
        q = np.asarray(q)
        if q.ndim == 1:
            q = q[None, :]
        nbytes = self.bits // 8
        if q.ndim != 2 or q.shape[1] != nbytes:
            got = q.shape[1] if q.ndim == 2 else f"shape {q.shape}"
            raise ValueError(f"queries have {got} bytes per code, index expects {nbytes} ({self.bits} bits / 8); "
                             "encode queries with the checkpoint this index was built from "
                             f"({self.manifest.get('checkpoint') or 'see manifest.json'})")
        if q.dtype != np.uint8:
            raise ValueError(f"queries must be packed codes of dtype uint8 (np.packbits of the sign bits), "
                             f"got {q.dtype}")
        return np.ascontiguousarray(q)

    def _fan_out(self, method: str, *args):
        import ray

        q_ref = ray.put(args[0])
        return ray.get([getattr(a, method).remote(q_ref, *args[1:]) for a in self._actors])

    def _k(self, k: Any) -> int:
        """k checked (an integer >= 1, Python or numpy) and capped at the index size: the result's columns."""
        return min(integer(k, "k", 1, None, fix="pass the number of nearest codes wanted per query"),
                   max(1, self.ntotal))

    def _radius(self, radius: Any) -> int:
        """radius checked (an integer >= 0, Python or numpy); past the code width every code is within it."""
        return min(integer(radius, "radius", 0, None, fix="pass a Hamming distance in bits"), self.bits)

    def search(self, q_packed: Any, k: int = 10) -> SearchResult:
        """The k nearest codes per query, exact, ties broken by key (independent of the sharding).

        ``q_packed``: uint8 (nq, bits/8) packed codes, or one code (bits/8,). ``k``: an integer >= 1 (a Python or
        numpy integer; bool, float and str are refused). The result has ``min(k, ntotal)`` columns; where fewer
        codes than that are reachable (approximate types: hash, multihash, ivf) the missing slots have distance
        -1, key None and label -1."""
        q = self._queries(q_packed)
        k = self._k(k)
        parts = self._group.search(q, k) if self._group is not None else merge_topk(self._fan_out("search", q, k), k)
        return dataclasses.replace(finish(*parts), label_names=self.label_names)

    def range_search(self, q_packed: Any, radius: int) -> RangeResult:
        """All codes within Hamming distance ``radius`` (inclusive) of each query, sorted by (distance, key).

        ``radius``: an integer >= 0 (Python or numpy; one above the code width is the width: every code). Exact for
        flat, mih, hash and multihash indices (hash lookups are widened to the radius); for ivf only the
        ``nprobe`` nearest lists are scanned."""
        q = self._queries(q_packed)
        radius = self._radius(radius)
        if self._group is not None:
            parts = self._group.range_search(q, radius)
        else:
            parts = merge_ranges(self._fan_out("range_search", q, radius))
        return dataclasses.replace(ranges_to_result(*parts, len(q)), label_names=self.label_names)

    def _check_encoder(self):
        from rayhash.model import Encoder

        if self._encoder is None:
            if not self.checkpoint:
                raise ValueError(f"{self.path}: no checkpoint recorded in manifest.json; pass checkpoint=RUN "
                                 "(--checkpoint) to encode query images")
            self._encoder = Encoder(self.checkpoint)
            if self._encoder.bits != self.bits:
                raise ValueError(f"checkpoint {self.checkpoint} produces {self._encoder.bits}-bit codes but index "
                                 f"{self.path} holds {self.bits}-bit codes; use the checkpoint the index was built "
                                 "from")
        return self._encoder

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """Packed codes (n, bits/8) of a list of images with the index's checkpoint: each a path or URI, a PIL image,
        a uint8 array (H, W, 3) or (H, W), or the raw bytes of an image file (PNG, JPEG, ...)."""
        if isinstance(items, (str, bytes, bytearray, memoryview, os.PathLike)) or (
                isinstance(items, np.ndarray) and items.ndim < 4):  # one image; a (n, H, W, 3) array is n images
            raise ValueError(f"items = {type(items).__name__}: encode and search_images take a list of images "
                             "(paths, PIL images, uint8 arrays or image file bytes); wrap a single image in a list")
        return self._check_encoder().encode_images(list(items))[1]

    def search_images(self, items: Sequence[Any], k: int = 10) -> SearchResult:
        """Encode images with the checkpoint, then :meth:`search` (``k`` checked before any image is encoded)."""
        self._k(k)
        return self.search(self.encode(items), k)

    # ------------------------------------------------------------------ database contents
    def _keys_labels(self) -> tuple[np.ndarray, np.ndarray]:
        if self._group is not None:
            return self._group.keys(), self._group.labels()
        import ray

        parts = ray.get([a.keys_labels.remote() for a in self._actors])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def keys(self) -> np.ndarray:
        """All database keys (object array) in shard order."""
        return self._keys_labels()[0].astype(object)

    def labels(self) -> np.ndarray:
        """All database labels (int32, -1 when unlabelled) in shard order."""
        return self._keys_labels()[1]

    def label_counts(self, minlength: int = 0) -> np.ndarray:
        """``np.bincount`` of the database labels (unlabelled codes not counted)."""
        labels = self.labels()
        return np.bincount(labels[labels >= 0], minlength=minlength)

    def close(self) -> None:
        """Release threads / Ray actors."""
        if self._group is not None:
            self._group.close()
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
            self._actors = []

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ShardedIndex({self.path!r}, mode={self.mode!r}, type={self.index_type}, bits={self.bits}, "
                f"shards={self.num_shards}, ntotal={self.ntotal})")
