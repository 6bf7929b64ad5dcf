"""The index's Python API and files against what users pass: numpy integers, wrong types, sizes past the index,
manifests with missing or wrongly-typed fields, parameters out of range, empty codes and hostile keys. Each case
gets its correct result or a clear error naming the argument / file and field and the fix."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_index import brute_distances, index_write_code_dir

from rayhash.index import ShardedIndex, build_index, write_codes


@pytest.fixture(scope="module")
def small_indices(tmp_path_factory, ray_local):
    """{type: index dir} over 600 random 16-bit codes (3 shards each), with their keys and codes."""
    rng = np.random.default_rng(5)
    n = 600
    codes = np.packbits(rng.random((n, 16)) < 0.3, axis=1)
    keys = np.array([f"k{i:04d}" for i in rng.permutation(n)], dtype=object)
    labels = rng.integers(0, 5, n).astype(np.int32)
    root = tmp_path_factory.mktemp("api")
    src = index_write_code_dir(root / "codes", keys, codes, labels)
    out = {}
    for t in ("flat", "hash", "multihash", "ivf", "mih"):
        out[t] = str(root / t)
        build_index(src, out[t], index_type=t, shards=3)
    return out, keys, codes


@pytest.mark.parametrize("index_type", ["flat", "hash", "multihash", "ivf", "mih"])
def test_numpy_integers_equal_python_ints(small_indices, index_type):
    paths, _, codes = small_indices
    q = codes[:7]
    with ShardedIndex.open(paths[index_type]) as index:
        for k_np in (np.int64(5), np.int32(5), np.uint8(5)):
            a, b = index.search(q, 5), index.search(q, k_np)
            np.testing.assert_array_equal(a.distances, b.distances)
            np.testing.assert_array_equal(a.keys, b.keys)
        ra, rb = index.range_search(q, 3), index.range_search(q, np.int64(3))
        np.testing.assert_array_equal(ra.lims, rb.lims)
        np.testing.assert_array_equal(ra.keys, rb.keys)


@pytest.mark.parametrize("value", [True, 2.5, "5", None, 0, -3])
def test_bad_k_and_radius_are_refused_naming_the_argument(small_indices, value):
    paths, _, codes = small_indices
    with ShardedIndex.open(paths["flat"]) as index:
        with pytest.raises(ValueError, match=r"^k = .* must be an integer|^k = .* out of range"):
            index.search(codes[:2], value)
        with pytest.raises(ValueError, match="^k = "):
            index.search_images([], value)  # checked before any image is encoded
        if value != 0:
            with pytest.raises(ValueError, match=r"^radius = "):
                index.range_search(codes[:2], value)


def test_k_past_the_index_size_returns_every_code_not_k_columns(small_indices):
    paths, keys, codes = small_indices
    q = codes[:3]
    with ShardedIndex.open(paths["mih"]) as index:
        res = index.search(q, 10 ** 6)
        rr = index.range_search(q, 10 ** 12)  # past the code width: every code
    assert res.distances.shape == (3, len(codes)) and (res.distances >= 0).all()
    want = np.sort(brute_distances(q, codes), axis=1)
    np.testing.assert_array_equal(res.distances, want)
    assert (np.diff(rr.lims) == len(codes)).all()


def test_a_single_path_string_is_not_taken_for_a_list_of_images(small_indices):
    paths, _, _ = small_indices
    with ShardedIndex.open(paths["flat"]) as index, pytest.raises(ValueError, match="wrap a single image in a list"):
        index.encode("query.jpg")


def _edit_manifest(path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["shards"][0].pop("index_sha256"), "'index_sha256' is missing"),
    (lambda m: m.update(params=None), "'params' is missing"),
    (lambda m: m.update(bits="16"), "'bits' = '16'"),
    (lambda m: m.update(ntotal=5), "'ntotal' = 5"),
    (lambda m: m["shards"][1].update(count="200"), "'count' = '200'"),
    (lambda m: m.update(params={"nflip": 10 ** 10, "hash_bits": 16}), "'nflip' = 10000000000 is out of range"),
    (lambda m: m.update(params={"nflip": 2, "hash_bits": "abc"}), "'hash_bits' = 'abc'"),
    (lambda m: m.update(format_version=99), "format_version 99 is newer"),
])
def test_manifest_fields_missing_or_of_the_wrong_type_are_refused_naming_file_field_and_fix(
        tmp_path, small_indices, edit, field):
    import shutil

    paths, _, _ = small_indices
    copy = tmp_path / "idx"
    shutil.copytree(paths["hash"], copy)
    _edit_manifest(copy, edit)
    with pytest.raises(ValueError) as e:
        ShardedIndex.open(copy)
    assert "manifest.json" in str(e.value) and field in str(e.value), str(e.value)
    assert "rebuild the index" in str(e.value) or "upgrade rayhash" in str(e.value)


@pytest.mark.parametrize("index_type, params, name", [("hash", {"nflip": 10 ** 10}, "'nflip' = 10000000000"),
                                                      ("ivf", {"nprobe": -5}, "'nprobe' = -5"),
                                                      ("mih", {"nhash": "abc"}, "'nhash' = 'abc'"),
                                                      ("ivf", {"nprobe": 2.5}, "'nprobe' = 2.5")])
def test_parameters_out_of_range_are_refused_before_faiss(small_indices, tmp_path, index_type, params, name):
    paths, _, _ = small_indices
    with pytest.raises(ValueError, match=f"ShardedIndex.open.*parameter {name}"):
        ShardedIndex.open(paths[index_type], **params)
    with pytest.raises(ValueError, match=f"parameter {name}"):
        build_index(paths[index_type] + "/../codes", tmp_path / "never", index_type=index_type, **params)
    assert not (tmp_path / "never" / "manifest.json").exists()


def test_empty_codes_are_refused_before_anything_is_written(tmp_path, ray_local):
    write_codes(str(tmp_path / "codes" / "codes-00000.parquet"), [], np.zeros((0, 2), np.uint8), [])
    with pytest.raises(ValueError, match="hold no rows; nothing to index"):
        build_index(tmp_path / "codes", tmp_path / "index", index_type="mih", shards=4)
    assert not list((tmp_path / "index").glob("shard-*")) and not (tmp_path / "index" / "manifest.json").exists()


@pytest.mark.parametrize("bad, message", [(["k000", "k000\x00"], "row 1 has key 'k000\\\\x00'"),
                                          (["", "k001"], "row 0 has key ''"),
                                          (["k000", "k000"], "key 'k000' occurs 2 times")])
def test_keys_that_would_collide_or_are_empty_are_refused_naming_the_row(tmp_path, ray_local, bad, message):
    codes = np.arange(4, dtype=np.uint8).reshape(2, 2)
    write_codes(str(tmp_path / "codes" / "codes-00000.parquet"), bad, codes, [0, 1])
    with pytest.raises(ValueError, match=message):
        build_index(tmp_path / "codes", tmp_path / "index")
    assert not (tmp_path / "index" / "manifest.json").exists()


def test_checkpoint_meta_of_the_wrong_type_is_refused_naming_the_field(tmp_path):
    from rayhash.layout import CheckpointDir

    ckpt = CheckpointDir(str(tmp_path))
    (tmp_path / "meta.json").write_text(json.dumps({"num_classes": "ten", "epoch": 3}))
    with pytest.raises(ValueError, match="meta.json.*'num_classes' = 'ten'.*train it again"):
        ckpt.read_meta()
    (tmp_path / "meta.json").write_text(json.dumps({"num_classes": 10, "epoch": 3}))
    meta = ckpt.read_meta()
    assert meta.num_classes == 10 and meta["epoch"] == 3 and meta.label_names is None


def test_padded_adds_missing_hit_slots(small_indices):
    paths, _, codes = small_indices
    with ShardedIndex.open(paths["flat"]) as index:
        res = index.search(codes[:2], 700).padded(705)
    assert res.distances.shape == (2, 705) and (res.distances[:, 600:] == -1).all()
    assert all(k is None for k in res.keys[:, 600:].ravel()) and (res.labels[:, 600:] == -1).all()
