"""Capacity plan: the Ray cluster that serves k-NN over N binary codes at a query rate and latency target.

    python benchmarks/capacity.py --codes 1e9 --bits 64 --qps 100 --latency-ms 200
    python benchmarks/capacity.py --codes 1e10 --bits 128 --qps 1000 --latency-ms 100 --mih-speedup 5

The model, per search method (flat scan; multi-index hashing, ``--type mih``):

- a query costs ``N / speedup`` code compares (speedup 1 for a scan; for multi-index hashing the measured ratio
  to a flat scan on your codes, ``benchmarks/bench_search.py --codes clustered``);
- one core does ``--compares-per-core`` compares per second (measured with ``bench_search.py``: the single FAISS
  index's scan-equivalent compares/s divided by its cores; 5e8 is what 2 cores of this build machine gave);
- a shard is searched by one core per query, so a shard holds at most ``latency x compares-per-core x speedup``
  codes (half the latency budget; the other half is left for fan-out, merging and queueing);
- memory per code: the code (bits/8 bytes), its key and label in the id map (``--id-bytes``, 48 by default for
  keys of ~20 characters), and for multi-index hashing 7 bytes per hash table (a 4-byte position, 2 bytes of
  substring, <= 1 of directory; ``rayhash.index.mih``), with floor(bits / log2 n) tables over a shard's n codes;
- nodes have ``--node-cores`` cores and ``--node-memory-gib`` GiB, of which ``--usable`` is given to index actors;
  cores are planned to be busy at most ``--max-utilisation`` of the time (0.7), so that queries rarely queue.

It prints shards, Ray actors (one per node, holding that node's shards, as ``ShardedIndex.open(mode="ray")`` places
them), nodes, memory per node and the expected latency for both methods.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rayhash.index.types import mih_tables  # noqa: E402

MIH_SPEEDUP = 4.0  # multi-index hashing over a flat scan: a cautious default (CIFAR codes: 13x at 10^7, 1.9x at 10^6)


def shard_max(latency_ms: float, compares_per_core: float, speedup: float) -> float:
    """Codes one core searches in half the latency budget: the most a shard may hold."""
    return max(1.0, latency_ms / 1e3 / 2 * compares_per_core * speedup)


def plan(codes: float, bits: int, qps: float, latency_ms: float, compares_per_core: float, speedup: float,
         node_cores: int, node_memory_gib: float, usable: float, id_bytes: int, tables: int,
         max_utilisation: float = 0.7) -> dict:
    bytes_per_code = bits / 8 + id_bytes + 7 * tables
    memory = codes * bytes_per_code
    per_query_core_s = codes / speedup / compares_per_core  # core-seconds of compares per query
    cores_for_rate = qps * per_query_core_s
    shards = max(1, math.ceil(codes / shard_max(latency_ms, compares_per_core, speedup)))
    node_mem = node_memory_gib * 2**30 * usable
    nodes = max(math.ceil(memory / node_mem), math.ceil(cores_for_rate / (node_cores * max_utilisation)),
                math.ceil(shards / node_cores / 4))  # at most 4 shards per core, or queries queue behind each other
    shard_codes = codes / shards
    latency = shard_codes / speedup / compares_per_core * 1e3 * max(1.0, shards / (nodes * node_cores))
    return {"bytes/code": bytes_per_code, "memory TiB": memory / 2**40, "cores for rate": cores_for_rate,
            "shards": shards, "codes/shard": shard_codes, "nodes": nodes, "actors": nodes,
            "memory/node GiB": memory / nodes / 2**30, "latency ms": latency,
            "utilisation": cores_for_rate / (nodes * node_cores)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codes", type=float, default=1e9, help="corpus size (up to 1e10)")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--qps", type=float, default=100.0, help="queries per second to sustain")
    p.add_argument("--latency-ms", type=float, default=200.0, help="target latency of one query")
    p.add_argument("--compares-per-core", type=float, default=5e8,
                   help="measured 64-bit compares/s per core (bench_search.py; scaled by 64/bits)")
    p.add_argument("--mih-speedup", type=float, default=MIH_SPEEDUP,
                   help="multi-index hashing / flat speed ratio measured on your codes (bench_search.py)")
    p.add_argument("--node-cores", type=int, default=32)
    p.add_argument("--node-memory-gib", type=float, default=256.0)
    p.add_argument("--usable", type=float, default=0.7, help="share of node memory for index actors")
    p.add_argument("--id-bytes", type=int, default=48, help="id map bytes per code (key + label, in memory)")
    p.add_argument("--max-utilisation", type=float, default=0.7, help="planned share of busy core time")
    args = p.parse_args(argv)
    if not 0 < args.codes <= 1e10 or args.bits % 8 or args.qps <= 0 or args.latency_ms <= 0:
        p.error("--codes in (0, 1e10], --bits a multiple of 8, --qps and --latency-ms positive")
    rate = args.compares_per_core * 64 / args.bits
    tables = mih_tables(args.bits, int(min(args.codes, shard_max(args.latency_ms, rate, args.mih_speedup))))[0]
    rows = {"flat": plan(args.codes, args.bits, args.qps, args.latency_ms, rate, 1.0, args.node_cores,
                         args.node_memory_gib, args.usable, args.id_bytes, 0, args.max_utilisation),
            "mih": plan(args.codes, args.bits, args.qps, args.latency_ms, rate, args.mih_speedup, args.node_cores,
                        args.node_memory_gib, args.usable, args.id_bytes, tables, args.max_utilisation)}
    print(f"{args.codes:.0e} codes of {args.bits} bits, {args.qps:g} queries/s, {args.latency_ms:g} ms target; "
          f"{rate:.2e} compares/s/core, nodes of {args.node_cores} cores / {args.node_memory_gib:g} GiB")
    print(f"{'':<18}" + "".join(f"{name:>14}" for name in rows))
    for key in rows["flat"]:
        cells = []
        for r in rows.values():
            v = r[key]
            cells.append(f"{v:>14.1%}" if key == "utilisation" else f"{v:>14,d}" if isinstance(v, int)
                         else f"{v:>14,.0f}" if v >= 100 else f"{v:>14.2f}")
        print(f"{key:<18}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
