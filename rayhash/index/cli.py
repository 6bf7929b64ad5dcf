"""``rayhash index build`` and ``rayhash query`` (imports nothing heavy at module level)."""
from __future__ import annotations

import argparse

from rayhash.cliargs import nonnegative_int, positive_int

BUILD_HELP = """\
Build a sharded FAISS binary index from Parquet code shards (one Ray task per index shard).
Writes INDEX/shard-%05d.faiss + INDEX/shard-%05d.ids.parquet per shard and INDEX/manifest.json (last, atomically).
Index types (--type):
{types}
--append adds codes not yet indexed as NEW shards; existing shards are never rewritten."""

QUERY_HELP = """\
Search an index for the nearest codes of query images (--image, encoded with the checkpoint) or of database
items (--key, their codes read from the code shards the index was built from). Prints rank, distance, key, label."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from rayhash.index.types import INDEX_TYPES

    index = subparsers.add_parser("index", help="build sharded FAISS binary indices",
                                  description="Sharded FAISS binary indices over code shards.")
    isub = index.add_subparsers(dest="index_command", metavar="<command>")
    b = isub.add_parser("build", help="build (or --append to) an index from code shards",
                        description=BUILD_HELP.format(types=INDEX_TYPES.describe()),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--codes", required=True, help="codes folder (codes-*.parquet) from `rayhash encode`, or URI")
    b.add_argument("--out", required=True, help="index folder (local path or s3:// gs:// URI)")
    b.add_argument("--type", dest="index_type", default="flat", choices=INDEX_TYPES.names(),
                   help="index type (default: flat; see the list above; mih is exact and fast on learned codes)")
    b.add_argument("--shards", type=positive_int, default=1, help="number of index shards to build (default: 1)")
    b.add_argument("--append", action="store_true", help="add code files not yet indexed as new shards")
    b.add_argument("--checkpoint", help="record this checkpoint in the manifest (default: from codes.json)")
    b.add_argument("--nlist", type=positive_int, help="ivf: inverted lists per shard (default 4*sqrt(shard size))")
    b.add_argument("--nprobe", type=positive_int, help="ivf: lists scanned per query (default 8; = nlist is exact)")
    b.add_argument("--hash-bits", type=positive_int, help="hash/multihash: bits per hash table")
    b.add_argument("--nhash", type=positive_int,
                   help="multihash, mih: number of hash tables (mih default: floor(bits / log2(n)) for the n codes "
                        "one search process holds, chosen when it loads them)")
    b.add_argument("--nflip", type=nonnegative_int,
                   help="hash/multihash: bit flips probed per table at k-NN search time")
    b.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    b.set_defaults(func=_build)
    index.set_defaults(func=lambda args: index.print_help() or 2)

    q = subparsers.add_parser("query", help="search an index for images or keys", description=QUERY_HELP)
    q.add_argument("--index", required=True, help="index folder or URI")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", metavar="FILE", help="query image file(s)")
    src.add_argument("--key", nargs="+", metavar="KEY", help="database key(s) whose codes are the queries")
    q.add_argument("--k", type=positive_int, default=10, help="hits per query (default: 10)")
    q.add_argument("--checkpoint", help="checkpoint to encode --image with (default: the one in the manifest)")
    q.add_argument("--mode", default="local", choices=["local", "ray"], help="shards in-process or on Ray actors")
    q.add_argument("--contact-sheet", metavar="PNG", help="also write a PNG grid of the query and its hits")
    q.add_argument("--data", nargs="+", metavar="SPLIT_OR_TAR",
                   help="dataset split (or tars) the hits' images come from, for --contact-sheet (default: the split "
                        "recorded at encode time, else the tars the codes were encoded from)")
    q.add_argument("--address", help="Ray cluster address for --mode ray")
    q.set_defaults(func=_query)


def _build(args: argparse.Namespace) -> int:
    from rayhash.index import build_index

    m = build_index(args.codes, args.out, index_type=args.index_type, shards=args.shards, append=args.append,
                    checkpoint=args.checkpoint, address=args.address, nlist=args.nlist, nprobe=args.nprobe,
                    hash_bits=args.hash_bits, nhash=args.nhash, nflip=args.nflip)
    print(f"{args.out}: {m['index_type']} index, {m['bits']} bits, {len(m['shards'])} shards, {m['ntotal']} codes")
    return 0


def _query(args: argparse.Namespace) -> int:
    from rayhash.index import ShardedIndex
    from rayhash.index.query import codes_for_keys, format_table, image_source, write_contact_sheet

    with ShardedIndex.open(args.index, mode=args.mode, checkpoint=args.checkpoint, address=args.address) as index:
        if args.image:
            queries, codes = args.image, index.encode(args.image)
        else:
            queries, codes = args.key, codes_for_keys(index.manifest, args.key)
        res = index.search(codes, args.k)
        names = index.manifest.get("label_names") or []
        print(format_table(queries, res, names))
        if args.contact_sheet:
            write_contact_sheet(args.contact_sheet, queries, res, names, images=bool(args.image),
                                data=(args.data[0] if len(args.data) == 1 else args.data) if args.data
                                else image_source(index.manifest))
            print(f"contact sheet: {args.contact_sheet}")
    return 0
