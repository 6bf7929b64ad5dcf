"""The README's main command end to end: convert -> train -> encode -> index -> eval on the synthetic dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


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
    # the results name the loss terms the shipped demo config trains with (the paper's KL term among them)
    from rayhash.config import find_config

    shipped = yaml.safe_load(Path(find_config("demo")).read_text())["loss"]
    assert shipped["beta"] > 0
    assert (f"L_sim × {shipped['alpha']:g} + L_KL × {shipped['beta']:g} ({shipped['kl_estimator']}, "
            f"k = {shipped['k']}") in metrics["objective"], metrics["objective"]
    for png in ("hp_curve.png", "bit_balance.png", "distance_histograms.png", "precision_recall.png"):
        assert (out / "eval" / png).stat().st_size > 1000
    # a re-run resumes from what is on storage: nothing is redone or duplicated, the numbers are the same
    codes_mtime = (out / "codes" / "codes-00000.parquet").stat().st_mtime_ns
    again = run_pipeline(str(out), dataset="synthetic", overrides=["train.epochs=4"])
    assert again["mAHP@250"] == metrics["mAHP@250"] and again["n_database"] == 480
    assert (out / "codes" / "codes-00000.parquet").stat().st_mtime_ns == codes_mtime


def test_objective_names_only_the_terms_switched_on():
    from rayhash.config import load_config
    from rayhash.pipeline import objective

    assert objective(load_config(None, ["loss.alpha=0", "loss.beta=0"]).loss) == "none (classification alone)"
    assert objective(load_config(None, ["loss.alpha=2", "loss.beta=0"]).loss) == "L_sim × 2"
    kl = load_config(None, ["loss.alpha=0", "loss.beta=0.5", "loss.kl_estimator=blockwise", "loss.k=7",
                            "loss.beta_schedule=ramp", "loss.beta_start=0.25"]).loss
    assert objective(kl) == "L_KL × 0.5 (blockwise, k = 7, ramped in from 25% of training)"
    assert objective(load_config(None, ["loss.beta=0.5", "loss.beta_schedule=constant"]).loss) == \
        "L_sim × 1 + L_KL × 0.5 (sampled, k = 3)"


def test_cli_reports_user_errors_in_one_line(tmp_path):
    missing = tmp_path / "no-such-index"
    proc = subprocess.run([sys.executable, "-m", "rayhash.cli", "query", "--index", str(missing), "--key", "x"],
                          capture_output=True, text=True, env={**os.environ, "RAYHASH_DEBUG": ""})
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"  # Ray's own module names
AUTOSCALE_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
QUIET_SCRIPT = f"""
import json, logging, logging.config, os
import ray
from rayhash.runtime import init_ray
init_ray(num_cpus=1)
@ray.remote
def speak():
    cleaner, autoscale = logging.getLogger("{CLEANER_LOGGER}"), logging.getLogger("{AUTOSCALE_LOGGER}")
    cleaner.warning("CLEANER-WARNING")
    autoscale.warning("AUTOSCALE-WARNING")
    data = logging.getLogger("ray.data")
    levels = [cleaner.isEnabledFor(logging.WARNING), cleaner.isEnabledFor(logging.ERROR),
              autoscale.isEnabledFor(logging.WARNING), autoscale.isEnabledFor(logging.ERROR),
              logging.getLogger("ray.train.v2.other").isEnabledFor(logging.WARNING),
              data.isEnabledFor(logging.INFO), data.isEnabledFor(logging.WARNING),
              os.environ.get("RAY_ADDRESS") == ray.get_runtime_context().gcs_address]
    # what Ray Train's controller does when it starts (LoggingManager.configure_controller_logger): dictConfig of
    # "ray.train", which resets the levels of the loggers below it; records that still pass are caught here
    logging.config.dictConfig({{"version": 1, "disable_existing_loggers": False,
                               "loggers": {{"ray.train": {{"level": "DEBUG", "propagate": False}}}}}})
    passed = []
    catch = logging.Handler()
    catch.emit = lambda record: passed.append(record.levelname)
    for lg in (cleaner, autoscale):
        lg.addHandler(catch)
        lg.warning("after dictConfig")
        lg.error("after dictConfig")
    return [passed, *levels]
print("LEVELS", json.dumps(ray.get(speak.remote())))
ray.shutdown()
"""


@pytest.mark.timeout(300)
def test_local_ray_instance_drops_only_the_per_second_dashboard_warning(tmp_path):
    """A local instance runs no dashboard, so Ray Train's placement-group cleaner would warn every second of a run
    that it cannot ask it; rayhash's local instance silences that logger's warnings in every worker, nothing else.
    The worker reports its loggers' levels itself (its printed output reaches the driver only asynchronously)."""
    import ray.train.v2._internal.execution.controller.placement_group_cleaner as cleaner_module
    import ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client as autoscale_module

    assert cleaner_module.logger.name == CLEANER_LOGGER  # the names rayhash silences are the ones Ray logs under
    assert autoscale_module.logger.name == AUTOSCALE_LOGGER
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", QUIET_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (passed, warning_on, error_on, as_warning_on, as_error_on, other_warning_on, data_info_on, data_warning_on,
     own_address) = json.loads(proc.stdout.split("LEVELS", 1)[1])
    assert passed == ["ERROR", "ERROR"]  # warnings stay out even after Ray Train reconfigures its loggers
    assert not warning_on and error_on and not as_warning_on and as_error_on and other_warning_on
    assert not data_info_on and data_warning_on  # Ray Data's per-dataset INFO lines off in workers, warnings on
    assert own_address  # Ray's state-API calls in workers ask this instance, never search for "the" local one
    assert "CLEANER-WARNING" not in proc.stdout + proc.stderr and "AUTOSCALE-WARNING" not in proc.stderr


# Ray's own per-epoch or per-dataset INFO lines, which a normal run must not print (they stay in Ray's log files)
RAY_NOISE = ("Reporting training result", "Checkpoint successfully created", "Starting execution of Dataset",
             "Execution plan of Dataset", "Requesting resources", "Started training worker group",
             "Moving model to device", "Setting up process group", "Progress bars disabled", "Traceback",
             "Failed to send resource request", "Token authentication",
             "constructor arguments in the object store")  # Ray Train's PreemptionWatcher (off on a private instance)


@pytest.mark.timeout(600)
def test_a_normal_train_run_prints_rayhash_lines_not_ray_internals(tmp_path):
    """`rayhash data convert` then `rayhash train` as a newcomer runs them: each epoch is one rayhash line, and
    none of Ray Train's or Ray Data's per-epoch INFO lines (nor a traceback) reaches the terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYHASH_ADDRESS", "RAYHASH_LOG_LEVEL")}
    env["RAYHASH_PROGRESS"] = "0"
    cli = [sys.executable, "-m", "rayhash.cli"]
    conv = subprocess.run([*cli, "data", "convert", "synthetic", "--out", str(tmp_path / "ds"), "--per-class", "4",
                           "2", "--image-size", "16"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert conv.returncode == 0, conv.stderr[-3000:]
    proc = subprocess.run([*cli, "train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"),
                           "train.epochs=2", "train.warmup_epochs=0", "train.steps_per_epoch=2",
                           "train.batch_size=16", "validation.every=1"],
                          capture_output=True, text=True, env=env, timeout=500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    epochs = [line for line in out.splitlines() if "rayhash.train: epoch " in line]
    assert len(epochs) == 2 and "(2 of 2)" in epochs[-1], out[-3000:]
    assert "final checkpoint" in out
    for noise in RAY_NOISE:
        assert noise not in out, f"{noise!r} in the output:\n{out[-4000:]}"
