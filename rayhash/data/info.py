"""``dataset.json`` as a :class:`DatasetInfo`, and the class hierarchy / similarity targets built from it."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rayhash import storage
from rayhash.data.shards import FORMAT
from rayhash.layout import DatasetDir

INFO = DatasetDir.INFO

RESOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources")
CIFAR100_HIERARCHY = os.path.join(RESOURCES, "cifar100.parent-child.txt")


@dataclass
class DatasetInfo:
    """What a converted dataset holds. ``hierarchy``: ``"cifar100"`` (shipped Barz & Denzler file),
    ``"wordnet"`` (built from ``wnids``), a parent-child file relative to the dataset folder, or None."""

    name: str
    kind: str  # "labels" | "captions"
    label_names: list[str]
    wnids: list[str] | None
    hierarchy: str | None
    splits: dict[str, dict]
    root: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> DatasetDir:
        return DatasetDir(self.root)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def shard_paths(self, split: str) -> list[str]:
        """Full paths/URIs of a split's shards, in order."""
        if split not in self.splits:
            raise ValueError(f"{self.dir.info}: no split {split!r} (have: {sorted(self.splits)})")
        return [self.dir.member(s["file"], INFO) for s in self.splits[split]["shards"]]

    def shard_records(self) -> dict[str, tuple[int, str]]:
        """{full path/URI: (samples, sha256)} of every shard of every split that records both."""
        return {self.dir.member(s["file"], INFO): (int(s["count"]), s["sha256"])
                for split in self.splits.values() for s in split["shards"] if "count" in s and "sha256" in s}

    def verify(self, split: str, address: str | None = None) -> None:
        """Check every shard of ``split`` against the sha256 that ``rayhash data convert`` recorded; see
        :func:`verify_shards`."""
        shards = self.splits[split]["shards"] if split in self.splits else []
        urls = self.shard_paths(split)
        markers = {u: self.dir.progress_of(s["file"]) for u, s in zip(urls, shards)}
        verify_shards([(u, s["sha256"]) for u, s in zip(urls, shards) if "sha256" in s], self.dir.info,
                      markers, address)

    def count(self, split: str, classes: Sequence[int] | None = None) -> int:
        """Samples in ``split``; with ``classes``, only those with one of these labels."""
        entry = self.splits[split]
        if classes is None:
            return int(entry["count"])
        if "label_counts" not in entry:
            raise ValueError(f"{self.dir.info}: split {split!r} has no label_counts; re-run "
                             "`rayhash data convert` (finished shards are kept) to record them")
        return sum(int(entry["label_counts"].get(str(c), 0)) for c in classes)

    def class_hierarchy(self):
        """The :class:`rayhash.semantics.ClassHierarchy` over this dataset's classes, or None when it has none."""
        from rayhash.semantics import ClassHierarchy

        if self.hierarchy is None:
            return None
        if self.hierarchy == "cifar100":
            return ClassHierarchy.from_parent_child_file(CIFAR100_HIERARCHY)
        if self.hierarchy == "wordnet":
            if not self.wnids:
                raise ValueError(f"{self.dir.info}: hierarchy 'wordnet' needs 'wnids'")
            return ClassHierarchy.from_wordnet(self.wnids)
        return ClassHierarchy.from_parent_child_file(self.dir.member(self.hierarchy, f"{INFO} field 'hierarchy'"))

    def hierarchy_leaves(self) -> list:
        """Leaf ids in label order, as the hierarchy names them."""
        if self.hierarchy == "cifar100":
            return list(range(self.num_classes))
        if self.hierarchy == "wordnet":
            return list(self.wnids)
        return list(self.label_names)

    def similarity_matrix(self) -> np.ndarray:
        """(C, C) float32 LCS-height similarity between classes; rows/cols = label indices."""
        h = self.class_hierarchy()
        if h is None:
            raise ValueError(f"{self.root}: dataset {self.name!r} ({self.kind}) has no class hierarchy; "
                             "caption datasets take their similarity from caption embeddings")
        return np.asarray(h.similarity_matrix(self.hierarchy_leaves()), dtype=np.float32)


HELD_OUT = ("val", "validation", "test")  # names a held-out split goes by, in the order they are looked for


def held_out_split(splits, preferred: str | None, train_split: str) -> str | None:
    """``preferred`` when the dataset has that split, else the first of :data:`HELD_OUT` that it has (a
    Tiny-ImageNet or ImageNet layout has ``val``, CIFAR ``test``), never the training split; None when none."""
    if preferred in splits:
        return preferred
    return next((s for s in HELD_OUT if s in splits and s != train_split), None)


_VERIFIED: dict[str, tuple[str, tuple[int, int | None]]] = {}  # shard -> (sha256, (size, mtime)) checked here


def verify_shards(expected: list[tuple[str, str]], info_path: str, markers: dict[str, str] | None = None,
                  address: str | None = None) -> None:
    """Stream every shard (one Ray task each) and compare its sha256 with the one ``dataset.json`` records: a
    shard changed after conversion (truncated, corrupt, replaced, missing) is refused up front, naming each one
    and the fix, before any job reads it. Why refuse rather than skip: a tar with a corrupt header mid-way ends
    the read silently and a truncated one fails the read task, so a job on it would lose samples without a count,
    or use up its restarts on a fault that no restart cures."""
    import ray

    from rayhash.runtime import init_ray

    # a shard this process has verified and that has not changed since (same size and modification time) is not
    # read again: a pipeline verifies the training split before training and no second time before encoding it
    stats = {u: storage.stat(u) for u, _ in expected}
    todo = [(u, want) for u, want in expected if stats[u] is None or _VERIFIED.get(u) != (want, stats[u])]
    if not todo:
        return
    init_ray(address)
    task = ray.remote(num_cpus=1)(_sha256_or_error)
    got = ray.get([task.remote(u) for u, _ in todo])
    bad = [(u, want, g) for (u, want), g in zip(todo, got) if g != want]
    _VERIFIED.update({u: (want, stats[u]) for (u, want), g in zip(todo, got) if g == want and stats[u] is not None})
    if not bad:
        return
    shown = "; ".join(f"{u} ({g if g.startswith('unreadable') else 'sha256 ' + g[:12] + '…'}, recorded "
                      f"{want[:12]}…)" for u, want, g in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    marks = [markers[u] for u, _, _ in bad if markers and u in markers]
    delete = f"Delete its done-marker ({', '.join(marks[:3])}{', ...' if len(marks) > 3 else ''}) and " if marks else ""
    raise ValueError(
        f"{info_path}: {len(bad)} of {len(expected)} shard(s) differ from what `rayhash data convert` recorded: "
        f"{shown}{more}. A shard changed after conversion is truncated, corrupt or replaced; reading it would "
        f"silently lose samples. {delete}re-run the same `rayhash data convert` command (it rewrites just those "
        "shards), or restore the files; data.verify_shards=false (encode: --no-verify) skips this check")


def _sha256_or_error(url: str) -> str:
    try:
        return storage.sha256_file(url)
    except (OSError, ValueError) as e:
        return f"unreadable: {type(e).__name__}"


def load_dataset_info(ds_dir: str | os.PathLike) -> DatasetInfo:
    """Read ``DS/dataset.json``; ``ds_dir`` may also be a split folder (``DS/train``) or the json file itself."""
    ds_dir = str(ds_dir).rstrip("/")
    if ds_dir.endswith(".json"):
        ds_dir = ds_dir.rsplit("/", 1)[0] if "/" in ds_dir else "."
    path = DatasetDir(ds_dir).info
    if not storage.exists(path):
        parent = ds_dir.rsplit("/", 1)[0] if "/" in ds_dir else ""
        if parent and storage.exists(DatasetDir(parent).info):
            ds_dir, path = parent, DatasetDir(parent).info
        else:
            raise FileNotFoundError(f"{path}: no dataset description; create the dataset with "
                                    "`rayhash data convert ... --out DS`")
    doc = storage.read_json(path)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a JSON object; re-run `rayhash data convert`")
    if doc.get("format", FORMAT) != FORMAT:
        raise ValueError(f"{path}: field 'format' is {doc['format']!r}, this rayhash reads {FORMAT!r}; convert the "
                         "data again with this version (`rayhash data convert`), or use the rayhash that wrote it")
    missing = [k for k in ("name", "kind", "splits") if k not in doc]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; re-run `rayhash data convert`")
    for split, entry in doc["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or any(not isinstance(s, dict) or {"file", "count"} - s.keys() for s in shards):
            raise ValueError(f"{path}: split {split!r} needs a list 'shards' of {{file, count, sha256}}; the file is "
                             "corrupt — re-run `rayhash data convert`")
    known = {"name", "kind", "label_names", "wnids", "hierarchy", "splits", "format"}
    return DatasetInfo(name=doc["name"], kind=doc["kind"], label_names=list(doc.get("label_names") or []),
                       wnids=doc.get("wnids"), hierarchy=doc.get("hierarchy"), splits=doc["splits"],
                       root=ds_dir, extra={k: v for k, v in doc.items() if k not in known})
