"""CIFAR-100 (official "cifar-100-python" archive or folder) -> WebDataset shards with fine and coarse labels."""
from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np

from rayhash.data.convert import CONVERTERS
from rayhash.data.shards import sample_members, write_dataset_json, write_split
from rayhash.runtime import get_logger

log = get_logger("data.cifar")
_SPLIT_FILES = {"train": "train", "test": "test"}


def _png(record: dict) -> dict[str, bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(record["array"]).save(buf, format="PNG")
    return {"png": buf.getvalue(), **sample_members(record)}


# What the official CIFAR pickles hold: dicts, lists, strings, bytes and numpy arrays. Nothing else is unpickled.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR archive never holds")


def _safe_load(f, where: str):
    """Unpickle a CIFAR file admitting only numpy arrays and plain containers: a crafted archive runs no code."""
    try:
        return _Unpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{where}: not loaded — it {e}; use the official cifar-100-python archive") from None


def _read_pickles(src: str, names: list[str]) -> dict[str, dict]:
    """Load ``meta`` and the split pickles from the .tar.gz (without extracting) or a folder."""
    out = {}
    if os.path.isfile(src):
        with tarfile.open(src, "r:*") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            for name in ["meta", *names]:
                if name not in members:
                    raise ValueError(f"{src}: no '{name}' pickle inside; expected the official "
                                     "'cifar-100-python' archive (cifar-100-python/{train,test,meta})")
                out[name] = _safe_load(tar.extractfile(members[name]), f"{src}:{members[name].name}")
        return out
    folder = src if os.path.isfile(os.path.join(src, "meta")) else os.path.join(src, "cifar-100-python")
    for name in ["meta", *names]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; pass the cifar-100-python folder or its .tar.gz "
                                    "(or use download=True / --download when online)")
        with open(path, "rb") as f:
            out[name] = _safe_load(f, path)
    return out


def _download(root: str) -> str:
    from torchvision.datasets import CIFAR100

    CIFAR100(root, train=True, download=True)
    return os.path.join(root, "cifar-100-python")


@CONVERTERS.register("cifar100", help="CIFAR-100 (official python layout; --download fetches it when online)",
                      source="cifar-100-python.tar.gz or its extracted folder", limit="limit_per_class",
                      config="cifar100", demo_config="cifar100-cpu")
def convert_cifar100(src: str | os.PathLike | None, out: str, shard_size: int = 5000,
                     limit_per_class: int | dict[str, int] | None = None,
                     splits: tuple[str, ...] | list[str] = ("train", "test"),
                     download: bool = False) -> dict:
    """Convert CIFAR-100 to ``out/<split>/<split>-%06d.tar`` (PNG, lossless) + ``out/dataset.json``.

    ``src``: the official ``cifar-100-python.tar.gz`` or its extracted folder; with ``download=True`` a missing
    ``src`` is fetched through torchvision into ``src`` (or ``out/download``). ``limit_per_class`` (an int, or
    ``{split: int}``) keeps the first N images of each fine class per split (tests, demos). Keys are
    ``<split>-<index in the pickle>``.
    Returns the ``dataset.json`` document.
    """
    out = str(out)
    for s in splits:
        if s not in _SPLIT_FILES:
            raise ValueError(f"CIFAR-100 has splits {sorted(_SPLIT_FILES)}, not {s!r}")
    if download and (src is None or not os.path.exists(src)):
        src = _download(str(src or os.path.join(out, "download")))
    if src is None or not os.path.exists(src):
        raise FileNotFoundError(f"{src}: CIFAR-100 not found; pass the cifar-100-python.tar.gz or folder, "
                                "or --download when online")
    data = _read_pickles(str(src), [_SPLIT_FILES[s] for s in splits])
    fine_names, coarse_names = data["meta"]["fine_label_names"], data["meta"]["coarse_label_names"]
    result = {}
    for split in splits:
        d = data[_SPLIT_FILES[split]]
        images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        fine, coarse = np.asarray(d["fine_labels"]), np.asarray(d["coarse_labels"])
        keep = np.arange(len(fine))
        limit = limit_per_class.get(split) if isinstance(limit_per_class, dict) else limit_per_class
        if limit is not None:
            keep = np.concatenate([np.flatnonzero(fine == c)[:limit] for c in range(len(fine_names))])
            keep.sort()
        records = [{"key": f"{split}-{i:06d}", "cls": int(fine[i]), "array": np.ascontiguousarray(images[i]),
                    "json": {"label": fine_names[fine[i]], "coarse_label": int(coarse[i]),
                             "coarse_label_name": coarse_names[coarse[i]], "source": d["filenames"][i]}}
                   for i in keep]
        result[split] = write_split(out, split, records, _png, shard_size)
    info = {"name": "cifar100", "kind": "labels", "label_names": list(fine_names), "wnids": None,
            "hierarchy": "cifar100", "coarse_label_names": list(coarse_names),
            "source": os.path.basename(str(src).rstrip("/")), "limit_per_class": limit_per_class}
    return write_dataset_json(out, info, result)
