"""Hostile inputs and faults, one case per test: each states what must happen (a clear error naming the file,
field or key and the fix; or the bad record skipped and counted and the job going on)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from rayhash.data import read_shards, skip_counts


def _png(arr_or_img) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, samples: list[dict]) -> str:
    """A WebDataset shard written by webdataset's own writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def _good(key: str, label: int = 0) -> dict:
    return {"__key__": key, "png": _png(np.full((8, 8, 3), 7 * label, np.uint8)), "cls": str(label).encode()}


def test_skip_counter_is_per_job_and_survives_another_job_ending(tmp_path, ray_local):
    """Each Ray job on a cluster counts its own skips: another job neither sees this job's count nor adds to it,
    and this job never depends on a counter that another job owns (with one named actor for the whole cluster,
    the owner's exit broke the next job's first corrupt sample with ActorDiedError)."""
    shard = _tar(tmp_path / "s" / "s-000000.tar",
                 [_good("ok0"), {"__key__": "junk", "png": b"not an image", "cls": b"0"}, _good("ok1")])
    before = skip_counts()["skipped"]
    rows = read_shards(shard, mode="raw").take_all()  # this job makes (and owns) its counter first
    assert sorted(r["key"] for r in rows) == ["ok0", "ok1"]
    assert skip_counts()["skipped"] == before + 1

    address = ray_local.get_runtime_context().gcs_address
    other = textwrap.dedent(f"""
        import ray
        ray.init(address={address!r}, log_to_driver=False)
        from rayhash.data import read_shards, skip_counts
        rows = read_shards({shard!r}, mode="raw").take_all()
        c = skip_counts()
        assert len(rows) == 2 and c["skipped"] == 1, (len(rows), c)  # its own skip only
        print("OTHER-JOB-OK")
    """)
    env = dict(os.environ, RAYHASH_PROGRESS="0")
    done = subprocess.run([sys.executable, "-c", other], env=env, capture_output=True, text=True, timeout=600)
    assert "OTHER-JOB-OK" in done.stdout, done.stderr[-3000:]

    after = skip_counts()  # the other job's skip is not in this job's count
    assert after["skipped"] == before + 1
    assert any(e["key"] == "junk" and e["reason"] == "undecodable image" for e in after["examples"])


def test_skip_counter_outlives_the_dataset_that_made_it(tmp_path, ray_local):
    """The job's counter stays while the job runs, after every dataset holding it is gone: Ray destroys a
    non-detached actor once its last handle drops, and the next pipeline that found it by name then died on its
    first skipped sample with ``ActorDiedError`` (a CI failure under load). Its count is kept too."""
    import gc
    import time

    shard = _tar(tmp_path / "s" / "s-000000.tar", [_good("ok0"), {"__key__": "junk", "png": b"nope", "cls": b"0"}])
    before = skip_counts()["skipped"]
    ds = read_shards(shard, mode="raw")
    assert [r["key"] for r in ds.take_all()] == ["ok0"]
    del ds
    gc.collect()
    for _ in range(20):  # Ray takes an actor down asynchronously after its last handle goes: give it the time
        assert skip_counts()["skipped"] == before + 1
        time.sleep(0.5)
    assert [r["key"] for r in read_shards(shard, mode="raw").take_all()] == ["ok0"]  # a new pipeline counts on
    assert skip_counts()["skipped"] == before + 2


def test_label_out_of_range_or_not_a_number_is_skipped_and_counted(tmp_path, ray_local):
    """A ``cls`` past the classifier (or below -1, or not an integer) never reaches the loss (an IndexError on
    CPU, a device assert on GPU): the sample is skipped and counted by reason, the rest of the shard goes on."""
    shard = _tar(tmp_path / "s" / "s-000000.tar",
                 [_good("ok0", 0), {**_good("big", 0), "cls": b"3"}, {**_good("neg", 0), "cls": b"-5"},
                  {**_good("nan", 0), "cls": b"two"}, _good("ok1", 2), {**_good("unlabelled", 0), "cls": b""}])
    before = skip_counts()["by_reason"]
    rows = read_shards(shard, mode="raw", num_classes=3).take_all()
    assert sorted((r["key"], r["label"]) for r in rows) == [("ok0", 0), ("ok1", 2), ("unlabelled", -1)]
    after = skip_counts()["by_reason"]
    assert after.get("cls out of range", 0) - before.get("cls out of range", 0) == 2
    assert after.get("bad cls label", 0) - before.get("bad cls label", 0) == 1


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the code a hostile checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_resume_state_holding_a_pickle_payload_is_refused_and_never_run(tmp_path):
    import torch

    from rayhash.config import RunConfig
    from rayhash.train import build_training, load_train_state, save_train_state

    cfg = RunConfig.model_validate({"model": {"backbone": "tiny_cnn", "bits": 16, "width": 4}})
    model, opt, sched, _ = build_training(cfg, 3, 10)
    save_train_state(str(tmp_path), model, opt, sched, cfg, {"num_classes": 3}, {"epoch": 0, "step": 3})
    load_train_state(str(tmp_path), model, opt, sched)  # rayhash's own state loads under weights_only
    marker = tmp_path / "payload-ran"
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, tmp_path / "train_state.pt")
    try:
        load_train_state(str(tmp_path), model, opt, sched)
        raise AssertionError("a checkpoint with a pickle payload was loaded")
    except ValueError as e:
        assert "train_state.pt" in str(e) and "train afresh" in str(e)
    assert not marker.exists()


@pytest.mark.parametrize("argv, option, rule", [
    (["data", "convert", "synthetic", "--out", "DS", "--shard-size", "0"], "--shard-size", "at least 1"),
    (["data", "convert", "cifar100", "SRC", "--out", "DS", "--limit", "-1"], "--limit", "at least 1"),
    (["data", "convert", "captions", "SRC", "--out", "DS", "--val-fraction", "1.0"], "--val-fraction", "below 1"),
    (["data", "convert", "captions", "SRC", "--out", "DS", "--val-fraction", "-0.1"], "--val-fraction", "at least 0"),
    (["data", "convert", "synthetic", "--out", "DS", "--per-class", "5", "0"], "--per-class", "at least 1"),
    (["index", "build", "--codes", "C", "--out", "I", "--hash-bits", "0"], "--hash-bits", "at least 1"),
    (["index", "build", "--codes", "C", "--out", "I", "--shards", "0"], "--shards", "at least 1"),
    (["index", "build", "--codes", "C", "--out", "I", "--nflip", "-1"], "--nflip", "0 or more"),
    (["query", "--index", "I", "--key", "a", "--k", "0"], "--k", "at least 1"),
    (["encode", "--checkpoint", "R", "--data", "D", "--out", "C", "--batch-size", "0"], "--batch-size", "at least 1"),
    (["encode", "--checkpoint", "R", "--data", "D", "--out", "C", "--num-gpus", "-1"], "--num-gpus", "0 or more"),
    (["eval", "--index", "I", "--queries", "Q", "--out", "E", "--k", "ten"], "--k", "not an integer"),
    (["eval", "--index", "I", "--queries", "Q", "--out", "E", "--radius", "-2"], "--radius", "0 or more"),
    (["pipeline", "--index-shards", "0"], "--index-shards", "at least 1"),
])
def test_cli_numbers_out_of_range_are_refused_naming_the_option(argv, option, rule, capsys):
    from rayhash.cli import main

    try:
        main(argv)
        raise AssertionError(f"{argv} was accepted")
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and rule in err, err


def _encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _palette_image(grey: int) -> Image.Image:
    img = Image.fromarray(np.full((4, 4), 3, np.uint8), "P")
    img.putpalette([0, 0, 0] * 3 + [grey] * 3 + [0, 0, 0] * 252)
    return img


@pytest.mark.parametrize("mode, make, expect", [
    ("1", lambda: Image.fromarray(np.ones((4, 4), bool)), 255),
    ("L", lambda: Image.fromarray(np.full((4, 4), 77, np.uint8)), 77),
    ("LA", lambda: Image.fromarray(np.dstack([np.full((4, 4), 77, np.uint8), np.full((4, 4), 255, np.uint8)]), "LA"),
     77),
    ("P", lambda: _palette_image(77), 77),
    ("RGBA half transparent over white", lambda: Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8),
                                                                           np.full((4, 4), 128, np.uint8)])),
     round(255 * 127 / 255)),
    ("CMYK", lambda: Image.fromarray(np.full((4, 4, 3), 77, np.uint8)).convert("CMYK"), 77),
    ("I;16 at 40000", lambda: Image.fromarray(np.full((4, 4), 40000, np.uint16)), round(40000 * 255 / 65535)),
    ("I at 40000", lambda: Image.fromarray(np.full((4, 4), 40000, np.int32), "I"), round(40000 * 255 / 65535)),
    ("I at 77", lambda: Image.fromarray(np.full((4, 4), 77, np.int32), "I"), 77),
    ("F at 0.5", lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), 128),
])
def test_every_image_mode_decodes_to_scaled_rgb(mode, make, expect):
    """16-bit values are scaled (40000 -> 156, not clipped to white), float [0, 1] by 255 (0.5 -> 128, not black)."""
    from rayhash.data import decode_image

    img = make()
    fmt = "TIFF" if img.mode in ("F", "I", "CMYK") else "PNG"
    out = np.asarray(decode_image(_encoded(img, fmt)))
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - expect).max() <= 1, (mode, out[0, 0])


def test_exif_orientation_is_applied():
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90° clockwise to view) decodes upright."""
    from rayhash.data import decode_image

    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:10, :10] = (255, 0, 0)  # top-left red block, as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    out = np.asarray(decode_image(_encoded(Image.fromarray(arr), "PNG", exif=exif.tobytes())))
    assert out.shape == (30, 20, 3)  # width and height swapped
    assert np.array_equal(out, np.rot90(arr, -1))  # turned 90° clockwise: the red block is now top-right


def test_image_over_the_pixel_limit_is_refused_from_its_header(monkeypatch):
    from rayhash.data import decode_image

    monkeypatch.setenv("RAYHASH_MAX_IMAGE_PIXELS", "1000000")
    data = _encoded(Image.new("L", (2000, 1000)))  # 2 megapixels in ~2 KB
    try:
        decode_image(data)
        raise AssertionError("an image over the pixel limit was decoded")
    except ValueError as e:
        assert "2000x1000" in str(e) and "RAYHASH_MAX_IMAGE_PIXELS" in str(e)
    monkeypatch.setenv("RAYHASH_MAX_IMAGE_PIXELS", "3000000")
    assert decode_image(data).size == (2000, 1000)


def test_decompression_bomb_in_a_shard_is_skipped_and_counted(tmp_path, ray_local):
    """PIL's own bomb guard (over 2 x its MAX_IMAGE_PIXELS, ~179 MP) fires on the header: a 20000 x 20000 PNG of
    a few hundred KB is skipped as undecodable, never decoded (400 MP, 1.2 GB as RGB)."""
    bomb = _png(Image.new("1", (20000, 20000)))
    assert len(bomb) < 1_000_000
    shard = _tar(tmp_path / "s" / "s-000000.tar", [_good("ok0"), {"__key__": "bomb", "png": bomb, "cls": b"0"}])
    before = skip_counts()["by_reason"].get("undecodable image", 0)
    rows = read_shards(shard, mode="train", image_size=32).take_all()
    assert [r["key"] for r in rows] == ["ok0"]
    assert skip_counts()["by_reason"]["undecodable image"] == before + 1


def test_extreme_aspect_ratio_decodes_under_bounded_memory():
    """A 122-byte 1x20000 PNG through the 224-px transforms: resizing its short side to 224 would make a 3-GB image;
    only the part the crop keeps is resized (peak memory measured in a fresh process)."""
    code = textwrap.dedent("""
        import io, resource
        import numpy as np
        from PIL import Image
        from rayhash.data.images import decode_image, eval_array, raw_array, train_array
        buf = io.BytesIO(); Image.new("L", (1, 20000)).save(buf, format="PNG")
        img = decode_image(buf.getvalue())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        shapes = [eval_array(img, 224).shape, train_array(img, 224).shape, raw_array(img, 224).shape]
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(len(buf.getvalue()), shapes, grown)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    size, rest = out.stdout.split(" ", 1)
    shapes, grown = rest.rsplit(" ", 1)
    assert int(size) < 1000
    assert shapes.strip() == "[(3, 224, 224), (3, 224, 224), (224, 224, 3)]"
    assert int(grown) < 100 * 1024  # KiB: under 100 MB


def test_file_names_that_map_to_one_key_keep_distinct_samples(tmp_path, ray_local):
    """``a b.jpg`` / ``a_b.jpg`` and ``猫.jpg`` / ``犬.jpg`` reduce to one WebDataset key each; a caption list with
    ``a.jpg`` and ``a.png`` shares a stem; a 200-character name is kept. Every image becomes its own sample (training
    later failed with "duplicate file name"); keys that did not collide are unchanged."""
    from rayhash.data import convert, load_dataset_info

    root = tmp_path / "tree"
    names = ["a b.jpg", "a_b.jpg", "猫.jpg", "犬.jpg", "plain.jpg", "x" * 200 + ".jpg"]
    for i, n in enumerate(names):  # one class folder: the file names themselves collide
        d = root / "train" / "n01440764"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(d / n)
    (root / "train" / "n01443537").mkdir()
    Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(root / "train" / "n01443537" / "other.jpg")
    convert("imagefolder", str(root), str(tmp_path / "ds"))
    rows = read_shards(load_dataset_info(tmp_path / "ds").shard_paths("train"), mode="raw").take_all()
    keys = sorted(r["key"] for r in rows)
    assert len(keys) == len(set(keys)) == len(names) + 1
    for stem in ("plain", "x" * 200, "other"):  # names that did not collide keep a key without a hash suffix
        assert any(k.endswith(stem) for k in keys), stem
    by_value = {int(r["image"][0, 0, 0]): r["key"] for r in rows}
    assert sorted(by_value) == [20 * i for i in range(len(names))] + [250]  # each image under its own key

    cap = tmp_path / "cap"
    (cap / "images").mkdir(parents=True)
    for n, v in (("a.jpg", 10), ("a.png", 200), ("b.jpg", 90)):
        Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(cap / "images" / n)
    (cap / "captions.txt").write_text("image,caption\na.jpg,a dog\na.png,a cat\nb.jpg,a bird\n")
    doc = convert("captions", str(cap), str(tmp_path / "dsc"), val_fraction=0.0)
    rows = read_shards(load_dataset_info(tmp_path / "dsc").shard_paths("train"), mode="raw").take_all()
    keys = {r["key"] for r in rows}
    assert doc["splits"]["train"]["count"] == 3 and len(keys) == 3 and "b" in keys


def test_cifar_archive_with_a_pickle_payload_is_refused_and_never_run(tmp_path):
    """The CIFAR pickles are unpickled admitting only numpy arrays and plain containers."""
    import pickle

    from rayhash.data import convert

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "payload-ran"
    good = {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1], "coarse_labels": [0, 0],
            "filenames": [b"a.png", b"b.png"]}
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "aquarium_fish"],
                                               "coarse_label_names": ["fruit"]}))
    (folder / "test").write_bytes(pickle.dumps(good))
    (folder / "train").write_bytes(pickle.dumps({**good, "extra": _Payload(marker)}))
    try:
        convert("cifar100", str(folder), str(tmp_path / "ds"))
        raise AssertionError("a CIFAR archive with a pickle payload was converted")
    except ValueError as e:
        assert str(folder / "train") in str(e) and "mkdir" in str(e)
    assert not marker.exists() and not (tmp_path / "ds" / "dataset.json").exists()


def _corrupt(path, how: str) -> None:
    """A shard damaged after conversion: a header overwritten mid-tar, cut in half, emptied, or replaced."""
    import tarfile

    data = path.read_bytes()
    if how == "header mid-tar":
        with tarfile.open(path) as t:
            offset = t.getmembers()[len(t.getmembers()) // 2].offset
        data = data[:offset] + b"\xff" * 100 + data[offset + 100:]
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = b""
    else:
        data = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["header mid-tar", "truncated", "empty", "garbage"])
def test_changed_shard_is_refused_before_training_naming_it_and_the_fix(tmp_path, data_synthetic_small,
                                                                       train_tiny_config, how):
    """Refused up front by dataset.json's sha256, not skipped: a corrupt header mid-tar ends the read silently
    (samples lost without a count) and a truncated tar fails the read task (using up training's restarts)."""
    import shutil

    from rayhash.data import convert
    from rayhash.train import train

    ds = tmp_path / "ds"
    shutil.copytree(data_synthetic_small, ds)
    shard = ds / "train" / "train-000001.tar"
    _corrupt(shard, how)
    try:
        train(train_tiny_config(str(ds), "train.epochs=1"), str(tmp_path / "run"))
        raise AssertionError("training started on a changed shard")
    except ValueError as e:
        msg = str(e)
    assert str(shard) in msg and "1 of 4 shard(s)" in msg and "train-000001.json" in msg, msg
    assert not (tmp_path / "run" / "ray").exists()  # refused before Ray Train started
    (ds / "_progress" / "train-000001.json").unlink()  # the fix the message names
    convert("synthetic", None, str(ds), superclasses=4, classes_per_superclass=4, image_size=32,
            per_class={"train": 30, "test": 10}, shard_size=128)
    assert shard.read_bytes() == (data_synthetic_small / "train" / "train-000001.tar").read_bytes()


def test_a_verified_shard_is_read_again_only_when_it_changed(tmp_path, data_synthetic_small, ray_local):
    """A pipeline verifies a split before training and needs no second full read before encoding it: a shard this
    process verified is skipped while its size and modification time are unchanged (what the record trusts, shown
    by a same-size rewrite with the old mtime put back), and read again, and refused, once either changes."""
    import os
    import shutil

    from rayhash.data import load_dataset_info

    ds = tmp_path / "ds"
    shutil.copytree(data_synthetic_small, ds)
    info = load_dataset_info(ds)
    info.verify("train")
    shard = ds / "train" / "train-000001.tar"
    before = shard.stat()
    _corrupt(shard, "garbage")  # same size
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    info.verify("train")  # size and mtime as verified: not read again
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ValueError, match="1 of 4 shard"):
        info.verify("train")


def test_encode_refuses_a_changed_shard_or_counts_what_it_lost(tmp_path, data_synthetic_small, index_tiny_checkpoint):
    """Encode checks its input tars against dataset.json first; with --no-verify, the samples a corrupt tar loses
    are counted as skipped (expected count minus codes received), and the rest is encoded."""
    import shutil

    from rayhash.encode import encode_dataset

    ds = tmp_path / "ds"
    shutil.copytree(data_synthetic_small, ds)
    _corrupt(ds / "test" / "test-000000.tar", "header mid-tar")
    try:
        encode_dataset(index_tiny_checkpoint, str(ds / "test"), str(tmp_path / "codes"))
        raise AssertionError("encoded a changed shard")
    except ValueError as e:
        assert "test-000000.tar" in str(e) and "--no-verify" in str(e)
    summary = encode_dataset(index_tiny_checkpoint, str(ds / "test"), str(tmp_path / "codes2"), verify=False)
    total = sum(s["count"] for s in json.loads((ds / "dataset.json").read_text())["splits"]["test"]["shards"])
    assert summary["skipped_corrupt"] > 0 and summary["count"] + summary["skipped_corrupt"] == total


def test_sample_without_image_is_skipped_and_counted_and_without_label_is_unlabelled(tmp_path, ray_local):
    shard = _tar(tmp_path / "s" / "s-000000.tar",
                 [_good("ok0", 1), {"__key__": "noimage", "cls": b"1", "json": b"{}"},
                  {"__key__": "nolabel", "png": _png(np.zeros((8, 8, 3), np.uint8))}])
    before = skip_counts()["by_reason"].get("no image member", 0)
    rows = {r["key"]: r["label"] for r in read_shards(shard, mode="raw", num_classes=3).take_all()}
    assert rows == {"ok0": 1, "nolabel": -1}
    assert skip_counts()["by_reason"]["no image member"] == before + 1


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("splits"), r"missing field\(s\) \['splits'\]"),
    (lambda d: d.update(format="rayhash-webdataset/9"),
     r"field 'format' is 'rayhash-webdataset/9'.*convert the data again"),
    (lambda d: d["splits"]["train"]["shards"][0].pop("file"), r"split 'train' needs a list 'shards'.*corrupt"),
    (lambda d: d.update(hierarchy="/etc/passwd"), r"field 'hierarchy'.*outside the folder"),
])
def test_dataset_json_missing_fields_other_format_or_escaping_names_are_refused(tmp_path, data_synthetic_small,
                                                                                change, message):
    import shutil

    from rayhash.data import load_dataset_info

    ds = tmp_path / "ds"
    shutil.copytree(data_synthetic_small, ds)
    doc = json.loads((ds / "dataset.json").read_text())
    change(doc)
    (ds / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as e:
        info = load_dataset_info(str(ds))
        info.shard_paths("train")
        info.class_hierarchy()
    assert str(ds) in str(e.value) and "dataset.json" in str(e.value)


@pytest.mark.parametrize("overrides, key", [
    (["model.bits=many"], "model.bits"),
    (["train.epochs=[3]"], "train.epochs"),
    (["data.targets=labels"], "data.targets"),
    (["loss.alpha=-1"], "loss.alpha"),
])
def test_config_values_of_the_wrong_type_name_their_key(overrides, key):
    from rayhash.config import load_config

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config({"model": {"backbone": "tiny_cnn"}}, overrides)
