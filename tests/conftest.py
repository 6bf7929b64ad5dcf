"""Shared test fixtures: one real local Ray per test session, paths to the offline data in ../shared/data.

Stage-specific fixtures live in ``tests/fixtures_<stage>.py`` and are imported at the end.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYHASH_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()
sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("RAYHASH_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
if (SHARED_DATA / "nltk_data").is_dir():
    os.environ.setdefault("NLTK_DATA", str(SHARED_DATA / "nltk_data"))


def shared(relpath: str) -> Path:
    """Path inside ../shared/data, or skip the test with the reason when it is absent."""
    p = SHARED_DATA / relpath
    if not p.exists():
        pytest.skip(f"offline data {p} not present (see ../shared/data/README.md)")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (logical CPUs oversubscribed on 2-core machines so
    Ray Train workers and Ray Data tasks can run side by side)."""
    import ray

    from rayhash.runtime import init_ray

    # The product's own start path: a private instance in its own folder, started once more when a loaded machine
    # misses Ray's 30 s node-registration limit.
    init_ray("local", num_cpus=8, include_dashboard=False, log_to_driver=False, object_store_memory=1 << 30,
             runtime_env={"env_vars": {"RAYHASH_PROGRESS": "0"}})
    yield ray


def pytest_collection_modifyitems(items):
    """The s3 fixture's endpoint is reserved before any Ray starts (fixtures_storage). Files holding multi-minute
    (``slow``) tests run first, each file's tests in their own order: `make test` hands whole files to two
    pytest-xdist processes, and the longest files started last would leave one of them idle at the end."""
    from fixtures_storage import reserve_s3_endpoint

    reserve_s3_endpoint(items)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


# Each stage's fixtures live in its own module; importing them here makes them visible to every test.
from fixtures_cluster import *  # noqa: E402,F401,F403
from fixtures_data import *  # noqa: E402,F401,F403
from fixtures_index import *  # noqa: E402,F401,F403
from fixtures_storage import *  # noqa: E402,F401,F403
from fixtures_train import *  # noqa: E402,F401,F403
