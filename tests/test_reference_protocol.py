"""Reference protocol (Barz & Denzler: queries = database, each query left out of its own ranking): the metrics of
an in-memory index over the query codes equal a brute-force numpy computation, Hamming ties included."""
from __future__ import annotations

import json

import numpy as np
import pytest

N, BITS = 40, 16
# root -> {A -> {A1 -> {0, 1}, 2}, B -> {3, 4}, 5}; S = 1 - height(LCS) / height(root), height(root) = 3
S = np.array([[1, 2 / 3, 1 / 3, 0, 0, 0],
              [2 / 3, 1, 1 / 3, 0, 0, 0],
              [1 / 3, 1 / 3, 1, 0, 0, 0],
              [0, 0, 0, 1, 2 / 3, 0],
              [0, 0, 0, 2 / 3, 1, 0],
              [0, 0, 0, 0, 0, 1]])


def _tied_codes(seed: int = 0):
    """N codes from 4 prototypes with 0 or 1 flipped bit (large tie groups), labels mostly the prototype's class;
    keys sort in row order."""
    from rayhash.index import CodeTable

    rng = np.random.default_rng(seed)
    proto = rng.integers(0, 4, N)
    bits = rng.integers(0, 2, (4, BITS))[proto]
    flip = np.flatnonzero(rng.random(N) < 0.5)
    bits[flip, rng.integers(0, BITS, len(flip))] ^= 1
    labels = np.where(rng.random(N) < 0.7, np.array([0, 1, 3, 4])[proto], rng.integers(0, 6, N))
    keys = np.array([f"img-{i:03d}" for i in range(N)], dtype=object)
    return CodeTable(keys, np.packbits(bits.astype(np.uint8), axis=1), labels.astype(np.int32), BITS)


def _ahp(hp, k):
    return np.trapezoid(hp, dx=1 / k, axis=-1)


def _brute_force(codes, labels, k, map_k, radius, n_perm=4000, seed=1):
    """Per query: AHP@k (ties in database order), Monte-Carlo mean and standard error of AHP@k over random orders
    within tie groups, AP@map_k, P@radius. Self excluded; k capped at the N - 1 other items."""
    rng = np.random.default_rng(seed)
    b = np.unpackbits(codes, axis=1)
    dist = (b[:, None, :] != b[None, :, :]).sum(axis=2)
    n = len(codes)
    k = min(k, n - 1)
    out = {"ahp": [], "ahp_mc": [], "ahp_se": [], "ap": [], "pr": [], "tie_past_k": []}
    for i in range(n):
        others = np.delete(np.arange(n), i)  # database order
        d, lab = dist[i, others], labels[others]
        sims = S[labels[i], lab]
        best = np.cumsum(np.sort(sims)[::-1])[:k]
        order = np.argsort(d, kind="stable")
        out["ahp"].append(_ahp(np.cumsum(sims[order][:k]) / best, k))
        perms = np.lexsort((rng.random((n_perm, n - 1)), np.broadcast_to(d, (n_perm, n - 1))), axis=-1)
        mc = _ahp(np.cumsum(sims[perms][:, :k], axis=1) / best, k)
        out["ahp_mc"].append(mc.mean())
        out["ahp_se"].append(mc.std() / np.sqrt(n_perm))
        kth = np.sort(d)[k - 1]
        out["tie_past_k"].append((d <= kth).sum() > k)  # the tie group at rank k continues past it
        rel = (lab[order][:map_k] == labels[i]).astype(float)
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        out["ap"].append((prec * rel).sum() / rel.sum() if rel.sum() else 0.0)
        within = d <= radius
        out["pr"].append((lab[within] == labels[i]).mean() if within.any() else 0.0)
    return {name: np.array(v) for name, v in out.items()}


@pytest.mark.parametrize("k, map_k, radius", [(10, 25, 1), (250, 1000, 2)])
def test_reference_metrics_equal_brute_force(k, map_k, radius):
    from rayhash.eval import hierarchy_metrics
    from rayhash.index import ShardedIndex

    q = _tied_codes()
    with ShardedIndex.from_codes(q) as idx:
        metrics, per_query = hierarchy_metrics(idx, q, S, k, map_k, radius)
    ref = _brute_force(q.codes, q.labels, k, map_k, radius)
    np.testing.assert_allclose(per_query[f"AHP@{k}"], ref["ahp"], rtol=1e-9)
    np.testing.assert_array_less(np.abs(per_query[f"AHP@{k}_expected"] - ref["ahp_mc"]), 5 * ref["ahp_se"] + 1e-9)
    np.testing.assert_allclose(per_query[f"AP@{map_k}"], ref["ap"], rtol=1e-9)
    np.testing.assert_allclose(per_query[f"P@r{radius}"], ref["pr"], rtol=1e-9)
    assert metrics[f"mAHP@{k}"] == pytest.approx(ref["ahp"].mean())
    assert metrics[f"mAP@{map_k}"] == pytest.approx(ref["ap"].mean())
    assert metrics[f"P@r{radius}"] == pytest.approx(ref["pr"].mean())
    if k < N - 1:  # the case really has tie groups across rank k that change AHP
        assert ref["tie_past_k"].sum() > N // 2
        assert not np.allclose(ref["ahp"], ref["ahp_mc"], atol=1e-3)


def test_from_codes_is_an_exact_in_memory_index(tmp_path, monkeypatch):
    from rayhash.index import ShardedIndex

    monkeypatch.chdir(tmp_path)
    q = _tied_codes(seed=2)
    with ShardedIndex.from_codes(q, checkpoint="RUN") as idx:
        assert (idx.ntotal, idx.bits, idx.index_type, idx.checkpoint) == (N, BITS, "flat", "RUN")
        assert list(idx.keys()) == list(q.keys) and list(idx.labels()) == list(q.labels)
        res = idx.search(q.codes[:5], k=12)
    b = np.unpackbits(q.codes, axis=1)
    for i in range(5):
        d = (b[i] != b).sum(axis=1)
        top = np.lexsort((q.keys.astype(str), d))[:12]  # by (distance, key)
        assert list(res.keys[i]) == list(q.keys[top]) and list(res.distances[i]) == list(d[top])
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ValueError, match="at least one code"):
        ShardedIndex.from_codes(q[:0])


def test_reference_protocol_needs_index_or_checkpoint(tmp_path, capsys):
    from rayhash.cli import main

    args = ["eval", "--queries", str(tmp_path / "ds" / "test"), "--out", str(tmp_path / "eval")]
    assert main([*args, "--protocol", "reference"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(args) == 2  # database protocol (the default) without --index
    assert "--index" in capsys.readouterr().err


def test_eval_reference_protocol_end_to_end(tmp_path, ray_local, data_synthetic_small):
    """`rayhash eval --protocol reference` on a tiny checkpoint: the database is the query split (restricted by
    --classes too), the metrics are those of hierarchy_metrics over from_codes of the written query codes, and the
    database protocol against an index built from those codes gives the same numbers."""
    from fixtures_index import index_save_tiny_checkpoint

    from rayhash.cli import main
    from rayhash.data import load_dataset_info
    from rayhash.eval import hierarchy_metrics
    from rayhash.index import ShardedIndex, build_index, read_codes

    run = index_save_tiny_checkpoint(tmp_path / "run", data_synthetic_small, bits=16)
    out = tmp_path / "eval"
    base = ["eval", "--queries", str(data_synthetic_small / "test"), "--out", str(out), "--k", "20", "--map-k", "50"]
    names = ("mAHP@20", "mAHP@20_expected", "mAP@50", "P@r2", "mAHP@20_random")
    S_ds = load_dataset_info(data_synthetic_small).similarity_matrix()
    results = {}
    for classes, n in (([0, 5, 6], 30), (None, 160)):  # later runs reuse the encoded query codes
        assert main(base + ["--checkpoint", run, "--protocol", "reference"]
                    + (["--classes", "0,5,6"] if classes else [])) == 0
        m = results[n] = json.loads((out / "metrics.json").read_text())
        assert (m["protocol"], m["n_queries"], m["n_database"], m["index"]) == ("reference", n, n, None)
        q = read_codes(out / "query_codes")
        q = q[np.isin(q.labels, classes)] if classes else q
        with ShardedIndex.from_codes(q) as idx:
            ref, _ = hierarchy_metrics(idx, q, S_ds, 20, 50, 2)
        for name in names:
            assert m[name] == pytest.approx(ref[name], rel=1e-9), name

    index = str(tmp_path / "index")
    build_index(str(out / "query_codes"), index, shards=2)
    for extra, protocol in ((["--checkpoint", run, "--index", index], "database"),
                            (["--index", index, "--protocol", "reference"], "reference")):  # checkpoint: manifest's
        assert main(base + extra) == 0
        m = json.loads((out / "metrics.json").read_text())
        assert (m["protocol"], m["n_database"], m["checkpoint"]) == (protocol, 160, run)
        assert {x: m[x] for x in names} == pytest.approx({x: results[160][x] for x in names}, rel=1e-9)


@pytest.mark.parametrize("k, map_k, radius", [(10, 25, 1), (250, 1000, 2)])
def test_training_validation_metrics_equal_brute_force(k, map_k, radius):
    """``reference_metrics`` (the dense form that training validation and bench_quality report) gives the same
    figures as the brute force on the same tied codes, plus the code statistics computed by hand."""
    from rayhash.metrics import reference_metrics

    q = _tied_codes()
    bits = np.unpackbits(q.codes, axis=1).astype(np.float32) * 2 - 1  # +-1: continuous == binary here
    z = bits * np.float32(0.9)  # |z| = 0.9: quantisation error 0.1 exactly
    m = reference_metrics(z, q.labels, S, k, map_k, radius)
    ref = _brute_force(q.codes, q.labels, k, map_k, radius)
    kk, mk = k, map_k  # names keep the k asked for; capped at N - 1 inside (the brute force caps too)
    assert m["n"] == N
    assert m[f"mAHP@{kk}"] == pytest.approx(ref["ahp"].mean(), rel=1e-9)
    assert abs(m[f"mAHP@{kk}_expected"] - ref["ahp_mc"].mean()) < 5 * ref["ahp_se"].max() + 1e-9
    assert m[f"mAP@{mk}"] == pytest.approx(ref["ap"].mean(), rel=1e-9)
    assert m[f"P@r{radius}"] == pytest.approx(ref["pr"].mean(), rel=1e-9)
    assert m["quant_error"] == pytest.approx(0.1, rel=1e-6)
    hd = (np.unpackbits(q.codes, axis=1)[:, None, :] != np.unpackbits(q.codes, axis=1)[None, :, :]).sum(axis=2)
    for r in range(radius + 1):
        assert m[f"within_r{r}"] == pytest.approx(((hd <= r).sum(axis=1) - 1).mean())
    assert m["bit_balance"] == pytest.approx(np.abs(bits.mean(0)).mean())
    corr = np.abs(np.corrcoef(bits, rowvar=False))
    corr = np.where(np.isnan(corr), 1.0, corr)
    assert m["bit_correlation"] == pytest.approx(corr[~np.eye(BITS, dtype=bool)].mean())
    # L1 on z ranks exactly as Hamming on the bits, ties included: no binarisation gap
    assert m[f"mAHP@{kk}_continuous"] == pytest.approx(m[f"mAHP@{kk}"]) and m["gap"] == pytest.approx(0.0)


def test_band_references():
    """The perfect flat classifier ranks the query's class first (AP = 1) and scores below a hierarchy-aware
    perfect ranking; random codes score near the mean similarity."""
    from rayhash.metrics import flat_classifier_mahp, mean_average_hierarchical_precision, random_codes_mahp

    labels = np.repeat(np.arange(6), 12)
    flat = flat_classifier_mahp(labels, S, k=30)
    ideal = mean_average_hierarchical_precision(1 - S[labels][:, labels], labels, labels, S, 30,
                                                np.arange(len(labels)))
    rand = random_codes_mahp(labels, S, 16, k=30)
    assert ideal == pytest.approx(29 / 30)  # a perfect ranking scores (k-1)/k
    assert rand < flat < ideal


def test_constant_bits_count_as_correlated_without_a_numpy_warning():
    import warnings

    from rayhash.metrics import code_statistics

    z = np.ones((6, 4), np.float32)
    z[:3, 0] = -1  # bit 0 varies, bits 1-3 are constant
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in divide" would raise here
        stats = code_statistics(z)
    assert stats["bit_correlation"] == pytest.approx(1.0)
