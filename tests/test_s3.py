"""Input and output on S3, against a moto server on 127.0.0.1: shards are read from a bucket, the
partitioned output is staged and published there, and the secret key shows up in no log or summary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import boto3
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import STRIDE, WINDOW, make_texts, write_config, write_shards

from pipeline.io.writer import OutputLocation, publish

KEY, SECRET, REGION = "AKIDBERTPIPETEST", "bertpipe-s3-secret-3c9a51f07e", "us-east-1"
SOURCES = ["news", "reviews", "forum"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class MotoS3:
    endpoint: str  # http://127.0.0.1:PORT

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read_text(self, bucket: str, key: str) -> str:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()

    def storage_options(self) -> dict:
        return {
            "key": KEY,
            "secret": SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION},
        }

    def read_output(self, bucket: str) -> pa.Table:
        """Arrow's own S3 client reads the output back, not the fsspec stack the pipeline writes with."""
        fs = pafs.S3FileSystem(
            access_key=KEY,
            secret_key=SECRET,
            endpoint_override=self.endpoint.removeprefix("http://"),
            scheme="http",
            region=REGION,
        )
        return pads.dataset(f"{bucket}/out", filesystem=fs, partitioning="hive").to_table()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server of our own, stopped by its pid afterwards."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        yield MotoS3(f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def bucket(s3) -> str:
    """A fresh bucket per test, so tests never see each other's output."""
    name = f"bertpipe-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def rows(s3, bucket, tmp_path) -> list[dict]:
    """Parquet and JSONL shards under ``s3://BUCKET/in/``."""
    texts = make_texts(36, seed=5, max_words=200)
    data = [{"id": f"s3-{i:03d}", "text": t, "source": SOURCES[i % 3]} for i, t in enumerate(texts)]
    for path in write_shards(tmp_path / "in", data, n_parquet=2, n_jsonl=1):
        s3.client().upload_file(str(path), bucket, f"in/{path.name}")
    return data


def job_config(bucket: str, models, **io_options) -> dict:
    return {
        "input": {"paths": [f"s3://{bucket}/in/"], **io_options},
        "output": {"path": f"s3://{bucket}/out", "partition_by": ["source"], **io_options},
        "tasks": [
            {"name": "topic", "kind": "classification", "model": str(models["topic"])},
            {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
        ],
        "runtime": {"dtype": "float32", "max_length": WINDOW, "stride": STRIDE, "local_cpus": 2},
    }


def run_cli(tmp_path, cfg: dict, **env: str) -> subprocess.CompletedProcess:
    """``bertpipe run -v`` in a subprocess with its own local Ray and no AWS settings but ``env``."""
    path = write_config(tmp_path / "job.yaml", **cfg)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_CA_BUNDLE"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path), "-v"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**base, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", **env},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def check_published(s3: MotoS3, bucket: str, rows: list[dict], proc: subprocess.CompletedProcess) -> dict:
    """The output is complete, hive-partitioned and committed, nothing else is left; returns the summary."""
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    out = s3.keys(bucket, "out/")
    assert set(s3.keys(bucket)) - set(out) == {
        f"in/{n}" for n in ("part-0.parquet", "part-1.parquet", "part-2.jsonl")
    }
    assert "out/_SUCCESS" in out
    runs = [k for k in out if k.startswith("out/_runs/")]
    assert len(runs) == 1 and runs[0].endswith(".json")
    folders = {k.split("/")[1] for k in out if k.endswith(".parquet")}
    assert folders == {f"source={s}" for s in SOURCES}

    table = s3.read_output(bucket)
    got = {r["id"]: r for r in table.to_pylist()}
    assert table.num_rows == len(got) == len(rows)
    for row in rows:
        assert got[row["id"]]["text"] == row["text"]
        assert got[row["id"]]["source"] == row["source"]
        assert got[row["id"]]["_error"] is None
        assert got[row["id"]]["sentiment_label"] in {"positive", "negative"}

    text = s3.read_text(bucket, runs[0])
    assert SECRET not in text
    summary = json.loads(text)
    assert summary["rows_in"] == summary["rows_out"] == len(rows)
    assert summary["files_in"] == 3
    assert s3.read_text(bucket, "out/_SUCCESS").strip() == summary["run_id"]
    return summary


@pytest.mark.slow
def test_credentials_in_storage_options(tmp_path, s3, bucket, rows, models):
    cfg = job_config(bucket, models, storage_options=s3.storage_options())
    summary = check_published(s3, bucket, rows, run_cli(tmp_path, cfg))
    for section in ("input", "output"):
        options = summary["config"][section]["storage_options"]
        assert options["secret"] == "***" and options["key"] == "***"
        assert options["client_kwargs"]["endpoint_url"] == s3.endpoint


@pytest.mark.slow
def test_credentials_from_the_environment(tmp_path, s3, bucket, rows, models):
    """No storage options: s3fs in the driver and in every Ray worker finds the AWS_* variables
    (without them there are no credentials at all, and no endpoint but the real AWS)."""
    env = {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_DEFAULT_REGION": REGION,
    }
    summary = check_published(s3, bucket, rows, run_cli(tmp_path, job_config(bucket, models), **env))
    assert summary["config"]["input"]["storage_options"] == {}


def _stage(location: OutputLocation, files: dict[str, list[str]]) -> None:
    """Put Parquet files into the staging folder, as Ray's writer would."""
    location.reset_staging()
    for name, ids in files.items():
        with location.fs.open(f"{location.staging}/{name}", "wb") as fh:
            pq.write_table(pa.table({"id": ids}), fh)


def _published(s3: MotoS3, bucket: str) -> tuple[list[str], list[str], str]:
    ids = sorted(s3.read_output(bucket).column("id").to_pylist())
    runs = [k.rsplit("/", 1)[1] for k in s3.keys(bucket, "out/_runs/")]
    return ids, runs, s3.read_text(bucket, "out/_SUCCESS").strip()


def test_publish_overwrite_and_append_on_s3(s3, bucket):
    """Folders are only key prefixes on S3: publishing copies the files; the run history is kept."""
    location = OutputLocation.from_url(f"s3://{bucket}/out", s3.storage_options())
    _stage(location, {"source=a/1.parquet": ["a1", "a2"], "source=b/1.parquet": ["b1"]})
    publish(location, "error", "run-1", {"run": 1})
    assert _published(s3, bucket) == (["a1", "a2", "b1"], ["run-1.json"], "run-1")

    _stage(location, {"source=c/2.parquet": ["c1"]})
    publish(location, "overwrite", "run-2", {"run": 2})
    assert _published(s3, bucket) == (["c1"], ["run-1.json", "run-2.json"], "run-2")

    _stage(location, {"source=c/3.parquet": ["c2"], "source=d/3.parquet": ["d1"]})
    publish(location, "append", "run-3", {"run": 3})
    runs = ["run-1.json", "run-2.json", "run-3.json"]
    assert _published(s3, bucket) == (["c1", "c2", "d1"], runs, "run-3")
    assert [k for k in s3.keys(bucket) if not k.startswith("out/")] == []
