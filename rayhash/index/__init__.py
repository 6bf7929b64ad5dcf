"""Sharded FAISS binary indices over Parquet code shards: build (one Ray task per shard), open, exact search.

```python
from rayhash.index import read_codes, build_index, ShardedIndex
build_index("CODES", "INDEX", index_type="flat", shards=4)
with ShardedIndex.open("INDEX", mode="local") as index:
    res = index.search(read_codes("CODES").codes[:5], k=10)   # res.distances, res.keys, res.labels
index = ShardedIndex.from_codes(read_codes("CODES"))          # the same, exact flat, in memory: no files
```
"""
from __future__ import annotations


def _one_faiss() -> None:
    """faiss-cpu and faiss-gpu-* install the same `faiss` module: with two of them, which one runs is undefined."""
    from importlib.metadata import PackageNotFoundError, version

    have = []
    for name in ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cuvs", "faiss-gpu-cu11", "faiss-gpu"):
        try:
            version(name)
            have.append(name)
        except PackageNotFoundError:
            pass
    if len(have) > 1:
        raise ImportError(f"{' and '.join(have)} are both installed and overwrite each other's `faiss` module; keep "
                          f"one: pip uninstall -y {' '.join(have)} && pip install 'rayhash[cpu]' (or 'rayhash[gpu]' "
                          "on GPU nodes)")


_one_faiss()

from rayhash.index.build import build_index, read_manifest  # noqa: E402  (after the one-faiss check)
from rayhash.index.codes import CodeTable, read_code_file, read_codes, write_codes  # noqa: E402  (after the one-faiss check)
from rayhash.index.merge import RangeResult, SearchResult  # noqa: E402  (after the one-faiss check)
from rayhash.index.sharded import ShardedIndex  # noqa: E402  (after the one-faiss check)
from rayhash.index.types import INDEX_TYPES  # noqa: E402  (after the one-faiss check)

__all__ = ["INDEX_TYPES", "CodeTable", "RangeResult", "SearchResult", "ShardedIndex", "build_index",
           "read_code_file", "read_codes", "read_manifest", "write_codes"]
