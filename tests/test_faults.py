"""Crashes and concurrency on a real local Ray: killed actors, a killed driver and resume, a failed
overwrite, a second writer, and incremental runs. Every case ends with each id exactly once and the
predictions of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import (
    base_config,
    committed_rows,
    committed_snapshot,
    make_texts,
    refuse_writes,
    write_config,
    write_shards,
)
from ray import cloudpickle

from bertpipe.config import ConfigError, JobConfig
from bertpipe.engine import data
from bertpipe.io import writer
from bertpipe.io.paths import Shard
from bertpipe.io.state import Intent, Ledger, OutputLock, lock_path
from bertpipe.io.writer import OutputLocation, committed_files, data_files, run_prefix
from bertpipe.runner import execute
from bertpipe.stages.infer import InferStage

pytestmark = pytest.mark.slow
COMPARED = ("topic_label", "topic_score", "sentiment_label", "sentiment_score", "entities", "_error")


@pytest.fixture(scope="module")
def fault_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault_corpus")
    texts = make_texts(2400, seed=5, max_words=120)
    rows = [{"id": f"r{i:05d}", "text": t} for i, t in enumerate(texts)]
    write_shards(folder, rows, n_parquet=4, n_jsonl=2)
    return folder, rows


def _config(input_dir: Path, out: Path, models, **output) -> JobConfig:
    cfg = base_config(input_dir, out, models, rows_per_block=20)
    cfg["output"].update(output)
    return JobConfig.model_validate(cfg)


def read_output(out: Path) -> dict[str, dict]:
    rows = pads.dataset(str(out), partitioning="hive").to_table().to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears more than once"
    return {r["id"]: {k: r[k] for k in COMPARED} for r in rows}


@pytest.fixture(scope="module")
def reference(ray_session, fault_corpus, models, tmp_path_factory):
    """An uninterrupted run of the same job."""
    out = tmp_path_factory.mktemp("reference") / "out"
    execute(_config(fault_corpus[0], out, models))
    return read_output(out)


def _written_files(out: Path) -> int:
    """Data files Ray has written: staged beside the output, or in place (a manifest commit)."""
    folders = [out.parent / f".{out.name}.staging", out]
    return sum(len(list(folder.rglob("*.parquet"))) for folder in folders if folder.exists())


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class CrashOnceInferStage(InferStage):
    """The model stage, except that the first batch ever seen kills its process mid-run (os._exit),
    as an out-of-memory kill would. A marker file makes it happen exactly once across restarts."""

    marker: str = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with open(self.marker + ".pids", "a") as fh:  # every actor process that loaded the models
            fh.write(f"{os.getpid()}\n")

    def __call__(self, table):
        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(table)


def test_killed_model_actor_is_restarted_and_its_batches_redone(
    reference, fault_corpus, models, tmp_path, monkeypatch
):
    CrashOnceInferStage.marker = str(tmp_path / "crashed")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor must get this class by value
    monkeypatch.setattr(data, "InferStage", CrashOnceInferStage)  # the stage the engine's graph uses
    out = tmp_path / "out"
    summary = execute(_config(fault_corpus[0], out, models))
    crashed_pid = int((tmp_path / "crashed").read_text())
    assert read_output(out) == reference
    assert summary["rows_out"] == len(reference)
    pids = {int(pid) for pid in (tmp_path / "crashed.pids").read_text().split()}
    assert crashed_pid in pids and len(pids) >= 2, "the actor was not restarted"


@pytest.mark.parametrize("commit", ["rename", "manifest"])
def test_killed_driver_leaves_no_output_and_resume_finishes(
    commit, reference, fault_corpus, models, tmp_path
):
    """With a manifest commit the killed run's files are in the output folder, but without ``_SUCCESS``
    a reader that follows it sees no output; ``resume`` commits them."""
    out = tmp_path / "out"
    path = write_config(
        tmp_path / "job.yaml", **_config(fault_corpus[0], out, models, commit=commit).model_dump(mode="json")
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "bertpipe", "run", str(path)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        _wait_for(
            lambda: _written_files(out) >= 3 or driver.poll() is not None, 300, "the first written files"
        )
        assert driver.poll() is None, "the run finished before it could be killed; make the corpus larger"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    location = OutputLocation.from_url(str(out), {})
    if commit == "rename":
        assert not out.exists(), "a killed run must not leave anything that looks like an output"
    else:
        assert not (out / "_SUCCESS").exists() and committed_files(location) == []
        prefix = run_prefix(Intent.load(location).run_id)
        assert all(p.name.startswith(prefix) for p in out.rglob("*.parquet")), "only the run's own files"
    # Also leave the state of a commit killed half way on an object store, where Ray's rename of
    # X.pending.parquet to X.parquet is a copy then a delete: both files exist.
    committed = [p for p in (tmp_path / ".out.checkpoint").glob("*.parquet") if ".pending." not in p.name]
    assert committed, "no checkpoint was committed before the kill"
    shutil.copy(committed[0], committed[0].with_name(committed[0].stem + ".pending.parquet"))
    # The resume runs in this process: it starts from what the dead driver left on disk all the same,
    # without paying for a second interpreter and Ray (test_s3 resumes through the CLI).
    execute(_config(fault_corpus[0], out, models, commit=commit, mode="resume"))
    assert read_output(out) == reference
    assert (out / "_SUCCESS").exists()
    summary = json.loads(next((out / "_runs").glob("*.json")).read_text())
    assert summary["rows_in"] == summary["rows_out"] == len(reference)
    assert not (tmp_path / ".out.checkpoint").exists() and not (tmp_path / ".out.staging").exists()
    assert data_files(location.fs, location.path) == committed_files(location), "uncommitted files left"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small_corpus")
    texts = make_texts(48, seed=8, max_words=60)
    write_shards(folder, [{"id": f"m{i:03d}", "text": t} for i, t in enumerate(texts)], 2, 1)
    return folder


def test_failed_overwrite_keeps_the_previous_output(ray_session, small_corpus, models, tmp_path, monkeypatch):
    """The rename commit; the first, uninterrupted run is the reference."""
    out = tmp_path / "out"
    execute(_config(small_corpus, out, models))
    before, reference = _snapshot(out), read_output(out)
    assert len(reference) == 48
    real_rename = writer._rename_dir

    def failing_rename(fs, src, dst):
        if src.endswith(".staging"):
            raise OSError("injected failure while publishing")
        real_rename(fs, src, dst)

    monkeypatch.setattr(writer, "_rename_dir", failing_rename)
    with pytest.raises(OSError, match="injected"):
        execute(_config(small_corpus, out, models, mode="overwrite"))
    assert _snapshot(out) == before
    assert read_output(out) == reference
    monkeypatch.setattr(writer, "_rename_dir", real_rename)
    # Failing later, once the new output is in place but before its _SUCCESS: rolled back as well.
    location = OutputLocation.from_url(str(out), {})
    refused = refuse_writes(monkeypatch, type(location.fs), writer.SUCCESS)
    with pytest.raises(OSError, match="injected"):
        execute(_config(small_corpus, out, models, mode="overwrite"))
    assert refused, "the commit never wrote _SUCCESS"
    assert _snapshot(out) == before
    monkeypatch.undo()
    execute(_config(small_corpus, out, models, mode="overwrite"))
    assert read_output(out) == reference
    assert len(list((out / "_runs").glob("*.json"))) == 2, "the run history is kept across overwrites"


def test_failed_manifest_commit_keeps_the_previous_output_and_resume_finishes_it(
    ray_session, small_corpus, models, tmp_path, monkeypatch
):
    """``output.commit: manifest`` on a local disk. An overwrite fails while it writes ``_SUCCESS`` (the
    disk is full): a reader that follows ``_SUCCESS`` still sees the previous output, byte for byte.
    A driver killed at that point leaves the same and its lock; ``resume`` then commits the overwrite.
    The first, uninterrupted run is the reference."""
    out = tmp_path / "out"
    location = OutputLocation.from_url(str(out), {})

    def job(mode: str) -> JobConfig:
        return _config(
            small_corpus, out, models, mode=mode, commit="manifest", partition_by=["sentiment_label"]
        )

    execute(job("error"))
    before, reference = committed_snapshot(location), committed_rows(location)
    assert len(reference) == 48 and len(before) > 3
    refused = refuse_writes(monkeypatch, type(location.fs), writer.SUCCESS)
    with pytest.raises(OSError, match="injected"):
        execute(job("overwrite"))
    assert refused, "the commit never wrote _SUCCESS"
    assert {p: location.fs.cat_file(p) for p in before} == before, "the previous output changed"
    assert committed_snapshot(location) == before and committed_rows(location) == reference
    failed = Intent.load(location).run_id
    assert len(list((out / "_runs").glob("*.json"))) == 1, "the failed run is not in the history"
    assert [f for f in data_files(location.fs, location.path) if run_prefix(failed) in f], "its files"
    assert not list(out.rglob(".*.tmp"))

    monkeypatch.undo()
    OutputLock(location, failed).acquire()  # what a killed driver leaves besides
    summary = execute(job("resume"))
    assert summary["run_id"] == failed
    assert committed_rows(location) == reference
    committed = committed_files(location)
    assert committed and all(run_prefix(failed) in f for f in committed)
    assert data_files(location.fs, location.path) == committed, "the previous output's files are deleted"
    assert len(list((out / "_runs").glob("*.json"))) == 2, "the run history is kept"
    assert not any(
        location.fs.exists(p) for p in (location.staging, location.checkpoint, lock_path(location))
    )


def test_a_second_writer_fails_cleanly(fault_corpus, models, tmp_path):
    out = tmp_path / "out"
    lock = OutputLock(OutputLocation.from_url(str(out), {}), "other-run")
    lock.acquire()
    with pytest.raises(ConfigError, match="being written by run other-run"):
        execute(_config(fault_corpus[0], out, models))
    lock.release()
    assert not out.exists()


def test_incremental_processes_only_new_files(ray_session, models, tmp_path):
    input_dir = tmp_path / "in"
    first = [{"id": f"a{i}", "text": t} for i, t in enumerate(make_texts(40, seed=1, max_words=30))]
    write_shards(input_dir, first, n_parquet=1, n_jsonl=1)
    out = tmp_path / "out"
    cfg = _config(input_dir, out, models, mode="incremental", partition_by=["sentiment_label"])
    s1 = execute(cfg)
    assert s1["rows_in"] == 40
    before = _snapshot(out)
    s2 = execute(cfg)
    assert s2.get("nothing_to_do") and _snapshot(out) == before, "an unchanged input must write nothing"
    second = [{"id": f"b{i}", "text": t} for i, t in enumerate(make_texts(15, seed=2, max_words=30))]
    write_shards(input_dir / "more", second, n_parquet=1, n_jsonl=0)
    s3 = execute(cfg)
    assert s3["rows_in"] == 15 and s3["files_in"] == 1
    got = read_output(out)
    assert sorted(got) == sorted(r["id"] for r in first + second)
    parts = sorted((out / "_state" / "ledger").iterdir())
    assert [p.name for p in parts] == ["gen-00000001.parquet", "gen-00000002.parquet"]
    assert [pq.read_table(p).num_rows for p in parts] == [2, 1], "each run appends only its own files"


def test_an_incremental_run_that_failed_at_its_commit_is_not_skipped_by_its_resume(
    ray_session, models, tmp_path, monkeypatch
):
    """``commit: manifest`` writes the ledger part before ``_SUCCESS``. A run that fails at ``_SUCCESS``
    leaves a part naming its new file; its resume must still process that file and commit its rows,
    once, and the ledger must not count a run that ``_SUCCESS`` does not name."""
    input_dir, out = tmp_path / "in", tmp_path / "out"
    first = [{"id": f"a{i}", "text": t} for i, t in enumerate(make_texts(20, seed=1, max_words=30))]
    write_shards(input_dir, first, n_parquet=1, n_jsonl=0)
    location = OutputLocation.from_url(str(out), {})

    def job(mode: str) -> JobConfig:
        return _config(input_dir, out, models, mode=mode, commit="manifest")

    execute(job("incremental"))
    second = [{"id": f"b{i}", "text": t} for i, t in enumerate(make_texts(12, seed=2, max_words=30))]
    write_shards(input_dir / "more", second, n_parquet=1, n_jsonl=0)
    refused = refuse_writes(monkeypatch, type(location.fs), writer.SUCCESS)
    with pytest.raises(OSError, match="injected"):
        execute(job("incremental"))
    assert refused, "the commit never wrote _SUCCESS"
    assert len(sorted((out / "_state" / "ledger").iterdir())) == 2, "the failed run wrote its ledger part"
    assert [r["id"] for r in committed_rows(location)] == sorted(r["id"] for r in first)

    monkeypatch.undo()
    summary = execute(job("resume"))
    assert summary["rows_in"] == len(second)
    assert [r["id"] for r in committed_rows(location)] == sorted(r["id"] for r in first + second)


def test_the_ledger_takes_one_generation_per_run_and_reads_the_legacy_document(tmp_path):
    """Two runs that loaded the same generation: the first to commit wins, the second fails instead of
    losing the first one's files. A ``ledger.json`` written by an older release is kept as the base."""
    location = OutputLocation.from_url(str(tmp_path / "out"), {})
    entry = {"size": 5, "version": "v1", "run_id": "r0"}
    legacy = {"generation": 3, "files": {"file:///in/a.parquet": entry}}
    (tmp_path / "out" / "_state").mkdir(parents=True)
    (tmp_path / "out" / "_state" / "ledger.json").write_text(json.dumps(legacy))
    a = Shard("/in/a.parquet", "file:///in/a.parquet", "parquet", 5, "v1")
    b = Shard("/in/b.parquet", "file:///in/b.parquet", "parquet", 7, "v1")
    changed_a = Shard("/in/a.parquet", "file:///in/a.parquet", "parquet", 6, "v2")
    first, second = Ledger.load(location), Ledger.load(location)
    assert first.changed([a, b, changed_a]) == [b, changed_a]
    first.append(location, [b], "r1")
    with pytest.raises(RuntimeError, match="ledger changed"):
        second.append(location, [changed_a], "r2")
    again = Ledger.load(location)
    assert again.generation == 1 and again.changed([a, b, changed_a]) == [changed_a]
    again.append(location, [changed_a], "r3")
    assert Ledger.load(location).changed([a, b, changed_a]) == [a]
