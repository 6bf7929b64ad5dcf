"""Streaming shards through Ray Data: decode, transform, shuffle, join caption targets, count corrupt samples.

Corrupt or undecodable samples are skipped, logged and counted in a named Ray actor of the current Ray job
(``rayhash_data_skips-<job id>`` in namespace ``rayhash``, owned by that job's driver): every job counts its own
skips, and a job that ends takes only its own counter with it. Read the counts with :func:`skip_counts` after (or
while) consuming the dataset.

Caption targets: the Parquet table (key -> embedding) is loaded once on the driver, sorted by key and put in the
object store; every batch looks its keys up with a binary search. That is fine up to a few million captions
(~1.5 KB each at 384-d); beyond that, join by key with Ray Data (``Dataset.join``) or store the target in the
shards themselves.
"""
from __future__ import annotations

import functools
import zlib
from typing import Any, Sequence

import numpy as np

from rayhash import storage
from rayhash.data.images import IMAGE_EXTENSIONS, decode_image, eval_array, raw_array, train_array
from rayhash.runtime import get_logger

log = get_logger("data.stream")

SKIP_ACTOR, SKIP_NAMESPACE = "rayhash_data_skips", "rayhash"
MODES = ("train", "eval", "raw")


class SkipCounter:
    """Counts skipped samples per reason and shard; keeps the first keys as examples."""

    def __init__(self, max_examples: int = 100):
        self.total, self.by_reason, self.by_shard, self.examples = 0, {}, {}, []
        self.max_examples = max_examples

    def add(self, items: list[tuple[str, str, str]]) -> int:
        for key, url, reason in items:
            self.total += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            self.by_shard[url] = self.by_shard.get(url, 0) + 1
            if len(self.examples) < self.max_examples:
                self.examples.append({"key": key, "shard": url, "reason": reason})
        return self.total

    def get(self) -> dict:
        return {"skipped": self.total, "by_reason": dict(self.by_reason), "by_shard": dict(self.by_shard),
                "examples": list(self.examples)}

    def reset(self) -> None:
        self.__init__(self.max_examples)


_SKIP_ACTORS: dict[tuple[str, str], Any] = {}  # (job id, driver node id) -> the counter's handle


def _skip_actor(create: bool):
    """This job's skip counter (created on first use when ``create``): one per Ray job, never shared between
    jobs, so no job depends on an actor that another job owns and takes down when it ends.

    The handle is kept for the life of the process: Ray destroys a non-detached actor, named or not, once every
    handle to it is gone, so a counter whose dataset had been dropped died under the next pipeline that looked
    it up by name (``ActorDiedError`` in the skip path, seen under load)."""
    import ray

    context = ray.get_runtime_context()
    job = (context.get_job_id(), context.get_node_id())
    if job in _SKIP_ACTORS:
        return _SKIP_ACTORS[job]
    name = f"{SKIP_ACTOR}-{job[0]}"
    try:
        actor = ray.get_actor(name, namespace=SKIP_NAMESPACE)
    except ValueError:
        if not create:
            return None
        actor = ray.remote(num_cpus=0)(SkipCounter).options(
            name=name, namespace=SKIP_NAMESPACE, get_if_exists=True).remote()
    _SKIP_ACTORS[job] = actor
    return actor


def skip_counts(reset: bool = False) -> dict:
    """Samples skipped by the :func:`read_shards` pipelines of this Ray job so far:
    ``{"skipped": n, "by_reason": {...}, "by_shard": {url: n}, "examples": [{key, shard, reason}, ...]}``."""
    import ray

    actor = _skip_actor(create=False) if ray.is_initialized() else None
    if actor is None:
        return SkipCounter().get()
    counts = ray.get(actor.get.remote())
    if reset:
        ray.get(actor.reset.remote())
    return counts


def shard_urls(source: str | Sequence[str]) -> list[str]:
    """Tar paths/URIs of ``source``: a split dir (its shards from ``dataset.json`` when present, else every
    ``*.tar`` in it), a dataset dir with exactly one split, a single .tar, or a list of these."""
    if not isinstance(source, (str, bytes)) and hasattr(source, "__iter__"):
        return [u for s in source for u in shard_urls(str(s))]
    source = str(source).rstrip("/")
    if source.endswith(".tar"):
        if not storage.exists(source):
            raise FileNotFoundError(f"{source}: shard not found")
        return [source]
    from rayhash.data.info import load_dataset_info

    try:
        info = load_dataset_info(source)
    except FileNotFoundError:
        info = None
    if info is not None:
        split = source.rsplit("/", 1)[-1]
        if storage.join(info.root, split) == source and split in info.splits:
            return info.shard_paths(split)
        if len(info.splits) == 1:
            return info.shard_paths(next(iter(info.splits)))
        raise ValueError(f"{source}: a dataset with splits {sorted(info.splits)}; pass one split folder, "
                         f"e.g. {storage.join(source, sorted(info.splits)[0])}")
    urls = storage.list_files(source, ".tar")
    if not urls:
        raise FileNotFoundError(f"{source}: no .tar shards found; convert data with `rayhash data convert`")
    return urls


def _rename_image(fname: str) -> str:
    base, _, ext = fname.rpartition(".")
    return f"{base}.img" if ext.lower() in IMAGE_EXTENSIONS else fname


_TABLES: dict[str, Any] = {}  # caption-target tables per worker process, by object ref


def _targets(ref) -> tuple[np.ndarray, np.ndarray]:
    import ray

    key = ref.hex()
    if key not in _TABLES:
        _TABLES[key] = ray.get(ref)
    return _TABLES[key]


def _shuffle_rows(batch, seed: int):
    """Permute the rows of one read block (a shard, or a piece of a large shard), seeded by its first key."""
    first = batch.column("__key__")[0].as_py() if batch.num_rows else ""
    rng = np.random.default_rng([seed, zlib.crc32(str(first).encode())])
    return batch.take(rng.permutation(batch.num_rows))


def _decode_block(block, batch_size: int, shuffle_seed: int | None, **decode_kwargs):
    """One whole read block -> decoded batches of ``batch_size`` rows (a generator, so memory stays bounded).

    Taking whole blocks (``map_batches(batch_size=None)``) lets Ray fuse this stage into the read task: one task
    per shard reads, shuffles and decodes, with no hand-off of raw bytes between stages."""
    if shuffle_seed is not None:
        block = _shuffle_rows(block, shuffle_seed)
    for start in range(0, max(block.num_rows, 1), batch_size):
        yield _decode_batch(block.slice(start, batch_size), **decode_kwargs)


def _decode_batch(batch, mode: str, image_size: int | None, targets_ref, counter,
                  classes: frozenset | None = None, with_source: bool = False,
                  shard_uris: dict[str, str] | None = None, num_classes: int = 0,
                  sample: float | None = None) -> dict[str, np.ndarray]:
    cols = set(batch.column_names)
    n = batch.num_rows
    keys = batch.column("__key__").to_pylist()
    urls = batch.column("__url__").to_pylist() if "__url__" in cols else [""] * n
    if shard_uris:  # Ray Data names a shard by its path inside the filesystem (no s3:// scheme): name it as given
        urls = [shard_uris.get(u, u) for u in urls]
    imgs = batch.column("img").to_pylist() if "img" in cols else [None] * n
    cls = batch.column("cls").to_pylist() if "cls" in cols else [None] * n
    transform = functools.partial({"train": train_array, "eval": eval_array, "raw": raw_array}[mode],
                                  image_size=image_size)
    if mode == "train":  # one generator per batch (creating one per image costs more than the crop)
        transform = functools.partial(transform, rng=np.random.default_rng())
    if targets_ref is not None:
        tkeys, tvals = _targets(targets_ref)
        pos = np.clip(np.searchsorted(tkeys, keys), 0, max(len(tkeys) - 1, 0))
        found = tkeys[pos] == np.asarray(keys, dtype=tkeys.dtype) if len(tkeys) else np.zeros(n, bool)
    out_keys, out_imgs, out_labels, out_rows, skipped = [], [], [], [], []
    for i in range(n):
        if sample is not None and key_fraction(keys[i]) >= sample:
            continue  # not in the sample (decided by the key alone, before decoding)
        if imgs[i] is None or (isinstance(imgs[i], float)):
            skipped.append((keys[i], urls[i], "no image member"))
            continue
        if targets_ref is not None and not found[i]:
            skipped.append((keys[i], urls[i], "no caption embedding"))
            continue
        try:
            missing = cls[i] is None or isinstance(cls[i], float) or cls[i] in (b"", "")  # float: NaN fill
            label = -1 if missing else int(cls[i])
        except ValueError:
            skipped.append((keys[i], urls[i], "bad cls label"))
            log.warning("skipping %s in %s: cls %r is not an integer", keys[i], urls[i], cls[i])
            continue
        if label < -1 or (num_classes and label >= num_classes):
            skipped.append((keys[i], urls[i], "cls out of range"))
            log.warning("skipping %s in %s: cls %d is outside 0..%d (dataset.json's label_names)", keys[i], urls[i],
                        label, num_classes - 1)
            continue
        if classes is not None and label not in classes:
            continue  # filtered out on purpose (e.g. unseen classes of a zero-shot split), not skipped
        try:
            x = transform(decode_image(imgs[i]))
        except ValueError as e:
            skipped.append((keys[i], urls[i], "undecodable image"))
            log.warning("skipping %s in %s: %s", keys[i], urls[i], e)
            continue
        out_keys.append(keys[i])
        out_imgs.append(np.asarray(x))
        out_labels.append(label)
        out_rows.append(i)
    if skipped and counter is not None:
        import ray

        ray.get(counter.add.remote(skipped))
    result = {"key": np.asarray(out_keys, dtype=object), "label": np.asarray(out_labels, dtype=np.int64)}
    if with_source:
        result["source"] = np.asarray([urls[i] for i in out_rows], dtype=object)
    if out_imgs and len({a.shape for a in out_imgs}) == 1:
        result["image"] = np.stack(out_imgs)
    elif out_imgs:
        if mode != "raw":
            raise ValueError(f"images of different sizes {sorted({a.shape for a in out_imgs})[:3]}...; "
                             "pass image_size= to read_shards")
        result["image"] = np.array(out_imgs + [None], dtype=object)[:-1]
    else:
        s = image_size or 1
        shape = (0, s, s, 3) if mode == "raw" else (0, 3, s, s)
        result["image"] = np.zeros(shape, dtype=np.uint8)
    if targets_ref is not None:
        result["target"] = tvals[pos[out_rows]] if out_rows else np.zeros((0, tvals.shape[1]), np.float32)
    return result


def load_caption_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys (str array), embeddings float32 (n, E)) from a Parquet file or folder (key, embedding)."""
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    try:
        table = pq.read_table(p, filesystem=fs, columns=["key", "embedding"])
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"{path}: cannot read caption embeddings ({e}); create them with "
                                "`rayhash data embed-captions DS --out ...`") from e
    keys = np.asarray(table.column("key").to_pylist(), dtype=str)
    emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    order = np.argsort(keys, kind="stable")
    return keys[order], emb[order]


def key_fraction(key: str) -> float:
    """A sample key's fixed position in [0, 1) (crc32 of the key): ``read_shards(sample=f)`` keeps keys below f."""
    return zlib.crc32(key.encode()) / 2**32


def caption_embedding_dim(path: str) -> int:
    """Length E of the caption embeddings in a Parquet file or folder (reads one row)."""
    import pyarrow.dataset as pads

    fs, p = storage.resolve(path)
    for batch in pads.dataset(p, filesystem=fs, format="parquet").to_batches(columns=["embedding"], batch_size=1):
        if batch.num_rows:
            return len(batch.column(0)[0])
    raise ValueError(f"{path}: holds no caption embeddings; re-run `rayhash data embed-captions`")


def read_shards(source: str | Sequence[str], *, mode: str = "train", image_size: int | None = None,
                shuffle: bool = False, seed: int = 0, caption_embeddings: str | None = None,
                batch_size: int = 64, concurrency: int | None = None,
                classes: Sequence[int] | None = None, with_source: bool = False, num_classes: int = 0,
                sample: float | None = None):
    """Stream WebDataset shards as a ``ray.data.Dataset`` with columns ``key`` (str), ``image``, ``label``
    (int64, -1 when unlabelled) and, with ``caption_embeddings`` (Parquet key -> embedding), ``target``.

    ``mode``: ``"train"`` (random resized crop + flip, uint8 (3,S,S)), ``"eval"`` (resize + center crop, uint8
    (3,S,S)) or ``"raw"`` (uint8 (H,W,3), resized + cropped only when ``image_size`` is given). Images stay uint8
    (a quarter of float32's bytes through the object store); the network normalises them on its device.
    ``shuffle=True``: file order shuffled (reseeded every epoch from ``seed``) and the rows of each shard permuted
    inside its read task (no extra pipeline stage); to mix rows across shards as well, pass
    ``local_shuffle_buffer_size`` to ``iter_torch_batches`` (training does, from ``data.shuffle_buffer``).
    ``batch_size``: rows decoded per call (output blocks hold whole shards either way).
    Works as a Ray Train dataset (``TorchTrainer(datasets={"train": ds})`` + ``get_dataset_shard``) and for
    ``map_batches`` inference. ``classes``: keep only samples with these labels (before decoding).
    ``sample`` in (0, 1]: keep the samples whose key hashes below that fraction (:func:`key_fraction`, before
    decoding): a fixed subset spread over every shard and class, where ``limit`` would take the first classes of
    class-ordered shards.
    ``with_source``: add a ``source`` column, the shard URL each row came from (as :func:`shard_urls` names it,
    scheme included). ``num_classes`` > 0: a ``cls`` outside ``0..num_classes-1`` is skipped and counted (it would
    index past the classifier). Skipped samples: see :func:`skip_counts`.
    """
    import ray
    from ray.data import FileShuffleConfig

    from rayhash.runtime import init_ray

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    init_ray()
    urls = shard_urls(source)
    counter = _skip_actor(create=True)
    ds = ray.data.read_webdataset(
        urls, decoder=None, filerename=_rename_image, suffixes=["img", "cls", "json", "txt"],
        shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle else None,
        concurrency=concurrency, override_num_blocks=min(len(urls), 4096))  # >= one read task per shard
    # Ray Data's per-operator resource reservation held the fused read+decode stage to one task at a time on a
    # 2-CPU node (half the CPUs reserved away from it); without it the stage uses every CPU (2x measured).
    ds.context.op_resource_reservation_enabled = False
    targets_ref = ray.put(load_caption_embeddings(caption_embeddings)) if caption_embeddings else None
    return ds.map_batches(_decode_block, batch_size=None, batch_format="pyarrow",
                          compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
                          fn_kwargs={"batch_size": batch_size, "shuffle_seed": seed if shuffle else None,
                                     "mode": mode, "image_size": image_size, "targets_ref": targets_ref,
                                     "counter": counter,
                                     "classes": None if classes is None else frozenset(int(c) for c in classes),
                                     "with_source": with_source, "num_classes": num_classes, "sample": sample,
                                     "shard_uris": {storage.filesystem_path(u): u for u in urls}})


def _torch_collate(batch: dict[str, np.ndarray]) -> dict:
    import warnings

    import torch

    with warnings.catch_warnings():  # arrays from the object store are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        return {k: [str(x) for x in v] if v.dtype.kind in "OUS" else torch.as_tensor(v) for k, v in batch.items()}


def _make_collate_torch():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TorchCollate(NumpyBatchCollateFn):
        """``collate_fn`` for ``iter_torch_batches``: numeric columns -> torch tensors (CPU), ``key`` -> list of
        str (Ray cannot turn string columns into tensors). Move tensors to the device in the training loop."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            return _torch_collate(batch)

    return TorchCollate()


def __getattr__(name: str):  # collate_torch is built on first use so that importing rayhash.data stays light
    if name == "collate_torch":
        globals()[name] = _make_collate_torch()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
