"""The driver side of training: plan the run, launch a Ray Train TorchTrainer, export the final checkpoint."""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
from dataclasses import dataclass, field

from rayhash import settings, storage
from rayhash.config import RunConfig
from rayhash.hooks import NO_HOOKS, Hooks
from rayhash.layout import CheckpointDir, DatasetDir, RunDir
from rayhash.runtime import get_logger, require_cpu_headroom
from rayhash.train.plan import WorkerPlan

log = get_logger("rayhash.train")
RUN_NAME = "train"


@dataclass
class TrainResult:
    checkpoint: str  # <out>/final: model.pt + meta.json + config.yaml (what encoding loads)
    metrics: list[dict] = field(default_factory=list)  # one dict per epoch (also <out>/metrics.jsonl)
    ray_checkpoint: str | None = None  # the last Ray Train checkpoint it was exported from


def plan_steps(config: RunConfig, n_train: int) -> int:
    """Optimiser steps per epoch: full global batches in the split, capped by train.steps_per_epoch."""
    t = config.train
    if t.batch_size % t.num_workers:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by train.num_workers "
                         f"({t.num_workers}): it is the global batch split evenly over workers")
    steps = n_train // t.batch_size
    if steps < 1:
        raise ValueError(f"train.batch_size ({t.batch_size}) exceeds the {n_train} training samples in "
                         f"{config.data.path}/{config.data.train_split}; lower train.batch_size")
    return min(steps, t.steps_per_epoch or steps)


def _storage(config: RunConfig, out: str) -> str:
    return storage.absolute(config.train.storage_path or RunDir(out).ray_storage)


def _has_run(storage_path: str) -> bool:
    return storage.exists(storage.join(storage_path, RUN_NAME))


def check_cpu_headroom(t, address: str | None = None) -> None:
    """Training workers must leave at least one CPU for Ray Data decoding (see ``require_cpu_headroom``)."""
    require_cpu_headroom(t.num_workers * t.cpus_per_worker, "train.num_workers x train.cpus_per_worker",
                         "lower train.cpus_per_worker (e.g. train.cpus_per_worker=1) or train.num_workers, or add "
                         "nodes", address)


def train(config: RunConfig, out: str, *, resume: bool = False, address: str | None = None,
          hooks: Hooks = NO_HOOKS) -> TrainResult:
    """Train a hash network with Ray Train (DDP over ``train.num_workers`` workers) and export ``<out>/final``.

    ``resume=True`` continues the run in ``<out>`` from its latest checkpoint (Ray Train restores it);
    without it an existing run folder is refused. Worker failures restart from the last checkpoint up to
    ``train.max_failures`` times. The run folder's writer lease is held throughout: a second ``rayhash train``
    into the same folder is refused while this one runs. ``hooks``: instrumentation the workers call (tests build
    them with :mod:`rayhash.testing`)."""
    config.check_paths()
    out = storage.absolute(out)
    store = _storage(config, out)
    if _has_run(store) and not resume:
        raise FileExistsError(f"{out} already holds a training run ({storage.join(store, RUN_NAME)}); pass --resume "
                              "to continue it from its latest checkpoint, or choose a new --out")
    if resume and not _has_run(store):
        log.warning("--resume: no earlier run under %s, starting from scratch", store)
    elif resume:
        _check_resume_config(config, store)
    if resume and (done := _finished_run(config, out)) is not None:
        log.info("%s: every one of the %d epochs is trained and exported; nothing to resume", out, config.train.epochs)
        return done
    run = RunDir(out)
    with run.lease("train"):
        return _fit(config, run, store, address, hooks)


def _fit(config: RunConfig, run: RunDir, store: str, address: str | None, hooks: Hooks) -> TrainResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    from rayhash.data import load_dataset_info, read_shards
    from rayhash.data.stream import caption_embedding_dim
    from rayhash.runtime import cluster_has_gpus, init_ray

    out = run.path
    d = config.data
    info = load_dataset_info(d.path)
    if d.targets == "hierarchy" and info.kind != "labels":
        raise ValueError(f"data.targets: 'hierarchy' needs a labelled dataset but {d.path} holds {info.kind}; "
                         "set data.targets=captions (or none)")
    caption_embeddings = d.caption_embeddings
    if d.targets == "captions" and not caption_embeddings:
        caption_embeddings = DatasetDir(d.path).captions
        if not storage.exists(caption_embeddings):
            raise FileNotFoundError(f"data.caption_embeddings: {caption_embeddings} not found; run "
                                    f"`rayhash data embed-captions {d.path} --out {caption_embeddings}`")
    similarity = info.similarity_matrix() if d.targets == "hierarchy" or info.hierarchy else None
    num_classes = info.num_classes if info.kind == "labels" else 0
    steps = plan_steps(config, info.count(d.train_split, d.train_classes))

    init_ray(address)
    val_split = _validation_split(d, info)
    val_source = DatasetDir(d.path).split(val_split) if val_split else None
    if d.verify_shards:  # before any worker starts: a corrupt shard is refused up front, naming it
        for split in [d.train_split] + ([val_split] if val_split else []):
            info.verify(split)
    use_gpu = cluster_has_gpus() if config.train.use_gpu == "auto" else bool(config.train.use_gpu)
    check_cpu_headroom(config.train, address)
    columns = ["image", "label"] + (["target"] if d.targets == "captions" else [])
    ds = read_shards(DatasetDir(d.path).split(d.train_split), mode="train", image_size=d.image_size, shuffle=True,
                     seed=config.train.seed, caption_embeddings=caption_embeddings if d.targets == "captions" else None,
                     classes=d.train_classes, num_classes=num_classes)
    ds = ds.select_columns(columns).limit(steps * config.train.batch_size)
    storage.makedirs(out)
    plan = WorkerPlan(
        config=config, num_classes=num_classes, steps_per_epoch=steps, similarity=similarity,
        embedding_dim=caption_embedding_dim(caption_embeddings) if d.targets == "captions" else 0,
        val_source=val_source, val_count=info.count(val_split) if val_split else 0, metrics_path=run.metrics,
        tensorboard_dir=(run.file(run.TENSORBOARD) if config.train.tensorboard and not storage.is_remote(out)
                         else None),
        meta={"bits": config.model.bits, "image_size": d.image_size, "num_classes": num_classes,
              "label_names": info.label_names, "dataset": info.name, "backbone": config.model.backbone,
              "targets": d.targets},
        hooks=hooks)
    t = config.train
    log.info("training %s (%d bits) on %s: %d worker(s)%s, %d epochs x %d steps, global batch %d; storage %s",
             config.model.backbone, config.model.bits, d.path, t.num_workers, " on GPU" if use_gpu else " on CPU",
             t.epochs, steps, t.batch_size, store)
    trainer = TorchTrainer(
        functools.partial(_entry, plan), datasets={"train": ds},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=store,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # Ray Train's own INFO lines (resources requested, worker group started, process group, "Reporting
            # training result N" and "Checkpoint successfully created" each epoch) stay in its log files under the
            # Ray session folder; rayhash's epoch line says what they say. Its warnings and errors still show, and
            # RAYHASH_LOG_LEVEL=DEBUG brings the INFO lines back.
            logging_config=ray.train.LoggingConfig(log_level=_ray_train_log_level())))
    with _EpochLines(run.metrics, t.epochs):
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    final = export_final(result.checkpoint, out)
    history = _read_history(run.metrics)
    plot_curves(history, run.curves)
    log.info("final checkpoint: %s", final)
    return TrainResult(checkpoint=final, metrics=history, ray_checkpoint=result.checkpoint.path)


def _check_resume_config(config: RunConfig, store: str) -> None:
    """``--resume`` with model settings other than the run's latest checkpoint fails here, naming each setting
    (not deep inside the restore)."""
    import yaml

    ckpts = storage.list_dirs(storage.join(store, RUN_NAME), prefix="checkpoint_")
    saved = CheckpointDir(ckpts[-1]).config if ckpts else None
    if not saved or not storage.exists(saved):
        return
    old = RunConfig.model_validate(yaml.safe_load(storage.read_bytes(saved))).model.model_dump()
    new = config.model.model_dump()
    differ = [f"model.{k}: checkpoint {old[k]!r}, now {new[k]!r}" for k in new
              if k != "pretrained" and old[k] != new[k]]
    if differ:
        raise ValueError(f"--resume: the run's latest checkpoint ({saved}) was trained with other model settings "
                         f"({'; '.join(differ)}); resume with the checkpoint's settings, or train into a new --out")


def _finished_run(config: RunConfig, out: str) -> TrainResult | None:
    """The result of a run in ``out`` that trained all ``train.epochs`` and exported ``out/final`` (its meta.json is
    written last), or None."""
    run = RunDir(out)
    meta = run.final.meta
    if not storage.finished(meta) or storage.read_json(meta).get("epoch") != config.train.epochs - 1:
        return None
    return TrainResult(checkpoint=str(run.final), metrics=_read_history(run.metrics))


def _validation_split(d, info) -> str | None:
    """The split validated on: ``data.val_split``, or, when the dataset has no such split, the first of
    val / validation / test that it has (a Tiny-ImageNet layout has ``val``), said at the start."""
    from rayhash.data.info import held_out_split

    if not d.val_split:
        return None
    split = held_out_split(info.splits, d.val_split, d.train_split)
    if split is None:
        log.warning("data.val_split %r not in %s (splits: %s) and no val/validation/test split to use instead: "
                    "training runs without validation metrics", d.val_split, d.path, sorted(info.splits))
    elif split != d.val_split:
        log.warning("data.val_split %r not in %s (splits: %s): validating on %r instead (set data.val_split to "
                    "choose)", d.val_split, d.path, sorted(info.splits), split)
    return split


def _ray_train_log_level() -> str:
    """Ray Train's console level: WARNING, or INFO when rayhash itself logs at DEBUG."""
    return "INFO" if settings.LOG_LEVEL.get().upper() == "DEBUG" else "WARNING"


def _entry(plan: WorkerPlan) -> list[dict]:
    from rayhash.runtime import quiet_ray_data
    from rayhash.train.loop import train_loop_per_worker

    quiet_ray_data()  # on a cluster too, where no set-up hook ran in this worker
    # Ray Train's worker-side lines each epoch: "Checkpoint successfully created" (under ray.train) and "Reporting
    # training result N" (its context module logs under its file path, outside ray.train's LoggingConfig)
    level = _ray_train_log_level()
    logging.getLogger("ray.train").setLevel(level)
    try:
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(level)
    except ImportError:  # another Ray version: its lines stay
        pass
    return train_loop_per_worker(plan)


def export_final(checkpoint, out: str) -> str:
    """Copy the Ray checkpoint's model files (model.pt, config.yaml, train_state.pt, then meta.json: a final/ with
    meta.json is complete) to <out>/final."""
    final = RunDir(out).final
    with checkpoint.as_directory() as d:
        for name in sorted(os.listdir(d), key=lambda n: (n == final.META, n)):
            src = os.path.join(d, name)
            if os.path.isfile(src):
                with open(src, "rb") as f:
                    storage.write_bytes(final.file(name), f.read())
    return str(final)


def _epoch_line(metrics: dict, epochs: int) -> str:
    """The one line a run prints per epoch: ``epoch 3 (4 of 20): lr=... loss=...`` (0-based, as in metrics.jsonl)."""
    values = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    return f"epoch {metrics['epoch']} ({metrics['epoch'] + 1} of {epochs}): {values}"


class _EpochLines:
    """Prints each epoch's line on the driver as soon as rank 0 has written it to metrics.jsonl (on storage, so
    this works for workers on any node). A worker's own log lines reach the driver asynchronously through Ray's
    log monitor, and a run that ends can exit before the last one arrives; the file is read once more at the end,
    so no epoch line is ever lost. Epochs already in the file when the run starts (``--resume``) are not repeated."""

    def __init__(self, path: str, epochs: int, every_s: float = 2.0):
        self._path, self._epochs, self._every_s = path, epochs, every_s
        self._shown = {h["epoch"] for h in _read_history(path)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="rayhash-epoch-lines", daemon=True)

    def __enter__(self) -> "_EpochLines":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._show()

    def _poll(self) -> None:
        while not self._stop.wait(self._every_s):
            self._show()

    def _show(self) -> None:
        try:
            history = _read_history(self._path)
        except (OSError, ValueError) as e:  # storage briefly unreachable: the next read (or the last) shows it
            log.debug("reading %s: %s", self._path, e)
            return
        for h in history:
            if h["epoch"] not in self._shown:
                self._shown.add(h["epoch"])
                log.info("%s", _epoch_line(h, self._epochs))


def _read_history(path: str) -> list[dict]:
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]


def plot_curves(history: list[dict], path: str) -> None:
    """PNG of the per-epoch curves: loss terms, code statistics, validation mAHP (binary vs continuous)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    panels = [("loss terms", ["loss", "ce", "sim", "kl", "beta"]), ("codes (training batches)",
                                                                 ["bit_balance", "quant_error"]),
              ("validation (reference protocol)",
               sorted({k for h in history for k in h if k.startswith(("val_mAHP", "val_mAP", "val_P@"))}))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)  # validated epochs line up with training
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with storage.atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
