"""Bad files fail fast (exit code 2, one line naming the file, nothing written) or are skipped and listed
by ``input.on_bad_file``; ``bertpipe validate`` finds them without running the models."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import STRIDE, WINDOW, base_config, make_texts, write_config
from transformers import pipeline as hf_pipeline
from typer.testing import CliRunner

from bertpipe.cli import app
from bertpipe.config import ConfigError, InputFormat
from bertpipe.engine.data import ShardDatasource
from bertpipe.io.paths import discover, filesystem_for
from bertpipe.io.reader import JSONL_SAMPLE_BYTES, inspect_shard

PARQUET_FOOTER = (
    "unreadable parquet file: Parquet magic bytes not found in footer. "
    "Either the file is corrupted or this is not a parquet file."
)


def good_rows(prefix: str, n: int, seed: int) -> list[dict]:
    texts = make_texts(n, seed=seed, max_words=150)
    return [{"id": f"{prefix}{i}", "text": t, "source": "news"} for i, t in enumerate(texts)]


def write_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_good(folder: Path) -> list[dict]:
    """Two good files (names sort first, so they set the reference schema)."""
    folder.mkdir(parents=True, exist_ok=True)
    parquet_rows, jsonl_rows = good_rows("p", 10, seed=31), good_rows("j", 10, seed=32)
    write_parquet(folder / "a-good.parquet", parquet_rows)
    write_jsonl(folder / "a-good.jsonl", jsonl_rows)
    return parquet_rows + jsonl_rows


def malformed_jsonl(folder: Path) -> tuple[Path, str]:
    path = folder / "malformed.jsonl"
    path.write_text('{"id": "m0", "text": "fine"}\n{"id": "m1", "text": "no end\n{"id": "m2", "text": "x"}\n')
    return path, "unreadable jsonl file: line 2: malformed JSON (JSONDecodeError)"


def jsonl_not_objects(folder: Path) -> tuple[Path, str]:
    path = folder / "arrays.jsonl"
    path.write_text('{"id": "m0", "text": "fine"}\n["m1", "a list"]\n')
    return path, "unreadable jsonl file: line 2: not a JSON object"


def corrupt_gzip(folder: Path) -> tuple[Path, str]:
    path = folder / "corrupt.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": "z0", "text": "fine"}\n' * 50)[:40])
    return path, "unreadable jsonl file: Compressed file ended before the end-of-stream marker was reached"


def truncated_parquet(folder: Path) -> tuple[Path, str]:
    path = folder / "truncated.parquet"
    write_parquet(path, good_rows("t", 20, seed=33))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, PARQUET_FOOTER


def not_parquet(folder: Path) -> tuple[Path, str]:
    path = folder / "garbage.parquet"
    path.write_bytes(b"this is a CSV file, really\n" * 20)
    return path, PARQUET_FOOTER


def unreadable(folder: Path) -> tuple[Path, str]:
    """A file that is listed but cannot be opened (tests run as root, so a dangling link, not chmod)."""
    path = folder / "gone.jsonl"
    path.symlink_to(folder / "deleted-meanwhile.jsonl")
    return path, f"unreadable jsonl file: [Errno 2] No such file or directory: '{path}'"


def no_text_column(folder: Path) -> tuple[Path, str]:
    path = folder / "no-text.parquet"
    write_parquet(path, [{"id": "n0", "body": "words", "source": "news"}])
    return path, "no text column 'text' (columns: id, body, source)"


def schema_differs(folder: Path) -> tuple[Path, str]:
    path = folder / "z-drift.jsonl"
    write_jsonl(path, [{"id": "d0", "text": "fine", "source": 3}])
    return path, "schema differs: column 'source' is int64 here, string elsewhere"


BAD_FILES: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "malformed-jsonl-line": malformed_jsonl,
    "jsonl-line-not-an-object": jsonl_not_objects,
    "corrupt-gzip-jsonl": corrupt_gzip,
    "truncated-parquet": truncated_parquet,
    "not-parquet": not_parquet,
    "unreadable-path": unreadable,
    "no-text-column": no_text_column,
    "schema-differs": schema_differs,
}


def job(tmp_path: Path, models: dict[str, Path], **input_options) -> tuple[Path, Path]:
    """A config over ``tmp_path/in``: topic classification and entities. Returns (config, output)."""
    cfg = base_config(tmp_path / "in", tmp_path / "out", models)
    cfg["tasks"] = [cfg["tasks"][0], cfg["tasks"][2]]
    cfg["input"].update(input_options)
    return write_config(tmp_path / "job.yaml", **cfg), tmp_path / "out"


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    errors = [line for line in result.stderr.splitlines() if line.startswith("bertpipe: error:")]
    return result, errors


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_fails_fast(tmp_path, models, kind, command):
    """Default ``on_bad_file: fail``: exit code 2 and one line naming the file; the models never run."""
    write_good(tmp_path / "in")
    path, reason = BAD_FILES[kind](tmp_path / "in")
    config, out = job(tmp_path, models)
    result, errors = cli(command, str(config))
    assert result.exit_code == 2, result.output
    assert errors == [
        f"bertpipe: error: bad input file {path}: {reason}; set input.on_bad_file: skip to skip"
    ]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_bad_file_exit_code_from_the_console_script(tmp_path, models):
    """The same through a real process: the exit code and stderr that a scheduler sees."""
    write_good(tmp_path / "in")
    path, reason = malformed_jsonl(tmp_path / "in")
    config, out = job(tmp_path, models)
    proc = subprocess.run(
        [sys.executable, "-m", "bertpipe", "run", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bertpipe: error:")]
    assert errors == [
        f"bertpipe: error: bad input file {path}: {reason}; set input.on_bad_file: skip to skip"
    ]
    assert not out.exists()


def test_several_bad_files_are_counted_in_the_one_line(tmp_path, models):
    write_good(tmp_path / "in")
    path, reason = malformed_jsonl(tmp_path / "in")
    truncated_parquet(tmp_path / "in")
    _, errors = cli("validate", str(job(tmp_path, models)[0]))
    assert errors == [
        f"bertpipe: error: bad input file {path}: {reason} (and 1 more bad files); "
        "set input.on_bad_file: skip to skip"
    ]


def test_every_file_bad_is_an_error_even_when_skipping(tmp_path, models):
    (tmp_path / "in").mkdir()
    truncated_parquet(tmp_path / "in")
    result, errors = cli("run", str(job(tmp_path, models, on_bad_file="skip")[0]))
    assert result.exit_code == 2
    assert errors == ["bertpipe: error: every input file is bad; nothing to do"]
    assert not (tmp_path / "out").exists()


def test_corrupt_data_page_names_the_file(ray_session, tmp_path):
    """A Parquet file whose footer is fine but whose data is not passes the pre-flight check (it reads
    footers only); reading it stops with a ConfigError naming the file, not a decoder's traceback.
    (``ray_session`` first: Ray Data's datasource starts a Ray of its own when none is running.)"""
    path = tmp_path / "in" / "pages.parquet"
    path.parent.mkdir()
    write_parquet(path, good_rows("c", 50, seed=34))
    data = bytearray(path.read_bytes())
    data[100:300] = bytes(b ^ 0xFF for b in data[100:300])  # inside the first column's data pages
    path.write_bytes(bytes(data))
    [shard] = discover([str(path)], InputFormat.auto, {})
    source = ShardDatasource([shard], pa.fs.LocalFileSystem(), "text", None, rows_per_block=16)
    with pytest.raises(ConfigError) as info, pa.fs.LocalFileSystem().open_input_file(str(path)) as f:
        list(source._read_stream(f, str(path)))
    assert (
        str(info.value) == f"bad input file {path}: unreadable parquet file: Corrupt snappy compressed data."
    )


def big_jsonl(path: Path, tail: str) -> None:
    """Rows (with blank lines among them) past the pre-flight's sample of a JSONL file, then ``tail``."""
    lines = [json.dumps({"id": f"b{i}", "text": f"row {i}", "pad": "x" * 4096}) for i in range(2100)]
    assert sum(map(len, lines)) > JSONL_SAMPLE_BYTES
    path.write_text("\n".join(lines[:5]) + "\n\n  \n" + "\n".join(lines[5:]) + "\n" + tail)


@pytest.mark.parametrize(
    "tail, reason",
    [
        ('{"id": "late", "text": "t", "late": 1}\n', "column 'late' is not in the file's pre-flight sample"),
        ('{"id": "bad", "text": \n', "unreadable jsonl file: line 2103: malformed JSON (JSONDecodeError)"),
    ],
)
def test_a_big_jsonl_file_is_typed_by_its_head_and_read_in_full(ray_session, tmp_path, tail, reason):
    """Past the sample the pre-flight check counts lines (exactly the rows Arrow's reader makes) and
    parses only the head; what the rest hides stops the read naming the file and the fault."""
    path = tmp_path / "big.jsonl"
    big_jsonl(path, tail)
    [shard] = discover([str(path)], InputFormat.auto, {})
    report = inspect_shard(filesystem_for(str(path), {}), shard, "text")
    assert report.problem is None and report.schema.names == ["id", "text", "pad"]
    good = path.read_text().rsplit("\n", 2)[0] + "\n"
    assert report.rows == pa.json.read_json(pa.py_buffer(good.encode())).num_rows + 1 == 2101
    source = ShardDatasource([shard], pa.fs.LocalFileSystem(), "text", None, 512, schema=report.schema)
    with pytest.raises(ConfigError) as info, pa.fs.LocalFileSystem().open_input_file(str(path)) as f:
        list(source._read_stream(f, str(path)))
    assert str(info.value).startswith(f"bad input file {path}: ") and reason in str(info.value)


@pytest.fixture(scope="module")
def skip_run(ray_session, models, tmp_path_factory):
    """``on_bad_file: skip`` over the two good files and one file of every bad kind."""
    root = tmp_path_factory.mktemp("skip")
    rows = write_good(root / "in")
    skipped = {}
    for make in BAD_FILES.values():
        path, reason = make(root / "in")
        skipped[str(path)] = reason
    config, out = job(root, models, on_bad_file="skip")
    result, errors = cli("run", str(config))
    summary = json.loads(next((out / "_runs").glob("*.json")).read_text())
    got = {r["id"]: r for r in pads.dataset(str(out), partitioning="hive").to_table().to_pylist()}
    return config, result, errors, summary, got, rows, skipped


def test_skipped_files_are_listed_in_the_summary(skip_run):
    _, result, errors, summary, _, rows, skipped = skip_run
    assert result.exit_code == 0 and errors == [], result.output
    assert {s["file"]: s["reason"] for s in summary["skipped_files"]} == skipped
    assert len(summary["skipped_files"]) == len(BAD_FILES)
    assert summary["files_in"] == 2
    assert summary["rows_in"] == summary["rows_out"] == summary["rows_ok"] == len(rows)
    assert summary["rows_error"] == 0 and summary["errors_by_reason"] == {}


def test_rows_of_good_files_are_all_there_and_equal_hf(skip_run, models):
    _, _, _, _, got, rows, _ = skip_run
    assert sorted(got) == sorted(r["id"] for r in rows)
    texts = [r["text"] for r in rows]
    topic = hf_pipeline("text-classification", model=str(models["topic"]))
    for row, exp in zip(rows, topic(texts, truncation=True, max_length=WINDOW), strict=True):
        assert got[row["id"]]["topic_label"] == exp["label"]
        assert got[row["id"]]["topic_score"] == pytest.approx(exp["score"], abs=1e-4)
    ner = hf_pipeline("token-classification", model=str(models["ner"]), aggregation_strategy="simple")
    for row, exp in zip(rows, ner(texts, stride=STRIDE), strict=True):
        spans = [(e["entity_group"], e["start"], e["end"]) for e in got[row["id"]]["entities"]]
        assert spans == [(e["entity_group"], e["start"], e["end"]) for e in exp]


def test_validate_lists_what_a_run_would_skip(skip_run, caplog):
    config, *_, skipped = skip_run
    validate, _ = cli("validate", str(config), "--set", "output.mode=overwrite")  # the run wrote it
    assert validate.exit_code == 0, validate.output
    assert f"2 ({len(BAD_FILES)} skipped by policy)" in validate.stdout
    warnings = [r.getMessage() for r in caplog.records if r.name == "bertpipe.plan"]
    assert sorted(warnings) == sorted(f"skipping bad input file {p}: {r}" for p, r in skipped.items())


def test_checks_on_ray_in_batches_of_files_equal_the_local_checks(ray_session, models, tmp_path):
    """The cluster's pre-flight check (files in batches per Ray task) reports what the local one does,
    file for file and in order, bad files included."""
    from bertpipe.config import load_config
    from bertpipe.engine.data import inspect_on_ray
    from bertpipe.plan import inspect_locally

    write_good(tmp_path / "in")
    for make in BAD_FILES.values():
        make(tmp_path / "in")
    shards = discover([str(tmp_path / "in")], InputFormat.auto, {})
    config, _ = job(tmp_path, models, on_bad_file="skip")
    local = inspect_locally(load_config(config))(shards)
    on_ray = inspect_on_ray({}, "text", files_per_task=2)(shards)

    def summary(reports):
        return [(r.shard.url, r.rows, r.problem, r.columns, str(r.schema)) for r in reports]

    assert len(shards) > 4 and summary(on_ray) == summary(local)
    # every bad kind but schema drift, which shows only across files
    assert sum(r.problem is not None for r in local) == len(BAD_FILES) - 1
