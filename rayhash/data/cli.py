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
                                   "re-running skips finished shards.\n\nKINDS:\n" + CONVERTERS.describe())
    c.add_argument("kind", choices=CONVERTERS.names(), metavar="KIND", help="one of: " + ", ".join(CONVERTERS.names()))
    c.add_argument("src", nargs="?", default=None, help="source archive/folder/file (not for synthetic)")
    c.add_argument("--out", required=True, help="output dataset folder DS (local path or s3://, gs:// URI)")
    c.add_argument("--shard-size", type=positive_int, default=None, help="samples per shard (default per kind)")
    c.add_argument("--limit", "--limit-per-class", dest="limit", type=positive_int, default=None,
                   help="keep N images per class (cifar100, imagefolder) or N images (captions), for tests and "
                        "demos; --limit-per-class is its old, deprecated name")
    c.add_argument("--download", action="store_true", default=None,
                   help="cifar100: download through torchvision if SRC is missing")
    c.add_argument("--class-index", default=None, help="imagefolder: imagenet_class_index.json (order + names)")
    c.add_argument("--val-labels", default=None, help="imagefolder: label file of a flat val folder")
    c.add_argument("--images", default=None, help="captions: images folder (default: SRC/images)")
    c.add_argument("--val-fraction", type=fraction, default=None,
                   help="captions: fraction of images in split val (default 0.1)")
    c.add_argument("--per-class", type=positive_int, nargs=2, default=None, metavar=("TRAIN", "TEST"),
                   help="synthetic: images per class in train and test (default 30 10)")
    c.add_argument("--image-size", type=positive_int, default=None, help="synthetic: image size (default 32)")
    c.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    c.set_defaults(func=_convert)

    e = sub.add_parser("embed-captions", help="sentence-embed every image's captions into Parquet key -> embedding")
    e.add_argument("ds", help="dataset folder DS (made by `rayhash data convert captions`)")
    e.add_argument("--out", default=None, help="Parquet output (default DS/caption_embeddings.parquet)")
    e.add_argument("--model", default=None, help="sentence-transformers model (default all-MiniLM-L6-v2, offline)")
    e.add_argument("--batch-size", type=positive_int, default=256)
    e.add_argument("--concurrency", type=positive_int, default=None, help="embedding actors (default: #GPUs, else 1)")
    e.add_argument("--overwrite", action="store_true", help="redo an existing output")
    e.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    e.set_defaults(func=_embed)


def _wordnet(args) -> int:
    from rayhash.semantics import install_wordnet

    print(f"WordNet available in {install_wordnet(args.dir)}")
    return 0


def _convert(args) -> int:
    from rayhash import data
    from rayhash.data.convert import limit_option
    from rayhash.runtime import init_ray

    limit = limit_option(args.kind, args.limit)  # refused before Ray starts
    init_ray(args.address)
    per_class = {"train": args.per_class[0], "test": args.per_class[1]} if args.per_class else None
    doc = data.convert(args.kind, args.src, args.out, shard_size=args.shard_size, **limit,
                       download=args.download, class_index=args.class_index,
                       val_labels=args.val_labels, images=args.images, val_fraction=args.val_fraction,
                       per_class=per_class, image_size=args.image_size)
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
