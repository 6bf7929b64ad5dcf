"""``rayhash eval``: score a sharded index with hierarchical precision."""
from __future__ import annotations

import argparse
import json

from rayhash.cliargs import default_of, nonnegative_int, positive_int


def _run(args: argparse.Namespace) -> int:
    from rayhash.eval import evaluate

    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    metrics = evaluate(args.index, args.checkpoint, args.queries, args.out, protocol=args.protocol, k=args.k,
                       map_k=args.map_k, radius=args.radius, targets=args.targets, max_queries=args.max_queries,
                       classes=classes, caption_embeddings=args.caption_embeddings, mode=args.mode,
                       address=args.address)
    print(json.dumps(metrics, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from rayhash.eval.evaluate import evaluate

    p = sub.add_parser("eval", help="evaluate an index: mAHP@250 (index / expected ties), mAP@1000, P@r2, plots",
                       description="Encode the query split with the checkpoint, retrieve from the sharded index (or, "
                                   "with --protocol reference, from the query split itself) and write "
                                   "EVAL/metrics.json, EVAL/per_query.parquet and PNG plots.")
    p.add_argument("--index", default=None,
                   help="index folder or URI (from `rayhash index build`); optional with --protocol reference, "
                        "where only its checkpoint is used")
    p.add_argument("--checkpoint", default=None,
                   help="training run or checkpoint (default: the index's; required with --protocol reference "
                        "when there is no --index)")
    p.add_argument("--protocol", default="database", choices=["database", "reference"],
                   help="database = queries against the --index database (default); reference = Barz & Denzler: "
                        "queries = database = the whole query split, each query left out of its own ranking; use "
                        "it to set figures beside published ones")
    p.add_argument("--queries", required=True, help="query split of shards, e.g. DS/test")
    p.add_argument("--out", required=True, help="output folder for metrics.json and plots")
    p.add_argument("--targets", default="auto", choices=["auto", "hierarchy", "captions"],
                   help="relevance: class hierarchy or caption-embedding similarity (auto: from dataset.json)")
    p.add_argument("--caption-embeddings", default=None, help="Parquet of caption embeddings (captions targets)")
    p.add_argument("--k", type=positive_int, default=default_of(evaluate, "k"),
                   help="mAHP cut-off (default: %(default)s)")
    p.add_argument("--map-k", type=positive_int, default=default_of(evaluate, "map_k"),
                   help="mAP cut-off (default: %(default)s)")
    p.add_argument("--radius", type=nonnegative_int, default=default_of(evaluate, "radius"),
                   help="Hamming radius for precision (default: %(default)s)")
    p.add_argument("--max-queries", type=positive_int, default=None,
                   help="evaluate a seeded random subset of queries (reference protocol: the database too)")
    p.add_argument("--classes", default=None,
                   help="comma-separated labels the queries are restricted to (zero-shot: the unseen classes; "
                        "reference protocol: the database too)")
    p.add_argument("--mode", default="local", choices=["local", "ray"], help="index search mode")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    p.set_defaults(func=_run)
