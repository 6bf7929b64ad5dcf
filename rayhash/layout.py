"""Every stage's output folder, defined once: its file names, and the one way to name a file inside it.

A stage writes one folder and reads the folders of the stages before it; each folder kind is a small typed
handle here, so no module spells another stage's file names::

    DatasetDir  DS/     dataset.json, <split>/<split>-%06d.tar, _progress/, caption_embeddings.parquet
    RunDir      RUN/    metrics.jsonl, curves.png, ray/ (Ray Train), final/ (a CheckpointDir)
    CheckpointDir       model.pt, config.yaml, train_state.pt, meta.json (written last)
    CodesDir    CODES/  codes-%05d.parquet, codes.json
    IndexDir    INDEX/  shard-%05d.faiss, shard-%05d.ids.parquet, manifest.json (written last)
    EvalDir     EVAL/   metrics.json, per_query.parquet, *.png, query_codes/ (a CodesDir), reference/ (an EvalDir)
    PipelineDir OUT/    data/ run/ codes/ index/ eval/

Handles are frozen, picklable, and behave as their path (``str(h)``, ``os.fspath(h)``), so they pass to Ray
workers and to every function that takes a path. Names read from a manifest (``dataset.json``'s shard files,
``manifest.json``'s index files) go through :meth:`Folder.member`, which refuses absolute, ``..`` and empty
names: a manifest cannot point a reader outside its folder.

All reads and writes go through :mod:`rayhash.storage` (local paths and ``s3://`` / ``gs://`` alike).
A writer holds the folder's lease (:mod:`rayhash.lease`) while it writes.
"""
from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from rayhash import storage


@dataclass(frozen=True)
class Folder:
    """A stage's output folder (local path or URI)."""

    path: str

    def __post_init__(self):
        object.__setattr__(self, "path", str(os.fspath(self.path)).rstrip("/") or "/")

    @classmethod
    def of(cls, path: "str | os.PathLike | Folder"):
        """The handle for ``path`` (a handle of this kind is returned as it is)."""
        return path if isinstance(path, cls) else cls(os.fspath(path))

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path

    def file(self, *parts: str) -> str:
        """A file of this folder, by a name this module defines."""
        return storage.join(self.path, *parts)

    def member(self, name: str, source: str = "manifest") -> str:
        """A file named by a manifest: a relative path inside this folder, refused when it would leave it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.path}: {source} names a file {name!r}; expected a relative path inside the "
                             "folder — the manifest is corrupt, write the folder again")
        norm = posixpath.normpath(name.replace("\\", "/"))
        if norm.startswith(("/", "../")) or norm == ".." or "://" in name or (len(name) > 1 and name[1] == ":"):
            raise ValueError(f"{self.path}: {source} names {name!r}, which is outside the folder; a manifest may "
                             "only name files inside its own folder — write the folder again with rayhash")
        return storage.join(self.path, norm)

    def exists(self) -> bool:
        return storage.exists(self.path)

    def lease(self, what: str):
        """Hold this folder's writer lease while writing (see :mod:`rayhash.lease`)."""
        from rayhash.lease import hold

        return hold(self.path, what)


@dataclass(frozen=True)
class DatasetDir(Folder):
    INFO = "dataset.json"
    CAPTIONS = "caption_embeddings.parquet"
    PROGRESS = "_progress"

    @property
    def info(self) -> str:
        return self.file(self.INFO)

    @property
    def captions(self) -> str:
        """The default caption-embedding Parquet folder (``rayhash data embed-captions``)."""
        return self.file(self.CAPTIONS)

    def split(self, name: str) -> str:
        return self.file(name)

    @staticmethod
    def shard_name(split: str, index: int) -> str:
        """A shard's path relative to the dataset folder (as dataset.json records it)."""
        return f"{split}/{split}-{index:06d}.tar"

    def progress(self, split: str, index: int) -> str:
        """The done-marker of one finished shard."""
        return self.progress_of(self.shard_name(split, index))

    def progress_of(self, shard_file: str) -> str:
        """The done-marker of the shard that dataset.json records as ``shard_file`` (``train/train-000001.tar``)."""
        return self.file(self.PROGRESS, posixpath.basename(shard_file).rsplit(".", 1)[0] + ".json")


@dataclass(frozen=True)
class CheckpointDir(Folder):
    MODEL, META, CONFIG, STATE = "model.pt", "meta.json", "config.yaml", "train_state.pt"

    @property
    def model(self) -> str:
        return self.file(self.MODEL)

    @property
    def meta(self) -> str:
        """Written last: a checkpoint folder with its meta.json is complete."""
        return self.file(self.META)

    @property
    def config(self) -> str:
        return self.file(self.CONFIG)

    @property
    def state(self) -> str:
        return self.file(self.STATE)


@dataclass(frozen=True)
class RunDir(Folder):
    FINAL, METRICS, CURVES, RAY, TENSORBOARD = "final", "metrics.jsonl", "curves.png", "ray", "tensorboard"

    @property
    def final(self) -> CheckpointDir:
        return CheckpointDir(self.file(self.FINAL))

    @property
    def metrics(self) -> str:
        """One JSON line per epoch."""
        return self.file(self.METRICS)

    @property
    def curves(self) -> str:
        return self.file(self.CURVES)

    @property
    def ray_storage(self) -> str:
        """Ray Train's ``storage_path`` for a run that names none."""
        return self.file(self.RAY)


@dataclass(frozen=True)
class CodesDir(Folder):
    SUMMARY, PREFIX, SUFFIX = "codes.json", "codes-", ".parquet"

    @property
    def summary(self) -> str:
        return self.file(self.SUMMARY)

    def shard(self, index: int) -> str:
        """Codes of input shard number ``index``."""
        return self.file(f"{self.PREFIX}{index:05d}{self.SUFFIX}")


@dataclass(frozen=True)
class IndexDir(Folder):
    MANIFEST = "manifest.json"

    @property
    def manifest(self) -> str:
        """Written last: an index folder with its manifest.json is complete."""
        return self.file(self.MANIFEST)

    @staticmethod
    def shard_names(no: int) -> tuple[str, str]:
        """(FAISS index, id map) file names of shard ``no``, as manifest.json records them."""
        return f"shard-{no:05d}.faiss", f"shard-{no:05d}.ids.parquet"

    @staticmethod
    def shard_number(name: str) -> int:
        """The number of a shard from its index file name (``shard-00007.faiss`` -> 7)."""
        m = re.fullmatch(r"shard-(\d+)\.faiss", posixpath.basename(str(name)))
        if not m:
            raise ValueError(f"{name!r} is not an index shard file name (shard-NNNNN.faiss); the manifest is corrupt")
        return int(m.group(1))


@dataclass(frozen=True)
class EvalDir(Folder):
    METRICS, PER_QUERY, REFERENCE, QUERY_CODES = "metrics.json", "per_query.parquet", "reference", "query_codes"

    @property
    def metrics(self) -> str:
        return self.file(self.METRICS)

    @property
    def per_query(self) -> str:
        return self.file(self.PER_QUERY)

    def plot(self, name: str) -> str:
        return self.file(f"{name}.png")

    @property
    def query_codes(self) -> CodesDir:
        """The query split's codes, encoded once (resumable)."""
        return CodesDir(self.file(self.QUERY_CODES))

    @property
    def reference(self) -> "EvalDir":
        """Where the pipeline writes the reference protocol's report."""
        return EvalDir(self.file(self.REFERENCE))


@dataclass(frozen=True)
class PipelineDir(Folder):
    """``rayhash pipeline --out OUT``: one folder per stage."""

    @property
    def data(self) -> DatasetDir:
        return DatasetDir(self.file("data"))

    @property
    def run(self) -> RunDir:
        return RunDir(self.file("run"))

    @property
    def codes(self) -> CodesDir:
        return CodesDir(self.file("codes"))

    @property
    def index(self) -> IndexDir:
        return IndexDir(self.file("index"))

    @property
    def eval(self) -> EvalDir:
        return EvalDir(self.file("eval"))
