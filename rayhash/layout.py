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

The JSON files that describe a folder (``manifest.json``, ``codes.json``, ``meta.json``) are typed records
(:class:`Record`: schema version, required fields and their types), each owned by its folder class and parsed in
one place (``IndexDir.read_manifest``, ``CodesDir.read_summary``, ``CheckpointDir.read_meta``): a missing or
wrongly-typed field is refused naming the file, the field and the fix. Records read as mappings too
(``manifest["bits"]``), so code that took the JSON dicts keeps working.

Handles are frozen, picklable, and behave as their path (``str(h)``, ``os.fspath(h)``), so they pass to Ray
workers and to every function that takes a path. Names read from a manifest (``dataset.json``'s shard files,
``manifest.json``'s index files) go through :meth:`Folder.member`, which refuses absolute, ``..`` and empty
names: a manifest cannot point a reader outside its folder.

All reads and writes go through :mod:`rayhash.storage` (local paths and ``s3://`` / ``gs://`` alike).
A writer holds the folder's lease (:mod:`rayhash.lease`) while it writes.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from rayhash import storage

_JSON_TYPES = {int: "an integer", str: "a string", list: "a list", dict: "a mapping", bool: "true or false",
               float: "a number"}


def spec(types: type | tuple[type, ...], *, required: bool = True, default: Any = None, item: type | None = None):
    """A :class:`Record` field: its JSON ``types`` (None allowed unless ``required``), and for lists of records
    the record class of their items."""
    types = types if isinstance(types, tuple) else (types,)
    return dataclasses.field(default=default, metadata={"types": types, "required": required, "item": item})


@dataclass(frozen=True)
class Record(Mapping):
    """A typed JSON record. :meth:`parse` checks every declared field (present when required, of its type, records
    in lists parsed in turn) and keeps undeclared keys in ``extra``; the record reads as a mapping of all of them."""

    FILE: ClassVar[str] = "record"
    FIX: ClassVar[str] = "write the file again with rayhash"
    VERSION_FIELD: ClassVar[str | None] = None
    SCHEMA_VERSION: ClassVar[int] = 1
    extra: dict = dataclasses.field(default_factory=dict, metadata={"internal": True})

    @classmethod
    def parse(cls, data: Any, where: str) -> "Record":
        """The record of JSON ``data`` read from ``where`` (a path, or ``path: shards[3]`` for a nested record)."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: holds {type(data).__name__} where {cls.FILE} is a JSON object; {cls.FIX}")
        version = data.get(cls.VERSION_FIELD) if cls.VERSION_FIELD else None
        if isinstance(version, int) and not isinstance(version, bool) and version > cls.SCHEMA_VERSION:
            raise ValueError(f"{where}: {cls.VERSION_FIELD} {version} is newer than this rayhash reads "
                             f"({cls.SCHEMA_VERSION}); upgrade rayhash")
        values, declared = {}, set()
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            declared.add(f.name)
            types, required, item = f.metadata["types"], f.metadata["required"], f.metadata["item"]
            value = data.get(f.name)
            if f.name not in data and not required:
                value = f.default
            elif value is None:
                if required:
                    raise ValueError(f"{where}: field {f.name!r} is missing (or null) in {cls.FILE}; {cls.FIX}")
            elif isinstance(value, bool) and bool not in types or not isinstance(value, types):
                want = " or ".join(_JSON_TYPES.get(t, t.__name__) for t in types)
                raise ValueError(f"{where}: field {f.name!r} = {value!r} in {cls.FILE} is "
                                 f"{_JSON_TYPES.get(type(value), type(value).__name__)}, expected {want}; {cls.FIX}")
            elif item is not None:
                value = [item.parse(v, f"{where}: {f.name}[{i}]") for i, v in enumerate(value)]
            values[f.name] = value
        return cls(extra={k: v for k, v in data.items() if k not in declared}, **values)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON data (nested records too), undeclared keys included."""
        return {k: [v.to_json() if isinstance(v, Record) else v for v in val] if isinstance(val, list) else val
                for k, val in self.items()}

    def _names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if not f.metadata.get("internal")] + list(self.extra)

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key == "extra" or key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def _read_record(cls: type[Record], path: str, missing: str) -> Record:
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: not found — {missing}")
    return cls.parse(storage.read_json(path), path)


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
class CheckpointMeta(Record):
    """``meta.json`` of a checkpoint (written last): the classes the model was trained on, and whatever else the
    trainer recorded (epoch, step, ...: kept in ``extra``)."""

    FILE: ClassVar[str] = "meta.json"
    FIX: ClassVar[str] = "the checkpoint is incomplete or was not written by rayhash; train it again"
    num_classes: int = spec(int, required=False, default=0)
    label_names: list = spec(list, required=False, default=None)


@dataclass(frozen=True)
class CheckpointDir(Folder):
    MODEL, META, CONFIG, STATE = "model.pt", "meta.json", "config.yaml", "train_state.pt"

    def read_meta(self) -> CheckpointMeta:
        return _read_record(CheckpointMeta, self.meta, "the checkpoint is incomplete; train it again")

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
class CodesSummary(Record):
    """``codes.json`` of a codes folder (``rayhash encode``): code width, the checkpoint and its weights' sha256,
    the dataset split, label names, per-shard counts and skipped corrupt samples."""

    FILE: ClassVar[str] = "codes.json"
    FIX: ClassVar[str] = "re-encode with `rayhash encode` into an empty folder"
    bits: int = spec(int)
    checkpoint: str = spec(str, required=False)
    model_sha256: str = spec(str, required=False)
    data: str = spec(str, required=False)
    label_names: list = spec(list, required=False)
    count: int = spec(int, required=False)
    skipped_corrupt: int = spec(int, required=False)
    shards: list = spec(list, required=False)
    created: str = spec(str, required=False)


@dataclass(frozen=True)
class CodesDir(Folder):
    SUMMARY, PREFIX, SUFFIX = "codes.json", "codes-", ".parquet"

    @property
    def summary(self) -> str:
        return self.file(self.SUMMARY)

    def read_summary(self) -> CodesSummary | None:
        """``codes.json``, parsed; None when the folder has none (codes written by other tools)."""
        return CodesSummary.parse(storage.read_json(self.summary), self.summary) if storage.exists(self.summary) \
            else None

    def shard(self, index: int) -> str:
        """Codes of input shard number ``index``."""
        return self.file(f"{self.PREFIX}{index:05d}{self.SUFFIX}")


_REBUILD = "rebuild the index with `rayhash index build`"


@dataclass(frozen=True)
class ShardEntry(Record):
    """One shard in ``manifest.json``: its two files, their sha256, its code count and the code rows it holds."""

    FILE: ClassVar[str] = "manifest.json"
    FIX: ClassVar[str] = _REBUILD
    index: str = spec(str)
    idmap: str = spec(str)
    count: int = spec(int)
    index_sha256: str = spec(str)
    idmap_sha256: str = spec(str)
    sources: list = spec(list, required=False, default=())
    created: str = spec(str, required=False)


@dataclass(frozen=True)
class IndexManifest(Record):
    """``manifest.json`` of an index folder (written last, atomically)."""

    FILE: ClassVar[str] = "manifest.json"
    FIX: ClassVar[str] = _REBUILD
    VERSION_FIELD: ClassVar[str] = "format_version"
    FORMAT: ClassVar[str] = "rayhash-index"
    format: str = spec(str)
    format_version: int = spec(int)
    bits: int = spec(int)
    index_type: str = spec(str)
    params: dict = spec(dict)
    ntotal: int = spec(int)
    shards: list = spec(list, item=ShardEntry)
    faiss_class: str = spec(str, required=False)
    checkpoint: str = spec(str, required=False)
    model_sha256: str = spec(str, required=False)
    label_names: list = spec(list, required=False)
    data: str = spec(str, required=False)
    created: str = spec(str, required=False)
    updated: str = spec(str, required=False)

    @classmethod
    def parse(cls, data: Any, where: str) -> "IndexManifest":
        if isinstance(data, dict) and data.get("format") != cls.FORMAT:
            raise ValueError(f"{where}: not a rayhash index manifest (format={data.get('format')!r}); {_REBUILD}")
        m = super().parse(data, where)
        if m.bits <= 0 or m.bits % 8:
            raise ValueError(f"{where}: field 'bits' = {m.bits!r} is not a positive multiple of 8; the manifest is "
                             f"corrupt, {_REBUILD}")
        for i, s in enumerate(m.shards):
            if s.count < 0:
                raise ValueError(f"{where}: field 'shards[{i}].count' = {s.count} is negative; {_REBUILD}")
        if m.ntotal != sum(s.count for s in m.shards):
            raise ValueError(f"{where}: field 'ntotal' = {m.ntotal} is not the sum of the shards' counts "
                             f"({sum(s.count for s in m.shards)}); {_REBUILD}")
        return m


@dataclass(frozen=True)
class IndexDir(Folder):
    MANIFEST = "manifest.json"

    @property
    def manifest(self) -> str:
        """Written last: an index folder with its manifest.json is complete."""
        return self.file(self.MANIFEST)

    def read_manifest(self) -> IndexManifest:
        """``manifest.json``, parsed and checked (see :class:`IndexManifest`)."""
        return _read_record(IndexManifest, self.manifest, f"{self.path} is not a rayhash index (build one with "
                            "`rayhash index build --codes CODES --out INDEX`)")

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
