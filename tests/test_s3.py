"""Input and output on S3, against a moto server on 127.0.0.1: shards are read from a bucket, the
partitioned output is staged and published there (also by resumed and incremental runs), and the
secret key shows up in no log or run summary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import (
    STRIDE,
    WINDOW,
    committed_rows,
    committed_snapshot,
    free_ports,
    make_texts,
    refuse_writes,
    write_config,
    write_shards,
)

from bertpipe.config import JobConfig
from bertpipe.io.paths import redact_options
from bertpipe.io.state import Intent, OutputLock
from bertpipe.io.writer import (
    SUCCESS,
    OutputLocation,
    committed_files,
    data_files,
    publish,
    publish_in_place,
    run_prefix,
)
from bertpipe.runner import execute

KEY, SECRET, REGION = "AKIDBERTPIPETEST", "bertpipe-s3-secret-3c9a51f07e", "us-east-1"
SOURCES = ["news", "reviews", "forum"]


@dataclass(frozen=True)
class MotoS3:
    endpoint: str  # http://127.0.0.1:PORT
    log: Path  # the server's access log: one line per request

    def requests(self) -> int:
        return sum(' HTTP/1.1" ' in line for line in self.log.read_text(errors="replace").splitlines())

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

    def arrow_fs(self) -> pafs.S3FileSystem:
        """Arrow's own S3 client, not the fsspec stack the pipeline writes with."""
        return pafs.S3FileSystem(
            access_key=KEY,
            secret_key=SECRET,
            endpoint_override=self.endpoint.removeprefix("http://"),
            scheme="http",
            region=REGION,
        )

    def read_output(self, bucket: str) -> pa.Table:
        return pads.dataset(f"{bucket}/out", filesystem=self.arrow_fs(), partitioning="hive").to_table()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server of our own, stopped by its pid afterwards."""
    (port,) = free_ports(1)
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
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
            yield MotoS3(f"http://127.0.0.1:{port}", log_path)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture
def bucket(s3) -> str:
    """A fresh bucket per test, so tests never see each other's output."""
    name = f"bertpipe-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def rows(s3, bucket, tmp_path) -> list[dict]:
    """Parquet and JSONL shards under ``s3://BUCKET/in/``."""
    texts = make_texts(36, seed=5, max_words=80)
    data = [{"id": f"s3-{i:03d}", "text": t, "source": SOURCES[i % 3]} for i, t in enumerate(texts)]
    for path in write_shards(tmp_path / "in", data, n_parquet=2, n_jsonl=1):
        s3.client().upload_file(str(path), bucket, f"in/{path.name}")
    return data


def job_config(bucket: str, models, **io_options) -> dict:
    return {
        "input": {"paths": [f"s3://{bucket}/in/"], **io_options},
        "output": {"path": f"s3://{bucket}/out", "partition_by": ["source"], **io_options},
        "tasks": [
            {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
        ],
        "runtime": {"dtype": "float32", "max_length": WINDOW, "stride": STRIDE, "local_cpus": 2},
    }


def cli_env(**aws: str) -> dict[str, str]:
    """This process's environment with no AWS settings but ``aws``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_CA_BUNDLE"}
    return {**base, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", **aws}


def run_cli(config: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``bertpipe run -v`` in a subprocess with its own local Ray."""
    proc = subprocess.run(
        [sys.executable, "-m", "bertpipe", "run", str(config), "-v", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    return proc


def check_published(s3: MotoS3, bucket: str, rows: list[dict], runs: int) -> dict:
    """The output holds ``rows``, hive-partitioned and committed, the bucket nothing but the input and
    the output (no staging, checkpoint or lock), and the summary no secret; returns the last summary."""
    out = s3.keys(bucket, "out/")
    assert all(k.startswith("in/") for k in set(s3.keys(bucket)) - set(out))
    data = {k.split("/")[1] for k in out if k.endswith(".parquet") and not k.startswith("out/_")}
    assert data == {f"source={s}" for s in SOURCES}
    assert len([k for k in out if k.startswith("out/_runs/")]) == runs

    table = s3.read_output(bucket)
    got = {r["id"]: r for r in table.to_pylist()}
    assert table.num_rows == len(got) == len(rows), "every id exactly once"
    for row in rows:
        assert got[row["id"]]["text"] == row["text"]
        assert got[row["id"]]["source"] == row["source"]
        assert got[row["id"]]["_error"] is None
        assert got[row["id"]]["sentiment_label"] in {"positive", "negative"}

    run_id = s3.read_text(bucket, "out/_SUCCESS").split()[-1]
    text = s3.read_text(bucket, f"out/_runs/{run_id}.json")
    assert SECRET not in text
    return json.loads(text)


def _kill_tree(proc: subprocess.Popen) -> None:
    """The driver and the local Ray it started (whose workers have process groups of their own)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_storage_options_and_resume(tmp_path, s3, bucket, rows, models):
    """Credentials in ``storage_options``. The first run is killed once it has staged files on S3;
    ``output.mode: resume`` reads its intent from S3, takes over its lock and finishes it."""
    cfg = job_config(bucket, models, storage_options=s3.storage_options())
    cfg["runtime"]["rows_per_block"] = 2  # many small blocks: the run is still writing when it is killed
    config = write_config(tmp_path / "job.yaml", **cfg)
    log = tmp_path / "killed.log"
    with log.open("wb") as fh:
        driver = subprocess.Popen(
            [sys.executable, "-m", "bertpipe", "run", str(config), "-v"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )
        try:
            deadline = time.time() + 300
            while driver.poll() is None and time.time() < deadline:
                if any(k.endswith(".parquet") for k in s3.keys(bucket, "out/")):
                    break
                time.sleep(0.1)
            assert driver.poll() is None, (
                "the run ended before it could be killed: " + log.read_text()[-2000:]
            )
        finally:
            _kill_tree(driver)
    assert SECRET not in log.read_text()
    # Files are written under their final names (output.commit: auto is a manifest commit on S3); with
    # no _SUCCESS, a reader that follows it sees no output.
    written = s3.keys(bucket, "out/")
    assert written and all(k.rsplit("/", 1)[1].startswith("part-") for k in written), written
    location = OutputLocation.from_url(f"s3://{bucket}/out", s3.storage_options())
    assert committed_files(location) == []

    resumed = run_cli(config, "--set", "output.mode=resume", env=cli_env())
    assert "resuming run" in resumed.stderr
    assert "omp_wait=PASSIVE" in resumed.stderr, "a CPU model actor's threads spin between operations"
    summary = check_published(s3, bucket, rows, runs=1)
    assert summary["rows_in"] == summary["rows_out"] == len(rows) and summary["files_in"] == 3
    for section in ("input", "output"):
        options = summary["config"][section]["storage_options"]
        assert options["secret"] == "***" and options["key"] == "***"
        assert options["client_kwargs"]["endpoint_url"] == s3.endpoint


@pytest.mark.slow
def test_environment_credentials_and_incremental(tmp_path, s3, bucket, rows, models):
    """No storage options: s3fs in the driver and in every Ray worker finds the AWS_* variables (without
    them there are no credentials at all, and no endpoint but AWS). A second ``incremental`` run
    processes only the file added since, and the ledger on S3 lists all four."""
    env = cli_env(
        AWS_ACCESS_KEY_ID=KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_ENDPOINT_URL=s3.endpoint,
        AWS_DEFAULT_REGION=REGION,
    )
    cfg = job_config(bucket, models)
    cfg["output"]["mode"] = "incremental"
    config = write_config(tmp_path / "job.yaml", **cfg)
    run_cli(config, env=env)
    first = check_published(s3, bucket, rows, runs=1)
    assert first["rows_in"] == len(rows) and first["config"]["input"]["storage_options"] == {}

    texts = make_texts(9, seed=6, max_words=40)
    more = [{"id": f"s3-new-{i}", "text": t, "source": SOURCES[i % 3]} for i, t in enumerate(texts)]
    pq.write_table(pa.Table.from_pylist(more), tmp_path / "more.parquet")
    s3.client().upload_file(str(tmp_path / "more.parquet"), bucket, "in/more/part-0.parquet")
    run_cli(config, env=env)
    second = check_published(s3, bucket, rows + more, runs=2)
    assert second["rows_in"] == second["rows_out"] == len(more) and second["files_in"] == 1
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix="out/_state/ledger/")["Contents"]
    parts = sorted(o["Key"] for o in listed)
    assert parts == [f"out/_state/ledger/gen-0000000{g}.parquet" for g in (1, 2)]
    body = s3.client().get_object(Bucket=bucket, Key=parts[1])["Body"].read()
    assert pq.read_table(pa.BufferReader(body)).column("url").to_pylist() == [
        f"s3://{bucket}/in/more/part-0.parquet"
    ]


@pytest.mark.slow
def test_failed_overwrite_keeps_the_committed_output(ray_session, s3, bucket, rows, models, monkeypatch):
    """A manifest commit (``output.commit: auto`` on S3) whose ``_SUCCESS`` PUT fails: a reader that
    follows ``_SUCCESS`` sees the previous output, byte for byte, and the history no trace of the failed
    run. A driver killed at that point leaves the same and its lock: ``resume`` commits the overwrite.
    Another overwrite then commits too, and deletes the files it replaced. The first, uninterrupted run
    is the reference."""
    cfg = job_config(bucket, models, storage_options=s3.storage_options())
    execute(JobConfig.model_validate(cfg))
    location = OutputLocation.from_url(f"s3://{bucket}/out", s3.storage_options())
    before, reference = committed_snapshot(location), committed_rows(location, s3.arrow_fs())
    assert len(reference) == len(rows) and len(before) > 3
    first_keys = s3.keys(bucket, "out/")
    refused = refuse_writes(monkeypatch, type(location.fs), SUCCESS)
    cfg["output"]["mode"] = "overwrite"
    with pytest.raises(OSError, match="injected"):
        execute(JobConfig.model_validate(cfg))
    assert refused, "the commit never wrote _SUCCESS"
    assert {p: location.fs.cat_file(p) for p in before} == before, "the previous output changed"
    assert committed_snapshot(location) == before
    assert committed_rows(location, s3.arrow_fs()) == reference
    new_keys = sorted(set(s3.keys(bucket, "out/")) - set(first_keys))
    assert new_keys and all(k.rsplit("/", 1)[1].startswith("part-") for k in new_keys), new_keys

    monkeypatch.undo()
    failed = Intent.load(location).run_id
    OutputLock(location, failed).acquire()  # what a killed driver leaves besides
    cfg["output"]["mode"] = "resume"
    assert execute(JobConfig.model_validate(cfg))["run_id"] == failed
    assert committed_rows(location, s3.arrow_fs()) == reference
    assert committed_files(location) == sorted(f"{bucket}/{k}" for k in new_keys)
    assert data_files(location.fs, location.path) == committed_files(location), "old files deleted"
    assert len(s3.keys(bucket, "out/_runs/")) == 2

    cfg["output"]["mode"] = "overwrite"
    execute(JobConfig.model_validate(cfg))
    assert committed_rows(location, s3.arrow_fs()) == reference
    committed = committed_files(location)
    assert not set(committed) & {f"{bucket}/{k}" for k in first_keys + new_keys}
    assert data_files(location.fs, location.path) == committed, "the replaced files are deleted"
    assert len(s3.keys(bucket, "out/_runs/")) == 3, "the history of the committed runs"
    assert all(k.startswith(("in/", "out/")) for k in s3.keys(bucket)), "no staging, checkpoint or lock"


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


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_table_counts_on_s3(ray_session, s3, bucket, tmp_path, fmt):
    """An Iceberg or Delta table on S3: the write tasks' counting files go to a scratch folder under
    the table with the table's own credentials (deltalake's keys, the catalog's ``s3.*``); the counts
    equal a Counter over the committed rows, a refused check commits nothing, and no scratch key is
    left either way."""
    import ray
    from conftest import counted

    from bertpipe.config import OutputConfig
    from bertpipe.engine.data import write_table
    from bertpipe.io.warehouse import SCRATCH, check_target

    if fmt == "delta":
        options = {
            "storage_options": {
                "AWS_ACCESS_KEY_ID": KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_ENDPOINT_URL": s3.endpoint,
                "AWS_REGION": REGION,
                "AWS_ALLOW_HTTP": "true",
            }
        }
    else:
        options = {
            "catalog": {
                "type": "sql",
                "uri": f"sqlite:///{tmp_path}/catalog.db",
                "warehouse": f"s3://{bucket}/warehouse",
                "s3.endpoint": s3.endpoint,
                "s3.access-key-id": KEY,
                "s3.secret-access-key": SECRET,
                "s3.region": REGION,
            }
        }
    output = OutputConfig(path=f"s3://{bucket}/table", format=fmt, mode="append", table="ns.t", **options)
    target = check_target(output)
    schema = pa.schema([("id", pa.string()), ("_row_key", pa.string()), ("_error", pa.string())])
    target.create(schema, [])
    rows = pa.Table.from_pylist(
        [
            {
                "id": None if i % 5 == 0 else f"i{i % 8}",
                "_row_key": f"k{i % 11}",
                "_error": [None, "x", "y"][i % 3],
            }
            for i in range(30)
        ],
        schema=schema,
    )
    ds = ray.data.from_arrow(rows).repartition(3)

    def read_table():
        if fmt == "delta":
            from deltalake import DeltaTable

            return DeltaTable(output.path, storage_options=options["storage_options"]).to_pyarrow_table()
        return target.table().scan().to_arrow()

    seen = []
    stats = write_table(lambda: ds, target, schema, "id", False, "append", "run-1", seen.append)
    assert seen == [stats]
    assert (stats.rows, stats.distinct_keys, stats.errors_by_reason, stats.duplicate_ids) == counted(
        read_table(), "id"
    )
    puts = [line for line in s3.log.read_text().splitlines() if SCRATCH in line and '"PUT ' in line]
    assert len(puts) >= 3, "each write task put its counting file on S3"

    def refuse(stats):
        raise RuntimeError("refused by the check")

    with pytest.raises(RuntimeError, match="refused"):
        write_table(lambda: ds, target, schema, "id", False, "append", "run-2", refuse)
    assert read_table().num_rows == len(rows)
    assert [k for k in s3.keys(bucket) if SCRATCH in k] == []


def test_every_credential_option_is_redacted():
    """Option names differ per backend: s3fs key/secret/token, adlfs account_key/connection_string."""
    options = {
        "key": KEY,
        "secret": SECRET,
        "token": "t",
        "account_name": "acct",
        "account_key": "k",
        "connection_string": "AccountKey=k",
        "client_kwargs": {"endpoint_url": "http://user:pw@127.0.0.1:9000", "region_name": REGION},
    }
    assert redact_options(options) == {
        "key": "***",
        "secret": "***",
        "token": "***",
        "account_name": "acct",
        "account_key": "***",
        "connection_string": "***",
        "client_kwargs": {"endpoint_url": "http://***@127.0.0.1:9000", "region_name": REGION},
    }


def test_listings_are_not_cached_while_other_processes_write(s3, bucket):
    """Ray's workers write staged files and its cleanup task deletes checkpoint files from other
    processes: the output's filesystem must list what is there now, not what it saw before."""
    from bertpipe.io.writer import data_files

    location = OutputLocation.from_url(f"s3://{bucket}/listing/out", s3.storage_options())
    _stage(location, {"1.parquet": ["a"]})
    before = data_files(location.fs, location.staging)
    location.fs.ls(location.staging)  # a listing the driver made earlier
    s3.client().put_object(Bucket=bucket, Key="listing/.out.staging/2.parquet", Body=b"x")
    s3.client().delete_object(Bucket=bucket, Key="listing/.out.staging/1.parquet")
    assert [p.rsplit("/", 1)[1] for p in before] == ["1.parquet"]
    assert [p.rsplit("/", 1)[1] for p in location.fs.ls(location.staging)] == ["2.parquet"]
    assert [p.rsplit("/", 1)[1] for p in data_files(location.fs, location.staging)] == ["2.parquet"]


def _write_in_place(location: OutputLocation, run_id: str, n: int, part: str = "a") -> list[str]:
    """``n`` one-row files of run ``run_id`` under their final names, as Ray's writer would put them."""
    names = []
    for i in range(n):
        name = f"source={part}/{run_prefix(run_id)}{i:05d}.parquet"
        with location.fs.open(f"{location.path}/{name}", "wb") as fh:
            pq.write_table(pa.table({"id": [f"{run_id}-{i}"]}), fh)
        names.append(f"{location.path}/{name}")
    return names


def test_manifest_commit_costs_a_constant_number_of_calls(s3, bucket):
    """A manifest commit copies nothing: its object-store calls do not grow with the files committed
    (it takes the listing made after the write, which the count step uses too); until ``_SUCCESS``
    changes, readers that follow it see the previous output; an overwrite then deletes the old files
    in one batch; an append keeps the runs it follows and drops the files of a run that died before
    its commit."""
    calls = {}
    for n in (5, 300):
        location = OutputLocation.from_url(f"s3://{bucket}/n{n}/out", s3.storage_options())
        run = f"20261201T000000Z-0000{n:04d}"
        files = _write_in_place(location, run, n)
        listing = data_files(location.fs, location.path)
        before = s3.requests()
        assert publish_in_place(location, "error", run, {"run": run}, listing) == sorted(files)
        calls[n] = s3.requests() - before
        assert committed_files(location) == sorted(files)
    assert 0 < calls[5] == calls[300] <= 4, calls

    location = OutputLocation.from_url(f"s3://{bucket}/n5/out", s3.storage_options())
    old = committed_files(location)
    r2, dead, r4 = "20261201T010000Z-00000002", "20261201T020000Z-00000003", "20261201T030000Z-00000004"
    new = _write_in_place(location, r2, 3, part="b")
    assert committed_files(location) == old, "files of a run not yet committed are not the output"
    publish_in_place(location, "overwrite", r2, {"run": r2}, data_files(location.fs, location.path))
    assert committed_files(location) == sorted(new)
    assert sorted(f"{bucket}/{k}" for k in s3.keys(bucket, "n5/out/source=")) == sorted(new)
    _write_in_place(location, dead, 2, part="c")  # a run killed before its commit
    appended = _write_in_place(location, r4, 2, part="c")
    publish_in_place(location, "append", r4, {"run": r4}, data_files(location.fs, location.path))
    assert committed_files(location) == sorted(new + appended)
    assert sorted(f"{bucket}/{k}" for k in s3.keys(bucket, "n5/out/source=")) == sorted(new + appended)
    assert s3.read_text(bucket, "n5/out/_SUCCESS").split() == [r2, r4]
    assert len(s3.keys(bucket, "n5/out/_runs/")) == 3, "the run history is kept"
