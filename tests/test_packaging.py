"""The wheel carries what an installed rayhash needs outside a checkout: the shipped run configs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
_NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", "tests", "benchmarks", "docs")


def test_checkout_configs_are_the_shipped_ones():
    """One source: the checkout's configs/ is the packaged folder, not a copy that could drift."""
    from rayhash.config import SHIPPED_CONFIGS, shipped_configs

    assert (ROOT / "configs").resolve() == SHIPPED_CONFIGS
    assert {"demo", "cifar100", "cifar100-cpu", "imagenet", "conceptual_captions"} <= set(shipped_configs())


@pytest.mark.timeout(900)
def test_installed_wheel_loads_shipped_configs_by_name(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_NOT_SOURCE)  # build outside the shared checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(src)], check=True, timeout=600, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("rayhash-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, timeout=300, capture_output=True)
    # the dependencies come from this environment (no download); its editable rayhash is not on that path
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    run = lambda *a: subprocess.run([str(venv / "bin" / "rayhash"), *a], capture_output=True, text=True,  # noqa
                                    env=env, cwd=tmp_path, timeout=300)
    where = subprocess.run([str(py), "-c", "import rayhash; print(rayhash.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    shown = run("config", "show", "demo")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout == (ROOT / "configs" / "demo.yaml").read_text()
    listed = run("config", "show")
    assert "demo" in listed.stdout.split() and "cifar100-cpu" in listed.stdout.split()
    backbone = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]["backbone"]
    for args in (["--config", "demo"], []):  # by name, and the default
        merged = run("train", *args, "--out", str(tmp_path / "run"), "--print-config", "train.epochs=2")
        assert merged.returncode == 0, merged.stderr[-2000:]
        assert f"backbone: {backbone}" in merged.stdout and "epochs: 2" in merged.stdout
