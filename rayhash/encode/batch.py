"""Ray Data batch inference: WebDataset shards -> packed binary codes in Parquet, one output shard per input tar.

The pipeline is ``read_shards(mode="eval") -> map_batches(EncodeBatch actor pool)``, executed with
``preserve_order`` so rows arrive in input order, each tagged with its source tar; the driver cuts the stream into
input tars and writes ``codes-%05d.parquet`` for input tar number ``%05d`` atomically as soon as the stream has moved
past it. Corrupt samples skipped in a tar = its sample count (``dataset.json``, else counted in the tar) minus the
codes received. Each output records what it was made from: the weights' sha256 (not the checkpoint path, which a
retrained run reuses) and its input tar's sha256. A re-run keeps an output only when both match and encodes the
rest, so codes of two models are never mixed in one folder. The folder's writer lease (:mod:`rayhash.lease`) is held
throughout: a second encode into it is refused.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from rayhash import storage
from rayhash.hooks import NO_HOOKS, Hooks
from rayhash.index.codes import write_codes
from rayhash.layout import CodesDir
from rayhash.runtime import get_logger

log = get_logger("rayhash.encode")
META_SOURCE, META_BITS, META_CHECKPOINT, META_SKIPPED = (b"rayhash.source", b"rayhash.bits", b"rayhash.checkpoint",
                                                         b"rayhash.skipped")
META_MODEL, META_SOURCE_SHA = b"rayhash.model_sha256", b"rayhash.source_sha256"


class EncodeBatch:
    """Stateful Ray Data UDF: loads the checkpoint once per actor (GPU when the actor has one)."""

    def __init__(self, checkpoint: str):
        from rayhash.model import Encoder

        self.encoder = Encoder(checkpoint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["key"])
        codes = (self.encoder.encode_tensor(torch.from_numpy(np.ascontiguousarray(batch["image"])))[1] if n
                 else np.zeros((0, self.encoder.bits // 8), np.uint8))
        return {"key": batch["key"], "code": codes, "label": np.asarray(batch["label"], dtype=np.int32),
                "source": batch["source"]}


class _HashingReader:
    """A read-only stream that feeds every byte it hands out to a sha256."""

    def __init__(self, stream):
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        return data


def _read_record(url: str) -> tuple[int, str]:
    """(samples (distinct keys), sha256) of a WebDataset tar, in one streamed pass from wherever it is."""
    fs, path = storage.resolve(url)
    keys = set()
    with fs.open_input_stream(path) as stream:
        reader = _HashingReader(stream)
        with tarfile.open(fileobj=reader, mode="r|") as tf:
            for member in tf:
                if member.isfile():
                    base = os.path.basename(member.name)
                    keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
        while reader.read(8 << 20):  # the tar's end padding belongs to its sha256 too
            pass
    return len(keys), reader.sha.hexdigest()


def _shard_records(data: str | Sequence[str], urls: list[str]) -> tuple[list[tuple[int, str]], str | None]:
    """(samples, sha256) per input tar: from ``dataset.json`` when it lists the tar, else read from the tar itself;
    and the path of that ``dataset.json`` (None when it lists none of them)."""
    known: dict[str, tuple[int, str]] = {}
    info_path = None
    if isinstance(data, (str, os.PathLike)):
        from rayhash.data import load_dataset_info

        try:
            info = load_dataset_info(str(data))
            known = info.shard_records()
            info_path = str(info.dir.info)
        except (FileNotFoundError, ValueError):
            pass
    described = [u for u in urls if u in known]
    return [known[u] if u in known else _read_record(u) for u in urls], (info_path if described else None)


def _existing_meta(path: str) -> dict[bytes, bytes]:
    import pyarrow.parquet as pq

    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return pq.ParquetFile(f).schema_arrow.metadata or {}


def _reusable(path: str, source_sha: str, bits: int, digest: str) -> int | None:
    """An output written by an earlier run: its skipped-corrupt count when it was made from the same input bytes with
    the same weights, else None (stale: encoded again)."""
    meta = _existing_meta(path)
    same = (meta.get(META_MODEL, b"").decode() == digest and meta.get(META_SOURCE_SHA, b"").decode() == source_sha
            and int(meta.get(META_BITS, 0)) == bits)
    return int(meta.get(META_SKIPPED, b"0")) if same else None


def encode_dataset(checkpoint: str | os.PathLike, data: str | os.PathLike | Sequence[str], out: str | os.PathLike,
                   *, batch_size: int = 256, concurrency: int | None = None, num_gpus: float | None = None,
                   address: str | None = None, verify: bool = True, hooks: Hooks = NO_HOOKS) -> dict[str, Any]:
    """Encode a split's shards into ``OUT/codes-%05d.parquet`` (one per input tar) + ``OUT/codes.json``.

    Ray Data actor pool of ``concurrency`` encoders (default: one per GPU, else up to 4 CPU actors leaving a CPU
    for reading), ``num_gpus`` per actor (default 1 when the cluster has GPUs, else 0). Resumable: outputs present
    from an earlier run are kept.
    ``verify``: input tars that ``dataset.json`` describes are checked against its sha256 first (a changed tar is
    refused, naming it); without it, samples lost to a corrupt tar are counted as skipped.
    Returns the ``codes.json`` summary (bits, checkpoint, per-shard counts, skipped corrupt samples) plus
    ``timing`` (seconds in all, seconds to the first encoded batch, rows encoded by this call). ``hooks``:
    instrumentation called after each written shard (tests: :mod:`rayhash.testing`).
    """
    codes = CodesDir(storage.absolute(out))
    with codes.lease("encode"):  # a second encode into the same folder is refused while this one runs
        return _encode(storage.absolute(checkpoint), data, codes, batch_size, concurrency, num_gpus, address, verify,
                       hooks)


def _encode(checkpoint: str, data, codes: CodesDir, batch_size: int, concurrency: int | None, num_gpus: float | None,
            address: str | None, verify: bool, hooks: Hooks) -> dict[str, Any]:
    import time

    from rayhash.data import read_shards, shard_urls
    from rayhash.model import load_checkpoint
    from rayhash.runtime import cluster_gpus, cluster_has_gpus, init_ray, progress, require_cpu_headroom

    out = codes.path
    loaded = load_checkpoint(checkpoint)
    bits, image_size = loaded.bits, loaded.image_size
    urls = shard_urls(data if isinstance(data, (str, os.PathLike)) else list(data))
    outputs = [codes.shard(i) for i in range(len(urls))]
    records, info_path = _shard_records(data, urls)
    present = [i for i, o in enumerate(outputs) if storage.finished(o)]
    skipped = {i: n for i in present if (n := _reusable(outputs[i], records[i][1], bits, loaded.digest)) is not None}
    if len(skipped) < len(present):
        log.warning("encode: %d output(s) in %s were made by other weights or from other input bytes; encoding them "
                    "again", len(present) - len(skipped), out)
    todo = [i for i in range(len(urls)) if i not in skipped]
    if verify and info_path and todo:  # tars that dataset.json describes: refused up front when changed since
        from rayhash.data.info import verify_shards

        verify_shards([(urls[i], records[i][1]) for i in todo], info_path, address=address)
    log.info("encode: %d input shard(s), %d already done, %d to encode -> %s", len(urls), len(skipped), len(todo), out)
    storage.makedirs(out)
    storage.remove_staging(out, "codes-")  # left by a killed run
    t0, first, encoded = time.perf_counter(), None, 0
    if todo:
        import ray

        init_ray(address)
        gpus = cluster_has_gpus()
        num_gpus = (1 if gpus else 0) if num_gpus is None else num_gpus
        if concurrency is None:
            # CPU actors leave one CPU for the shard-reading tasks, or the pipeline starves on small machines
            cpus = int(ray.cluster_resources().get("CPU", 1))
            concurrency = max(1, int(cluster_gpus())) if num_gpus else max(1, min(4, cpus - 1))
            concurrency = min(concurrency, len(todo))  # more actors than input tars would sit idle
        if not num_gpus:
            require_cpu_headroom(concurrency, "encode concurrency (CPU encoder actors, 1 CPU each)",
                                 "lower --concurrency, or add nodes", address)
        ds = read_shards([urls[i] for i in todo], mode="eval", image_size=image_size, with_source=True)
        ds = ds.map_batches(EncodeBatch, fn_constructor_kwargs={"checkpoint": checkpoint}, batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=num_gpus,
                            num_cpus=0 if num_gpus else 1,
                            batch_format="numpy")
        ds.context.execution_options.preserve_order = True
        writer = _ShardWriter([(i, urls[i], outputs[i], *records[i]) for i in todo], bits, checkpoint, loaded.digest,
                              hooks)
        bar = progress(None, total=sum(records[i][0] for i in todo), desc="encode", unit="img")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            first = first or time.perf_counter() - t0
            encoded += len(batch["key"])
            bar.update(len(batch["key"]))
            writer.add(batch)
        bar.close()
        skipped.update(writer.finish())
    summary = _write_summary(out, outputs, urls, skipped, bits, checkpoint, loaded.digest, data, loaded.label_names)
    seconds = time.perf_counter() - t0
    log.info("encode: %d new codes in %.1fs (first batch after %.1fs)", encoded, seconds, first or 0.0)
    return {**summary, "timing": {"seconds": seconds, "first_batch_seconds": first, "encoded": encoded}}


class _ShardWriter:
    """Cuts the ordered stream of encoded rows into input tars by each row's ``source`` tar and writes each tar's
    codes as soon as the stream has moved past it; expected count minus rows received = corrupt samples skipped."""

    def __init__(self, plan: list[tuple[int, str, str, int, str]], bits: int, checkpoint: str, digest: str,
                 hooks: Hooks):
        self.plan, self.bits, self.checkpoint, self.digest, self.hooks = plan, bits, checkpoint, digest, hooks
        self.position = {url: j for j, (_, url, *_) in enumerate(plan)}
        self.cur, self.parts = 0, []
        self.written: dict[int, int] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        sources = batch["source"]
        cuts = np.flatnonzero(sources[1:] != sources[:-1]) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(sources)]):
            j = self.position.get(sources[a])
            if j is None or j < self.cur:
                raise ValueError(f"{sources[a]}: more samples than its recorded count, or rows out of order; its "
                                 "output may be incomplete — re-run `rayhash data convert` to refresh dataset.json, "
                                 "then encode into an empty --out")
            while self.cur < j:  # the stream moved on: earlier tars are complete
                self._flush()
            self.parts.append({c: batch[c][a:b] for c in ("key", "code", "label")})
            if sum(len(p["key"]) for p in self.parts) >= self.plan[self.cur][3]:
                self._flush()  # every sample of this tar is encoded: write it now

    def _flush(self) -> None:
        no, url, path, count, source_sha = self.plan[self.cur]
        keys = np.concatenate([p["key"] for p in self.parts]) if self.parts else np.empty(0, object)
        codes = (np.concatenate([p["code"] for p in self.parts]) if self.parts
                 else np.zeros((0, self.bits // 8), np.uint8))
        labels = np.concatenate([p["label"] for p in self.parts]) if self.parts else np.empty(0, np.int32)
        skipped = count - len(keys)
        if skipped < 0:
            raise ValueError(f"{url}: {len(keys)} codes but the shard holds {count} samples; dataset.json sample "
                             "counts are wrong — re-run `rayhash data convert`")
        write_codes(path, keys, codes, labels, {META_SOURCE: os.path.basename(url), META_SOURCE_SHA: source_sha,
                                                META_BITS: self.bits, META_CHECKPOINT: self.checkpoint,
                                                META_MODEL: self.digest, META_SKIPPED: skipped})
        self.written[no] = skipped
        self.cur, self.parts = self.cur + 1, []
        self.hooks.encode_output(len(self.written))

    def finish(self) -> dict[int, int]:
        while self.cur < len(self.plan):
            self._flush()
        return self.written


def _write_summary(out: str, outputs: list[str], urls: list[str], skipped: dict[int, int], bits: int,
                   checkpoint: str, digest: str, data, label_names: list[str]) -> dict[str, Any]:
    from rayhash.index.codes import code_file_rows

    shards = [{"file": os.path.basename(o), "source": u, "count": code_file_rows(o)[0], "skipped": skipped[i]}
              for i, (o, u) in enumerate(zip(outputs, urls))]
    summary = {"bits": bits, "checkpoint": checkpoint, "model_sha256": digest,
               "data": storage.absolute(data) if isinstance(data, (str, os.PathLike)) else None,
               "label_names": label_names, "count": sum(s["count"] for s in shards),
               "skipped_corrupt": sum(s["skipped"] for s in shards), "shards": shards,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = CodesDir(out).summary
    old = storage.read_json(path) if storage.exists(path) else None
    if old is not None and {**old, "created": None} == {**summary, "created": None}:
        return old  # a re-run that encoded nothing new: the summary stands as written
    storage.write_json(path, summary)
    log.info("encode: %d codes in %d shard(s), %d corrupt sample(s) skipped -> %s", summary["count"], len(shards),
             summary["skipped_corrupt"], out)
    return summary
