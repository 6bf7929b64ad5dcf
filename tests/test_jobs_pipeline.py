"""The whole pipeline as Ray jobs, each submitted with `rayhash submit` to a real local cluster (head + 1 worker
node started by cluster/local.sh): every job succeeds and the final codes beat random codes clearly."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_pipeline_stages_as_ray_jobs_on_local_cluster(cluster_local, tmp_path):
    ds, run, codes, index, ev = (str(tmp_path / n) for n in ("ds", "run", "codes", "index", "eval"))
    stages = [
        ["data", "convert", "synthetic", "--out", ds],
        ["train", "--config", "configs/demo.yaml", "--data", ds, "--out", run, "train.epochs=4"],
        ["encode", "--checkpoint", run, "--data", f"{ds}/train", "--out", codes],
        ["index", "build", "--codes", codes, "--out", index, "--shards", "2"],
        ["eval", "--index", index, "--queries", f"{ds}/test", "--out", ev],
    ]
    for args in stages:
        proc = cluster_local.rayhash("submit", *args, timeout=600)
        assert proc.returncode == 0, f"{args[0]} job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "SUCCEEDED" in proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_database"] == 480 and metrics["n_queries"] == 160
    assert metrics["mAHP@250"] > metrics["mAHP@250_random"] + 0.1, metrics
