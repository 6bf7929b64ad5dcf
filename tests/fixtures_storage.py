"""A real S3 endpoint for the tests: moto's standalone server in its own process, reached the way a user reaches
their MinIO / Ceph endpoint (``AWS_ENDPOINT_URL`` + credentials in the environment).

The server starts only when a test asks for the ``s3`` fixture. Ray workers inherit the environment of the process
that starts the local Ray instance, so the endpoint must be in ``os.environ`` before ``ray.init``: when the collected
tests use ``s3``, :func:`reserve_s3_endpoint` (called by conftest's collection hook) reserves the port and sets the
environment right after collection, before any test (and so any Ray) has started.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

S3_BUCKET = "rhbucket"


def _reserve_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reserve_s3_endpoint(items) -> None:
    if any("s3" in getattr(item, "fixturenames", ()) for item in items) and "RAYHASH_TEST_S3_PORT" not in os.environ:
        port = _reserve_port()
        os.environ.update({"RAYHASH_TEST_S3_PORT": str(port), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"})
        for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):  # a developer's own AWS session must not leak in
            os.environ.pop(var, None)


@dataclass
class S3Endpoint:
    url: str
    bucket: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url)

    def keys(self, prefix: str) -> dict[str, tuple[int, object]]:
        """{key: (size, last modified)} of every object under ``prefix`` (an ``s3://bucket/...`` URI or a key),
        leaving out the empty directory markers (keys ending in ``/``) that pyarrow creates for parent folders."""
        prefix = prefix.removeprefix(f"s3://{self.bucket}/")
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.update({o["Key"]: (o["Size"], o["LastModified"]) for o in page.get("Contents", [])
                        if not o["Key"].endswith("/")})
        return out

    def prefix(self, name: str) -> str:
        """A fresh ``s3://`` folder for one test."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> S3Endpoint:
    """moto's S3 server on 127.0.0.1 (one process for the session) with bucket ``rhbucket``; the environment
    points boto3, pyarrow and Ray workers at it."""
    port = os.environ.get("RAYHASH_TEST_S3_PORT")
    if not port:
        pytest.fail("the s3 fixture's environment was not set at collection (reserve_s3_endpoint)")
    url = os.environ["AWS_ENDPOINT_URL"]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except urllib.error.HTTPError:  # it answers
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port}: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        endpoint = S3Endpoint(url, S3_BUCKET)
        endpoint.client().create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
