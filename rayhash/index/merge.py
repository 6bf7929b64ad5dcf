"""Search results and how partial results merge: per-shard (or per-actor) exact top-k lists by (distance, key) into
the exact global top-k, and range results into one list sorted by (query, distance, key).

Inside a process candidates are int64 ``distance * stride + rank`` (rank: the key's place in the sorted key table,
``EMPTY`` for a slot with no code); between Ray actors they travel as ``(distances, keys, labels)`` with fixed-width
numpy unicode keys and ``SENTINEL`` distances for empty slots.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

SENTINEL = np.iinfo(np.int32).max  # distance of a candidate slot with no code
EMPTY = np.iinfo(np.int64).max  # integer candidate slot with no code


def label_name(label: int, names: Sequence[str]) -> str | None:
    """The name of class ``label`` (its number as text past the end of ``names``; None for -1, unlabelled)."""
    if label < 0:
        return None
    return names[label] if label < len(names) else str(label)


class _Named:
    def names(self) -> np.ndarray:
        """``labels`` as class names (object array of the same shape; None where unlabelled or missing), from the
        dataset's ``label_names`` (the number as text when the dataset has none)."""
        flat = [label_name(int(v), self.label_names) for v in np.asarray(self.labels).ravel()]
        return np.asarray(flat + [None], dtype=object)[:-1].reshape(np.shape(self.labels))


@dataclass
class SearchResult(_Named):
    """Per query the k nearest codes: ``distances`` int32 (nq,k), ``keys`` object (nq,k), ``labels`` int32 (nq,k),
    and the dataset's class names ``label_names`` (``names()`` maps ``labels`` to them).
    Rows are sorted by (distance, key); missing hits (fewer than k reachable) have distance -1, key None."""

    distances: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    label_names: Sequence[str] = field(default=(), repr=False)

    def padded(self, k: int) -> "SearchResult":
        """The result with k columns: a search returns ``min(k, ntotal)``; the added slots are missing hits
        (distance -1, key None, label -1)."""
        extra = k - self.distances.shape[1]
        if extra <= 0:
            return self
        pad = ((0, 0), (0, extra))
        keys = np.full((len(self.keys), k), None, object)
        keys[:, :self.keys.shape[1]] = self.keys
        return SearchResult(np.pad(self.distances, pad, constant_values=-1), keys,
                            np.pad(self.labels, pad, constant_values=-1), self.label_names)


@dataclass
class RangeResult(_Named):
    """All codes within a Hamming radius, per query ``i`` in ``[lims[i], lims[i+1])``, sorted by (distance, key);
    ``label_names`` as in :class:`SearchResult`."""

    lims: np.ndarray
    distances: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    label_names: Sequence[str] = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.lims) - 1

    def __getitem__(self, i: int) -> SearchResult:
        a, b = self.lims[i], self.lims[i + 1]
        return SearchResult(self.distances[a:b], self.keys[a:b], self.labels[a:b], self.label_names)


def select_topk(d: np.ndarray, keys: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Row-wise top-k of candidate lists by (distance, key); invalid candidates carry distance ``SENTINEL``."""
    nq, w = d.shape
    if w < k:
        pad = ((0, 0), (0, k - w))
        d, keys, labels = np.pad(d, pad, constant_values=SENTINEL), np.pad(keys, pad), np.pad(labels, pad,
                                                                                                  constant_values=-1)
    order = np.lexsort((keys, d), axis=-1)[:, :k]
    return tuple(np.take_along_axis(a, order, axis=1) for a in (d, keys, labels))


def finish(d: np.ndarray, keys: np.ndarray, labels: np.ndarray) -> SearchResult:
    """Candidate arrays (sentinel-padded, unicode keys) -> public :class:`SearchResult`."""
    missing = d == SENTINEL
    out_keys = keys.astype(object)
    out_keys[missing] = None
    return SearchResult(np.where(missing, -1, d).astype(np.int32), out_keys,
                        np.where(missing, -1, labels).astype(np.int32))


def merge_topk(parts: list[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, ...]:
    """Merge exact per-part top-k candidate triples into the exact top-k."""
    if len(parts) == 1:
        return select_topk(*parts[0], k)
    d = np.concatenate([p[0] for p in parts], axis=1)
    keys = np.concatenate([p[1] for p in parts], axis=1)
    labels = np.concatenate([p[2] for p in parts], axis=1)
    return select_topk(d, keys, labels, k)


def merge_ranges(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Merge per-part range results ``(qid, distances, keys, labels)`` sorted by (query, distance, key)."""
    qid, d, keys, labels = (np.concatenate([p[i] for p in parts]) for i in range(4))
    order = np.lexsort((keys, d, qid))
    return tuple(a[order] for a in (qid, d, keys, labels))


def ranges_to_result(qid: np.ndarray, d: np.ndarray, keys: np.ndarray, labels: np.ndarray, nq: int) -> RangeResult:
    lims = np.searchsorted(qid, np.arange(nq + 1)).astype(np.int64)
    return RangeResult(lims, d.astype(np.int32), keys.astype(object), labels.astype(np.int32))



def smallest(c: np.ndarray, k: int) -> np.ndarray:
    """Row-wise k smallest of an int64 candidate matrix, sorted, padded with ``EMPTY`` to k columns."""
    if c.shape[1] > k:
        c = np.partition(c, k - 1, axis=1)[:, :k]
    c = np.sort(c, axis=1)
    if c.shape[1] < k:
        c = np.pad(c, ((0, 0), (0, k - c.shape[1])), constant_values=EMPTY)
    return c
