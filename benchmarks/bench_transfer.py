"""Quality beyond class labels, over seeds: caption targets and the zero-shot protocol.

``--study captions``: images with captions and no labels (default: the offline Flickr8k stand-in for Conceptual
Captions). L_sim targets are sentence-embedding distances of the captions; retrieval is scored with graded
relevance (clipped cosine of caption embeddings in place of class similarity), mAHP@250 under the reference protocol
(queries = database = the held-out split) and the database protocol (held-out queries against the training split),
against random codes on the same items.

``--study zeroshot``: train on the first 80 CIFAR-100 classes, encode the whole training split (all 100 classes)
into an index and query it with the test images of the 20 unseen classes; mAHP@250 of (a) CE only and (b) CE + L_sim
(plus L_KL when the config's β > 0) against random codes.

    export RAYHASH_DATA=/path/to/data   # holds flickr8k-1k/ and cifar-100-python.tar.gz
    .venv/bin/python benchmarks/bench_transfer.py --study captions --seeds 0,1,2
    .venv/bin/python benchmarks/bench_transfer.py --study zeroshot --seeds 0,1,2 --set train.epochs=8

Finished runs are appended to ``--results`` (JSON lines) and skipped when found there.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAYHASH_PROGRESS", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("RAYHASH_DATA", ".")  # a folder holding cifar-100-python.tar.gz and flickr8k-1k/
CAPTION_CONFIG = ["model.backbone=resnet9", "model.width=32", "data.image_size=64", "train.epochs=15",
                  "train.batch_size=100", "train.optimizer=sgd", "train.lr=0.05", "train.warmup_epochs=2",
                  "train.num_workers=1", "train.cpus_per_worker=1", "train.threads=2", "loss.beta=0",
                  "train.checkpoint_every=100"]


def _random_table(table, seed: int):
    import numpy as np

    from rayhash.index.codes import CodeTable

    rng = np.random.default_rng(seed)
    return CodeTable(table.keys, rng.integers(0, 256, table.codes.shape, dtype=np.uint8), table.labels, table.bits)


def _mahp(metrics: dict) -> float:
    """The mAHP@k figure (k is capped at the database size - 1, which names the key)."""
    return next(v for key, v in metrics.items() if key.startswith("mAHP@") and "_" not in key)


def _captions(args, seed: int, work: str) -> dict:
    from rayhash.config import load_config
    from rayhash.data import convert_captions, embed_captions
    from rayhash.encode import encode_dataset
    from rayhash.eval import evaluate
    from rayhash.eval.evaluate import caption_metrics
    from rayhash.index import ShardedIndex, build_index, read_codes
    from rayhash.train import train

    ds = os.path.join(work, "captions")
    convert_captions(args.captions, ds)
    emb = embed_captions(ds)
    cfg = load_config(os.path.join(HERE, "..", "configs", "conceptual_captions.yaml"),
                      [f"data.path={ds}", f"data.caption_embeddings={emb}", f"train.seed={seed}", *CAPTION_CONFIG,
                       *args.set])
    run = tempfile.mkdtemp(dir=work, prefix=f"captions-{seed}-")
    ckpt = train(cfg, run).checkpoint
    encode_dataset(ckpt, os.path.join(ds, "train"), os.path.join(run, "codes"))
    build_index(os.path.join(run, "codes"), os.path.join(run, "index"), index_type="flat", shards=1)
    out = {"reference": _mahp(evaluate(None, ckpt, os.path.join(ds, "val"), os.path.join(run, "eval-ref"),
                                       protocol="reference")),
           "database": _mahp(evaluate(os.path.join(run, "index"), ckpt, os.path.join(ds, "val"),
                                      os.path.join(run, "eval-db")))}
    q = read_codes(os.path.join(run, "eval-ref", "query_codes"))
    db = read_codes(os.path.join(run, "codes"))
    rq = _random_table(q, seed)
    out["reference_random"] = _mahp(caption_metrics(ShardedIndex.from_codes(rq), rq, emb)[0])
    rdb = _random_table(db, seed + 1)
    out["database_random"] = _mahp(caption_metrics(ShardedIndex.from_codes(rdb), _random_table(q, seed + 2), emb)[0])
    return {f"mAHP {k}": v for k, v in out.items()} | {"n_val": len(q), "n_train": len(db)}


def _zeroshot(args, seed: int, work: str, variant: str) -> dict:
    from rayhash.config import load_config
    from rayhash.data import convert_cifar100
    from rayhash.encode import encode_dataset
    from rayhash.eval import evaluate
    from rayhash.index import build_index
    from rayhash.train import train

    ds = os.path.join(work, "cifar")
    convert_cifar100(args.cifar, ds)
    seen, unseen = list(range(80)), list(range(80, 100))
    loss = ["loss.alpha=0", "loss.beta=0"] if variant == "a" else []
    cfg = load_config(os.path.join(HERE, "..", "configs", "cifar100-cpu.yaml"),
                      [f"data.path={ds}", f"train.seed={seed}", f"data.train_classes={seen}", "validation.subset=0",
                       *args.set, *loss])
    run = tempfile.mkdtemp(dir=work, prefix=f"zeroshot-{variant}-{seed}-")
    ckpt = train(cfg, run).checkpoint
    encode_dataset(ckpt, os.path.join(ds, "train"), os.path.join(run, "codes"))
    build_index(os.path.join(run, "codes"), os.path.join(run, "index"), index_type="flat", shards=2)
    m = evaluate(os.path.join(run, "index"), ckpt, os.path.join(ds, "test"), os.path.join(run, "eval"),
                 classes=unseen, seed=seed)
    return {"mAHP@250 unseen": m["mAHP@250"], "mAHP@250 random": m["mAHP@250_random"], "mAP@1000": m["mAP@1000"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, choices=["captions", "zeroshot"])
    p.add_argument("--captions", default=os.path.join(DATA, "flickr8k-1k"),
                   help="caption collection folder (captions.txt + images/; default: $RAYHASH_DATA/flickr8k-1k)")
    p.add_argument("--cifar", default=os.path.join(DATA, "cifar-100-python.tar.gz"),
                   help="CIFAR-100 archive (default: $RAYHASH_DATA/cifar-100-python.tar.gz)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="a,b", help="zeroshot: a = CE only, b = the config's losses")
    p.add_argument("--results", default=None, help="JSON-lines file of finished runs")
    p.add_argument("--work", default=None, help="folder for datasets and runs (default: a temp folder)")
    args = p.parse_args()

    import numpy as np
    import ray

    from rayhash.runtime import init_ray

    work = args.work or tempfile.mkdtemp(prefix=f"bench-{args.study}-")
    results = args.results or os.path.join(work, "results.jsonl")
    init_ray("local", include_dashboard=False, log_to_driver=False)
    done = [json.loads(x) for x in open(results)] if os.path.exists(results) else []
    variants = args.variants.split(",") if args.study == "zeroshot" else ["-"]
    for variant in variants:
        for seed in (int(s) for s in args.seeds.split(",")):
            ident = {"study": args.study, "variant": variant, "seed": seed, "set": args.set}
            if any(all(r.get(k) == v for k, v in ident.items()) for r in done):
                continue
            t0 = time.perf_counter()
            m = _captions(args, seed, work) if args.study == "captions" else _zeroshot(args, seed, work, variant)
            row = {**ident, **m, "seconds": time.perf_counter() - t0}
            done.append(row)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print("done", json.dumps(row), flush=True)
    rows = [r for r in done if r["study"] == args.study and r["set"] == args.set]
    print(f"\n{args.study}: mean ± sd over seeds {args.seeds} {' '.join(args.set)}\n")
    for variant in variants:
        rs = [r for r in rows if r["variant"] == variant]
        metrics = [k for k in rs[0] if k.startswith("mAHP") or k.startswith("mAP")]
        cells = [f"{k}: {np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs], ddof=1):.3f}"
                 for k in metrics]
        label = {"a": "(a) CE only", "b": "(b) config losses", "-": "captions"}[variant]
        print(f"{label} ({len(rs)} runs, {np.mean([r['seconds'] for r in rs]):.0f} s/run): " + "; ".join(cells))
    ray.shutdown()


if __name__ == "__main__":
    main()
