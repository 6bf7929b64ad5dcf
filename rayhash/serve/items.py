"""What the service knows of each database item: label and code by key, and where its image lies in the dataset's
tars (``--data``), held as sorted numpy arrays so one copy in Ray's object store serves every replica."""
from __future__ import annotations

import mimetypes
import os
import tarfile

import numpy as np

from rayhash import storage
from rayhash.runtime import get_logger

log = get_logger("rayhash.serve")


def _tar_images(url: str) -> tuple[list[str], list[int], list[int], list[str]]:
    """(keys, data offsets, sizes, extensions) of the image members of one WebDataset tar, from its headers only
    (seeking past the data of a local file; a remote one is read through once, in order)."""
    from rayhash.data.images import IMAGE_EXTENSIONS

    fs, path = storage.resolve(url)
    remote = storage.is_remote(url)
    keys, offsets, sizes, exts = [], [], [], []
    with (fs.open_input_stream(path) if remote else fs.open_input_file(path)) as f:
        with tarfile.open(fileobj=f, mode="r|" if remote else "r:") as tf:
            for m in tf:
                base = os.path.basename(m.name)
                stem, _, ext = base.partition(".")
                if m.isfile() and ext.lower() in IMAGE_EXTENSIONS:
                    keys.append(os.path.join(os.path.dirname(m.name), stem))
                    offsets.append(m.offset_data)
                    sizes.append(m.size)
                    exts.append(ext.lower())
    return keys, offsets, sizes, exts


class ItemTable:
    """Database items sorted by key: ``labels``, packed ``codes`` (None when the code shards the index was built
    from cannot be read) and, with a dataset split, each image's tar, offset and size."""

    def __init__(self, keys: np.ndarray, labels: np.ndarray, codes: np.ndarray | None):
        n = len(keys)
        self.keys, self.labels, self.codes = keys, labels, codes
        self.tars: list[str] = []
        self.image_ext: list[str] = []
        self.image_tar = np.full(n, -1, np.int32)
        self.image_offset, self.image_size = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.image_ext_id = np.zeros(n, np.int16)

    @classmethod
    def build(cls, index, data: str | None = None) -> "ItemTable":
        """The items of an opened :class:`~rayhash.index.ShardedIndex`: keys and labels from its shards, codes from
        the code shards it was built from, images from the tars of ``data`` (a dataset split) read by Ray tasks."""
        from rayhash.index.query import codes_for_keys

        keys = index.keys().astype(str)
        order = np.argsort(keys, kind="stable")
        keys, labels = keys[order], index.labels()[order]
        try:
            codes = codes_for_keys(index.manifest, keys)
        except (OSError, ValueError, KeyError) as e:
            log.warning("codes of the items are not readable (%s): /item answers without a code and the page "
                        "cannot search by a clicked result", e)
            codes = None
        table = cls(keys, labels, codes)
        if data:
            table._add_images(data)
        return table

    def _add_images(self, data: str) -> None:
        import ray

        from rayhash.data import shard_urls

        self.tars = shard_urls(data)
        scan = ray.remote(num_cpus=0.25)(_tar_images)
        parts = ray.get([scan.remote(u) for u in self.tars])
        found = 0
        for t, (keys, offsets, sizes, exts) in enumerate(parts):
            if not keys:
                continue
            pos = np.searchsorted(self.keys, keys).clip(0, max(len(self.keys) - 1, 0))
            hit = self.keys[pos] == np.asarray(keys, dtype=str)
            ext_ids = [self._ext_id(e) for e in exts]
            self.image_tar[pos[hit]] = t
            self.image_offset[pos[hit]] = np.asarray(offsets, np.int64)[hit]
            self.image_size[pos[hit]] = np.asarray(sizes, np.int64)[hit]
            self.image_ext_id[pos[hit]] = np.asarray(ext_ids, np.int16)[hit]
            found += int(hit.sum())
        log.info("%s: images of %d of %d items in %d tars", data, found, len(self.keys), len(self.tars))
        if not found:
            raise ValueError(f"--data {data}: none of its {len(self.tars)} tars holds an image of this index's "
                             "items; pass the dataset split the codes were encoded from (e.g. DS/train)")

    def _ext_id(self, ext: str) -> int:
        if ext not in self.image_ext:
            self.image_ext.append(ext)
        return self.image_ext.index(ext)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, key: str) -> int | None:
        """Row of ``key``, or None."""
        i = int(np.searchsorted(self.keys, key))
        return i if i < len(self.keys) and self.keys[i] == key else None

    def has_images(self) -> bool:
        return bool(self.tars)

    def code_hex(self, row: int) -> str | None:
        return None if self.codes is None else self.codes[row].tobytes().hex()

    def image(self, row: int) -> tuple[bytes, str] | None:
        """(bytes as stored in the tar, media type) of the item's image, or None when it has none."""
        t = int(self.image_tar[row])
        if t < 0:
            return None
        fs, path = storage.resolve(self.tars[t])
        with fs.open_input_file(path) as f:
            data = f.read_at(int(self.image_size[row]), int(self.image_offset[row]))
        ext = self.image_ext[int(self.image_ext_id[row])]
        return bytes(data), mimetypes.types_map.get(f".{ext}", "application/octet-stream")
