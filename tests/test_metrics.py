"""Codes and retrieval metrics against hand-worked cases, brute-force loops and Monte Carlo."""
from __future__ import annotations

import numpy as np
import pytest

from rayhash.metrics import (average_hierarchical_precision_ranked, average_precision_ranked, distance_matrix,
                             hamming_distances, hierarchical_precision_ranked, hierarchical_precision_values,
                             mean_average_hierarchical_precision, mean_average_precision, pack_codes,
                             precision_at_radius, unpack_codes)


# ------------------------------------------------------------------ independent reference implementations (loops)
def ref_ahp(dist_row, q_label, db_labels, S, k, exclude=None):
    """Straight from DESIGN.md: stable ranking by (distance, row), best_j from all database items but the query."""
    rows = [j for j in range(len(db_labels)) if j != exclude]
    ranked = sorted(rows, key=lambda j: (dist_row[j], j))
    sims = [S[q_label][db_labels[j]] for j in ranked[:k]]
    best = sorted((S[q_label][db_labels[j]] for j in rows), reverse=True)[:k]
    hp = [sum(sims[: j + 1]) / sum(best[: j + 1]) for j in range(k)]
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    return float(trapezoid(hp, dx=1.0 / k))


def ref_ap(dist_row, q_label, db_labels, k, exclude=None):
    rows = [j for j in range(len(db_labels)) if j != exclude]
    ranked = sorted(rows, key=lambda j: (dist_row[j], j))[:k]
    hits, total = 0, 0.0
    for pos, j in enumerate(ranked, 1):
        if db_labels[j] == q_label:
            hits += 1
            total += hits / pos
    return total / hits if hits else 0.0


# ------------------------------------------------------------------ codes
def test_pack_codes_sign_and_bit_order():
    z = np.array([[0.5, -0.1, 0.0, -1, 1, 1, -1, -1] + [-1] * 7 + [0.2]])
    packed = pack_codes(z)
    # bits 1,0,1(0 -> +1),0,1,1,0,0 -> 0b10101100 = 172; second byte 0b00000001 = 1 (big-endian)
    assert packed.tolist() == [[172, 1]]
    assert unpack_codes(packed).tolist() == [[int(v >= 0) for v in z[0]]]
    assert pack_codes(np.array([[1, -1, 1, -1, 1, -1, 1, -1]])).tolist() == [[0b10101010]]
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(np.ones((2, 12)))


@pytest.mark.parametrize("bits", [8, 24, 64, 136])
def test_hamming_equals_bit_by_bit(bits):
    rng = np.random.default_rng(bits)
    q = pack_codes(rng.standard_normal((37, bits)))
    db = pack_codes(rng.standard_normal((151, bits)))
    expected = (np.unpackbits(q, axis=1)[:, None, :] != np.unpackbits(db, axis=1)[None, :, :]).sum(axis=2)
    np.testing.assert_array_equal(hamming_distances(q, db), expected)
    np.testing.assert_array_equal(hamming_distances(q, db, block=5), expected)  # memory-bounded blocks


def test_hamming_lookup_table_fallback(monkeypatch):
    """The popcount table path (numpy < 2) gives the same numbers."""
    import rayhash.metrics.codes as codes

    rng = np.random.default_rng(0)
    q, db = (rng.integers(0, 256, (n, 8), dtype=np.uint8) for n in (9, 20))
    expected = hamming_distances(q, db)
    monkeypatch.delattr(codes.np, "bitwise_count", raising=False)
    np.testing.assert_array_equal(codes.hamming_distances(q, db), expected)


def test_distance_matrix_float_metrics():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((9, 5))
    eu = np.linalg.norm(a[:, None] - b[None], axis=2)
    np.testing.assert_allclose(distance_matrix(a, b, "euclidean"), eu, atol=1e-9)
    cos = 1 - (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(distance_matrix(a, b, "cosine"), cos, atol=1e-12)
    a8, b8 = rng.standard_normal((6, 16)), rng.standard_normal((9, 16))
    np.testing.assert_array_equal(distance_matrix(a8, b8, "hamming"),
                                  ((a8 >= 0)[:, None] != (b8 >= 0)[None]).sum(2))


# ------------------------------------------------------------------ mAHP
S3 = np.array([[1.0, 0.5, 0.0],
               [0.5, 1.0, 0.0],
               [0.0, 0.0, 1.0]])


def test_mahp_perfect_ranking_is_k_minus_1_over_k():
    rng = np.random.default_rng(2)
    db_labels = rng.integers(0, 3, 300)
    q_labels = np.array([0, 1, 2, 1])
    # distance = 1 - similarity: items ranked by decreasing similarity (ties: any order is optimal)
    dist = 1.0 - S3[q_labels][:, db_labels]
    for k in (1, 10, 50):
        got = mean_average_hierarchical_precision(dist, q_labels, db_labels, S3, k=k)
        assert got == pytest.approx((k - 1) / k, abs=1e-12)


def test_mahp_hand_computed():
    """One query of class 0, k=3, database labels [2, 1, 0, 0] ranked in that order (distances 0..3).

    sims in rank order: 0, 0.5, 1, (1)        best (sorted sims 1, 1, 0.5, 0): 1, 2, 2.5
    HP@1 = 0/1 = 0, HP@2 = 0.5/2 = 0.25, HP@3 = 1.5/2.5 = 0.6
    AHP@3 = (1/3) * ((0 + 0.25)/2 + (0.25 + 0.6)/2) = (1/3) * 0.55 = 0.18333...
    With the query itself being database row 3 (excluded): best = 1, 1.5, 1.5 (sims 1, 0.5, 0);
    HP = 0, 0.5/1.5, 1.5/1.5 -> AHP@3 = (1/3)((0 + 1/3)/2 + (1/3 + 1)/2) = (1/3)(5/6) = 0.27777...
    """
    dist = np.array([[0.0, 1.0, 2.0, 3.0]])
    got = mean_average_hierarchical_precision(dist, [0], [2, 1, 0, 0], S3, k=3)
    assert got == pytest.approx(0.55 / 3, abs=1e-12)
    got = mean_average_hierarchical_precision(dist, [0], [2, 1, 0, 0], S3, k=3, query_db_index=[3])
    assert got == pytest.approx(5 / 18, abs=1e-12)


def test_mahp_matches_reference_loop_with_queries_in_database():
    rng = np.random.default_rng(3)
    C = 6
    S = rng.uniform(0, 1, (C, C))
    S = (S + S.T) / 2
    np.fill_diagonal(S, 1.0)
    db_labels = rng.integers(0, C, 120)
    codes = pack_codes(rng.standard_normal((120, 16)))
    qi = rng.choice(120, 25, replace=False)
    dist = hamming_distances(codes[qi], codes)  # ties everywhere: tests the (distance, row) order
    got = mean_average_hierarchical_precision(dist, db_labels[qi], db_labels, S, k=20, query_db_index=qi)
    want = np.mean([ref_ahp(dist[i], db_labels[q], db_labels, S, 20, exclude=q) for i, q in enumerate(qi)])
    assert got == pytest.approx(want, abs=1e-12)
    # the same through features + metric, and the ranked form fed with the dense ranking
    assert mean_average_hierarchical_precision((codes[qi], codes), db_labels[qi], db_labels, S, k=20,
                                               query_db_index=qi) == pytest.approx(want, abs=1e-12)


def _random_tie_orders_mc(dist, q_labels, db_labels, S, k, rng, trials, score):
    """Average of ``score`` over rankings with ties broken by a fresh random permutation each time."""
    total = 0.0
    for _ in range(trials):
        perm = rng.permutation(dist.shape[1])
        # ranking by (distance, random key) == ranking by distance of the permuted database, ties by new row
        total += score(dist[:, perm], db_labels[perm])
    return total / trials


def test_mahp_expected_ties_equals_monte_carlo():
    rng = np.random.default_rng(4)
    C, n, bits = 5, 200, 8  # 8-bit codes: distances 0..8, heavy ties
    S = np.eye(C) * 0.6 + 0.4 * rng.uniform(0, 1, (C, C))
    S = (S + S.T) / 2
    db_labels = np.sort(rng.integers(0, C, n))  # sorted: breaking ties by row favours class-0 items
    codes = pack_codes(rng.standard_normal((n, bits)))
    qcodes = pack_codes(rng.standard_normal((6, bits)))
    ql = np.zeros(6, dtype=np.int64)
    dist = hamming_distances(qcodes, codes)
    k = 30
    exact = mean_average_hierarchical_precision(dist, ql, db_labels, S, k=k, ties="expected")
    index = mean_average_hierarchical_precision(dist, ql, db_labels, S, k=k, ties="index")
    mc = _random_tie_orders_mc(dist, ql, db_labels, S, k, rng, 3000, lambda d, lab: mean_average_hierarchical_precision(
        d, ql, lab, S, k=k))
    # MC standard error here is a few 1e-4; the index order differs from the expectation by far more
    assert exact == pytest.approx(mc, abs=1.5e-3)
    assert index - exact > 0.02


def test_ahp_ranked_form_uses_label_counts():
    """From an index: ranked labels + db label counts; query inside the database removes one of its class."""
    ranked = np.array([[0, 1, 2, 0]])
    counts = np.bincount([2, 1, 0, 0, 0], minlength=3)  # the query (class 0) is one of the three 0s
    got = average_hierarchical_precision_ranked(ranked, [0], S3, counts, k=3, query_in_db=True)
    # best (others: 0, 0, 1, 2 -> sims 1, 1, .5, 0): 1, 2, 2.5; sims 1, .5, 0 -> HP 1, .75, .6
    assert got[0] == pytest.approx(((1 + 0.75) / 2 + (0.75 + 0.6) / 2) / 3, abs=1e-12)
    hp = hierarchical_precision_ranked(ranked, [0], S3, counts, k=3, query_in_db=True)
    np.testing.assert_allclose(hp, [[1, 0.75, 0.6]])
    # graded relevance given directly (captions): sims .2, .9, 0 against best .9, 1.1, 1.2; best 0 -> HP 1
    hv = hierarchical_precision_values([[0.2, 0.9, 0.0], [0, 0, 0]], [[0.9, 1.1, 1.2], [0, 0, 0]], 3)
    np.testing.assert_allclose(hv, [[0.2 / 0.9, 1.1 / 1.1, 1.1 / 1.2], [1, 1, 1]])


# ------------------------------------------------------------------ mAP and P@r
def test_map_matches_reference_loop():
    rng = np.random.default_rng(5)
    db_labels = rng.integers(0, 4, 150)
    codes = pack_codes(rng.standard_normal((150, 16)))
    qi = np.arange(0, 150, 7)
    dist = hamming_distances(codes[qi], codes)
    got = mean_average_precision(dist, db_labels[qi], db_labels, k=40, query_db_index=qi)
    want = np.mean([ref_ap(dist[i], db_labels[q], db_labels, 40, exclude=q) for i, q in enumerate(qi)])
    assert got == pytest.approx(want, abs=1e-12)


def test_map_hand_computed_and_no_relevant_counts_zero():
    # relevance 1,0,1 -> (1/1 + 2/3) / 2 = 5/6 ; the second query has nothing relevant -> 0
    dist = np.array([[0, 1, 2], [0, 1, 2]])
    assert average_precision_ranked([[0, 1, 0], [1, 1, 1]], [0, 0], k=3).tolist() == pytest.approx([5 / 6, 0])
    assert mean_average_precision(dist, [0, 3], [0, 1, 0], k=3) == pytest.approx(5 / 12)


def test_map_expected_ties_equals_monte_carlo():
    rng = np.random.default_rng(6)
    n = 120
    db_labels = np.sort(rng.integers(0, 3, n))
    dist = rng.integers(0, 4, (5, n))  # four distance levels: big tie groups, one straddles rank k
    ql = np.array([0, 0, 1, 2, 2])
    k = 45
    exact = mean_average_precision(dist, ql, db_labels, k=k, ties="expected")
    index = mean_average_precision(dist, ql, db_labels, k=k, ties="index")
    mc = _random_tie_orders_mc(dist, ql, db_labels, None, k, rng, 4000,
                               lambda d, lab: mean_average_precision(d, ql, lab, k=k))
    assert exact == pytest.approx(mc, abs=2e-3)  # MC standard error ~5e-4
    assert abs(index - exact) > 0.02


def test_precision_at_radius():
    dist = np.array([[0, 2, 3, 1], [5, 5, 5, 5], [0, 0, 0, 0]])
    # db labels 0,1,1,0. q0 (label 0): within 2 -> rows 0,1,3 -> 2/3; q1 retrieves nothing -> 0;
    # q2 (label 1): all four rows -> 2/4
    got = precision_at_radius(dist, [0, 0, 1], [0, 1, 1, 0], r=2)
    assert got == pytest.approx((2 / 3 + 0 + 2 / 4) / 3)
    got = precision_at_radius(dist[[0, 2]], [0, 1], [0, 1, 1, 0], r=2, query_db_index=[0, 1])
    # q0 is row 0 (excluded): rows 1,3 -> labels 1,0 -> 1/2 ; q2: rows 0,2,3 -> 0,1,0 -> 1/3
    assert got == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="ties"):
        mean_average_precision(np.zeros((1, 3)), [0], [0, 0, 0], k=2, ties="random")
    with pytest.raises(ValueError, match="db_labels"):
        mean_average_precision(np.zeros((1, 3)), [0], [0, 0], k=2)
    with pytest.raises(ValueError, match="uint8"):
        hamming_distances(np.zeros((1, 2), np.int64), np.zeros((1, 2), np.uint8))
