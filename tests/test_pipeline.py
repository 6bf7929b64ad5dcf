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


CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"  # Ray's own module name
QUIET_SCRIPT = f"""
import json, logging, os
import ray
from rayhash.runtime import init_ray
init_ray(num_cpus=1)
@ray.remote
def speak():
    cleaner = logging.getLogger("{CLEANER_LOGGER}")
    cleaner.warning("CLEANER-WARNING")
    return [cleaner.isEnabledFor(logging.WARNING), cleaner.isEnabledFor(logging.ERROR),
            logging.getLogger("ray.train.v2.other").isEnabledFor(logging.WARNING),
            os.environ.get("RAY_ADDRESS") == ray.get_runtime_context().gcs_address]
print("LEVELS", json.dumps(ray.get(speak.remote())))
ray.shutdown()
"""


@pytest.mark.timeout(300)
def test_local_ray_instance_drops_only_the_per_second_dashboard_warning(tmp_path):
    """A local instance runs no dashboard, so Ray Train's placement-group cleaner would warn every second of a run
    that it cannot ask it; rayhash's local instance silences that logger's warnings in every worker, nothing else.
    The worker reports its loggers' levels itself (its printed output reaches the driver only asynchronously)."""
    import ray.train.v2._internal.execution.controller.placement_group_cleaner as cleaner_module

    assert cleaner_module.logger.name == CLEANER_LOGGER  # the name rayhash silences is the one Ray logs under
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", QUIET_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning_on, error_on, other_warning_on, own_address = json.loads(proc.stdout.split("LEVELS", 1)[1])
    assert not warning_on and error_on and other_warning_on
    assert own_address  # Ray's state-API calls in workers ask this instance, never search for "the" local one
    assert "CLEANER-WARNING" not in proc.stdout + proc.stderr
