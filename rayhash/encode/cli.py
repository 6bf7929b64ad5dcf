"""``rayhash encode`` (imports nothing heavy at module level)."""
from __future__ import annotations

import argparse

from rayhash.cliargs import nonnegative_float, positive_int

HELP = """\
Encode a dataset split with a trained checkpoint into packed binary codes (Ray Data batch inference, one encoder
per actor; GPU actors when the cluster has GPUs). Writes CODES/codes-%05d.parquet (one per input shard: key, code,
label) and CODES/codes.json (bits, checkpoint, counts, skipped corrupt samples). Re-running after a crash encodes
only the input shards whose output is missing."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("encode", help="encode images into binary code shards (Parquet)", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder (RUN or RUN/final) from `rayhash train`")
    p.add_argument("--data", required=True, help="dataset split folder DS/<split>, or .tar shard(s)", nargs="+")
    p.add_argument("--out", required=True, help="output folder for code shards (local path or s3:// gs:// URI)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per encoder call (default: 256)")
    p.add_argument("--concurrency", type=positive_int,
                   help="encoder actors (default: one per GPU, else up to 4 CPU actors, leaving one CPU for reading)")
    p.add_argument("--num-gpus", type=nonnegative_float,
                   help="GPUs per encoder actor (default: 1 if the cluster has GPUs)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not check input tars against dataset.json's sha256 first (samples lost to a corrupt "
                        "tar are then counted as skipped)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=_encode)


def _encode(args: argparse.Namespace) -> int:
    from rayhash.encode import encode_dataset

    data = args.data[0] if len(args.data) == 1 else args.data
    s = encode_dataset(args.checkpoint, data, args.out, batch_size=args.batch_size, concurrency=args.concurrency,
                       num_gpus=args.num_gpus, address=args.address, verify=args.verify)
    print(f"{args.out}: {s['count']} codes ({s['bits']} bits) in {len(s['shards'])} shard(s); "
          f"{s['skipped_corrupt']} corrupt sample(s) skipped")
    return 0
