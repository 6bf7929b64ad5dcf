"""Stage output folders as typed handles (rayhash.layout), one writer per folder (rayhash.lease), and the kinds
registries that the CLI, the config and the code share (rayhash.registry)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rayhash.layout import CodesDir, DatasetDir, Folder, IndexDir, PipelineDir
from rayhash.lease import LEASE_FILE, FolderBusy, hold


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("name", ["/etc/passwd", "../x.tar", "a/../../x.tar", "..", "s3://other/x", "", "C:\\x",
                                  "a\\..\\..\\x"])
def test_member_refuses_names_outside_the_folder(tmp_path, name):
    with pytest.raises(ValueError) as e:
        Folder(str(tmp_path)).member(name, "manifest.json")
    assert str(tmp_path) in str(e.value) and "manifest.json" in str(e.value)


def test_member_keeps_names_inside_the_folder(tmp_path):
    f = Folder(str(tmp_path))
    assert f.member("train/train-000001.tar") == os.path.join(str(tmp_path), "train", "train-000001.tar")
    assert f.member("./a/../b.tar") == os.path.join(str(tmp_path), "b.tar")
    assert Folder("s3://b/p").member("x/y.faiss") == "s3://b/p/x/y.faiss"


def test_handles_are_paths_and_name_each_stage_file_once(tmp_path):
    out = PipelineDir(str(tmp_path))
    assert os.fspath(out.data) == str(out.data) == os.path.join(str(tmp_path), "data")
    assert out.run.final.meta == os.path.join(str(tmp_path), "run", "final", "meta.json")
    codes = out.codes
    assert CodesDir.of(str(codes)) == codes and CodesDir.of(codes) is codes
    assert out.codes.shard(7).endswith("codes-00007.parquet")
    assert IndexDir.shard_number(IndexDir.shard_names(123)[0]) == 123
    with pytest.raises(ValueError, match="not an index shard file name"):
        IndexDir.shard_number("../shard-00001.faiss.bak")
    assert DatasetDir.shard_name("val", 3) == "val/val-000003.tar"
    import pickle

    assert pickle.loads(pickle.dumps(out.eval.reference)) == out.eval.reference


def test_dataset_json_naming_a_file_outside_its_folder_is_refused(tmp_path, data_synthetic_small):
    from rayhash.data import load_dataset_info

    ds = tmp_path / "ds"
    shutil.copytree(data_synthetic_small, ds)
    doc = json.loads((ds / "dataset.json").read_text())
    doc["splits"]["train"]["shards"][0]["file"] = "../../outside.tar"
    (ds / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"dataset\.json names '\.\./\.\./outside\.tar', which is outside"):
        load_dataset_info(str(ds)).shard_paths("train")


def test_index_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path, index_flat_indices):
    from rayhash.index import ShardedIndex

    idx = tmp_path / "idx"
    shutil.copytree(index_flat_indices[3], idx)
    secret = tmp_path / "secret.faiss"
    shutil.copy(idx / "shard-00000.faiss", secret)
    m = json.loads((idx / "manifest.json").read_text())
    m["shards"][0]["index"] = str(secret)  # absolute: would read a file outside the index folder
    (idx / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="outside the folder"):
        ShardedIndex.open(str(idx), mode="local")


# ------------------------------------------------------------------------------------------ lease
def test_second_writer_is_refused_naming_the_first_and_nothing_is_lost(tmp_path):
    folder = str(tmp_path / "out")
    with hold(folder, "encode") as doc:
        lease = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
        assert lease["owner"] == doc["owner"] and lease["pid"] == os.getpid()
        (tmp_path / "out" / "codes-00000.parquet").write_bytes(b"first writer's work")
        with pytest.raises(FolderBusy) as e:
            with hold(folder, "index build"):
                pytest.fail("a second writer was admitted")
        msg = str(e.value)
        assert "encode" in msg and f"pid {os.getpid()}" in msg and "index build refused" in msg and folder in msg
        assert (tmp_path / "out" / LEASE_FILE).exists()  # the refused writer did not remove the holder's lease
    assert not (tmp_path / "out" / LEASE_FILE).exists()  # released
    assert (tmp_path / "out" / "codes-00000.parquet").read_bytes() == b"first writer's work"
    with hold(folder, "index build"):  # free again
        pass


def test_racing_writers_exactly_one_admitted(tmp_path):
    folder, n = str(tmp_path / "race"), 8
    barrier, admitted, refused, release = threading.Barrier(n), [], [], threading.Event()

    def writer(i):
        barrier.wait()
        try:
            with hold(folder, f"writer {i}"):
                admitted.append(i)
                release.wait(30)
        except FolderBusy:
            refused.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(admitted) + len(refused) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    for t in threads:
        t.join(60)
    assert len(admitted) == 1 and len(refused) == n - 1


def _write_lease(folder, **fields):
    os.makedirs(folder, exist_ok=True)
    doc = {"owner": "someone", "what": "train", "job_id": "07000000", "host": socket.gethostname(),
           "pid": os.getpid(), "since": time.time(), "expires": time.time() + 600, **fields}
    with open(os.path.join(folder, LEASE_FILE), "w") as f:
        json.dump(doc, f)


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = str(tmp_path / "out")
    _write_lease(folder, pid=int(proc.stdout))  # that process has exited
    with hold(folder, "train") as doc:
        assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["owner"] == doc["owner"]


def test_lease_of_another_host_holds_until_it_expires(tmp_path):
    folder = str(tmp_path / "out")
    _write_lease(folder, host="some-other-node", pid=1)
    with pytest.raises(FolderBusy, match="some-other-node"):
        with hold(folder, "train"):
            pass
    _write_lease(folder, host="some-other-node", pid=1, expires=time.time() - 1)  # its owner stopped renewing
    with hold(folder, "train") as doc:
        assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["owner"] == doc["owner"]


def test_lease_is_renewed_while_held(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYHASH_LEASE_TTL", "0.6")
    folder = str(tmp_path / "out")
    with hold(folder, "train"):
        first = json.loads((tmp_path / "out" / LEASE_FILE).read_text())["expires"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = json.loads((tmp_path / "out" / LEASE_FILE).read_text())["expires"]
            if now > first:
                break
        assert now > first


def test_stage_into_a_busy_folder_is_refused_before_writing(tmp_path, index_random_codes, ray_local):
    from rayhash.index import build_index

    out = tmp_path / "idx"
    with hold(str(out), "index build"):
        with pytest.raises(FolderBusy, match="index build"):
            build_index(index_random_codes[0], str(out), shards=2)
        assert sorted(os.listdir(out)) == [LEASE_FILE]  # the refused build wrote nothing
    manifest = build_index(index_random_codes[0], str(out), shards=2)  # and runs once the folder is free
    assert manifest["ntotal"] == len(index_random_codes[1]) and LEASE_FILE not in os.listdir(out)


def test_lease_on_object_storage(s3):
    folder = s3.prefix("lease")
    with hold(folder, "encode"):
        assert any(k.endswith(LEASE_FILE) for k in s3.keys(folder))
        with pytest.raises(FolderBusy, match="encode"):
            with hold(folder, "encode"):
                pass
    assert not any(k.endswith(LEASE_FILE) for k in s3.keys(folder))


# ------------------------------------------------------------------------------------------ registries
def _help(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "rayhash.cli", *args, "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_lists_every_registered_kind():
    from rayhash.data import CONVERTERS
    from rayhash.index import INDEX_TYPES
    from rayhash.model import BACKBONES

    for args, registry in ((("data", "convert"), CONVERTERS), (("index", "build"), INDEX_TYPES),
                           (("train",), BACKBONES), (("pipeline",), CONVERTERS)):
        text = " ".join(_help(*args).split())
        for kind in registry:
            assert kind.name in text, (args, kind.name)
        if args != ("pipeline",):
            for kind in registry:
                assert " ".join(kind.help.split()) in text, (args, kind.name)


def test_unknown_kinds_are_refused_with_the_choices():
    from rayhash.config import load_config
    from rayhash.data import convert
    from rayhash.index.types import default_params

    with pytest.raises(ValueError, match=r"model\.backbone: unknown backbone 'resnet90' \(did you mean 'resnet9'"):
        load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"), ["model.backbone=resnet90"])
    with pytest.raises(ValueError, match="unknown index type 'IVF'; choose one of flat, hash"):
        default_params("IVF", 64)
    with pytest.raises(ValueError, match="unknown converter 'cifar10'"):
        convert("cifar10", None, "/nonexistent")
    with pytest.raises(ValueError, match="converter 'synthetic' takes no option class_index"):
        convert("synthetic", None, "/nonexistent", class_index="x.json")


@pytest.mark.parametrize("index_type", ["flat", "hash", "multihash", "ivf"])
def test_index_types_build_their_faiss_class_and_find_exact_matches(index_type):
    from rayhash.index import INDEX_TYPES
    from rayhash.index.types import default_params, make_faiss_index

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (2000, 8), dtype=np.uint8)
    params = default_params(index_type, 64, **({"nprobe": 64} if index_type == "ivf" else {}))
    index = make_faiss_index(index_type, 64, params, codes)
    assert type(index).__name__ == INDEX_TYPES[index_type].faiss_class and index.ntotal == len(codes)
    d, i = index.search(codes[:50], 1)  # every code finds itself at distance 0
    assert (d[:, 0] == 0).all() and (codes[i[:, 0]] == codes[:50]).all()


def test_backbones_are_known_without_importing_torch():
    code = ("import sys; from rayhash.config import load_config; from rayhash.model import BACKBONES; "
            "print('torch' in sys.modules, ','.join(BACKBONES.names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    loaded, names = out.stdout.split()
    assert loaded == "False" and "resnet9" in names.split(",")


def test_unreadable_lease_file_is_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LEASE_FILE).write_bytes(b"\x00garbage")
    with hold(str(tmp_path / "out"), "encode") as doc:
        assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["owner"] == doc["owner"]
