"""Object storage for real: every stage's input and output on s3:// against moto's S3 server (see fixtures_storage),
reached through AWS_ENDPOINT_URL as a MinIO / Ceph user reaches theirs."""
from __future__ import annotations

import os

import pytest

from rayhash import storage


def test_endpoint_reaches_pyarrow_and_ray_workers(s3, ray_local):
    uri = s3.prefix("endpoint") + "/hello.txt"
    storage.write_bytes(uri, b"hello")
    assert list(s3.keys(uri).values())[0][0] == 5  # pyarrow wrote to the moto server, not to real AWS

    @ray_local.remote
    def remote_read(u: str) -> tuple[str | None, bytes]:
        from rayhash import storage

        return os.environ.get("AWS_ENDPOINT_URL"), storage.read_bytes(u)

    endpoint, data = ray_local.get(remote_read.remote(uri), timeout=300)
    assert endpoint == s3.url and data == b"hello"
