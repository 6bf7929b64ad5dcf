"""Index types, listed once: each a FAISS binary index factory string, its parameters with their defaults, and
its search-time settings. ``rayhash index build --type``, manifest validation and the shard loader all read
:data:`INDEX_TYPES`; a new type is one more ``@INDEX_TYPES.register`` here."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from rayhash.registry import Registry

INDEX_TYPES = Registry("index type", "index build --type")


@INDEX_TYPES.register("flat", help="exact k-NN and radius search, brute-force Hamming scan",
                      factory="BFlat", faiss_class="IndexBinaryFlat")
def _flat_params(bits: int) -> dict[str, Any]:
    return {}


@INDEX_TYPES.register("hash", help="exact radius lookups in one hash table of hash_bits bits (k-NN approximate)",
                      factory="BHash{hash_bits}", faiss_class="IndexBinaryHash")
def _hash_params(bits: int) -> dict[str, Any]:
    return {"hash_bits": min(bits, 16), "nflip": 2}


@INDEX_TYPES.register("multihash", help="exact radius lookups in nhash tables (k-NN approximate)",
                      factory="BHash{nhash}x{hash_bits}", faiss_class="IndexBinaryMultiHash")
def _multihash_params(bits: int) -> dict[str, Any]:
    return {"nhash": 2, "hash_bits": min(bits // 2, 16), "nflip": 1}


@INDEX_TYPES.register("mih", help="exact k-NN and radius search by multi-index hashing: nhash tables of bits/nhash "
                                   "bits probed with a growing radius per query, a scan when that is cheaper (fast on "
                                   "clustered codes)",
                      factory="BFlat", faiss_class="IndexBinaryFlat",
                      complete=lambda p, bits: {**p, "hash_bits": bits // int(p["nhash"]) if p["nhash"] else None})
def _mih_params(bits: int) -> dict[str, Any]:
    # Stored as a flat index (the codes); the tables (rayhash.index.mih) are built when a process loads its shards,
    # over all the codes it holds. nhash None: chosen from that size (mih_tables).
    return {"nhash": None, "hash_bits": None}


MIH_MAX_TABLE_BITS = 32


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
                      factory="BIVF{nlist}", faiss_class="IndexBinaryIVF")
def _ivf_params(bits: int) -> dict[str, Any]:
    return {"nlist": None, "nprobe": 8, "train_size": 50_000}  # nlist None: 4·sqrt(shard size)


def default_params(index_type: str, bits: int, **overrides: Any) -> dict[str, Any]:
    """The type's parameters: its defaults for ``bits``-bit codes, updated by the ``overrides`` that are not None."""
    kind = INDEX_TYPES[index_type]
    params = kind.target(bits)
    unknown = {k for k, v in overrides.items() if v is not None} - set(params)
    if unknown:
        raise ValueError(f"index type {index_type!r} takes no parameter(s) {sorted(unknown)}; "
                         f"it takes {sorted(params) or 'none'}")
    params.update({k: v for k, v in overrides.items() if v is not None})
    complete = kind.extra.get("complete")
    if complete is not None:
        params = complete(params, bits)
    if index_type == "mih" and params["nhash"] and not 1 <= params["hash_bits"] <= MIH_MAX_TABLE_BITS:
        low = math.ceil(bits / MIH_MAX_TABLE_BITS)
        raise ValueError(f"index type 'mih': nhash={params['nhash']} tables of {params['hash_bits']} bits; each table "
                         f"takes 1 to {MIH_MAX_TABLE_BITS} of the {bits} bits: choose nhash from {low} to {bits}, or "
                         "leave it out (chosen from the number of codes a process holds)")
    return params


def make_faiss_index(index_type: str, bits: int, params: dict[str, Any], codes: np.ndarray, seed: int = 0):
    """A filled FAISS binary index of ``index_type`` over ``codes`` (IVF trained on a seeded sample)."""
    import faiss

    n, params = len(codes), dict(params)
    if index_type == "ivf" and not params.get("nlist"):
        params["nlist"] = max(1, min(int(4 * math.sqrt(n)), n // 39))
    if "nlist" in params:
        params["nlist"] = max(1, min(int(params["nlist"]), n))
    index = faiss.index_binary_factory(bits, INDEX_TYPES[index_type].factory.format(**params))
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        size = int(params["train_size"])
        index.train(np.ascontiguousarray(codes if n <= size else codes[rng.choice(n, size, replace=False)]))
    configure(index, index_type, params)
    index.add(np.ascontiguousarray(codes))
    return index


def configure(index, index_type: str, params: dict[str, Any]) -> None:
    """Search-time settings of a loaded index (they are not stored in the FAISS file)."""
    if "nflip" in params:
        index.nflip = int(params["nflip"])
    if "nprobe" in params:
        index.nprobe = int(params["nprobe"])
    if index_type in ("flat", "mih"):  # mih: its scans
        index.use_heap = False  # counting k-selection: ~25% faster than the heap for k up to a few hundred
