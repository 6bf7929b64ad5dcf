"""Evaluate a sharded index: encode the query set, retrieve from the index, score with hierarchical precision.

Targets:
- ``hierarchy``: relevance of a retrieved item = LCS-height similarity of its class to the query's class
  (CIFAR-100 / WordNet / the dataset's own hierarchy); mAP and P@r use plain class relevance.
- ``captions``: graded relevance = clipped cosine of caption embeddings (query vs retrieved item); best_j comes
  from the top-j similarities over the whole database. mAP / P@r need classes and are not reported.

Self-matches (a query whose key is in the database) are removed from its ranking, as in Barz & Denzler.

Protocols: ``database`` searches the queries in a built index; ``reference`` (Barz & Denzler) uses the query split
as its own database (an exact in-memory flat index over the query codes), each query left out of its own ranking —
the setting of published figures. Both score through the same functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayhash import storage
from rayhash.layout import EvalDir
from rayhash.runtime import get_logger

log = get_logger("eval")


@dataclass
class Ranking:
    """Per-query ranked lists with self-matches removed, padded with label -1 / distance inf / key ''."""

    labels: np.ndarray
    distances: np.ndarray
    keys: np.ndarray


PROTOCOLS = ("database", "reference")


def evaluate(index: str | None, checkpoint: str | None, queries: str, out: str, *, protocol: str = "database",
             k: int = 250, map_k: int = 1000, radius: int = 2, targets: str = "auto", max_queries: int | None = None,
             classes: list[int] | None = None, caption_embeddings: str | None = None, mode: str = "local",
             address: str | None = None, seed: int = 0) -> dict:
    """Encode ``queries`` (a split folder of shards) with ``checkpoint`` (default: the index's), search ``index``
    and write ``out/metrics.json``, ``out/per_query.parquet`` and PNG plots. Returns the metrics.

    ``protocol="reference"``: the database is the (restricted) query set itself, ``index`` is optional (only its
    checkpoint is used). ``classes`` restricts the queries to those labels (zero-shot protocol: train on seen
    classes, query with unseen ones against the whole database); ``max_queries`` subsamples them."""
    from rayhash.data import load_dataset_info
    from rayhash.index import ShardedIndex, read_manifest
    from rayhash.runtime import init_ray

    _check_protocol(protocol, index, checkpoint)
    out = EvalDir(storage.absolute(out))
    with out.lease("eval"):  # a second evaluation into the same folder is refused while this one runs
        init_ray(address)
        idx = ShardedIndex.open(index, mode=mode) if protocol == "database" else None
        checkpoint = checkpoint or (idx.checkpoint if idx is not None else read_manifest(index).get("checkpoint"))
        if not checkpoint:
            raise ValueError(f"{index}: manifest names no checkpoint; pass --checkpoint RUN")
        info = load_dataset_info(queries)
        targets = ("captions" if info.kind == "captions" else "hierarchy") if targets == "auto" else targets
        q = _query_codes(checkpoint, queries, out, max_queries, classes, seed)
        if idx is None:  # reference protocol: the queries are the database
            idx = ShardedIndex.from_codes(q, checkpoint)
        if q.bits != idx.bits:
            raise ValueError(f"checkpoint {checkpoint} gives {q.bits}-bit codes but index {index} holds {idx.bits}-bit")
        log.info("evaluating %d queries against %d database codes (%s targets, %s protocol)", len(q), idx.ntotal,
                 targets, protocol)
        with idx:
            if targets == "hierarchy":
                metrics, per_query = hierarchy_metrics(idx, q, info.similarity_matrix(), k, map_k, radius, seed)
            elif targets == "captions":
                emb = caption_embeddings or info.dir.captions
                metrics, per_query = caption_metrics(idx, q, emb, k)
            else:
                raise ValueError(f"--targets must be hierarchy, captions or auto, got {targets!r}")
        metrics.update({"protocol": protocol, "n_queries": len(q), "n_database": idx.ntotal, "bits": idx.bits,
                        "targets": targets, "index": str(index) if protocol == "database" else None,
                        "checkpoint": str(checkpoint), "queries": str(queries)})
        _write_outputs(out, metrics, q, per_query)
        _plots(out, q, metrics.pop("_hp_curve"), metrics.pop("_hp_curve_random", None))
        return metrics


def _check_protocol(protocol, index, checkpoint):
    """Argument errors, before anything starts."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "database" and not index:
        raise ValueError("--protocol database needs --index INDEX (or use --protocol reference: the query split is "
                         "its own database)")
    if protocol == "reference" and not (index or checkpoint):
        raise ValueError("--protocol reference without --index needs --checkpoint RUN (the run that encodes the "
                         "query split)")


# ------------------------------------------------------------------------------------------ queries
def _query_codes(checkpoint, queries, out, max_queries, classes, seed):
    """Codes of the query split (encoded once into ``out/query_codes``, resumable), optionally subsampled."""
    from rayhash.encode import encode_dataset
    from rayhash.index import read_codes

    codes_dir = EvalDir.of(out).query_codes
    encode_dataset(checkpoint, queries, codes_dir)
    q = read_codes(codes_dir)
    keep = np.arange(len(q))
    if classes is not None:
        keep = keep[np.isin(q.labels, classes)]
        if len(keep) == 0:
            raise ValueError(f"no query has a label in --classes {classes}")
    if max_queries and len(keep) > max_queries:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_queries, replace=False))
    return q[keep]


def rank(idx, q, k: int, complete_ties: bool = False) -> Ranking:
    """Top-k per query from the index without the query itself; with ``complete_ties`` the lists also hold the
    whole tie group at the k-th distance (needed for the exact expectation over tie orders)."""
    res = idx.search(q.codes, k + 1).padded(k + 1)  # k past the index size: missing hits
    top = Ranking(*_drop_self(res.labels, res.distances, res.keys, q.keys, k))
    return _complete_ties(idx, q, top, k) if complete_ties else top


def _complete_ties(idx, q, top: Ranking, k: int) -> Ranking:
    """``top`` (>= k columns) extended by every code tied with its k-th result (one range search per distance)."""
    boundary = top.distances[:, k - 1]
    rows = [None] * len(q)
    for b in np.unique(boundary[np.isfinite(boundary)]).astype(int):
        sel = np.flatnonzero(boundary == b)
        rr = idx.range_search(q.codes[sel], int(b))
        for i, qi in enumerate(sel):
            hit = rr[i]
            keep = hit.keys != q.keys[qi]
            rows[qi] = (hit.labels[keep], hit.distances[keep].astype(float), hit.keys[keep])
    for qi in np.flatnonzero(~np.isfinite(boundary)):  # fewer than k reachable: the list is already complete
        rows[qi] = (top.labels[qi], top.distances[qi], top.keys[qi])
    return _pad_rows(rows)


def _drop_self(labels, dists, keys, qkeys, k):
    keep = keys != qkeys[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept entries first, in rank order
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    valid = take(keep) & (take(dists) >= 0)
    return (np.where(valid, take(labels), -1), np.where(valid, take(dists).astype(float), np.inf),
            np.where(valid, take(keys), ""))


def _pad_rows(rows) -> Ranking:
    width = max(len(r[0]) for r in rows)
    pad = lambda a, v: np.concatenate([a, np.full(width - len(a), v, dtype=a.dtype)])  # noqa: E731
    return Ranking(np.stack([pad(np.asarray(r[0], np.int64), -1) for r in rows]),
                   np.stack([pad(np.asarray(r[1], float), np.inf) for r in rows]),
                   np.stack([pad(np.asarray(r[2], object), "") for r in rows]))


# ------------------------------------------------------------------------------------------ metrics
def hierarchy_metrics(idx, q, S, k: int = 250, map_k: int = 1000, radius: int = 2, seed: int = 0):
    """Metrics of query codes ``q`` (a CodeTable) against ``idx`` with class similarity ``S``: returns
    (metrics dict, per-query arrays)."""
    from rayhash.metrics import average_precision_ranked, hierarchical_precision_ranked, trapezoid_ahp

    counts = _label_counts(idx, len(S))
    in_db = np.isin(q.keys, idx.keys())
    top = rank(idx, q, max(k, map_k))
    hp = hierarchical_precision_ranked(top.labels, q.labels, S, counts, k, query_in_db=in_db)
    tied = _complete_ties(idx, q, top, k)
    hp_exp = hierarchical_precision_ranked(tied.labels, q.labels, S, counts, k, ranked_distances=tied.distances,
                                           ties="expected", query_in_db=in_db)
    ap = average_precision_ranked(top.labels, q.labels, map_k)
    within = idx.range_search(q.codes, radius)
    p_r = np.array([_precision_within(within[i], q.keys[i], q.labels[i]) for i in range(len(q))])
    ahp, ahp_exp = (trapezoid_ahp(h, h.shape[1]) for h in (hp, hp_exp))  # k capped at the database size
    rand_hp = _random_codes_hp(q, idx, S, counts, k, seed, in_db)
    metrics = {f"mAHP@{k}": float(ahp.mean()), f"mAHP@{k}_expected": float(ahp_exp.mean()),
               f"mAP@{map_k}": float(ap.mean()), f"P@r{radius}": float(p_r.mean()),
               f"mAHP@{k}_random": float(trapezoid_ahp(rand_hp, rand_hp.shape[1]).mean()),
               "_hp_curve": hp.mean(axis=0), "_hp_curve_random": rand_hp.mean(axis=0)}
    per_query = {f"AHP@{k}": ahp, f"AHP@{k}_expected": ahp_exp, f"AP@{map_k}": ap, f"P@r{radius}": p_r}
    return metrics, per_query


def _label_counts(idx, n_classes):
    counts = np.asarray(idx.label_counts(), dtype=np.int64)
    return np.pad(counts, (0, max(0, n_classes - len(counts))))


def _precision_within(hit, qkey, qlabel) -> float:
    keep = hit.keys != qkey
    n = int(keep.sum())
    return float((hit.labels[keep] == qlabel).sum() / n) if n else 0.0


def _random_codes_hp(q, idx, S, counts, k, seed, in_db):
    """HP@j of uniformly random codes for the same query and database labels (the chance baseline); a query that is
    in the database (``in_db``) is scored as the real one is, against the others (same k cap and best_j)."""
    from rayhash.metrics import hamming_distances, hierarchical_precision_ranked, rank_dense

    rng = np.random.default_rng(seed)
    db_labels = np.repeat(np.arange(len(counts)), counts)
    nbytes = idx.bits // 8
    qc = rng.integers(0, 256, (len(q), nbytes), dtype=np.uint8)
    dbc = rng.integers(0, 256, (len(db_labels), nbytes), dtype=np.uint8)
    rl, _, _ = rank_dense(hamming_distances(qc, dbc), db_labels, k, None, "hamming")
    return hierarchical_precision_ranked(rl, q.labels, S, counts, k, query_in_db=in_db)


def caption_metrics(idx, q, emb_path: str, k: int = 250):
    """mAHP@k with graded relevance = clipped cosine of caption embeddings (from ``emb_path`` Parquet)."""
    from rayhash.data.stream import load_caption_embeddings
    from rayhash.metrics import hierarchical_precision_values, trapezoid_ahp

    keys, emb = load_caption_embeddings(emb_path)
    row = {key: i for i, key in enumerate(keys.tolist())}
    lookup = lambda ks: np.stack([emb[row[x]] for x in ks])  # noqa: E731
    db_keys = idx.keys()
    missing = [x for x in list(q.keys) + list(db_keys) if x not in row]
    if missing:
        raise ValueError(f"{emb_path}: no caption embedding for {len(missing)} keys (e.g. {missing[0]!r}); "
                         "re-run `rayhash data embed-captions` on this dataset")
    qe, dbe = lookup(q.keys), lookup(db_keys)
    name, k = f"mAHP@{k}", min(k, len(db_keys) - int(np.isin(q.keys, db_keys).any()))  # the name keeps the k asked
    top = rank(idx, q, k)
    ranked_sims = np.zeros(top.keys.shape)
    valid = top.keys != ""
    ranked_sims[valid] = np.einsum("ij,ij->i", np.repeat(qe, valid.sum(1), axis=0), lookup(top.keys[valid]))
    ranked_sims = np.maximum(ranked_sims, 0.0)
    all_sims = np.maximum(qe @ dbe.T, 0.0)
    all_sims[q.keys[:, None] == db_keys[None, :]] = -np.inf  # the query itself is not a candidate
    best = np.cumsum(-np.sort(-all_sims, axis=1)[:, :k], axis=1)
    hp = hierarchical_precision_values(ranked_sims, best, k)
    ahp = trapezoid_ahp(hp, k)
    return {name: float(ahp.mean()), "_hp_curve": hp.mean(axis=0)}, {name[1:]: ahp}


# ------------------------------------------------------------------------------------------ outputs
def _write_outputs(out, metrics, q, per_query):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": q.keys.astype(str), "label": q.labels.astype(np.int32),
                      **{name: v.astype(np.float64) for name, v in per_query.items()}})
    out = EvalDir.of(out)
    with storage.atomic_output(out.per_query) as tmp:
        pq.write_table(table, tmp)
    storage.write_json(out.metrics, {k: v for k, v in metrics.items() if not k.startswith("_")})
    log.info("wrote %s", out.metrics)


def _plots(out, q, hp_curve, hp_random, max_pairs: int = 2000):
    """Plots of the query set's codes: HP@j, precision-recall by radius, bit balance, pair distances."""
    from rayhash.eval import plots
    from rayhash.metrics import hamming_distances, unpack_codes

    plots.plot_hp_curve(hp_curve, out, hp_random)
    sub = np.arange(min(len(q), max_pairs))
    codes, labels = q.codes[sub], q.labels[sub]
    bits = unpack_codes(codes, q.bits).astype(np.float64) * 2 - 1
    plots.plot_bit_balance(bits.mean(axis=0), out)
    d = hamming_distances(codes, codes)
    iu = np.triu_indices(len(sub), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    dd = d[iu]
    if (labels >= 0).all() and same.any():
        plots.plot_distance_histograms(dd[same], dd[~same], q.bits, out)
        radii = np.arange(q.bits + 1)
        retrieved = np.array([(dd <= r).sum() for r in radii], dtype=float)
        hits = np.array([((dd <= r) & same).sum() for r in radii], dtype=float)
        precision = np.divide(hits, retrieved, out=np.ones_like(hits), where=retrieved > 0)
        plots.plot_precision_recall(precision, hits / same.sum(), out)
