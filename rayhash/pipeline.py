"""The whole pipeline in one call: convert -> [embed captions] -> train -> encode -> index -> eval.

``rayhash demo`` runs it on the offline synthetic dataset (or real CIFAR-100) on a local Ray instance;
``rayhash pipeline`` / ``jobs/pipeline.py`` runs it with any config on a cluster. Every stage is resumable and
skips work whose outputs already exist, so a re-run after a failure continues where it stopped.
"""
from __future__ import annotations

import argparse
import time

from rayhash import storage
from rayhash.cliargs import positive_int
from rayhash.layout import PipelineDir
from rayhash.runtime import get_logger

log = get_logger("pipeline")


def convert(dataset: str, source: str | None, ds_dir: str, shard_size: int | None = None,
            limit: int | None = None) -> dict:
    """Convert raw data into WebDataset shards (resumable: finished shards are kept). ``limit`` caps images per
    class (cifar100, imagefolder) or images (captions), for quick runs; ``cifar100`` without a source downloads."""
    from rayhash.data import convert as run_converter
    from rayhash.data.convert import limit_option

    options = {"shard_size": shard_size, **limit_option(dataset, limit)}
    if source is None and dataset == "cifar100":
        options["download"] = True
    return run_converter(dataset, source, ds_dir, **options)


def run_pipeline(out: str, *, dataset: str = "synthetic", source: str | None = None, config: str | None = None,
                 overrides: list[str] = (), index_shards: int = 2, limit: int | None = None,
                 address: str | None = None) -> dict:
    """Run every stage into ``out`` (data/, run/, codes/, index/, eval/); returns the eval metrics of the database
    protocol (queries = the held-out split, database = the training split), with the reference protocol's
    (queries = database = the held-out split, Barz & Denzler; written to eval/reference/) under ``"reference"``."""
    from rayhash.config import find_config, load_config
    from rayhash.data import CONVERTERS, embed_captions, load_dataset_info
    from rayhash.data.info import held_out_split
    from rayhash.encode import encode_dataset
    from rayhash.eval import evaluate
    from rayhash.index import build_index
    from rayhash.runtime import init_ray
    from rayhash.train import train

    init_ray(address)
    out = PipelineDir(storage.absolute(out))
    log.info("[1/5] converting %s data into shards under %s", dataset, out.data)
    convert(dataset, source, out.data, limit=limit)
    info = load_dataset_info(out.data)
    cfg_path = find_config(config or CONVERTERS[dataset].config)
    extra = [f"data.path={out.data}"]
    if info.kind == "captions":
        emb = embed_captions(out.data)  # kept when it already exists
        extra.append(f"data.caption_embeddings={emb}")
    cfg = load_config(cfg_path, [*extra, *overrides])
    log.info("[2/5] training (%s) into %s", cfg_path, out.run)
    result = train(cfg, out.run, resume=storage.exists(out.run))
    db_split = cfg.data.train_split
    query_split = (held_out_split(info.splits, cfg.data.val_split, db_split)
                   or next((s for s in info.splits if s != db_split), None))
    if query_split is None:
        raise ValueError(f"{out.data.info}: no held-out split to evaluate with (splits: {sorted(info.splits)}); "
                         "set data.val_split to one of them")
    log.info("[3/5] encoding the %s split", db_split)
    encode_dataset(result.checkpoint, out.data.split(db_split), out.codes)
    log.info("[4/5] building a %d-shard binary index", index_shards)
    resumed = storage.finished(out.index.manifest)  # a re-run indexes only new code files
    build_index(out.codes, out.index, index_type="flat", shards=index_shards, append=resumed)
    log.info("[5/5] evaluating %s queries against the index, then on their own (reference protocol)", query_split)
    queries = out.data.split(query_split)
    metrics = evaluate(out.index, result.checkpoint, queries, out.eval)
    metrics["reference"] = evaluate(None, result.checkpoint, queries, out.eval.reference, protocol="reference")
    metrics["objective"] = objective(cfg.loss)
    return metrics


def objective(loss) -> str:
    """The weighted terms a run trained with beside classification, e.g. ``L_sim × 1 + L_KL × 0.3 (corners, k = 32,
    ramped in from 50% of training)``."""
    terms = [f"L_sim × {loss.alpha:g}"] if loss.alpha else []
    if loss.beta:
        when = f", ramped in from {loss.beta_start:.0%} of training" if loss.beta_schedule == "ramp" else ""
        terms.append(f"L_KL × {loss.beta:g} ({loss.kl_estimator}, k = {loss.k}{when})")
    return " + ".join(terms) or "none (classification alone)"


def results_table(metrics: dict) -> str:
    """A small fixed-width table of the headline metrics, one column per protocol present."""
    columns = [("database", metrics)] + ([("reference", metrics["reference"])] if "reference" in metrics else [])
    names = [k for k in ("mAHP@250", "mAHP@250_expected", "mAHP@250_random", "mAP@1000", "P@r2", "bits",
                         "n_queries", "n_database") if any(k in m for _, m in columns)]
    width = max(len(k) for k in names)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    head = f"  {'protocol':<{width}}" + "".join(f"  {name:>10}" for name, _ in columns)
    return "\n".join([head] + [f"  {k:<{width}}" + "".join(f"  {fmt(m[k]) if k in m else '':>10}" for _, m in columns)
                               for k in names])


def _run(args: argparse.Namespace) -> int:
    from rayhash.data import CONVERTERS

    config = args.config or (CONVERTERS[args.dataset].demo_config if args.command == "demo" else None)
    started = time.perf_counter()
    metrics = run_pipeline(args.out, dataset=args.dataset, source=args.data, config=config,
                           overrides=args.overrides, index_shards=args.index_shards,
                           limit=args.limit, address=args.address)
    wall = time.perf_counter() - started
    print(f"\nrayhash results ({args.dataset}):\n{results_table(metrics)}")
    print(f"  loss terms: {metrics['objective']}\n  wall time: {int(wall // 60)} min {wall % 60:.0f} s (this call, "
          "all stages; stages found done were skipped)")
    out = PipelineDir(args.out)
    print(f"\nreport: {out.eval.metrics}")
    for png in storage.list_files(out.eval, ".png"):
        print(f"plot:   {png}")
    print(f"training curves: {out.run.curves}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from rayhash.data import CONVERTERS

    for name, help_ in (("demo", "run the whole pipeline on the offline synthetic dataset (a few minutes, CPU)"),
                        ("pipeline", "run every stage end to end (convert, train, encode, index, eval)")):
        p = sub.add_parser(name, help=help_, description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--dataset", default="synthetic", choices=CONVERTERS.names(),
                       help="which converter to run (default: synthetic, needs no data): "
                            + "; ".join(f"{k.name} (config {k.config})" for k in CONVERTERS))
        p.add_argument("--data", default=None, help="raw data for the converter (cifar100: empty = download)")
        p.add_argument("--config", default=None,
                       help="YAML config or shipped config name (`rayhash config show`; "
                            "default for demo: demo, cifar100: "
                            "cifar100-cpu; for pipeline: the dataset's config)")
        p.add_argument("--out", default=f"runs/{name}", help="output folder (default: %(default)s)")
        p.add_argument("--index-shards", type=positive_int, default=2, help="index shards (default: %(default)s)")
        p.add_argument("--limit", type=positive_int, default=None,
                       help="cap images per class (cifar100) or images (captions) when converting")
        p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
        p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.epochs=3")
        p.set_defaults(func=_run)
