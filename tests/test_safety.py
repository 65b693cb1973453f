"""Safe defaults: pickle weights refused unless allowed, remote code off, partition values that can
never leave the output path, secrets never printed."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest
from conftest import base_config, write_shards
from tiny_models import build_sequence_classifier

from bertpipe.config import ConfigError, JobConfig
from bertpipe.io.partitions import MAX_ENCODED_BYTES, safe_partition_value
from bertpipe.models.loading import inspect_model
from bertpipe.runner import execute
from bertpipe.tasks import parse_task


def test_pickle_only_weights_are_refused_with_the_way_to_allow_them(tmp_path):
    folder = build_sequence_classifier(tmp_path / "pickled", ["a", "b"], pickle_only=True)
    with pytest.raises(ConfigError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle: true"):
        inspect_model(parse_task(dict(name="t", kind="classification", model=str(folder))))
    trusted = parse_task(dict(name="t", kind="classification", model=str(folder), allow_pickle=True))
    info = inspect_model(trusted)
    assert info.weight_files == ("pytorch_model.bin",)


def test_remote_code_is_off_by_default():
    assert parse_task(dict(name="t", kind="ner", model="m")).trust_remote_code is False


def test_long_partition_values_are_shortened_and_distinct():
    long_a, long_b = "x" * 10_000, "x" * 9_999 + "y"
    assert safe_partition_value("a/b") == "a/b", "pyarrow percent-encodes; the value round-trips"
    safe_a, safe_b = safe_partition_value(long_a), safe_partition_value(long_b)
    assert safe_a != safe_b and len(safe_a) < MAX_ENCODED_BYTES


@pytest.mark.slow
def test_hostile_partition_values_stay_inside_the_output(ray_session, models, tmp_path):
    values = ["../../etc", "a/b", "", "x" * 10_000, "/abs/path", "..", "ünï\u00e9 \\ : * ? | <>"]
    rows = [{"id": str(i), "text": f"some words number {i}", "source": v} for i, v in enumerate(values)]
    write_shards(tmp_path / "in", rows, n_parquet=1, n_jsonl=1)
    out = tmp_path / "job" / "out"
    cfg = base_config(tmp_path / "in", out, models)
    cfg["output"]["partition_by"] = ["source"]
    summary = execute(JobConfig.model_validate(cfg))
    assert summary["rows_out"] == len(values)
    job_root = tmp_path / "job"
    written = [p for p in job_root.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in written), "a file escaped the output"
    assert not (tmp_path / "etc").exists() and not (tmp_path.parent / "etc").exists()
    for folder in out.iterdir():
        assert len(folder.name.encode()) < 255
    table = pads.dataset(str(out), partitioning="hive").to_table().to_pylist()
    by_id = {r["id"]: r for r in table}
    for i, value in enumerate(values):
        row = by_id[str(i)]
        original = json.loads(row["_partition_original"])["source"] if row["_partition_original"] else None
        assert (original or row["source"]) == value, "the original value must survive"
    assert by_id["3"]["source"] != values[3] and by_id["3"]["_partition_original"]
