"""ImageNet-style class folders -> shards (original image bytes kept, no re-encoding).

Layouts: ``root/train/<class>/*`` (or ``root/<class>/*`` alone = split ``train``); ``root/val`` (and
``root/test``) either as class folders or flat (``root/val/*.JPEG`` or Tiny-ImageNet's ``root/val/images/*``)
with a label file: ILSVRC ``LOC_val_solution.csv`` (``ImageId,PredictionString``), Tiny-ImageNet
``val_annotations.txt`` (``file<TAB>wnid...``), or any ``file,label`` / ``file label`` list (``val_labels=``).
Undecodable files are copied as they are and skipped (and counted) when streamed.
"""
from __future__ import annotations

import json
import os
import re

from rayhash.data.convert import CONVERTERS
from rayhash.data.images import IMAGE_EXTENSIONS
from rayhash.data.shards import safe_key, sample_members, unique_keys, write_dataset_json, write_split
from rayhash.runtime import get_logger

log = get_logger("data.imagefolder")
_WNID = re.compile(r"n\d{8}")
_LABEL_FILES = ("LOC_val_solution.csv", "val_annotations.txt", "val_labels.txt", "labels.csv")


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _images(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if _is_image(n) and os.path.isfile(os.path.join(folder, n)))


def _class_files(folder: str) -> list[str]:
    """Image paths of a class folder: its own images, and those in an ``images/`` subfolder (Tiny-ImageNet)."""
    nested = os.path.join(folder, "images")
    files = [os.path.join(folder, n) for n in _images(folder)]
    return files + ([os.path.join(nested, n) for n in _images(nested)] if os.path.isdir(nested) else [])


def _class_dirs(folder: str) -> list[str]:
    """Sub-folders holding images, except ``images`` itself (a flat split, e.g. Tiny-ImageNet's val/images)."""
    return sorted(d for d in os.listdir(folder) if d != "images" and os.path.isdir(os.path.join(folder, d))
                  and _class_files(os.path.join(folder, d)))


def _file_sample(record: dict) -> dict[str, bytes] | None:
    try:
        with open(record["path"], "rb") as f:
            data = f.read()
    except OSError as e:
        log.warning("skipping unreadable %s: %s", record["path"], e)
        return None
    ext = record["path"].rsplit(".", 1)[-1].lower()
    return {{"jpeg": "jpg"}.get(ext, ext): data, **sample_members(record)}


def _read_label_file(path: str) -> dict[str, str]:
    """{image file stem: class id} from LOC_val_solution.csv, val_annotations.txt or a 'file label' list."""
    labels = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.lower().startswith(("imageid,", "image,", "file,", "filename,")):
                continue
            fields = re.split(r"[,\t ]+", line)
            if len(fields) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'image label', got {line!r}")
            labels[os.path.splitext(os.path.basename(fields[0]))[0]] = fields[1]
    if not labels:
        raise ValueError(f"{path}: no labels found")
    return labels


def _find_label_file(root: str, split_dir: str) -> str | None:
    for folder in (split_dir, root):
        for name in _LABEL_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def _label_names(classes: list[str], wnids: bool, class_index: str | None) -> list[str]:
    if class_index:
        index = {v[0]: v[1] for v in json.loads(open(class_index, encoding="utf-8").read()).values()}
        return [index.get(c, c) for c in classes]
    if not wnids:
        return list(classes)
    try:
        from rayhash.semantics.wordnet import ensure_wordnet

        wn = ensure_wordnet()
        return [wn.synset_from_pos_and_offset("n", int(c[1:])).lemma_names()[0] for c in classes]
    except (LookupError, ImportError) as e:
        log.warning("WordNet unavailable (%s); label names = wnids", str(e).splitlines()[0])
        return list(classes)


def _split_records(root: str, split: str, folder: str, classes: list[str], val_labels: str | None,
                   limit_per_class: int | None) -> list[dict]:
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[str, str]] = []  # (path, class id)
    class_dirs = _class_dirs(folder)
    if class_dirs:
        for c in class_dirs:
            if c not in index:
                raise ValueError(f"{os.path.join(folder, c)}: class {c!r} is not among the {len(classes)} "
                                 "training classes (folder names must match)")
            items += [(p, c) for p in _class_files(os.path.join(folder, c))[:limit_per_class]]
    else:
        img_dir = os.path.join(folder, "images") if os.path.isdir(os.path.join(folder, "images")) else folder
        label_file = val_labels or _find_label_file(root, folder)
        if label_file is None:
            raise FileNotFoundError(f"{folder}: flat image folder without labels; add LOC_val_solution.csv / "
                                    "val_annotations.txt or pass val_labels=<file> (--val-labels)")
        labels, seen = _read_label_file(label_file), {}
        for n in _images(img_dir):
            stem = os.path.splitext(n)[0]
            if stem not in labels:
                raise ValueError(f"{label_file}: no label for image {n!r} in {img_dir}")
            c = labels[stem]
            if c not in index:
                raise ValueError(f"{label_file}: label {c!r} of {n!r} is not a training class")
            seen[c] = seen.get(c, 0) + 1
            if limit_per_class is None or seen[c] <= limit_per_class:
                items.append((os.path.join(img_dir, n), c))
    sources = [os.path.relpath(p, folder) for p, _ in items]
    stems = [os.path.splitext(os.path.basename(p))[0] for p, _ in items]
    if len(set(map(safe_key, stems))) < len(stems):  # same file names in different class folders
        stems = [os.path.splitext(src)[0] for src in sources]
    keys = unique_keys(stems, sources)
    return [{"key": k, "cls": index[c], "path": p, "json": {"wnid": c, "source": os.path.relpath(p, root)}}
            for k, (p, c) in zip(keys, items)]


@CONVERTERS.register("imagefolder", help="ImageNet-style tree: root/train/<wnid>/*.JPEG + root/val (class folders "
                                            "or flat + LOC_val_solution.csv / val_annotations.txt)",
                      source="the tree's root folder", limit="limit_per_class",
                      config="imagenet", demo_config="demo")
def convert_imagefolder(root: str | os.PathLike, out: str, *, shard_size: int = 1000,
                        class_index: str | None = None, val_labels: str | None = None,
                        limit_per_class: int | None = None, name: str | None = None) -> dict:
    """Convert an ImageNet-style tree (see module doc) to shards + ``dataset.json``.

    Classes = the train class folders in sorted order (ImageNet's standard index order for wnids), or the order of
    ``class_index`` (``imagenet_class_index.json``: ``{"0": [wnid, name], ...}``), which also gives the label
    names; otherwise names come from WordNet lemmas (wnid folders, when WordNet is installed) or the folder names.
    Wnid folders record ``wnids`` and ``hierarchy: "wordnet"``. Returns the ``dataset.json`` document.
    """
    root, out = os.path.abspath(str(root)), str(out)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: image folder not found")
    train_dir = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    classes = _class_dirs(train_dir)
    if not classes:
        raise ValueError(f"{train_dir}: no class folders with images (expected <root>/train/<class>/*.JPEG)")
    if class_index:
        order = [v[0] for _, v in sorted(json.loads(open(class_index, encoding="utf-8").read()).items(),
                                         key=lambda kv: int(kv[0]))]
        missing = sorted(set(classes) - set(order))
        if missing:
            raise ValueError(f"{class_index}: classes {missing[:5]} of {train_dir} are not in the class index")
        classes = order
    wnids = all(_WNID.fullmatch(c) for c in classes)
    label_names = _label_names(classes, wnids, class_index)
    split_dirs = {"train": train_dir}
    if train_dir != root:
        for split in ("val", "test"):
            if os.path.isdir(os.path.join(root, split)):
                split_dirs[split] = os.path.join(root, split)
    result = {}
    for split, folder in split_dirs.items():
        try:
            records = _split_records(root, split, folder, classes, val_labels, limit_per_class)
        except FileNotFoundError:
            if split == "val":
                raise
            log.warning("%s: unlabelled flat folder (e.g. the ILSVRC test set); split %r not converted", folder, split)
            continue
        for r in records:
            r["json"]["label"] = label_names[r["cls"]]
        result[split] = write_split(out, split, records, _file_sample, shard_size)
    info = {"name": name or os.path.basename(root), "kind": "labels", "label_names": label_names,
            "wnids": list(classes) if wnids else None, "hierarchy": "wordnet" if wnids else None,
            "class_folders": list(classes), "limit_per_class": limit_per_class}
    return write_dataset_json(out, info, result)
