"""The README's main command end to end: convert -> train -> encode -> index -> eval on the synthetic dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_pipeline_beats_random_codes(tmp_path, ray_local):
    from rayhash.pipeline import run_pipeline

    out = tmp_path / "demo"
    metrics = run_pipeline(str(out), dataset="synthetic", overrides=["train.epochs=4"])
    on_disk = json.loads((out / "eval" / "metrics.json").read_text())
    assert on_disk["mAHP@250"] == pytest.approx(metrics["mAHP@250"])
    assert {"mAHP@250", "mAHP@250_expected", "mAP@1000", "P@r2", "n_queries", "n_database", "bits"} <= set(on_disk)
    assert on_disk["n_database"] == 480 and on_disk["n_queries"] == 160
    # learned codes retrieve semantically: clearly above random codes on the same labels
    assert metrics["mAHP@250"] > metrics["mAHP@250_random"] + 0.1, metrics
    for png in ("hp_curve.png", "bit_balance.png", "distance_histograms.png", "precision_recall.png"):
        assert (out / "eval" / png).stat().st_size > 1000
    # a re-run resumes from what is on storage: nothing is redone or duplicated, the numbers are the same
    codes_mtime = (out / "codes" / "codes-00000.parquet").stat().st_mtime_ns
    again = run_pipeline(str(out), dataset="synthetic", overrides=["train.epochs=4"])
    assert again["mAHP@250"] == metrics["mAHP@250"] and again["n_database"] == 480
    assert (out / "codes" / "codes-00000.parquet").stat().st_mtime_ns == codes_mtime


def test_cli_reports_user_errors_in_one_line(tmp_path):
    missing = tmp_path / "no-such-index"
    proc = subprocess.run([sys.executable, "-m", "rayhash.cli", "query", "--index", str(missing), "--key", "x"],
                          capture_output=True, text=True, env={**os.environ, "RAYHASH_DEBUG": ""})
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
