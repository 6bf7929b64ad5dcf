"""Retrieval metrics: mAHP@k (Barz & Denzler), mAP@k (class relevance), precision within a Hamming radius.

Each metric has a *ranked* form working on per-query ranked lists (what an index search returns: no dense matrix)
and a dense form on an (nq, n) distance matrix that ranks, then calls the ranked form. Ranked lists may be padded
with label -1 / distance +inf. ``ties="index"`` scores the lists in the given order (the dense form orders equal
distances by database row); ``ties="expected"`` gives the exact expectation over uniformly random orders within
groups of equal distance. The expected form needs every tie group that reaches rank k to be complete in the list:
the dense form guarantees it; from an index, fetch everything within the distance of the k-th result.
"""
from __future__ import annotations

import numpy as np

from rayhash.metrics.codes import distance_matrix

TIES = ("index", "expected")


# ------------------------------------------------------------------------------------------------ mAHP
def hierarchical_precision_ranked(ranked_labels, query_labels, S, db_label_counts, k: int = 250,
                                  ranked_distances=None, ties: str = "index", query_in_db=False) -> np.ndarray:
    """HP@1..HP@k per query (nq, k) from ranked lists of database labels (nq, k' >= k).

    ``HP@j = sum_{i<=j} s(q, r_i) / best_j`` with ``best_j`` the top-j similarity sum over the whole database,
    taken from ``db_label_counts`` (``np.bincount`` of database labels) minus the query itself where
    ``query_in_db`` (bool or (nq,) bools). k is capped at the database size. A query that is in the database must
    not appear in its own ranked list (drop it from search results, e.g. by key). With ``ties="expected"`` the
    curve is the exact expected HP (HP is linear in the ranked similarities).
    """
    S = np.asarray(S, dtype=np.float64)
    ql = np.asarray(query_labels, dtype=np.int64)
    counts = np.zeros(S.shape[0], dtype=np.int64)
    counts[: len(db_label_counts)] = db_label_counts
    in_db = np.broadcast_to(np.asarray(query_in_db, dtype=bool), ql.shape)
    k = min(k, int(counts.sum() - in_db.max(initial=False)))
    sims = _ranked_values(ranked_labels, k, ties, ranked_distances, lambda rl: _lookup(S, ql, rl))
    return hierarchical_precision_values(sims, _best_cumsum(S, ql, counts, in_db, k), k)


def hierarchical_precision_values(ranked_sims, best, k: int) -> np.ndarray:
    """(nq, k) ``HP@j = cumsum(ranked_sims)[j] / best[j]`` for graded relevance given directly (e.g. caption
    similarities); ``best`` (nq, >= k) = top-j similarity sums over the database. HP = 1 where best = 0."""
    cum = np.cumsum(np.asarray(ranked_sims, dtype=np.float64)[:, :k], axis=1)
    best = np.asarray(best, dtype=np.float64)[:, :k]
    return np.divide(cum, best, out=np.ones_like(cum), where=best > 0)


def average_hierarchical_precision_ranked(ranked_labels, query_labels, S, db_label_counts, k: int = 250,
                                          ranked_distances=None, ties: str = "index",
                                          query_in_db=False) -> np.ndarray:
    """Per-query AHP@k (nq,) = ``trapezoid(HP@1..HP@k, dx=1/k)`` (a perfect ranking scores (k-1)/k), with HP from
    :func:`hierarchical_precision_ranked` (same arguments)."""
    hp = hierarchical_precision_ranked(ranked_labels, query_labels, S, db_label_counts, k, ranked_distances, ties,
                                       query_in_db)
    return trapezoid_ahp(hp, hp.shape[1])


def mean_average_hierarchical_precision(dist, query_labels, db_labels, S, k: int = 250, query_db_index=None,
                                        ties: str = "index", metric: str = "hamming") -> float:
    """mAHP@k from an (nq, n) distance matrix (or a ``(queries, database)`` pair of codes/features compared with
    ``metric``). ``query_db_index[i]``: database row of query i (excluded from its ranking), or None."""
    db_labels = np.asarray(db_labels, dtype=np.int64)
    if db_labels.min(initial=0) < 0:
        raise ValueError("mAHP needs a label for every database item (found label -1)")
    rl, rd, in_db = rank_dense(dist, db_labels, k, query_db_index, metric)
    counts = np.bincount(db_labels, minlength=len(S))
    return float(average_hierarchical_precision_ranked(rl, query_labels, S, counts, k, rd, ties, in_db).mean())


# ------------------------------------------------------------------------------------------------ mAP
def average_precision_ranked(ranked_labels, query_labels, k: int = 1000, ranked_distances=None,
                             ties: str = "index") -> np.ndarray:
    """Per-query AP@k (nq,) with class relevance: ``sum_j rel_j P@j / R`` over the top k, R = relevant items in
    the top k (the hashing literature's convention); 0 when none is relevant."""
    ql = np.asarray(query_labels, dtype=np.int64)
    rl = np.asarray(ranked_labels, dtype=np.int64)
    k = min(k, rl.shape[1])
    rel = (rl == ql[:, None]) & (rl >= 0)
    if ties == "expected":
        return _expected_ap(rel, _checked_distances(ranked_distances, rl.shape), k)
    _check_ties(ties)
    rel = rel[:, :k].astype(np.float64)
    prec = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    n_rel = rel.sum(axis=1)
    return np.divide((prec * rel).sum(axis=1), n_rel, out=np.zeros_like(n_rel), where=n_rel > 0)


def mean_average_precision(dist, query_labels, db_labels, k: int = 1000, query_db_index=None,
                           ties: str = "index", metric: str = "hamming") -> float:
    """mAP@k (class relevance; queries without a relevant item in the top k count 0) from a distance matrix or a
    ``(queries, database)`` pair; ``query_db_index`` as for mAHP."""
    rl, rd, _ = rank_dense(dist, np.asarray(db_labels, dtype=np.int64), k, query_db_index, metric)
    return float(average_precision_ranked(rl, query_labels, k, rd, ties).mean())


# ------------------------------------------------------------------------------------------------ P@r
def precision_at_radius_ranked(ranked_labels, ranked_distances, query_labels, r: float = 2) -> np.ndarray:
    """Per-query precision of everything within distance ``r`` (lists must hold all of it; padding -1/inf);
    a query retrieving nothing counts 0. Items labelled -1 are not counted."""
    rl = np.asarray(ranked_labels, dtype=np.int64)
    within = (np.asarray(ranked_distances) <= r) & (rl >= 0)
    hits = (within & (rl == np.asarray(query_labels)[:, None])).sum(axis=1)
    n = within.sum(axis=1)
    return np.divide(hits, n, out=np.zeros(len(rl)), where=n > 0)


def precision_at_radius(dist, query_labels, db_labels, r: float = 2, query_db_index=None,
                        metric: str = "hamming") -> float:
    """Mean precision within distance ``r`` (default Hamming radius 2); queries retrieving nothing count 0."""
    d = _exclude_queries(_distances(dist, metric), query_db_index)
    db_labels = np.broadcast_to(np.asarray(db_labels, dtype=np.int64), d.shape)
    return float(precision_at_radius_ranked(db_labels, d, query_labels, r).mean())


# ------------------------------------------------------------------------------------------------ internals
def _distances(dist, metric: str) -> np.ndarray:
    if isinstance(dist, tuple):
        return distance_matrix(dist[0], dist[1], metric)
    return np.asarray(dist)


def _exclude_queries(d: np.ndarray, query_db_index) -> np.ndarray:
    d = d.astype(np.float64, copy=True)
    if query_db_index is not None:
        d[np.arange(len(d)), np.asarray(query_db_index)] = np.inf
    return d


def rank_dense(dist, db_labels, k, query_db_index, metric, max_bytes: int = 64 << 20):
    """Ranked labels/distances (nq, L) holding the top k by (distance, row) plus the rest of the last tie group;
    padded with -1 / inf. Returns (labels, distances, query_in_db)."""
    d = _distances(dist, metric)
    nq, n = d.shape
    if len(db_labels) != n:
        raise ValueError(f"distance matrix has {n} database columns but db_labels has {len(db_labels)}")
    n_avail = n - (query_db_index is not None)
    k = min(k, n_avail)
    if k < 1:
        return np.zeros((nq, 0), np.int64), np.zeros((nq, 0)), query_db_index is not None
    labels, dists = [], []
    step = max(1, max_bytes // (16 * n))
    for s in range(0, nq, step):
        qdi = None if query_db_index is None else np.asarray(query_db_index)[s:s + step]
        blk = _exclude_queries(d[s:s + step], qdi)
        kth = np.partition(blk, k - 1, axis=1)[:, k - 1:k]
        width = int((blk <= kth).sum(axis=1).max())
        idx = np.argpartition(blk, width - 1, axis=1)[:, :width] if width < n else np.tile(np.arange(n), (len(blk), 1))
        dsel = np.take_along_axis(blk, idx, axis=1)
        order = np.lexsort((idx, dsel), axis=1)
        idx, dsel = np.take_along_axis(idx, order, 1), np.take_along_axis(dsel, order, 1)
        pad = dsel > kth
        labels.append(np.where(pad, -1, db_labels[idx]))
        dists.append(np.where(pad, np.inf, dsel))
    width = max(x.shape[1] for x in labels)
    labels = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-1) for x in labels])
    dists = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=np.inf) for x in dists])
    return labels, dists, query_db_index is not None


def _lookup(S, ql, rl):
    """s(q, r) per ranked item; padding (-1) -> 0."""
    return np.where(rl >= 0, S[ql[:, None], np.maximum(rl, 0)], 0.0)


def _ranked_values(ranked_labels, k, ties, ranked_distances, value):
    """Per-position values, or (ties="expected") their means over each tie group."""
    rl = np.asarray(ranked_labels, dtype=np.int64)
    if rl.shape[1] < k:
        raise ValueError(f"ranked lists have {rl.shape[1]} columns but k={k} results are needed")
    v = value(rl)
    if ties == "expected":
        start, end = _tie_groups(_checked_distances(ranked_distances, rl.shape))
        cs = np.concatenate([np.zeros((len(v), 1)), np.cumsum(v, axis=1)], axis=1)
        v = (np.take_along_axis(cs, end + 1, 1) - np.take_along_axis(cs, start, 1)) / (end - start + 1)
    else:
        _check_ties(ties)
    return v


def _check_ties(ties):
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def _checked_distances(ranked_distances, shape):
    if ranked_distances is None:
        raise ValueError('ties="expected" needs ranked_distances')
    d = np.asarray(ranked_distances, dtype=np.float64)
    if d.shape != shape:
        raise ValueError(f"ranked_distances has shape {d.shape}, ranked labels {shape}")
    if np.any(d[:, 1:] < d[:, :-1]):
        raise ValueError("ranked_distances must be sorted ascending along each row")
    return d


def _tie_groups(d):
    """(start, end) position of each position's tie group (equal distances are contiguous in sorted rows)."""
    pos = np.broadcast_to(np.arange(d.shape[1]), d.shape)
    first = np.ones(d.shape, bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    last = np.ones(d.shape, bool)
    last[:, :-1] = first[:, 1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, pos, d.shape[1])[:, ::-1], axis=1)[:, ::-1]
    return start, end


def _best_cumsum(S, ql, counts, in_db, k):
    """(nq, k) top-j similarity sums over the database, per distinct (query label, query in database)."""
    out = np.empty((len(ql), k))
    keys = np.stack([ql, in_db.astype(np.int64)], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    for u, (label, inside) in enumerate(uniq):
        c = counts.copy()
        c[label] -= inside
        order = np.argsort(-S[label], kind="stable")
        cls = np.searchsorted(np.cumsum(c[order]), np.arange(k), side="right")
        out[inverse.ravel() == u] = np.cumsum(S[label][order][cls])
    return out


def trapezoid_ahp(y, k):
    """AHP from HP curves (nq, k): Trapezoid rule over the columns with dx = 1/k."""
    return (y.sum(axis=1) - (y[:, 0] + y[:, -1]) / 2) / k if k > 0 else np.zeros(len(y))


def _expected_ap(rel, d, k):
    """Exact E[AP@k] over uniformly random orders within tie groups.

    For a tie group of g places holding r relevant items after c relevant ones, the t-th place has
    ``E[rel_j C_j] = (r/g)(c+1) + (t-1) r(r-1)/(g(g-1))`` (C_j = relevant up to j). Groups wholly inside the top k
    fix their share of R; only the group straddling rank k makes R random: given x relevant among its m places
    inside the top k (x hypergeometric), the same formula holds with (x, m), and
    ``E[AP] = sum_x P(x) (pre + B(x)) / (c + x)``.
    """
    start, end = (x[:, :k] for x in _tie_groups(d))  # groups of the top k places (may extend beyond k)
    g = (end - start + 1).astype(np.float64)
    cs = np.concatenate([np.zeros((len(rel), 1)), np.cumsum(rel, axis=1, dtype=np.float64)], axis=1)
    r = np.take_along_axis(cs, end + 1, 1) - np.take_along_axis(cs, start, 1)  # relevant in the group
    c = np.take_along_axis(cs, start, 1)  # relevant before the group
    t = np.arange(k)[None, :] - start + 1  # 1-based place in the group
    e = (r / g) * (c + 1) + (t - 1) * _ratio(r * (r - 1), g * (g - 1))  # E[rel_j C_j], whole group retrieved
    a = start[:, k - 1]  # the group straddling rank k starts at 0-based position a
    j = np.arange(1, k + 1)[None, :]
    pre = np.where(j <= a[:, None], e / j, 0.0).sum(axis=1)
    col = (np.arange(len(rel)), np.full(len(rel), k - 1))
    return _expected_ap_boundary(pre, a, g[col], r[col], c[col], k)


def _expected_ap_boundary(pre, a, g, r, c, k):
    """Average over x (relevant among the m = k - a retrieved places of the straddling group) of AP given x."""
    m = (k - a).astype(np.float64)[:, None]
    tt = np.arange(1, k + 1)[None, :]
    inside = tt <= m
    h1 = np.where(inside, 1.0 / (a[:, None] + tt), 0).sum(1, keepdims=True)
    h2 = np.where(inside, (tt - 1) / (a[:, None] + tt), 0).sum(1, keepdims=True)
    x = np.arange(int(np.minimum(r, m[:, 0]).max()) + 1, dtype=np.float64)[None, :]
    px = _hypergeom_pmf(x, g[:, None], r[:, None], m)
    b = x * (c[:, None] + 1) / m * h1 + _ratio(x * (x - 1), m * (m - 1)) * h2
    ap = _ratio(pre[:, None] + b, c[:, None] + x)  # AP = 0 when nothing relevant is retrieved
    return (px * ap).sum(axis=1)


def _ratio(num, den):
    """num / den, 0 where den is 0."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    return np.divide(num, den, out=np.zeros(num.shape), where=den != 0)


def _hypergeom_pmf(x, g, r, m):
    """P(x relevant among m draws without replacement from g items holding r relevant)."""
    lf = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(g.max()) + 1)))])  # log factorials

    def log_choose(a, b):
        ok = (b >= 0) & (b <= a)
        ai, bi = a.astype(np.int64), np.where(ok, b, 0).astype(np.int64)
        return np.where(ok, lf[ai] - lf[bi] - lf[np.maximum(ai - bi, 0)], -np.inf)

    return np.exp(log_choose(r, x) + log_choose(g - r, m - x) - log_choose(g, m))
