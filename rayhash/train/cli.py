"""``rayhash train``: train a hash network on Ray Train from a YAML config plus key=value overrides."""
from __future__ import annotations

import argparse

HELP = """\
Train a semantic hash network with Ray Train (DDP over train.num_workers workers, GPU when the cluster has one).

  rayhash train --config demo --data DS --out runs/demo train.epochs=3 model.bits=32

--config takes a YAML path or the name of a shipped config (`rayhash config show` lists them; default: demo).

Writes RUN/metrics.jsonl (one line per epoch), RUN/curves.png, RUN/ray/ (Ray Train checkpoints) and
RUN/final/ (model.pt, meta.json, config.yaml) which `rayhash encode --checkpoint RUN` loads.

Backbones (model.backbone=NAME):
{backbones}
"""


DEFAULT_CONFIG = "demo"  # a shipped config (rayhash.config.shipped_configs)


def register(subparsers) -> None:
    from rayhash.model.backbones import BACKBONES

    p = subparsers.add_parser("train", help="train a hash network (Ray Train)",
                              description=HELP.format(backbones=BACKBONES.describe()),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="YAML run config, or a shipped config's name (default: %(default)s; `rayhash config show`)")
    p.add_argument("--data", help="dataset folder from `rayhash data convert` (sets data.path)")
    p.add_argument("--out", required=True, help="run folder (local path or s3:// / gs:// URI)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--print-config", action="store_true", help="print the merged, validated config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.bits=32")
    p.set_defaults(func=run)


def run(args) -> int:
    from rayhash.config import find_config, load_config

    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    config = load_config(find_config(args.config), overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from rayhash.train import train

    result = train(config, args.out, resume=args.resume, address=args.address)
    last = result.metrics[-1] if result.metrics else {}
    shown = {k: round(v, 4) for k, v in last.items() if k.startswith(("loss", "val_mAHP", "val_gap"))}
    print(f"final checkpoint: {result.checkpoint}  {shown}")
    return 0
