"""``rayhash data wordnet | convert | embed-captions`` (nothing heavy imported at module level)."""
from __future__ import annotations

import argparse

from rayhash.cliargs import fraction, positive_int


def register(subparsers) -> None:
    from rayhash.data import CONVERTERS  # importing rayhash.data registers every converter

    p = subparsers.add_parser("data", help="prepare datasets: WordNet, shard conversion, caption embeddings",
                              description="Prepare data: WebDataset shards + dataset.json, caption targets.")
    sub = p.add_subparsers(dest="data_command", metavar="<data command>")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    w = sub.add_parser("wordnet", help="make WordNet available to nltk (downloads it when missing)")
    w.add_argument("--dir", default=None, help="nltk data folder (default: $NLTK_DATA or nltk's default)")
    w.set_defaults(func=_wordnet)

    c = sub.add_parser("convert", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="convert a dataset to WebDataset shards + dataset.json",
                       description="Write DS/<split>/<split>-%06d.tar + DS/dataset.json, in parallel with Ray tasks; "
                                   "re-running skips finished shards. `rayhash data convert KIND --help` lists a "
                                   "kind's own options.\n\nKINDS:\n" + CONVERTERS.describe())
    kinds = c.add_subparsers(dest="kind", metavar="KIND")
    c.set_defaults(func=lambda args: c.print_help() or 2)
    for conv in CONVERTERS:
        k = kinds.add_parser(conv.name, help=conv.help, description=f"{conv.help}.")
        if conv.source:
            k.add_argument("src", nargs="?", default=None, help=f"SRC: {conv.source}")
        k.add_argument("--out", required=True, help="output dataset folder DS (local path or s3://, gs:// URI)")
        takes = _converter_options(conv)
        if "shard_size" in takes:
            k.add_argument("--shard-size", type=positive_int, default=None,
                           help=f"samples per shard (default: {takes['shard_size']})")
        if conv.limit:
            what = "images per class" if conv.limit == "limit_per_class" else "images"
            k.add_argument("--limit", "--limit-per-class", dest="limit", type=positive_int, default=None,
                           help=f"keep N {what}, for tests and demos (--limit-per-class: its old, deprecated name)")
        for name, (flags, kwargs) in _KIND_OPTIONS.items():
            if name in takes:
                k.add_argument(*flags, dest=name, default=None, **kwargs)
        k.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
        k.set_defaults(func=_convert)

    e = sub.add_parser("embed-captions", help="sentence-embed every image's captions into Parquet key -> embedding")
    e.add_argument("ds", help="dataset folder DS (made by `rayhash data convert captions`)")
    e.add_argument("--out", default=None, help="Parquet output (default DS/caption_embeddings.parquet)")
    e.add_argument("--model", default=None, help="sentence-transformers model (default all-MiniLM-L6-v2, offline)")
    e.add_argument("--batch-size", type=positive_int, default=256)
    e.add_argument("--concurrency", type=positive_int, default=None, help="embedding actors (default: #GPUs, else 1)")
    e.add_argument("--overwrite", action="store_true", help="redo an existing output")
    e.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    e.set_defaults(func=_embed)


# Options only some converters take: each kind's parser offers those in its converter's signature.
_KIND_OPTIONS = {
    "download": (("--download",), {"action": "store_true", "help": "download through torchvision if SRC is missing"}),
    "class_index": (("--class-index",), {"help": "imagenet_class_index.json (class order + names)"}),
    "val_labels": (("--val-labels",), {"help": "label file of a flat val folder"}),
    "images": (("--images",), {"help": "images folder (default: SRC/images)"}),
    "val_fraction": (("--val-fraction",), {"type": fraction, "help": "fraction of images in split val, chosen "
                                                                     "by key hash (default 0.1)"}),
    "per_class": (("--per-class",), {"type": positive_int, "nargs": 2, "metavar": ("TRAIN", "TEST"),
                                     "help": "images per class in train and test (default 30 10)"}),
    "image_size": (("--image-size",), {"type": positive_int, "help": "image size in pixels (default 32)"}),
}


def _converter_options(conv) -> dict:
    """The converter's keyword options and their defaults (its signature is the one list)."""
    import inspect

    return {n: p.default for n, p in inspect.signature(conv.target).parameters.items()
            if n not in ("src", "root", "out")}


def _wordnet(args) -> int:
    from rayhash.semantics import install_wordnet

    print(f"WordNet available in {install_wordnet(args.dir)}")
    return 0


def _convert(args) -> int:
    from rayhash import data
    from rayhash.data.convert import limit_option
    from rayhash.runtime import init_ray

    limit = limit_option(args.kind, getattr(args, "limit", None))  # refused before Ray starts
    options = {name: getattr(args, name) for name in (*_KIND_OPTIONS, "shard_size") if hasattr(args, name)}
    if options.get("per_class"):
        options["per_class"] = {"train": options["per_class"][0], "test": options["per_class"][1]}
    init_ray(args.address)
    doc = data.convert(args.kind, getattr(args, "src", None), args.out, **limit, **options)
    for split, entry in doc["splits"].items():
        print(f"{split}: {entry['count']} samples in {len(entry['shards'])} shards")
    return 0


def _embed(args) -> int:
    from rayhash.data import embed_captions
    from rayhash.runtime import init_ray

    init_ray(args.address)
    out = embed_captions(args.ds, args.out, model=args.model, batch_size=args.batch_size,
                         concurrency=args.concurrency, overwrite=args.overwrite)
    print(out)
    return 0
