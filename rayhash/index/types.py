"""Index types, listed once: each a class on :data:`INDEX_TYPES` holding its FAISS binary index factory string, its
parameters (defaults and allowed ranges, checked before FAISS sees them), its search-time settings and its search
behaviour (k-NN and range search over a :class:`rayhash.index.search.Shard`). ``rayhash index build --type``,
manifest validation, the shard loader and the searches all read :data:`INDEX_TYPES`; a new type is one more
``@INDEX_TYPES.register`` class here."""
from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from rayhash.index.validate import INT_MAX, integer
from rayhash.registry import Registry

INDEX_TYPES = Registry("index type", "index build --type")
MIH_MAX_TABLE_BITS = 32


class IndexKind:
    """What an index type does; the base is an exact scan (the flat type's behaviour)."""

    factory = "BFlat"
    merged = False  # a group's shards become one FAISS index over all their codes, ids in key order
    gpu = False  # shards are copied to a GpuIndexBinaryFlat where FAISS has a usable GPU
    counting = False  # FAISS k-selection by counting (use_heap=False) for its scans
    legacy: frozenset = frozenset()  # parameters that manifests of earlier versions hold, ignored

    @staticmethod
    def defaults(bits: int) -> dict[str, Any]:
        return {}

    @classmethod
    def check(cls, params: dict[str, Any], bits: int, where: str, fix: str) -> dict[str, Any]:
        """``params`` completed and range-checked (a ValueError names the parameter, ``where`` and ``fix``)."""
        return params

    @classmethod
    def configure(cls, index, params: dict[str, Any]) -> None:
        """Search-time settings of a loaded FAISS index (they are not stored in the FAISS file)."""
        if "nflip" in params:
            index.nflip = int(params["nflip"])
        if "nprobe" in params:
            index.nprobe = int(params["nprobe"])
        if cls.counting:
            index.use_heap = False  # counting k-selection: ~25% faster than the heap for k up to a few hundred

    @staticmethod
    def sized(params: dict[str, Any], n: int) -> dict[str, Any]:
        """The parameters for building over n codes (defaults that depend on n filled in)."""
        return params

    @staticmethod
    def table_bytes(bits: int, n: int) -> int:
        """Memory a loaded shard of n codes takes beyond its codes and id map."""
        return 0

    @staticmethod
    def prepare(shard) -> None:
        """Called once a :class:`ShardGroup` has ranked the shard's keys (mih builds its tables here)."""

    @staticmethod
    def knn(shard, q: np.ndarray, k: int) -> np.ndarray:
        return shard.scan_knn(q, k)

    @staticmethod
    def range(shard, q: np.ndarray, radius: int) -> tuple[np.ndarray, ...]:
        return shard.faiss_range(q, radius)


def _check_int(params: dict, name: str, low: int, high: int | None, where: str, fix: str,
               optional: bool = False) -> None:
    if name in params and not (optional and params[name] is None):
        params[name] = integer(params[name], f"parameter {name!r}", low, high, where=where, fix=fix)


@contextlib.contextmanager
def _nflip(index, nflip: int):
    """The FAISS hash index probing ``nflip`` bit flips per table for the duration of the block."""
    saved = index.nflip
    index.nflip = max(saved, nflip)
    try:
        yield
    finally:
        index.nflip = saved


@INDEX_TYPES.register("flat", help="exact k-NN and radius search, brute-force Hamming scan",
                      faiss_class="IndexBinaryFlat")
class Flat(IndexKind):
    merged, gpu, counting = True, True, True


@INDEX_TYPES.register("hash", help="exact radius lookups in one hash table of hash_bits bits (k-NN approximate)",
                      faiss_class="IndexBinaryHash")
class Hash(IndexKind):
    factory = "BHash{hash_bits}"

    @staticmethod
    def defaults(bits: int) -> dict[str, Any]:
        return {"hash_bits": min(bits, 16), "nflip": 2}

    @classmethod
    def check(cls, params, bits, where, fix):
        _check_int(params, "hash_bits", 1, min(bits, 64), where, fix)
        _check_int(params, "nflip", 0, params["hash_bits"], where, fix)
        return params

    @staticmethod
    def range(shard, q, radius):
        with _nflip(shard.index, radius):  # every code within the radius is within it on the hashed bits
            return shard.faiss_range(q, radius)


@INDEX_TYPES.register("multihash", help="exact radius lookups in nhash tables (k-NN approximate)",
                      faiss_class="IndexBinaryMultiHash")
class MultiHash(IndexKind):
    factory = "BHash{nhash}x{hash_bits}"

    @staticmethod
    def defaults(bits: int) -> dict[str, Any]:
        return {"nhash": 2, "hash_bits": min(bits // 2, 16), "nflip": 1}

    @classmethod
    def check(cls, params, bits, where, fix):
        _check_int(params, "nhash", 1, bits, where, fix)
        _check_int(params, "hash_bits", 1, min(64, bits // params["nhash"]), where, fix)
        _check_int(params, "nflip", 0, params["hash_bits"], where, fix)
        return params

    @staticmethod
    def range(shard, q, radius):
        # a code within r is within ceil((r + 1) / nhash) - 1 bits of the query on at least one table
        with _nflip(shard.index, math.ceil((radius + 1) / int(shard.index.nhash)) - 1):
            return shard.faiss_range(q, radius)


@INDEX_TYPES.register("mih", help="exact k-NN and radius search by multi-index hashing: nhash tables of bits/nhash "
                                   "bits; each query probes them or scans, whichever its buckets say is cheaper "
                                   "(fast on clustered codes)",
                      faiss_class="IndexBinaryFlat")
class Mih(IndexKind):
    # Stored as a flat index (the codes); the tables (rayhash.index.mih) are built when a process loads its shards,
    # over all the codes it holds. nhash None: chosen from that size (mih_tables).
    merged, counting = True, True
    legacy = frozenset({"max_flips"})  # FAISS IndexBinaryMultiHash mih shards

    @staticmethod
    def defaults(bits: int) -> dict[str, Any]:
        return {"nhash": None, "hash_bits": None}

    @classmethod
    def check(cls, params, bits, where, fix):
        low = math.ceil(bits / MIH_MAX_TABLE_BITS)
        _check_int(params, "nhash", low, bits, where,
                   fix or "leave nhash out (chosen from the number of codes a process holds)", optional=True)
        params["hash_bits"] = bits // params["nhash"] if params.get("nhash") else None
        return params

    @staticmethod
    def table_bytes(bits: int, n: int) -> int:
        return 7 * n * mih_tables(bits, n)[0]  # 7 bytes a code and table (rayhash.index.mih)

    @staticmethod
    def prepare(shard) -> None:
        from rayhash.index.mih import MultiIndex, default_threads

        tables = MultiIndex(shard.codes(), shard.rank, shard.stride, shard.params.get("nhash"))
        tables.calibrate(lambda q: shard.scan_knn(q, 10), default_threads())
        shard.mih = tables

    @staticmethod
    def knn(shard, q, k):
        """Each query probes the tables or is scanned, as its predicted cost says (:meth:`MultiIndex.search`)."""
        from rayhash.index.merge import EMPTY
        from rayhash.index.mih import default_threads

        out = np.full((len(q), k), EMPTY, np.int64)
        out[:, :min(k, shard.ntotal)], scanned = shard.mih.search(q, min(k, shard.ntotal), default_threads())
        rows = np.flatnonzero(scanned)
        if len(rows):
            out[rows] = shard.scan_knn(q[rows], k)
        return out

    @staticmethod
    def range(shard, q, radius):
        """Probes with ⌊r/m⌋ flips unless the probes alone would cost more than a scan."""
        from rayhash.index.mih import default_threads

        if shard.mih.probe_cost(radius) < shard.mih.scan_units:
            qid, d, ranks = shard.mih.range_search(q, radius, default_threads())
            return qid, d.astype(np.int32), ranks
        return shard.scan_range(q, radius)


def mih_tables(bits: int, n: int) -> tuple[int, int]:
    """(tables m, bits per table) for multi-index hashing over n codes: m = ⌊bits / log2 n⌋, so each substring has
    at least about log2 n bits (at most ``MIH_MAX_TABLE_BITS``; leftover bits are in no table, which keeps the search
    exact: a code within radius r overall is within r on the bits the tables cover). Norouzi et al. advise substrings
    of about log2 n bits, where uniform codes fill each bucket with about one code; learned codes crowd their buckets
    with near-duplicates, and rounding down to fewer, longer substrings cuts those candidates more than the extra
    probes cost. Measured on CIFAR codes (k = 10, held-out queries): 3 tables about 2x faster than 2 at 10^6 codes,
    2 about 2x faster than 3 at 10^7."""
    m = max(1, math.ceil(bits / MIH_MAX_TABLE_BITS), min(bits // 4, math.floor(bits / math.log2(max(n, 16)))))
    return m, bits // m


@INDEX_TYPES.register("ivf", help="approximate k-NN over nlist inverted lists, trained on a sample",
                      faiss_class="IndexBinaryIVF")
class Ivf(IndexKind):
    factory = "BIVF{nlist}"

    @staticmethod
    def defaults(bits: int) -> dict[str, Any]:
        return {"nlist": None, "nprobe": 8, "train_size": 50_000}  # nlist None: 4·sqrt(shard size)

    @classmethod
    def check(cls, params, bits, where, fix):
        _check_int(params, "nlist", 1, INT_MAX, where, fix, optional=True)
        _check_int(params, "nprobe", 1, INT_MAX, where, fix)
        _check_int(params, "train_size", 1, INT_MAX, where, fix)
        return params

    @staticmethod
    def sized(params, n):
        nlist = params.get("nlist") or max(1, min(int(4 * math.sqrt(n)), n // 39))
        return {**params, "nlist": max(1, min(int(nlist), n))}


def kind(index_type: str) -> type[IndexKind]:
    """The :class:`IndexKind` of a registered type name."""
    return INDEX_TYPES[index_type].target


def check_params(index_type: str, params: Any, bits: int, where: str, fix: str = "") -> dict[str, Any]:
    """The parameters of an index type, each checked against its range before FAISS sees it: unknown names and
    values of the wrong type or out of range are refused naming the parameter, ``where`` and ``fix``."""
    if not isinstance(params, dict):
        raise ValueError(f"{where}: parameters = {params!r} must be a mapping of parameter names to values"
                         f"{'; ' + fix if fix else ''}")
    base = kind(index_type).defaults(bits)
    unknown = set(params) - set(base) - kind(index_type).legacy
    if unknown:
        raise ValueError(f"{where}: index type {index_type!r} takes no parameter(s) {sorted(unknown)}; it takes "
                         f"{sorted(base) or 'none'}{'; ' + fix if fix else ''}")
    return kind(index_type).check({**base, **params}, bits, where, fix)


def default_params(index_type: str, bits: int, **overrides: Any) -> dict[str, Any]:
    """The type's parameters: its defaults for ``bits``-bit codes, updated by the ``overrides`` that are not None,
    range-checked."""
    base = kind(index_type).defaults(bits)
    unknown = {k for k, v in overrides.items() if v is not None} - set(base)
    if unknown:
        raise ValueError(f"index type {index_type!r} takes no parameter(s) {sorted(unknown)}; "
                         f"it takes {sorted(base) or 'none'}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return check_params(index_type, given, bits, f"index type {index_type!r}",
                        "pass a value in that range (rayhash index build --help)" if given else "")


def make_faiss_index(index_type: str, bits: int, params: dict[str, Any], codes: np.ndarray, seed: int = 0):
    """A filled FAISS binary index of ``index_type`` over ``codes`` (IVF trained on a seeded sample)."""
    import faiss

    n, params = len(codes), kind(index_type).sized(dict(params), len(codes))
    index = faiss.index_binary_factory(bits, kind(index_type).factory.format(**params))
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        size = int(params["train_size"])
        index.train(np.ascontiguousarray(codes if n <= size else codes[rng.choice(n, size, replace=False)]))
    kind(index_type).configure(index, params)
    index.add(np.ascontiguousarray(codes))
    return index
