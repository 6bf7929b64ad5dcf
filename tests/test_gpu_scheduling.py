"""The GPU code paths' Ray side on a CPU machine: a two-node cluster whose worker node advertises one (logical) GPU.

Caption embedding, encoding and the Ray-mode index then take their GPU defaults (one actor per GPU, ``num_gpus=1``;
one index actor holding the GPU): Ray must place them on the GPU node, and with no CUDA / faiss GPU there they must
fall back to the CPU and give the results of the CPU paths. CUDA kernels themselves need a GPU machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rayhash.index import ShardedIndex, build_index, read_codes

GPU_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from rayhash.data import embed_captions
    from rayhash.encode import encode_dataset
    from rayhash.index import ShardedIndex, read_codes

    ckpt, data, out, index_dir, captions, emb_out = sys.argv[1:7]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        embed_captions(captions, emb_out)
        summary = encode_dataset(ckpt, data, out, batch_size=100)
        codes = read_codes(out)
        with ShardedIndex.open(index_dir, mode="ray", actors=1) as index:
            free_gpus = ray.available_resources().get("GPU", 0)
            res = index.search(codes.codes[:20], k=7)
        with ShardedIndex.open(index_dir, mode="ray", actors=2) as index:  # more shard groups than GPUs (1 CPU each)
            shared_gpus = ray.available_resources().get("GPU", 0)
            res3 = index.search(codes.codes[:20], k=7)
        print("RESULT", json.dumps({"count": summary["count"], "free_gpus_while_open": free_gpus,
                                    "free_gpus_three_groups": shared_gpus, "keys3": res3.keys.tolist(),
                                    "keys": res.keys.tolist(), "distances": res.distances.tolist()}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gpu_defaults_schedule_on_gpu_node_and_match_cpu(data_cifar_small, index_tiny_checkpoint, tmp_path,
                                                        ray_local):
    import pyarrow.parquet as pq

    from conftest import shared
    from rayhash.data import convert_captions, embed_captions
    from rayhash.encode import encode_dataset

    captions = tmp_path / "flickr"
    convert_captions(shared("flickr8k-1k"), str(captions), limit=6, shard_size=3, val_fraction=0.0)
    embed_captions(str(captions), str(tmp_path / "cpu-emb.parquet"))

    cpu_codes = tmp_path / "cpu-codes"
    encode_dataset(index_tiny_checkpoint, str(data_cifar_small / "test"), str(cpu_codes), batch_size=100)
    build_index(str(cpu_codes), str(tmp_path / "index"), shards=3)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", GPU_SCRIPT, str(index_tiny_checkpoint), str(data_cifar_small / "test"),
                           str(tmp_path / "gpu-codes"), str(tmp_path / "index"), str(captions),
                           str(tmp_path / "gpu-emb.parquet")],
                          env=env, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert got["free_gpus_while_open"] == 0  # the index actor holds the node's GPU
    assert got["free_gpus_three_groups"] < 0.01  # two groups share the one GPU (1/2 each) instead of waiting forever
    assert got["keys3"] == got["keys"]
    a, b = read_codes(str(cpu_codes)), read_codes(str(tmp_path / "gpu-codes"))
    assert got["count"] == len(a) > 0
    np.testing.assert_array_equal(a.keys, b.keys)  # same samples, same order, same codes
    np.testing.assert_array_equal(a.codes, b.codes)
    with ShardedIndex.open(str(tmp_path / "index"), mode="local") as local:
        want = local.search(a.codes[:20], k=7)
    assert got["keys"] == want.keys.tolist() and got["distances"] == want.distances.tolist()
    emb = [pq.read_table(tmp_path / f"{which}-emb.parquet").sort_by("key") for which in ("cpu", "gpu")]
    assert emb[0].column("key").to_pylist() == emb[1].column("key").to_pylist() and emb[0].num_rows == 6
    np.testing.assert_allclose(np.asarray(emb[1].column("embedding").to_pylist()),
                               np.asarray(emb[0].column("embedding").to_pylist()), atol=1e-5)


def _fake_cuda(monkeypatch, capability=(8, 0), wheel="faiss-gpu-cu12"):
    """A machine with one CUDA GPU, as torch, faiss and the CUDA driver would report it (the hardware is absent),
    with the faiss GPU ``wheel`` installed (its kernels' compute capabilities as measured)."""
    import faiss
    import torch

    from rayhash.index import gpu as search

    assert search.gpu_capability() is None  # no NVIDIA driver here: what the real query gives without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(search, "gpu_capability", lambda device=0: capability)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(search, "faiss_gpu_wheel", lambda: (wheel, *search.FAISS_GPU_WHEELS[wheel]))
    if not hasattr(faiss, "GpuIndexBinaryFlat"):
        monkeypatch.setattr(faiss, "GpuIndexBinaryFlat", object, raising=False)


@pytest.mark.parametrize("capability, usable", [((7, 0), True), ((8, 9), True), ((9, 0), False), ((10, 0), False)])
def test_faiss_gpu_only_on_gpus_its_wheel_has_kernels_for(monkeypatch, capability, usable, caplog):
    """faiss-gpu-cu12 wheels have kernels up to compute capability 8.9: on an H100 (9.0) the first kernel launch
    aborts the process, so the index stays on CPU and says why."""
    from rayhash.index.gpu import faiss_gpu_usable

    _fake_cuda(monkeypatch, capability)
    monkeypatch.delenv("RAYHASH_FAISS_GPU", raising=False)
    assert faiss_gpu_usable() is usable
    if not usable:
        assert "searching on CPU" in caplog.text and f"{capability[0]}.{capability[1]}" in caplog.text
        monkeypatch.setenv("RAYHASH_FAISS_GPU", "force")
        assert faiss_gpu_usable() is True


def test_work_given_no_gpu_stays_on_cpu_on_a_gpu_node(ray_local):
    """Ray no longer hides a node's GPUs from tasks and actors that asked for none: they must not pick cuda:0 (or a
    faiss GPU index) by themselves. The driver may."""
    import ray

    @ray.remote(num_cpus=0)
    def choose():
        import faiss
        import torch

        from rayhash.index import gpu as search

        saved = torch.cuda.is_available, search.gpu_capability, faiss.get_num_gpus
        torch.cuda.is_available = lambda: True  # this worker sees a GPU, as it would on a GPU node
        search.gpu_capability = lambda device=0: (8, 0)
        faiss.get_num_gpus = lambda: 1
        try:
            from rayhash.runtime import ray_gave_no_gpu, torch_device

            return ray_gave_no_gpu(), str(torch_device()), search.faiss_gpu_usable()
        finally:  # Ray reuses this worker process for later tasks
            torch.cuda.is_available, search.gpu_capability, faiss.get_num_gpus = saved

    assert ray.get(choose.remote()) == (True, "cpu", False)
    from rayhash.runtime import ray_gave_no_gpu

    assert ray_gave_no_gpu() is False  # the driver decides by the devices present


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_its_checks_on_cpu_and_refuses_without_a_gpu():
    """`make gpu-check`: every check it makes on a GPU node runs here on the CPU (same code, --device cpu) and
    passes; without --device it says that no GPU is present and exits 2."""
    import torch

    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
                          "--images", "128", "--batch-size", "64", "--database", "5000", "--queries", "50"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    rows = [line.split()[:2] for line in run.stdout.splitlines()[1:]]
    assert rows == [["train", "PASS"], ["syncs", "SKIP"], ["compile", "PASS"], ["encode", "PASS"],
                    ["search", "PASS"]], run.stdout
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU refusal cannot be shown here")
    bare = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], capture_output=True,
                          text=True, timeout=300)
    assert bare.returncode == 2 and "no NVIDIA GPU is visible" in bare.stderr


def test_autoscaling_gpu_groups_count_as_gpus(ray_local, monkeypatch):
    """The shipped clusters start their GPU groups at zero nodes: no GPU is present until something asks for one.
    `use_gpu: auto` and the GPU defaults must read the autoscaler's maximum resources (Ray's cluster config, as Ray
    Train does) or they never ask. The autoscaler's cluster config is cloud infrastructure that this machine lacks:
    Ray's accessor is replaced by what a launcher cluster with a 0..4-node GPU group reports."""
    from ray._private.state import state

    from rayhash import runtime

    assert ray_local.cluster_resources().get("GPU", 0) == 0
    assert runtime.cluster_has_gpus() is False and runtime.cluster_gpus() == 0
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: {"CPU": 66, "GPU": 4})
    assert runtime.cluster_has_gpus() is True and runtime.cluster_gpus() == 4
    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: None)  # no autoscaler
    assert runtime.cluster_has_gpus() is False
