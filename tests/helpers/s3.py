"""A real S3-API server for the tests: moto in server mode (what s3fs and fsspec test against),
started as its own process on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from bench.server import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "adapterserve-test",
    "AWS_SECRET_ACCESS_KEY": "adapterserve-test-secret",
    "AWS_REGION": "us-east-1",
}


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """An S3-compatible server; yields the ``AWS_*`` environment that points clients at it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the S3 test server did not start") from None
                time.sleep(0.1)
        yield {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    finally:
        proc.terminate()
        proc.wait(10)


def new_bucket(env: dict[str, str]) -> str:
    """Create a fresh bucket on the test server (it takes unsigned requests); return an
    ``s3://bucket/prefix`` store URL in it."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    httpx.put(f"{env['AWS_ENDPOINT_URL']}/{bucket}", timeout=10).raise_for_status()
    return f"s3://{bucket}/adapters"


@contextmanager
def aws_env(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in this process's environment for the duration."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
