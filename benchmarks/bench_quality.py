"""Does each loss term help? The loss study on real CIFAR-100 under the reference protocol, over seeds.

Variants share one config (backbone, bits, steps, schedule) and differ only in their loss weights:
(a) CE only, (b) CE + L_sim, (c) CE + L_sim + L_KL (β and its schedule from the config or ``--set``).
Each run trains with rayhash's own Ray Train path; its last validation is the reference protocol of Barz & Denzler
(queries = database = the whole test split, each query left out of its own ranking). The table gives mean ± sd over
seeds of mAHP@250 (index ties and expected ties), mAP@1000, P@r≤2, the binarisation gap (continuous − binary mAHP),
quantisation error, bit balance and mean |bit correlation|, framed by two references on the same labels: a perfect
*flat* classifier (the query's class first, the rest in random order) and random codes.

    export RAYHASH_DATA=/path/to/data   # holds cifar-100-python.tar.gz
    .venv/bin/python benchmarks/bench_quality.py --seeds 0,1,2 --set train.epochs=6   # the study (short budget)
    .venv/bin/python benchmarks/bench_quality.py --variants b --seeds 0,1,2           # the full CPU recipe

Every finished run is appended to ``--results`` (JSON lines) at once, and runs already there are skipped, so a long
study survives interruption and can be run in the background; ``benchmarks/results/*.jsonl`` holds the committed
runs of the README's tables (pass one as ``--results`` to add seeds to it).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAYHASH_PROGRESS", "0")

from rayhash.config import KL_ESTIMATORS, load_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"a": ("CE", ["loss.alpha=0", "loss.beta=0"]),
            "b": ("CE+L_sim", ["loss.beta=0"]),
            "c": ("CE+L_sim+L_KL", [])}  # c: alpha and beta (> 0) as configured / --set
# c-<estimator>: (c) with that loss.kl_estimator (rayhash.losses.kl), e.g. c-blockwise
VARIANTS.update({f"c-{e}": (f"CE+L_sim+L_KL {e}", [f"loss.kl_estimator={e}"]) for e in KL_ESTIMATORS})
COLUMNS = ["mAHP@250", "mAHP@250_expected", "mAP@1000", "P@r2", "gap", "quant_error", "bit_balance",
           "bit_correlation", "within_r0", "within_r2"]


def _mean_sd(values) -> str:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def _run(args, ds: str, variant: str, seed: int, work: str) -> dict:
    from rayhash.train import train

    name, overrides = VARIANTS[variant]
    cfg = load_config(args.config, [f"data.path={ds}", f"train.seed={seed}", *args.set, *overrides])
    if variant.startswith("c") and not (cfg.loss.alpha and cfg.loss.beta):
        raise SystemExit("variant c needs loss.alpha > 0 and loss.beta > 0: pass e.g. --set loss.beta=0.1")
    t0 = time.perf_counter()
    last = train(cfg, tempfile.mkdtemp(dir=work, prefix=f"{variant}-{seed}-")).metrics[-1]
    metrics = {key.removeprefix("val_"): v for key, v in last.items() if key.startswith("val_")}
    return {"variant": variant, "name": name, "seed": seed, "set": args.set, "config": _config_name(args.config),
            "seconds": time.perf_counter() - t0, "epochs": cfg.train.epochs, "bits": cfg.model.bits, **metrics}


def _config_name(path: str) -> str:
    """A config's name in the results file: relative to the checkout for shipped configs (so a results file
    committed in one checkout resumes in another), else the absolute path."""
    root = os.path.abspath(os.path.join(HERE, ".."))
    return os.path.relpath(path, root) if os.path.abspath(path).startswith(root + os.sep) else os.path.abspath(path)


def _table(rows: list[dict], refs: dict[str, list[float]]) -> str:
    lines = [f"| variant | runs | {' | '.join(COLUMNS)} | time / run |", "|---" * (len(COLUMNS) + 3) + "|"]
    for v in sorted({r["variant"] for r in rows}, key=list(VARIANTS).index):
        rs = [r for r in rows if r["variant"] == v]
        cells = [_mean_sd([r[c] for r in rs]) if all(c in r for r in rs) else "" for c in COLUMNS]
        lines.append(f"| ({v}) {rs[0]['name']} | {len(rs)} | {' | '.join(cells)} | "
                     f"{sum(r['seconds'] for r in rs) / len(rs):.0f} s |")
    for name, vals in refs.items():
        lines.append(f"| {name} | {len(vals)} | {_mean_sd(vals)} |" + " |" * (len(COLUMNS)))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=os.path.join(os.environ.get("RAYHASH_DATA", "."), "cifar-100-python.tar.gz"),
                   help="CIFAR-100 python-version archive (default: $RAYHASH_DATA/cifar-100-python.tar.gz)")
    p.add_argument("--config", default=os.path.join(HERE, "..", "configs", "cifar100-cpu.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every variant, repeatable (e.g. --set train.epochs=6)")
    p.add_argument("--variants", default="a,b,c", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--limit", type=int, default=None, help="images per class and split (default: all)")
    p.add_argument("--results", default=None, help="JSON-lines file of finished runs (default: a temp folder)")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing: print the table of the runs already in --results")
    p.add_argument("--work", default=None, help="folder for the dataset and runs (default: a temp folder)")
    args = p.parse_args()
    args.config = os.path.abspath(args.config)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    import numpy as np
    import ray

    from rayhash.runtime import init_ray

    from rayhash.data import convert_cifar100, load_dataset_info
    from rayhash.data.stream import read_shards
    from rayhash.metrics import flat_classifier_mahp, random_codes_mahp

    work = args.work or tempfile.mkdtemp(prefix="bench-quality-")
    results = args.results or os.path.join(work, "results.jsonl")
    init_ray("local", include_dashboard=False, log_to_driver=False)
    ds = os.path.join(work, "cifar")
    convert_cifar100(args.cifar, ds, limit_per_class=args.limit)
    info = load_dataset_info(ds)
    done = [json.loads(x) for x in open(results)] if os.path.exists(results) else []
    key = lambda r: (r["variant"], r["seed"], tuple(r["set"]), r["config"])  # noqa: E731
    config_name = _config_name(args.config)
    t_start = time.perf_counter()
    for seed in ([] if args.table_only else (int(s) for s in args.seeds.split(","))):  # each variant's seed 0 first
        for variant in args.variants.split(","):
            if any(key(r) == (variant, seed, tuple(args.set), config_name) for r in done):
                continue
            row = _run(args, ds, variant, seed, work)
            done.append(row)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"done ({variant}) seed {seed}: mAHP@250 {row.get('mAHP@250', float('nan')):.4f} "
                  f"in {row['seconds']:.0f} s", flush=True)
    rows = [r for r in done if tuple(r["set"]) == tuple(args.set) and r["config"] == config_name]
    labels = np.concatenate([b["label"] for b in read_shards(os.path.join(ds, "test"), mode="eval").select_columns(
        ["label"]).iter_batches(batch_size=4096, batch_format="numpy")])
    S = info.similarity_matrix()
    seeds = [int(s) for s in args.seeds.split(",")]
    bits = load_config(args.config, list(args.set)).model.bits  # the code length these rows were trained at
    refs = {"perfect flat classifier": [flat_classifier_mahp(labels, S, 250, s) for s in seeds],
            "random codes": [random_codes_mahp(labels, S, bits, 250, s) for s in seeds]}
    print(f"\nCIFAR-100 ({info.count('train')} train / {len(labels)} test images), reference protocol "
          f"(queries = database = test split), config {os.path.relpath(args.config)} {' '.join(args.set)}; "
          f"mean ± sd over seeds {args.seeds}; this invocation took {time.perf_counter() - t_start:.0f} s\n")
    print(_table(rows, refs))
    print(f"\nruns: {results}")
    ray.shutdown()


if __name__ == "__main__":
    main()
