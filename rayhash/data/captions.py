"""Image-caption collections -> shards (all captions of an image in one sample), and caption embeddings.

Inputs: a CSV/TSV of ``image,caption`` lines (CSV lines split on the FIRST comma, TSV on the first tab; an
optional header ``image,caption``) plus an images folder (the Flickr8k layout), or a folder of img2dataset
WebDataset shards (``*.tar`` with ``jpg`` + ``txt``/``json``, beside img2dataset's ``.parquet`` and ``_stats.json``).
img2dataset shards are re-written one output shard per input shard and split, into ``train`` and ``val`` by a seeded
hash of the sample key (``val_fraction``), their captions normalised into our ``json``; img2dataset's stats (or
parquet) give the expected sample count. They can also be read as they are with ``read_shards([...tar])``, which
understands ``jpg`` + ``txt``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile

import numpy as np

from rayhash import storage
from rayhash.data.convert import CONVERTERS
from rayhash.data.images import IMAGE_EXTENSIONS
from rayhash.data.shards import safe_key, sample_members, unique_keys, write_dataset_json, write_split
from rayhash.layout import Folder
from rayhash.runtime import get_logger, init_ray

log = get_logger("data.captions")
_HEADER = {"image", "file", "filename", "path", "image_path", "url"}


def read_caption_file(path: str) -> dict[str, list[str]]:
    """{image: [captions in file order]} from a CSV (first comma) or TSV (first tab) file."""
    sep = "\t" if path.lower().endswith(".tsv") else ","
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            image, found, caption = line.partition(sep)
            if lineno == 1 and image.strip().lower() in _HEADER:
                continue
            if not found or not caption.strip():
                raise ValueError(f"{path}:{lineno}: expected 'image{sep}caption', got {line[:80]!r}")
            caption = caption.strip()
            if len(caption) > 1 and caption[0] == caption[-1] == '"':  # CSV quoting: "a, b ""c"""
                caption = caption[1:-1].replace('""', '"')
            out.setdefault(image.strip(), []).append(caption)
    if not out:
        raise ValueError(f"{path}: no captions found")
    return out


def _in_val(image: str, fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha1(f"{seed}:{image}".encode()).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


def _file_sample(record: dict) -> dict[str, bytes] | None:
    from rayhash.data.imagefolder import _file_sample as read_file

    return read_file(record)


def _img2dataset_samples(record: dict) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of one img2dataset tar that belong to ``record["split"]`` (val: a seeded hash of the sample key below
    ``val_fraction``): image bytes + our json (captions from txt / json["caption"])."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(record["tar"], "r") as tar:
        for m in tar:
            if m.isfile():
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                groups.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
    samples = []
    for key in sorted(groups):
        if _in_val(key, record["val_fraction"], record["seed"]) != (record["split"] == "val"):
            continue
        g = groups[key]
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
        meta = json.loads(g["json"]) if "json" in g else {}
        caption = g["txt"].decode("utf-8") if "txt" in g else meta.get("caption")
        if image_ext is None or not caption:
            log.warning("%s: sample %s has no image or caption; skipped", record["tar"], key)
            continue
        doc = {"captions": [caption], "caption": caption, "source": meta.get("url") or key}
        samples.append((safe_key(key), {{"jpeg": "jpg"}.get(image_ext, image_ext): g[image_ext],
                                        **sample_members({"json": doc})}))
    return samples


def _caption_source(src: str) -> tuple[str, str]:
    """(caption file, images dir) for a file or a folder holding captions.{txt,csv,tsv} + images/."""
    if os.path.isfile(src):
        folder = os.path.dirname(os.path.abspath(src))
        return src, os.path.join(folder, "images") if os.path.isdir(os.path.join(folder, "images")) else folder
    for name in ("captions.txt", "captions.csv", "captions.tsv", "results.csv"):
        if os.path.isfile(os.path.join(src, name)):
            images = os.path.join(src, "images")
            return os.path.join(src, name), images if os.path.isdir(images) else src
    raise FileNotFoundError(f"{src}: no captions.txt/.csv/.tsv (image,caption) and no img2dataset *.tar shards")


@CONVERTERS.register("captions", help="image-caption pairs: image,caption CSV/TSV (+ images/), or an img2dataset "
                                         "*.tar folder",
                      source="the captions file or its folder, or a folder of img2dataset tars", limit="limit",
                      config="conceptual_captions", demo_config="demo")
def convert_captions(src: str | os.PathLike, out: str, *, images: str | None = None, val_fraction: float = 0.1,
                     shard_size: int = 1000, seed: int = 0, limit: int | None = None,
                     name: str | None = None) -> dict:
    """Convert an image-caption collection (see module doc) to shards + ``dataset.json`` (kind ``captions``).

    CSV/TSV input: each image's captions stay together in its ``json`` (``captions`` list, ``caption`` = first);
    images are split into ``train``/``val`` by a seeded hash of the file name (``val_fraction``), so the split
    does not depend on file order; missing image files are skipped and counted (``missing_images``).
    ``limit`` keeps the first N images (sorted by name) for tests and demos.
    """
    src, out = str(src), str(out)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: caption source not found")
    tars = storage.list_files(src, ".tar") if os.path.isdir(src) else []
    info = {"name": name or os.path.basename(os.path.abspath(src).rstrip("/")).split(".")[0], "kind": "captions",
            "label_names": [], "wnids": None, "hierarchy": None}
    if tars:
        return _convert_img2dataset(tars[:limit], out, info, val_fraction, seed)
    caption_file, image_dir = _caption_source(src)
    image_dir = images or image_dir
    captions = read_caption_file(caption_file)
    names = sorted(captions)[:limit]
    present = [n for n in names if os.path.isfile(os.path.join(image_dir, n))]
    if len(present) < len(names):
        log.warning("%d of %d images listed in %s are missing from %s; skipped", len(names) - len(present),
                    len(names), caption_file, image_dir)
    if not present:
        raise FileNotFoundError(f"{image_dir}: none of the images listed in {caption_file} exist; pass --images DIR")
    by_split: dict[str, list[dict]] = {"train": [], "val": []}
    keys = dict(zip(present, unique_keys([os.path.splitext(n)[0] for n in present], present)))
    for n in present:
        if n.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{caption_file}: {n!r} is not an image file name")
        doc = {"captions": captions[n], "caption": captions[n][0], "source": n}
        split = "val" if _in_val(n, val_fraction, seed) else "train"
        by_split[split].append({"key": keys[n], "path": os.path.join(image_dir, n),
                                "json": doc})
    splits = {s: write_split(out, s, recs, _file_sample, shard_size) for s, recs in by_split.items() if recs}
    extra = {"missing_images": len(names) - len(present), "val_fraction": val_fraction, "seed": seed,
             "source_format": "csv"}
    return write_dataset_json(out, {**info, **extra}, splits)


def img2dataset_successes(tar: str) -> int | None:
    """Samples img2dataset wrote into ``tar``: ``successes`` of its ``<name>_stats.json``, else the rows of its
    ``<name>.parquet`` with status ``success``; None when it left neither."""
    base = tar[:-len(".tar")]
    stats = f"{base}_stats.json"
    if os.path.isfile(stats):
        with open(stats, encoding="utf-8") as f:
            doc = json.load(f)
        if isinstance(doc.get("successes"), int):
            return doc["successes"]
    if os.path.isfile(f"{base}.parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(f"{base}.parquet", columns=["status"])
        return sum(s == "success" for s in table.column("status").to_pylist())
    return None


def _convert_img2dataset(tars: list[str], out: str, info: dict, val_fraction: float, seed: int) -> dict:
    """One output shard per input tar and split; samples split into train/val by a seeded hash of their key."""
    splits = {}
    for split in ("train", "val"):
        records = [{"key": f"tar{i}", "tar": t, "split": split, "val_fraction": val_fraction, "seed": seed}
                   for i, t in enumerate(tars)]
        entry = write_split(out, split, records, _img2dataset_samples, 1)
        if entry["count"]:
            splits[split] = entry
    written = sum(e["count"] for e in splits.values())
    known = [img2dataset_successes(t) for t in tars]
    extra = {"source_format": "img2dataset", "val_fraction": val_fraction, "seed": seed}
    if all(n is not None for n in known):
        extra["source_successes"] = sum(known)
        if sum(known) != written:
            log.warning("%d samples read from %d tars, but img2dataset's _stats.json/.parquet count %d successes "
                        "(samples without image or caption are skipped; a tar may be truncated)", written,
                        len(tars), sum(known))
    return write_dataset_json(out, {**info, **extra}, splits)


# --------------------------------------------------------------------------- caption embeddings
def _captions_of(batch) -> dict[str, np.ndarray]:
    keys = batch.column("__key__").to_pylist()
    docs = batch.column("json").to_pylist() if "json" in batch.column_names else [None] * len(keys)
    txts = batch.column("txt").to_pylist() if "txt" in batch.column_names else [None] * len(keys)
    caps = []
    for d, t in zip(docs, txts):
        doc = json.loads(d) if d else {}
        caps.append(doc.get("captions") or ([doc["caption"]] if doc.get("caption") else [])
                    or ([t.decode("utf-8")] if t else []))
    return {"key": np.asarray(keys, dtype=object), "captions": np.asarray(
        [json.dumps(c) for c in caps], dtype=object)}


class CaptionEmbedder:
    """Ray Data actor: mean of an image's caption embeddings, L2-normalised (GPU when the actor has one)."""

    def __init__(self, model=None, batch_size: int = 128):
        from rayhash.runtime import torch_device
        from rayhash.semantics import load_sentence_model

        self.device = torch_device().type
        self.model = load_sentence_model(model, device=self.device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        from rayhash.semantics import sentence_embeddings

        caps = [json.loads(c) for c in batch["captions"]]
        keep = [i for i, c in enumerate(caps) if c]
        flat = [t for i in keep for t in caps[i]]
        emb = sentence_embeddings(flat, self.model, batch_size=self.batch_size) if flat else np.zeros((0, 1))
        owners = np.repeat(np.arange(len(keep)), [len(caps[i]) for i in keep])
        sums = np.zeros((len(keep), emb.shape[1]), np.float64)
        np.add.at(sums, owners, emb)
        mean = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        return pa.table({"key": pa.array([str(batch["key"][i]) for i in keep], pa.string()),
                         "embedding": pa.array(list(mean.astype(np.float32)), pa.list_(pa.float32()))})


def embed_captions(ds_dir: str, out_parquet: str | None = None, model=None, *, batch_size: int = 256,
                   concurrency: int | None = None, overwrite: bool = False) -> str:
    """Embed every image's captions (all splits) with sentence-transformers in a Ray Data actor pool and write
    Parquet ``key`` (string) -> ``embedding`` (list<float32>, mean of the caption embeddings, L2-normalised).

    GPU actors (one GPU each) when the cluster has GPUs, else CPU actors. ``out_parquet`` (default
    ``DS/caption_embeddings.parquet``) is a Parquet folder (local or object store), complete once its ``_SUCCESS``
    file is written, last. A complete one is kept unless ``overwrite``; an interrupted one (no ``_SUCCESS``) is
    written again. Images without any caption are skipped and logged. The writer lease of the folder holding the
    output is held while writing: a second embed-captions into it is refused.
    """
    from rayhash.data.info import load_dataset_info

    info = load_dataset_info(ds_dir)
    out = storage.absolute(out_parquet or info.dir.captions)
    if embeddings_complete(out) and not overwrite:
        log.info("%s exists; keeping it (overwrite=True to redo)", out)
        return out
    with Folder(out.rsplit("/", 1)[0]).lease("embed-captions"):  # the folder that holds the output
        return _embed(info, out, model, batch_size, concurrency)


def _embed(info, out: str, model, batch_size: int, concurrency: int | None) -> str:
    import ray

    from rayhash.runtime import cluster_gpus, cluster_has_gpus

    _remove_own_output(out)
    init_ray()
    urls = [u for split in info.splits for u in info.shard_paths(split)]
    gpus = cluster_has_gpus()
    ds = ray.data.read_webdataset(urls, decoder=None, fileselect=["*.json", "*.txt"], suffixes=["json", "txt"])
    ds = ds.map_batches(_captions_of, batch_format="pyarrow")
    size = concurrency or (max(1, int(cluster_gpus())) if gpus else 1)
    ds = ds.map_batches(CaptionEmbedder, fn_constructor_kwargs={"model": model}, batch_size=batch_size,
                        batch_format="numpy", num_gpus=1 if gpus else 0,
                        compute=ray.data.ActorPoolStrategy(size=size))
    ds.write_parquet(out)
    storage.write_json(storage.join(out, DONE), {"files": [p.rsplit("/", 1)[-1] for p in storage.list_files(out)]})
    log.info("wrote caption embeddings of %s to %s", info.name, out)
    return out


DONE = "_SUCCESS"  # written last into a caption-embedding folder (Parquet readers skip names starting with _)


def embeddings_complete(path: str) -> bool:
    """A caption-embedding Parquet file, or a folder that :func:`embed_captions` finished (has ``_SUCCESS``)."""
    return storage.finished(storage.join(path, DONE)) if storage.is_dir(path) else storage.finished(path)


def _remove_own_output(out: str) -> None:
    """Clear an interrupted (or to be overwritten) embedding output; refuse a folder holding other files."""
    if not storage.exists(out):
        return
    if storage.is_dir(out):
        others = [f for f in storage.list_files(out) if not f.endswith((".parquet", DONE))]
        if others:
            raise FileExistsError(f"{out}: holds files that embed-captions did not write ({others[0]}, ...); "
                                  "choose another --out")
    storage.delete(out)
