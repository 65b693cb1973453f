"""Warehouse tables as input: a Delta table and an Iceberg table (SQLite catalog) enriched into the other
format with ``output.mode: merge`` (one row per id, the latest run's labels) and ``incremental`` (only
the rows of versions appended since the last run), labels checked against ``transformers.pipeline``."""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import WINDOW, base_config, make_texts
from tiny_models import build_sequence_classifier
from transformers import pipeline as hf_pipeline

from bertpipe.config import ConfigError, JobConfig
from bertpipe.plan import plan
from bertpipe.runner import check_output, execute
from bertpipe.tasks.sentiment import normalise_sentiment_label

pytestmark = pytest.mark.slow

SOURCE_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("day", pa.string())])


def source_rows(start: int, n: int) -> pa.Table:
    texts = make_texts(n, seed=40 + start, max_words=60)
    rows = [{"id": f"r{start + i:02d}", "text": t, "day": "2026-11-28"} for i, t in enumerate(texts)]
    return pa.Table.from_pylist(rows, SOURCE_SCHEMA)


def iceberg_catalog(folder):
    from pyiceberg.catalog import load_catalog

    return load_catalog(
        "bertpipe", type="sql", uri=f"sqlite:///{folder}/catalog.db", warehouse=f"file://{folder}/warehouse"
    )


class Source:
    """A source table that the test appends to, as an upstream system would."""

    def __init__(self, fmt: str, folder):
        self.fmt, self.folder = fmt, folder
        folder.mkdir(parents=True)
        if fmt == "iceberg":
            catalog = iceberg_catalog(folder)
            catalog.create_namespace("raw")
            catalog.create_table("raw.events", schema=SOURCE_SCHEMA)

    def append(self, rows: pa.Table) -> None:
        if self.fmt == "delta":
            import deltalake

            deltalake.write_deltalake(str(self.folder), rows, mode="append")
        else:
            iceberg_catalog(self.folder).load_table("raw.events").append(rows)

    def input(self) -> dict:
        if self.fmt == "delta":
            return {"format": "delta", "paths": [str(self.folder)]}
        return {"format": "iceberg", "paths": [str(self.folder)], "table": "raw.events"}


def read_output(fmt: str, out) -> pa.Table:
    if fmt == "delta":
        from deltalake import DeltaTable

        return DeltaTable(str(out)).to_pyarrow_table()
    return iceberg_catalog(out).load_table("bertpipe.enriched").scan().to_arrow()


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """Another sentiment model: a new model version whose labels differ from the first's."""
    return build_sequence_classifier(
        tmp_path_factory.mktemp("v2") / "sentiment", ["NEGATIVE", "POSITIVE"], seed=9, model_max_length=WINDOW
    )


def oracle(model, texts: list[str]) -> list[tuple[str, float]]:
    out = hf_pipeline("text-classification", model=str(model))(texts, truncation=True, max_length=WINDOW)
    return [(normalise_sentiment_label(o["label"]), o["score"]) for o in out]


@pytest.mark.parametrize(("source_fmt", "out_fmt"), [("delta", "iceberg"), ("iceberg", "delta")])
def test_table_in_merge_and_incremental(ray_session, models, second_model, tmp_path, source_fmt, out_fmt):
    source = Source(source_fmt, tmp_path / "source")
    first, appended = source_rows(0, 8), source_rows(8, 3)
    source.append(first)
    out = tmp_path / "out"
    cfg = base_config(tmp_path, out, models)
    cfg["input"] = {**source.input(), "id_column": "id"}
    cfg["output"].update(format=out_fmt, table="bertpipe.enriched" if out_fmt == "iceberg" else "enriched")
    cfg["tasks"] = [cfg["tasks"][1]]

    def run(mode: str, model) -> dict:
        job = JobConfig.model_validate(cfg)
        job.output.mode = mode
        job.tasks[0].model = str(model)
        return execute(job)

    def labels() -> dict[str, tuple[str, float, str]]:
        table = read_output(out_fmt, out)
        assert table.column("id").to_pylist().count(None) == 0
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)), "one row per id"
        return {
            r["id"]: (r["sentiment_label"], r["sentiment_score"], r["_row_key"]) for r in table.to_pylist()
        }

    # 1. incremental into a table that does not exist yet: every row, the ledger records the files
    summary = run("incremental", models["sentiment"])
    assert summary["rows_in"] == summary["rows_out"] == 8
    # 2. merge with a new model version: the same ids, updated in place with its labels
    summary = run("merge", second_model)
    assert summary["rows_in"] == 8 and summary["table"]["mode"] == "merge"
    texts = first.column("text").to_pylist()
    got = labels()
    assert sorted(got) == first.column("id").to_pylist()
    second = oracle(second_model, texts)
    assert second != oracle(models["sentiment"], texts), "the two model versions must disagree"
    table_name = "raw.events" if source_fmt == "iceberg" else tmp_path / "source"
    for row_id, (label, score) in zip(first.column("id").to_pylist(), second, strict=True):
        assert got[row_id][:2] == (label, pytest.approx(score, abs=1e-4))
        assert got[row_id][2] == f"{source_fmt}:{table_name}#{row_id}"  # stable: from the id
    # 3. the source gains a version; incremental (with the first model) touches only its rows
    source.append(appended)
    if source_fmt == "iceberg":  # the run itself is the same as Delta's: planning shows the selection
        job = JobConfig.model_validate({**cfg, "output": {**cfg["output"], "mode": "incremental"}})
        target, _ = check_output(job)
        selected = target.select(plan(job))
        assert selected.rows_in == 3 and selected.table is None  # only the new snapshot's data file
        return
    summary = run("incremental", models["sentiment"])
    assert summary["rows_in"] == summary["rows_out"] == 3
    after = labels()
    assert {k: v for k, v in after.items() if k in got} == got  # the old rows keep the merge's labels
    new_ids = appended.column("id").to_pylist()
    for row_id, (label, score) in zip(
        new_ids, oracle(models["sentiment"], appended.column("text").to_pylist()), strict=True
    ):
        assert after[row_id][:2] == (label, pytest.approx(score, abs=1e-4))
    assert run("incremental", models["sentiment"]).get("nothing_to_do") is True


def test_table_input_checks(models, tmp_path):
    source = Source("delta", tmp_path / "source")
    source.append(source_rows(0, 2))
    cfg = base_config(tmp_path, tmp_path / "out", models)
    cfg["input"] = {**source.input(), "id_column": "key"}
    with pytest.raises(
        ConfigError, match=r"input.id_column 'key' is not a column of Delta table .*source \(columns: id"
    ):
        plan(JobConfig.model_validate(cfg))
    cfg["input"] = {**source.input(), "version": 7}
    with pytest.raises(ConfigError, match="input.version 7: "):
        plan(JobConfig.model_validate(cfg))
    cfg["input"] = {"format": "iceberg", "paths": [str(tmp_path / "source")], "table": "raw.missing"}
    with pytest.raises(ConfigError, match="input.table raw.missing: no such table"):
        plan(JobConfig.model_validate(cfg))
    cfg["input"] = {"format": "delta", "paths": [str(tmp_path / "source")], "id_column": None}
    with pytest.raises(ValueError, match="input.format delta: set input.id_column"):
        JobConfig.model_validate(cfg)
    cfg["input"] = {"paths": [str(tmp_path / "source")]}
    cfg["output"]["mode"] = "merge"
    with pytest.raises(ConfigError, match="output.mode merge applies to output.format iceberg or delta"):
        execute(JobConfig.model_validate(cfg))
