"""Data stage: real CIFAR-100 / synthetic shards round-tripped through Ray Data; dataset.json; hierarchy targets."""
from __future__ import annotations

import hashlib
import json
import pickle
import tarfile

import numpy as np
from conftest import shared

from rayhash.data import load_dataset_info, read_shards


def _cifar_pickles():
    src = shared("cifar-100-python.tar.gz")
    out = {}
    with tarfile.open(src) as tar:
        for m in tar.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if name in ("train", "test", "meta"):
                out[name] = pickle.load(tar.extractfile(m), encoding="latin1")
    return out


def test_cifar_round_trip_exact_pixels_labels_counts(data_cifar_small):
    ref = _cifar_pickles()
    info = load_dataset_info(data_cifar_small)
    assert info.name == "cifar100" and info.kind == "labels" and info.hierarchy == "cifar100"
    assert info.label_names == ref["meta"]["fine_label_names"]
    for split, per_class in (("train", 10), ("test", 3)):
        d = ref[split]
        fine = np.asarray(d["fine_labels"])
        expected = np.sort(np.concatenate([np.flatnonzero(fine == c)[:per_class] for c in range(100)]))
        assert info.count(split) == len(expected) == 100 * per_class
        assert sum(s["count"] for s in info.splits[split]["shards"]) == info.count(split)
        for s in info.splits[split]["shards"]:  # recorded checksums are those of the files
            assert hashlib.sha256((data_cifar_small / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        rows = read_shards(str(data_cifar_small / split), mode="raw").take_all()
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)) == len(expected)  # each sample exactly once
        idx = np.array([int(k.split("-")[1]) for k in keys])
        assert sorted(idx.tolist()) == expected.tolist()
        images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        got = np.stack([r["image"] for r in rows])
        assert got.dtype == np.uint8 and got.shape == (len(rows), 32, 32, 3)
        np.testing.assert_array_equal(got, images[idx])
        np.testing.assert_array_equal([r["label"] for r in rows], fine[idx])


def test_cifar_eval_mode_is_uint8_chw_exact_pixels(data_cifar_small):
    raw = {r["key"]: r["image"] for r in read_shards(str(data_cifar_small / "test"), mode="raw").take_all()}
    rows = read_shards(str(data_cifar_small / "test"), mode="eval").take(50)
    for r in rows:  # uint8 through the object store (the network normalises on its device)
        assert r["image"].dtype == np.uint8 and r["image"].shape == (3, 32, 32)
        np.testing.assert_array_equal(r["image"].transpose(1, 2, 0), raw[r["key"]])
    train = read_shards(str(data_cifar_small / "test"), mode="train", image_size=24, shuffle=True).take(40)
    assert {r["image"].shape for r in train} == {(3, 24, 24)}
    assert len({r["key"] for r in train}) == 40


def test_cifar_json_metadata_and_similarity(data_cifar_small):
    info = load_dataset_info(data_cifar_small)
    shard = data_cifar_small / info.splits["train"]["shards"][0]["file"]
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        first = json.loads(tar.extractfile(names[names.index(next(n for n in names if n.endswith(".json")))]).read())
        members = tar.getmembers()
    assert {m.mtime for m in members} == {0} and {m.uid for m in members} == {0}
    assert first["label"] in info.label_names and "coarse_label_name" in first and first["source"].endswith(".png")
    S = info.similarity_matrix()
    assert S.shape == (100, 100) and S.dtype == np.float32
    np.testing.assert_allclose(np.diag(S), 1.0)
    names = info.label_names
    # Barz & Denzler hierarchy: apple/pear are siblings (fruit), apple/tractor meet much higher up.
    a, p, t = names.index("apple"), names.index("pear"), names.index("tractor")
    assert S[a, p] > S[a, t] >= 0


def test_synthetic_hierarchy_and_labels(data_synthetic_small):
    info = load_dataset_info(data_synthetic_small)
    assert info.num_classes == 16 and info.count("train") == 480 and info.count("test") == 160
    S = info.similarity_matrix()
    # leaves share a parent iff same colour (superclass): LCS height 1 of max 2 -> 0.5; else root -> 0
    sup = np.arange(16) // 4
    expected = np.where(sup[:, None] == sup[None, :], 0.5, 0.0)
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_allclose(S, expected)
    rows = read_shards(str(data_synthetic_small / "train"), mode="raw").take_all()
    assert np.bincount([r["label"] for r in rows], minlength=16).tolist() == [30] * 16
    # the superclass is visible: mean background colour separates superclasses
    img = np.stack([r["image"] for r in rows]).astype(np.float32)
    corner = img[:, :4, :4].reshape(len(rows), -1, 3).mean(1)
    lab_sup = np.array([r["label"] for r in rows]) // 4
    centroids = np.stack([corner[lab_sup == s].mean(0) for s in range(4)])
    nearest = np.argmin(((corner[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == lab_sup).mean() > 0.95


def test_sample_is_a_key_hash_subset_spread_over_every_class(data_cifar_small):
    """``read_shards(sample=f)`` keeps exactly the keys whose crc32 / 2^32 < f (an independent computation), so a
    validation subset covers the split's classes where ``limit`` takes the first rows of class-ordered shards."""
    import zlib

    split = str(data_cifar_small / "test")
    rows = read_shards(split, mode="raw").take_all()
    want = sorted(r["key"] for r in rows if zlib.crc32(r["key"].encode()) / 2**32 < 0.25)
    got = read_shards(split, mode="eval", sample=0.25).take_all()
    assert sorted(r["key"] for r in got) == want and 0 < len(want) < len(rows)
    labels = {r["key"]: r["label"] for r in rows}
    ordered = sorted(rows, key=lambda r: (r["label"], r["key"]))  # as an ImageNet folder's shards are written
    first = {r["label"] for r in ordered[:len(want)]}
    sampled = {labels[k] for k in want}
    assert len(sampled) > len(first)  # the sample reaches more classes than the first rows of class-ordered data
