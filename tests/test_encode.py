"""Ray Data encoding of real CIFAR-100 shards -> code shards -> sharded index -> queries, resume, corrupt inputs."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from rayhash.index import ShardedIndex, build_index, read_code_file, read_codes


def tar_samples(path) -> dict[str, bytes]:
    """key -> image bytes of a WebDataset tar, read with tarfile (independent of the data stage)."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            if ext in ("png", "jpg", "jpeg", "webp"):
                out[key] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, data_cifar_small, index_tiny_checkpoint, ray_local):
    from rayhash.encode import encode_dataset

    out = tmp_path_factory.mktemp("encode") / "codes"
    summary = encode_dataset(index_tiny_checkpoint, str(data_cifar_small / "train"), str(out), batch_size=100)
    return out, summary


def test_encode_writes_one_code_shard_per_input_tar(encoded, data_cifar_small, index_tiny_checkpoint):
    from rayhash.model import Encoder

    out, summary = encoded
    tars = sorted((data_cifar_small / "train").glob("*.tar"))
    assert summary["bits"] == 32 and summary["count"] == 1000 and summary["skipped_corrupt"] == 0
    assert summary["timing"]["encoded"] == 1000
    assert json.loads((out / "codes.json").read_text()) == {k: v for k, v in summary.items() if k != "timing"}
    assert [s["file"] for s in summary["shards"]] == [f"codes-{i:05d}.parquet" for i in range(len(tars))]
    encoder = Encoder(index_tiny_checkpoint, device="cpu")
    for i, tar in enumerate(tars):
        samples = tar_samples(tar)
        t = read_code_file(str(out / f"codes-{i:05d}.parquet"))
        assert list(t.keys) == list(samples)  # the tar's samples, in tar order, nothing else
        pick = list(range(0, len(t), 50))
        direct = encoder.encode_images([Image.open(io.BytesIO(samples[t.keys[j]])) for j in pick])[1]
        np.testing.assert_array_equal(t.codes[pick], direct)
    with tarfile.open(tars[0]) as tf:
        cls = {m.name.split(".")[0]: int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls")}
    t0 = read_code_file(str(out / "codes-00000.parquet"))
    assert [cls[k] for k in t0.keys] == t0.labels.tolist()


def test_encode_build_query_round_trip(encoded, data_cifar_small, index_tiny_checkpoint, tmp_path, capsys):
    from rayhash.cli import main

    out, _ = encoded
    index_dir = tmp_path / "index"
    m = build_index(str(out), index_dir, shards=3)
    assert m["checkpoint"] == index_tiny_checkpoint and m["label_names"][0] == "apple"
    samples = tar_samples(sorted((data_cifar_small / "train").glob("*.tar"))[2])
    keys = list(samples)[:4]
    table = read_codes(out)
    with ShardedIndex.open(index_dir, checkpoint=index_tiny_checkpoint) as index:
        queries = index.encode([Image.open(io.BytesIO(samples[k])) for k in keys])
        res = index.search_images([Image.open(io.BytesIO(samples[k])) for k in keys], k=5)
        same = index.range_search(queries, 0)
        for i, key in enumerate(keys):
            own = table.codes[list(table.keys).index(key)]
            at_zero = int((np.unpackbits(own[None] ^ table.codes, axis=1).sum(1) == 0).sum())
            np.testing.assert_array_equal(queries[i], own)
            assert res.distances[i, 0] == 0 and key in set(same[i].keys) and len(same[i].keys) == at_zero
            if at_zero <= 5:
                assert key in set(res.keys[i, :at_zero])  # own key among the distance-0 hits
        # every kind of image the API takes gives the same codes: path, PIL image, uint8 array, raw file bytes
        img = tmp_path / "q.png"
        img.write_bytes(samples[keys[0]])
        pil = Image.open(io.BytesIO(samples[keys[0]])).convert("RGB")
        kinds = index.encode([str(img), pil, np.asarray(pil), samples[keys[0]], bytearray(samples[keys[0]])])
        assert (kinds == queries[0]).all()
        by_bytes = index.search_images([samples[k] for k in keys], k=5)
        np.testing.assert_array_equal(by_bytes.distances, res.distances)
        with pytest.raises(ValueError, match="image 1: array of dtype float64"):
            index.encode([pil, np.zeros((8, 8, 3))])
        # labels come with the dataset's class names
        assert index.label_names[:2] == ["apple", "aquarium_fish"]
        names = res.names()
        assert names.shape == res.labels.shape
        assert names[0, 0] == m["label_names"][res.labels[0, 0]]
        assert same[0].names()[0] == m["label_names"][same[0].labels[0]]
    sheet = tmp_path / "sheet.png"
    assert main(["query", "--index", str(index_dir), "--image", str(img), "--k", "3",
                 "--contact-sheet", str(sheet)]) == 0
    text = capsys.readouterr().out
    first = [line.split() for line in text.splitlines() if line.strip().startswith("1 ")][0]
    assert first[1] == "0" and Image.open(sheet).size[0] > 100


def test_contact_sheet_reads_images_from_the_tars_the_codes_came_from(tmp_path, data_cifar_small,
                                                                     index_tiny_checkpoint, ray_local, capfd, caplog):
    """Codes of raw tars (no dataset folder: img2dataset output) record no split; the contact sheet finds the
    images in the tars named in codes.json, and says what to pass when it cannot."""
    from rayhash.encode import encode_dataset
    from rayhash.index.query import _images_for_keys, image_source, write_contact_sheet

    raw = tmp_path / "raw" / "00000.tar"
    raw.parent.mkdir()
    shutil.copy(sorted((data_cifar_small / "test").glob("*.tar"))[0], raw)
    summary = encode_dataset(index_tiny_checkpoint, [str(raw)], str(tmp_path / "codes"))
    m = build_index(str(tmp_path / "codes"), tmp_path / "index")
    assert summary["data"] is None and m["data"] is None
    assert image_source(m) == [str(raw)]
    with ShardedIndex.open(tmp_path / "index") as index:
        res = index.search(read_codes(tmp_path / "codes").codes[:2], 3)
    hits = {str(k) for k in res.keys.ravel()}
    assert set(_images_for_keys(image_source(m), hits)) == hits
    capfd.readouterr()
    write_contact_sheet(str(tmp_path / "blank.png"), ["a", "b"], res, images=False, data=None)
    assert "pass --data" in capfd.readouterr().err + caplog.text


def test_encode_resumes_only_missing_outputs(encoded, data_cifar_small, index_tiny_checkpoint, tmp_path):
    from rayhash.encode import encode_dataset

    full, summary = encoded
    part = tmp_path / "codes"
    shutil.copytree(full, part)
    os.remove(part / "codes.json")
    os.remove(part / "codes-00001.parquet")  # as if the run was killed before writing these
    os.remove(part / "codes-00003.parquet")
    (part / ".codes-00003.parquet.1a2b3c4d.tmp").write_bytes(b"half-written")
    kept = {n: os.stat(part / n).st_mtime_ns for n in ("codes-00000.parquet", "codes-00002.parquet")}
    again = encode_dataset(index_tiny_checkpoint, str(data_cifar_small / "train"), str(part), batch_size=64)
    assert {n: os.stat(part / n).st_mtime_ns for n in kept} == kept
    assert sorted(os.listdir(part)) == sorted(os.listdir(full))  # stray temp removed, nothing extra
    a, b = read_codes(full), read_codes(part)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(set(b.keys)) == 1000
    assert [s["count"] for s in again["shards"]] == [s["count"] for s in summary["shards"]]
    assert again["timing"]["encoded"] == summary["shards"][1]["count"] + summary["shards"][3]["count"]


def test_encode_counts_and_skips_corrupt_samples(tmp_path, data_cifar_small, index_tiny_checkpoint, ray_local):
    from rayhash.encode import encode_dataset

    src = sorted((data_cifar_small / "test").glob("*.tar"))[-1]
    bad = tmp_path / "bad" / "test-000000.tar"
    bad.parent.mkdir()
    broken = []
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            if m.name.endswith(".png") and len(broken) < 2:
                data, _ = b"\x89PNG garbage" + data[:20], broken.append(m.name.split(".")[0])
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    n = len(tar_samples(src))
    out = tmp_path / "codes"
    summary = encode_dataset(index_tiny_checkpoint, [str(bad)], str(out), batch_size=32)
    assert summary["skipped_corrupt"] == 2 and summary["count"] == n - 2
    keys = set(read_codes(out).keys)
    assert not keys & set(broken) and len(keys) == n - 2


def test_encode_redoes_outputs_of_other_input_bytes(encoded, data_cifar_small, index_tiny_checkpoint, tmp_path):
    """Outputs are keyed on their input tar's sha256: codes of the train split left in --out are not taken for the
    test split's (same file numbers), they are encoded again."""
    from rayhash.encode import encode_dataset

    out, fresh = tmp_path / "codes", tmp_path / "fresh"
    shutil.copytree(encoded[0], out)
    summary = encode_dataset(index_tiny_checkpoint, str(data_cifar_small / "test"), str(out))
    reference = encode_dataset(index_tiny_checkpoint, str(data_cifar_small / "test"), str(fresh))
    assert summary["timing"]["encoded"] == reference["count"] == summary["count"]
    a, b = read_code_file(str(out / "codes-00000.parquet")), read_code_file(str(fresh / "codes-00000.parquet"))
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.codes, b.codes)


def _retrain_in_place(run: str) -> None:
    """New weights at the same checkpoint path, as retraining into the same --out does."""
    import torch

    from rayhash.model import checkpoint_dir

    path = checkpoint_dir(run).model
    state = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(7)
    torch.save({k: (v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                for k, v in state.items()}, path)


def test_encode_after_retraining_at_the_same_path_redoes_everything(encoded, data_cifar_small,
                                                                      index_tiny_checkpoint, tmp_path):
    from rayhash.encode import encode_dataset
    from rayhash.model import Encoder

    run = tmp_path / "run"
    shutil.copytree(index_tiny_checkpoint, run)
    out = tmp_path / "codes"
    shutil.copytree(encoded[0], out)
    old = read_codes(out)
    _retrain_in_place(str(run))
    again = encode_dataset(str(run), str(data_cifar_small / "train"), str(out), batch_size=100)
    assert again["timing"]["encoded"] == encoded[1]["count"]  # every shard redone, none kept
    assert again["model_sha256"] != encoded[1]["model_sha256"]
    new = read_codes(out)
    np.testing.assert_array_equal(new.keys, old.keys)
    assert (new.codes != old.codes).any()
    # every code now comes from the new weights: compare with the encoder run directly on the images
    src = sorted((data_cifar_small / "train").glob("*.tar"))[0]
    images = tar_samples(src)
    first = read_code_file(str(out / "codes-00000.parquet"))
    direct = Encoder(str(run)).encode_images([Image.open(io.BytesIO(images[k])) for k in first.keys[:16]])[1]
    np.testing.assert_array_equal(first.codes[:16], direct)


def test_index_append_refuses_codes_of_another_checkpoint(encoded, data_cifar_small, index_tiny_checkpoint,
                                                          tmp_path):
    from rayhash.encode import encode_dataset

    index = tmp_path / "index"
    build_index(str(encoded[0]), str(index), shards=1)
    run = tmp_path / "run"
    shutil.copytree(index_tiny_checkpoint, run)
    _retrain_in_place(str(run))
    codes = tmp_path / "codes"
    summary = encode_dataset(str(run), str(data_cifar_small / "test"), str(codes))
    before = (index / "manifest.json").read_bytes()
    with pytest.raises(ValueError) as e:
        build_index(str(codes), str(index), append=True)
    msg = str(e.value)
    assert str(run) in msg and str(index_tiny_checkpoint) in msg
    assert summary["model_sha256"][:12] in msg and encoded[1]["model_sha256"][:12] in msg
    assert (index / "manifest.json").read_bytes() == before  # the index is untouched


def test_encode_killed_midway_then_rerun_matches(encoded, data_cifar_small, index_tiny_checkpoint, tmp_path):
    """A real encode driver process (attached to the session's Ray) dies abruptly right after its first output."""
    import subprocess
    import sys

    import ray

    from rayhash.encode import encode_dataset

    out = tmp_path / "codes"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAYHASH_PROGRESS": "0"}
    script = ("import sys; from rayhash import testing; from rayhash.encode import encode_dataset; "
              "encode_dataset(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=8, concurrency=1, "
              "hooks=testing.hooks(crash_after_output=1))")
    proc = subprocess.run([sys.executable, "-c", script, index_tiny_checkpoint, str(data_cifar_small / "train"),
                           str(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    done = sorted(p.name for p in out.glob("codes-*.parquet"))
    assert done == ["codes-00000.parquet"]  # one finished output; the other three tars never written
    assert not (out / "codes.json").exists()
    kept = {n: os.stat(out / n).st_mtime_ns for n in done}
    again = encode_dataset(index_tiny_checkpoint, str(data_cifar_small / "train"), str(out), batch_size=64)
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept
    assert again["timing"]["encoded"] == sum(s["count"] for s in again["shards"] if s["file"] not in kept)
    a, b = read_codes(encoded[0]), read_codes(out)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in encoded[0].iterdir())


def test_encode_refuses_cpu_actors_that_starve_the_reader(data_cifar_small, index_tiny_checkpoint, tmp_path,
                                                          ray_local):
    """As many CPU encoder actors as the instance has CPUs would leave none for reading shards: a clear error
    naming the setting instead of a pipeline that waits forever."""
    import ray

    from rayhash.encode import encode_dataset

    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(ValueError, match="encode concurrency.*lower --concurrency"):
        encode_dataset(index_tiny_checkpoint, str(data_cifar_small / "test"), str(tmp_path / "c"), concurrency=cpus)
    assert not list((tmp_path / "c").glob("*.parquet"))
