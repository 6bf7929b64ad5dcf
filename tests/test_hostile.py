"""Hostile inputs and faults, one case per test: each states what must happen (a clear error naming the file,
field or key and the fix; or the bad record skipped and counted and the job going on)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from rayhash.data import read_shards, skip_counts


def _png(arr_or_img) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, samples: list[dict]) -> str:
    """A WebDataset shard written by webdataset's own writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def _good(key: str, label: int = 0) -> dict:
    return {"__key__": key, "png": _png(np.full((8, 8, 3), 7 * label, np.uint8)), "cls": str(label).encode()}


def test_skip_counter_is_per_job_and_survives_another_job_ending(tmp_path, ray_local):
    """Each Ray job on a cluster counts its own skips: another job neither sees this job's count nor adds to it,
    and this job never depends on a counter that another job owns (with one named actor for the whole cluster,
    the owner's exit broke the next job's first corrupt sample with ActorDiedError)."""
    shard = _tar(tmp_path / "s" / "s-000000.tar",
                 [_good("ok0"), {"__key__": "junk", "png": b"not an image", "cls": b"0"}, _good("ok1")])
    before = skip_counts()["skipped"]
    rows = read_shards(shard, mode="raw").take_all()  # this job makes (and owns) its counter first
    assert sorted(r["key"] for r in rows) == ["ok0", "ok1"]
    assert skip_counts()["skipped"] == before + 1

    address = ray_local.get_runtime_context().gcs_address
    other = textwrap.dedent(f"""
        import ray
        ray.init(address={address!r}, log_to_driver=False)
        from rayhash.data import read_shards, skip_counts
        rows = read_shards({shard!r}, mode="raw").take_all()
        c = skip_counts()
        assert len(rows) == 2 and c["skipped"] == 1, (len(rows), c)  # its own skip only
        print("OTHER-JOB-OK")
    """)
    env = dict(os.environ, RAYHASH_PROGRESS="0")
    done = subprocess.run([sys.executable, "-c", other], env=env, capture_output=True, text=True, timeout=600)
    assert "OTHER-JOB-OK" in done.stdout, done.stderr[-3000:]

    after = skip_counts()  # the other job's skip is not in this job's count
    assert after["skipped"] == before + 1
    assert any(e["key"] == "junk" and e["reason"] == "undecodable image" for e in after["examples"])
