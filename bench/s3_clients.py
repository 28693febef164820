"""The S3 client of the store, chosen by measurement: obstore against boto3, in turns, on the
operations the store makes (list the manifests, read a manifest, create one exclusively, upload and
download adapter weights), against a local S3-API server (moto in server mode).

    python -m bench.s3_clients [--repeats 15] [--weights-mb 10]

Prints one markdown table of median milliseconds per operation, plus import time and install size.
A local server measures the clients' own overhead (request building, signing, body handling), not a
network; both clients talk to the same server in the same turns.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.s3 import aws_env, new_bucket, s3_server

KEYS = 200  # manifests listed per sync


def _size_mb(*packages: str) -> float:
    total = 0
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            continue
        for folder in spec.submodule_search_locations:
            total += sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return total / 1e6


def _import_ms(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print((time.perf_counter() - t) * 1000)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def obstore_ops(url: str, weights: Path) -> dict[str, Callable[[], Any]]:
    import obstore
    from obstore.store import S3Store

    store = S3Store.from_url(url, client_options={"allow_http": True})
    for i in range(KEYS):
        obstore.put(store, f"_versions/o/{i:010d}.json", b"{}")
    obstore.put(store, "w/o", weights)

    def create() -> None:
        obstore.put(store, f"c/{uuid.uuid4().hex}", b"{}", mode="create")

    return {
        f"list {KEYS} keys": lambda: [o for b in obstore.list(store, prefix="_versions/o/") for o in b],
        "get a manifest": lambda: obstore.get(store, "_versions/o/0000000001.json").bytes(),
        "create a manifest (If-None-Match)": create,
        "upload the weights": lambda: obstore.put(store, "w/o2", weights),
        "download the weights": lambda: obstore.get(store, "w/o").bytes(),
    }


def boto3_ops(url: str, weights: Path) -> dict[str, Callable[[], Any]]:
    import boto3

    bucket, prefix = url[len("s3://") :].split("/", 1)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for i in range(KEYS):
        client.put_object(Bucket=bucket, Key=f"{prefix}/_versions/b/{i:010d}.json", Body=b"{}")
    client.upload_file(str(weights), bucket, f"{prefix}/w/b")

    def listing() -> list[Any]:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/_versions/b/"
        )
        return [o for page in pages for o in page.get("Contents", [])]

    def create() -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/c/{uuid.uuid4().hex}", Body=b"{}", IfNoneMatch="*")

    return {
        f"list {KEYS} keys": listing,
        "get a manifest": lambda: client.get_object(
            Bucket=bucket, Key=f"{prefix}/_versions/b/0000000001.json"
        )["Body"].read(),
        "create a manifest (If-None-Match)": create,
        "upload the weights": lambda: client.upload_file(str(weights), bucket, f"{prefix}/w/b2"),
        "download the weights": lambda: client.get_object(Bucket=bucket, Key=f"{prefix}/w/b")["Body"].read(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--weights-mb", type=int, default=10)
    args = parser.parse_args()
    weights = Path(f"/tmp/adapterserve-s3-bench-{os.getpid()}.bin")
    weights.write_bytes(os.urandom(args.weights_mb << 20))
    try:
        with s3_server() as env, aws_env(env):
            url = new_bucket(env)
            clients = {"obstore": obstore_ops(url, weights), "boto3": boto3_ops(url, weights)}
            times: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.repeats):  # in turns: every operation of every client per round
                for client, ops in clients.items():
                    for op, run in ops.items():
                        start = time.perf_counter()
                        run()
                        times.setdefault((client, op), []).append((time.perf_counter() - start) * 1000)
        names = list(clients["obstore"])
        print(f"\n{args.repeats} turns, weights of {args.weights_mb} MB, a local moto server\n")
        print("| operation | obstore (ms) | boto3 (ms) | boto3 / obstore |")
        print("|---|---:|---:|---:|")
        for op in names:
            o, b = statistics.median(times[("obstore", op)]), statistics.median(times[("boto3", op)])
            print(f"| {op} | {o:.1f} | {b:.1f} | {b / o:.2f}x |")
        o_imp, b_imp = _import_ms("obstore"), _import_ms("boto3")
        print(f"| import (a fresh process) | {o_imp:.0f} | {b_imp:.0f} | {b_imp / o_imp:.2f}x |")
        o_mb, b_mb = _size_mb("obstore"), _size_mb("boto3", "botocore", "s3transfer", "jmespath")
        print(f"| installed size (MB) | {o_mb:.0f} | {b_mb:.0f} | {b_mb / o_mb:.2f}x |")
    finally:
        weights.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
