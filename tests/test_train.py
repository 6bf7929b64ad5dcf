"""Ray Train end to end on real data: 2 CPU workers (gloo), resume, worker loss, two-node cluster."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from rayhash import testing


def _traces(d: Path, prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(d.glob(prefix + "*.json"))]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_workers_on_cifar_loss_decreases_and_workers_see_different_data(
        ray_local, data_cifar_small, train_tiny_config, tmp_path):
    from rayhash.model import load_checkpoint
    from rayhash.train import train

    trace = tmp_path / "trace"
    # 1000 images / global batch 20 = 50 steps per epoch, 5 epochs = 250 steps; validate + checkpoint at the end
    cfg = train_tiny_config(data_cifar_small, "train.epochs=5", "train.batch_size=20", "model.bits=32",
                            "validation.every=5", "train.checkpoint_every=5")
    result = train(cfg, str(tmp_path / "run"), hooks=testing.hooks(trace=trace))
    hist = result.metrics
    assert [h["epoch"] for h in hist] == list(range(5)) and hist[-1]["step"] == 250 and hist[0]["workers"] == 2
    first, last = hist[0], hist[-1]
    assert last["loss"] < 0.85 * first["loss"], (first["loss"], last["loss"])
    assert last["ce"] < first["ce"]
    # each epoch, the two workers' labels together are exactly the 1000-image split (10 per class) and disjoint
    for epoch in (0, 4):
        r0, r1 = (Counter(t["labels"]) for t in _traces(trace, f"epoch{epoch}-rank"))
        assert sum(r0.values()) == sum(r1.values()) == 500
        assert r0 + r1 == Counter({c: 10 for c in range(100)})
        assert r0 != r1
    # outputs: JSON lines per epoch, a PNG plot, a loadable final checkpoint
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(5))
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"val_mAHP@50", "val_mAHP@50_expected", "val_mAHP@50_continuous", "val_gap", "val_P@r2",
            "val_quant_error", "val_bit_balance", "val_bit_correlation", "beta"} <= set(last)
    # mAP over all the others: validation.subset=100 is a key-hash sample of about 100 held-out images
    assert "val_mAP@1000" in last and 60 <= last["val_n"] <= 140  # the configured k names it, at any split size
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.bits == 32 and loaded.meta["epoch"] == 4 and len(loaded.label_names) == 100
    assert "val_gap" not in hist[0]  # validation only every 5 epochs


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_continues_and_killed_worker_restarts_from_last_checkpoint(
        ray_local, data_synthetic_small, train_tiny_config, tmp_path):
    from rayhash.train import train

    run, trace, marker = tmp_path / "run", tmp_path / "trace", tmp_path / "killed"
    tiny = ("validation.subset=0",)
    first = train(train_tiny_config(data_synthetic_small, "train.epochs=1", *tiny), str(run))  # 480 // 40 = 12 steps
    assert [h["step"] for h in first.metrics] == [12]
    saved_model = torch.load(run / "final" / "model.pt", weights_only=True)
    saved_state = torch.load(run / "final" / "train_state.pt", weights_only=True)  # tensors and plain values only
    expect_params = sum(float(v.double().sum()) for k, v in saved_model.items() if "running" not in k
                        and "num_batches" not in k)
    expect_moments = sum(float(v.double().sum()) for st in saved_state["optimizer"]["state"].values()
                         for v in st.values())

    with pytest.raises(FileExistsError, match="--resume"):
        train(train_tiny_config(data_synthetic_small, "train.epochs=3", *tiny), str(run))
    with pytest.raises(ValueError, match=r"model\.bits: checkpoint 16, now 32.*train into a new --out"):
        train(train_tiny_config(data_synthetic_small, "train.epochs=2", "model.bits=32", *tiny), str(run), resume=True)
    # resume to 2 epochs; worker rank 1 dies at step 17 (inside epoch 1, after the epoch-0 checkpoint)
    second = train(train_tiny_config(data_synthetic_small, "train.epochs=2", "train.max_failures=1", *tiny),
                   str(run), resume=True, hooks=testing.hooks(trace=trace, fail_at=(1, 17, marker)))
    assert marker.exists()  # the worker really was killed
    restores = _traces(trace, "restore-rank0")
    assert len(restores) == 2  # once for --resume, once after the worker loss
    for r in restores:
        assert (r["epoch"], r["step"]) == (0, 12)
        assert r["params"] == pytest.approx(expect_params, rel=0, abs=1e-9)  # exact state, not a re-init
        assert r["optimizer"] == pytest.approx(expect_moments, rel=0, abs=1e-9)
    assert [h["epoch"] for h in second.metrics] == [0, 1]
    assert second.metrics[0] == first.metrics[0]  # epoch 0 was not re-run
    assert second.metrics[-1]["step"] == 24
    # the logged lr is the last step's (cosine to 0 at the end: the last step's is small but not 0)
    from rayhash.train.loop import lr_lambda

    cfg2 = train_tiny_config(data_synthetic_small, "train.epochs=2")
    expect_lr = cfg2.train.lr * lr_lambda(round(cfg2.train.warmup_epochs * 12), 24, cfg2.train.min_lr_ratio)(23)
    assert second.metrics[-1]["lr"] == pytest.approx(expect_lr) and expect_lr > 0
    assert json.loads((run / "final" / "meta.json").read_text())["epoch"] == 1


CLUSTER_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from rayhash import testing
    from rayhash.config import load_config
    from rayhash.train import train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    cluster.add_node(num_cpus=3)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = load_config(json.loads(sys.argv[1]), sys.argv[4:])
        res = train(cfg, sys.argv[2], hooks=testing.hooks(trace=sys.argv[3]))
        print("RESULT", json.dumps(res.metrics))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_node_cluster_one_worker_per_node(data_synthetic_small, tmp_path):
    from fixtures_train import TRAIN_TINY

    trace = tmp_path / "trace"
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1"}
    env.pop("RAY_ADDRESS", None)
    # 2 CPUs per worker on 3-CPU nodes: only one worker fits per node, the spare CPU feeds Ray Data
    args = [sys.executable, "-c", CLUSTER_SCRIPT, json.dumps(TRAIN_TINY), str(tmp_path / "run"), str(trace),
            f"data.path={data_synthetic_small}", "train.epochs=1", "train.cpus_per_worker=2", "validation.subset=0"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert metrics[0]["workers"] == 2 and metrics[0]["step"] == 12
    r0, r1 = _traces(trace, "epoch0-rank")
    assert r0["node"] != r1["node"]  # one worker on each node
    assert sorted(r0["labels"] + r1["labels"]) == sorted(np.repeat(np.arange(16), 30).tolist())
    assert (tmp_path / "run" / "final" / "model.pt").exists()


def test_workers_that_leave_no_cpu_for_data_fail_fast(ray_local):
    """8 logical CPUs, 2 workers x 4 CPUs: Ray Data could never decode a batch, so training refuses to start."""
    import ray

    from rayhash.config import load_config
    from rayhash.train.driver import check_cpu_headroom

    total = ray.cluster_resources()["CPU"]
    fits = load_config({}, ["train.num_workers=1", f"train.cpus_per_worker={total - 1}"]).train
    check_cpu_headroom(fits)  # leaves exactly one CPU: fine
    starved = load_config({}, ["train.num_workers=2", f"train.cpus_per_worker={total / 2}"]).train
    with pytest.raises(ValueError, match="train.cpus_per_worker"):
        check_cpu_headroom(starved)
    check_cpu_headroom(starved, address="auto")  # a cluster that may autoscale: only a warning


@pytest.mark.parametrize("configured, splits, expected", [
    ("test", {"train", "test"}, "test"),
    ("test", {"train", "val"}, "val"),  # a Tiny-ImageNet layout: val, not test
    ("val", {"train", "validation"}, "validation"),
    ("test", {"train"}, None),
    (None, {"train", "test"}, None),
])
def test_validation_split_falls_back_to_the_one_that_exists(configured, splits, expected, caplog):
    """Training validates on data.val_split, or on an existing val/validation/test split, and says so."""
    from types import SimpleNamespace

    from rayhash.config import DataConfig
    from rayhash.train.driver import _validation_split

    d = DataConfig(path="/data/ds", val_split=configured)
    info = SimpleNamespace(splits={s: {} for s in splits})
    with caplog.at_level("WARNING", logger="rayhash"):
        got = _validation_split(d, info)
    assert got == expected
    if configured and configured not in splits:
        assert configured in caplog.text and ("instead" in caplog.text or "without validation" in caplog.text)


def test_the_driver_prints_every_epoch_line_once_even_the_last_one_written_as_the_run_ends(tmp_path):
    """The epoch lines come from metrics.jsonl on storage, not from the workers' asynchronous log stream: an epoch
    written just before the run ends is still printed, each epoch once, and a resumed run does not repeat the
    epochs of the run before it."""
    from rayhash.storage import write_bytes
    from rayhash.train.driver import _EpochLines

    path = str(tmp_path / "metrics.jsonl")
    rows = [{"epoch": e, "step": 10 * (e + 1), "lr": 0.5 / (e + 1), "loss": 2.0 - e / 4} for e in range(3)]

    def write(n):
        write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows[:n]).encode())

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("rayhash.train")
    logger.addHandler(handler)
    write(1)  # epoch 0 is from the run being resumed
    try:
        with _EpochLines(path, epochs=3, every_s=0.01):
            write(2)
            for _ in range(200):  # the poller prints epoch 1 while the run goes on
                if any("(2 of 3)" in r.getMessage() for r in records):
                    break
                threading.Event().wait(0.05)
            assert any("(2 of 3)" in r.getMessage() for r in records), "epoch 1 not printed during the run"
        lines = [r.getMessage() for r in records]
        records.clear()
        write(1)
        with _EpochLines(path, epochs=3, every_s=3600):  # no poll ever runs: only the read at the end
            write(3)  # the last epochs land as the run ends
        lines += [r.getMessage() for r in records]
    finally:
        logger.removeHandler(handler)
    want = ["epoch 1 (2 of 3): lr=0.25 loss=1.75", "epoch 1 (2 of 3): lr=0.25 loss=1.75",
            "epoch 2 (3 of 3): lr=0.1667 loss=1.5"]
    assert [x for x in lines if x.startswith("epoch ")] == want, lines
