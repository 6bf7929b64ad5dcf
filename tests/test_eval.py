"""Evaluation numbers from a real sharded FAISS index equal a naive, loop-based computation of the definitions."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures_index import index_random_table, index_write_code_dir

K, MAP_K, RADIUS = 20, 60, 2


def _hand_hierarchy():
    """10 leaves under 3 inner nodes: root -> {A: 0-3, B: 4-6 -> {B1: 4,5}, C: 7-9}."""
    from rayhash.semantics import ClassHierarchy

    import tempfile, os  # noqa: E401
    edges = ["root A", "root B", "root C", "B B1"] + [f"A {i}" for i in range(4)] + ["B1 4", "B1 5", "B 6"] + \
        [f"C {i}" for i in range(7, 10)]
    path = os.path.join(tempfile.mkdtemp(), "h.txt")
    with open(path, "w") as f:
        f.write("\n".join(edges) + "\n")
    return ClassHierarchy.from_parent_child_file(path).similarity_matrix([str(i) for i in range(10)])


def _naive(q_codes, q_keys, q_labels, db_codes, db_keys, db_labels, S):
    """Direct transcription of the definitions, one query at a time, bits compared one by one."""
    qb, db = np.unpackbits(q_codes, axis=1), np.unpackbits(db_codes, axis=1)
    out = {"ahp": [], "ahp_exp": [], "ap": [], "pr": []}
    for i in range(len(q_codes)):
        d = np.array([int((qb[i] != db[j]).sum()) for j in range(len(db))])
        cand = [j for j in range(len(db)) if db_keys[j] != q_keys[i]]
        order = sorted(cand, key=lambda j: (d[j], db_keys[j]))
        sims = np.array([S[q_labels[i], db_labels[j]] for j in order])
        best = np.cumsum(np.sort(sims)[::-1])[:K]
        hp = np.cumsum(sims[:K]) / best
        out["ahp"].append((hp.sum() - (hp[0] + hp[-1]) / 2) / K)
        # expected over random tie orders: a place in a tie group holds the group's mean similarity
        dist = np.array([d[j] for j in order])
        exp_sims = np.array([sims[dist == dist[p]].mean() for p in range(K)])
        hpe = np.cumsum(exp_sims) / best
        out["ahp_exp"].append((hpe.sum() - (hpe[0] + hpe[-1]) / 2) / K)
        rel = np.array([db_labels[j] == q_labels[i] for j in order[:MAP_K]], float)
        prec = np.cumsum(rel) / np.arange(1, MAP_K + 1)
        out["ap"].append((prec * rel).sum() / rel.sum() if rel.sum() else 0.0)
        within = [j for j in order if d[j] <= RADIUS]
        out["pr"].append(np.mean([db_labels[j] == q_labels[i] for j in within]) if within else 0.0)
    return {name: np.array(v) for name, v in out.items()}


@pytest.mark.parametrize("shards", [1, 3])
def test_hierarchy_metrics_equal_naive_computation(tmp_path, ray_local, shards):
    from rayhash.eval import hierarchy_metrics
    from rayhash.index import CodeTable, ShardedIndex, build_index

    S = _hand_hierarchy()
    keys, codes, labels = index_random_table(n=400, bits=16, seed=3)
    build_index(index_write_code_dir(tmp_path / "codes", keys, codes, labels), str(tmp_path / "idx"),
                shards=shards)
    ext_keys, ext_codes, ext_labels = index_random_table(n=15, bits=16, seed=4)
    sel = np.arange(0, 400, 27)  # 15 queries that are database members (self excluded) + 15 outside it
    q = CodeTable(np.concatenate([keys[sel], np.array([f"q-{k}" for k in ext_keys], object)]),
                  np.concatenate([codes[sel], ext_codes]), np.concatenate([labels[sel], ext_labels]), 16)
    with ShardedIndex.open(str(tmp_path / "idx")) as idx:
        metrics, per_query = hierarchy_metrics(idx, q, S, k=K, map_k=MAP_K, radius=RADIUS)
    ref = _naive(q.codes, q.keys, q.labels, codes, keys, labels, S)
    np.testing.assert_allclose(per_query[f"AHP@{K}"], ref["ahp"], rtol=1e-6)
    np.testing.assert_allclose(per_query[f"AHP@{K}_expected"], ref["ahp_exp"], rtol=1e-6)
    np.testing.assert_allclose(per_query[f"AP@{MAP_K}"], ref["ap"], rtol=1e-6)
    np.testing.assert_allclose(per_query[f"P@r{RADIUS}"], ref["pr"], rtol=1e-6)
    assert metrics[f"mAHP@{K}"] == pytest.approx(ref["ahp"].mean())
    assert not np.allclose(ref["ahp"], ref["ahp_exp"])  # the case really has ties that matter


@pytest.mark.slow
def test_caption_targets_on_flickr8k_end_to_end(tmp_path, ray_local):
    """Flickr8k captions -> shards -> caption embeddings -> training on caption targets -> index -> eval, and the
    caption mAHP equals a naive computation from the written codes and embeddings."""
    from conftest import shared
    from rayhash.data.stream import load_caption_embeddings
    from rayhash.index import read_codes
    from rayhash.pipeline import run_pipeline

    captions = shared("flickr8k-1k/captions.txt")
    out = tmp_path / "cap"
    metrics = run_pipeline(str(out), dataset="captions", source=str(captions), config="conceptual_captions",
                           limit=300, index_shards=2,
                           overrides=["model.backbone=tiny_cnn", "model.width=8", "model.bits=16",
                                      "data.image_size=32", "train.epochs=1", "train.batch_size=32", "loss.k=4",
                                      "train.num_workers=1", "train.cpus_per_worker=1",
                                      "data.shuffle_buffer=64"])
    assert metrics["targets"] == "captions"
    q, db = read_codes(out / "eval" / "query_codes"), read_codes(out / "codes")
    keys, emb = load_caption_embeddings(str(out / "data" / "caption_embeddings.parquet"))
    row = {key: i for i, key in enumerate(keys)}
    k = min(250, len(db))
    qb, dbb = np.unpackbits(q.codes, axis=1), np.unpackbits(db.codes, axis=1)
    ahps = []
    for i in range(len(q)):
        d = (qb[i][None, :] != dbb).sum(axis=1)
        order = sorted(range(len(db)), key=lambda j: (d[j], db.keys[j]))
        sims = np.array([max(0.0, float(emb[row[q.keys[i]]] @ emb[row[db.keys[j]]])) for j in order])
        hp = np.cumsum(sims[:k]) / np.cumsum(np.sort(sims)[::-1][:k])
        ahps.append((hp.sum() - (hp[0] + hp[-1]) / 2) / k)
    assert metrics[f"mAHP@{k}"] == pytest.approx(np.mean(ahps), rel=1e-6)
    assert 0 < metrics[f"mAHP@{k}"] < 1
