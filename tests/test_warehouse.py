"""Iceberg and Delta outputs: the real pipeline (``plan`` + ``build_dataset``) written by ``TableTarget``,
read back with pyiceberg / deltalake and DuckDB, and compared with ``transformers.pipeline``.

DuckDB's iceberg and delta extensions are downloaded at run time, which this environment cannot do, so
DuckDB queries the Arrow tables that pyiceberg and deltalake read (the snapshot's files, not the folder).
"""

from __future__ import annotations

from types import SimpleNamespace

import duckdb
import pyarrow as pa
import pytest
import ray
from conftest import STRIDE, WINDOW, base_config, counted, make_texts, write_shards
from transformers import pipeline as hf_pipeline

from bertpipe.config import ConfigError, JobConfig
from bertpipe.engine import data
from bertpipe.engine.data import build_dataset
from bertpipe.io.warehouse import SCRATCH, check_target, conform, table_schema
from bertpipe.plan import plan
from bertpipe.runner import TableTarget, execute, verify_counts
from bertpipe.tasks.sentiment import normalise_sentiment_label

pytestmark = pytest.mark.slow

PARTITION_BY = ["sentiment_label", "source"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("warehouse_corpus")
    texts = make_texts(24, seed=5, max_words=200)
    rows = [
        {"id": f"doc-{i:03d}", "text": t, "source": ["news", "reviews", "forum"][i % 3]}
        for i, t in enumerate(texts)
    ]
    write_shards(folder, rows, n_parquet=2, n_jsonl=1)
    return folder, rows


def job(small_corpus, models, out, fmt: str, mode: str = "error", **output) -> JobConfig:
    cfg = base_config(small_corpus[0], out, models)
    cfg["output"].update(format=fmt, mode=mode, partition_by=PARTITION_BY, **output)
    return JobConfig.model_validate(cfg)


def write(cfg: JobConfig, run_id: str, ds=None, verify=verify_counts):
    """The runner's table write: returns the plan and what was committed (stats and table info)."""
    p = plan(cfg)
    target = TableTarget(cfg, verify)
    stats = target.write(lambda: build_dataset(p, "cpu") if ds is None else ds, p, run_id)
    return p, SimpleNamespace(stats=stats, info=target.info)


@pytest.fixture(scope="module")
def materialized(ray_session, small_corpus, models, tmp_path_factory):
    """The pipeline's output once, for every write but the first Iceberg one (which streams it)."""
    cfg = job(small_corpus, models, tmp_path_factory.mktemp("unused") / "out", "delta")
    return build_dataset(plan(cfg), "cpu").materialize()


@pytest.fixture(scope="module")
def expected(small_corpus, models):
    texts = [r["text"] for r in small_corpus[1]]
    topic = hf_pipeline("text-classification", model=str(models["topic"]), top_k=2)
    sentiment = hf_pipeline("text-classification", model=str(models["sentiment"]))
    ner = hf_pipeline(
        "token-classification", model=str(models["ner"]), aggregation_strategy="simple", stride=STRIDE
    )
    return {
        row["id"]: (t, s, n)
        for row, t, s, n in zip(
            small_corpus[1],
            topic(texts, truncation=True, max_length=WINDOW),
            sentiment(texts, truncation=True, max_length=WINDOW),
            ner(texts),
            strict=True,
        )
    }


def check_rows(table: pa.Table, rows: list[dict], expected: dict, copies: int = 1) -> None:
    """Each id ``copies`` times, inputs kept, task outputs equal to ``transformers.pipeline``'s."""
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows for _ in range(copies))
    source = {r["id"]: r["source"] for r in rows}
    spans = 0
    for got in table.to_pylist():
        topic, sentiment, ner = expected[got["id"]]
        assert got["source"] == source[got["id"]]
        assert got["_error"] is None
        assert got["topic_label"] == topic[0]["label"]
        assert got["topic_score"] == pytest.approx(topic[0]["score"], abs=1e-4)
        assert [t["label"] for t in got["topic_top"]] == [t["label"] for t in topic]
        assert got["sentiment_label"] == normalise_sentiment_label(sentiment["label"])
        assert got["sentiment_score"] == pytest.approx(sentiment["score"], abs=1e-4)
        assert [(e["entity_group"], e["start"], e["end"]) for e in got["entities"]] == [
            (e["entity_group"], e["start"], e["end"]) for e in ner
        ]
        assert [e["score"] for e in got["entities"]] == pytest.approx([e["score"] for e in ner], abs=1e-4)
        spans += len(got["entities"])
    assert spans > 0, "the fixture NER model should find entities"


def check_types(schema: pa.Schema) -> None:
    """Task columns come back typed, NER spans and top-k as lists of structs."""
    assert schema.field("topic_label").type in (pa.string(), pa.large_string())
    assert schema.field("topic_score").type == pa.float32()
    top = schema.field("topic_top").type
    assert pa.types.is_list(top) or pa.types.is_large_list(top)
    assert [f.name for f in top.value_type] == ["label", "score"]
    entities = schema.field("entities").type.value_type
    assert [f.name for f in entities] == ["entity_group", "word", "start", "end", "score"]
    assert entities.field("start").type == pa.int32() and entities.field("score").type == pa.float32()


def check_with_duckdb(enriched: pa.Table, rows: list[dict]) -> None:
    """The enrichment use: join the table back to the source rows on the id."""
    source = pa.Table.from_pylist([{"id": r["id"], "source": r["source"]} for r in rows])  # noqa: F841
    joined = duckdb.sql(
        "select count(*), count(distinct s.id), count(*) filter (where s.source = t.source) "
        "from source s join enriched t using (id)"
    ).fetchall()
    assert joined == [(len(rows), len(rows), len(rows))]
    labels = duckdb.sql("select distinct sentiment_label from enriched").fetchall()
    assert {label for (label,) in labels} <= {"positive", "negative"}


def iceberg_catalog(out):
    """The default catalog of ``output.path`` = ``out``, opened as a reader would (SQL catalogs keep
    their tables under the catalog name)."""
    from pyiceberg.catalog import load_catalog

    return load_catalog(
        "bertpipe", type="sql", uri=f"sqlite:///{out}/catalog.db", warehouse=f"file://{out}/warehouse"
    )


def test_iceberg_create_append_overwrite(small_corpus, models, materialized, expected, tmp_path):
    from pyiceberg.types import FloatType, ListType, StringType, StructType

    rows = small_corpus[1]
    out = tmp_path / "out"
    cfg = job(small_corpus, models, out, "iceberg", table="bertpipe.enriched")

    p, created = write(cfg, "run-1")  # streams the whole pipeline into a new table
    catalog = iceberg_catalog(out)
    table = catalog.load_table("bertpipe.enriched")
    first = table.current_snapshot()
    assert created.info == {
        "format": "iceberg",
        "table": "Iceberg table bertpipe.enriched",
        "mode": "error",
        "snapshot_id": first.snapshot_id,
    }
    assert created.stats.rows == len(rows) and created.stats.files == int(first.summary["added-data-files"])
    assert first.summary["bertpipe.run_id"] == "run-1"
    assert [
        (table.schema().find_column_name(f.source_id), str(f.transform)) for f in table.spec().fields
    ] == [
        ("sentiment_label", "identity"),
        ("source", "identity"),
    ]
    assert all("/sentiment_label=" in task.file.file_path for task in table.scan().plan_files())
    assert table.schema().find_field("topic_label").field_type == StringType()
    assert table.schema().find_field("topic_score").field_type == FloatType()
    entities = table.schema().find_field("entities").field_type
    assert isinstance(entities, ListType) and isinstance(entities.element_type, StructType)
    assert table.schema().as_arrow().names == table_schema(p).names
    data = table.scan().to_arrow()
    check_types(data.schema)
    check_rows(data, rows, expected)
    check_with_duckdb(data, rows)

    with pytest.raises(ConfigError, match="already has data"):
        check_target(cfg.output)
    moved = cfg.model_copy(deep=True)
    moved.output.partition_by = ["source"]
    moved.output.mode = "append"
    with pytest.raises(ConfigError, match="partitioned by"):
        check_target(moved.output)

    cfg.output.mode = "append"
    _, appended = write(cfg, "run-2", materialized)
    table = catalog.load_table("bertpipe.enriched")
    assert appended.info["snapshot_id"] == table.current_snapshot().snapshot_id != first.snapshot_id
    check_rows(table.scan().to_arrow(), rows, expected, copies=2)

    cfg.output.mode = "overwrite"
    _, replaced = write(cfg, "run-3", materialized)
    table = catalog.load_table("bertpipe.enriched")
    check_rows(table.scan().to_arrow(), rows, expected)
    assert replaced.info["snapshot_id"] == table.current_snapshot().snapshot_id
    assert len(table.metadata.metadata_log) == 3  # after the table's creation, one catalog commit per write
    assert [(s.summary.operation.value, s.summary["bertpipe.run_id"]) for s in table.snapshots()[-2:]] == [
        ("delete", "run-3"),
        ("append", "run-3"),
    ]
    before = table.scan(snapshot_id=appended.info["snapshot_id"]).to_arrow()
    check_rows(before, rows, expected, copies=2)  # time travel still sees the rows overwritten

    _, emptied = write(cfg, "run-4", materialized.limit(0), verify=lambda p, stats: None)
    assert emptied.stats.rows == 0
    assert catalog.load_table("bertpipe.enriched").scan().to_arrow().num_rows == 0


def test_delta_create_append_overwrite(small_corpus, models, materialized, expected, tmp_path):
    from deltalake import DeltaTable

    rows = small_corpus[1]
    out = tmp_path / "delta"
    cfg = job(small_corpus, models, out, "delta", table="enriched")

    _, created = write(cfg, "run-1", materialized)  # the Iceberg test streams the pipeline itself
    table = DeltaTable(str(out))
    assert created.info == {"format": "delta", "table": f"Delta table {out}", "mode": "error", "version": 0}
    assert created.stats.rows == len(rows) and created.stats.files == len(table.file_uris())
    assert table.metadata().name == "enriched"
    assert list(table.metadata().partition_columns) == PARTITION_BY
    assert all("/sentiment_label=" in uri for uri in table.file_uris())
    data = table.to_pyarrow_table()
    check_types(data.schema)
    check_rows(data, rows, expected)
    check_with_duckdb(data, rows)

    with pytest.raises(ConfigError, match="already has data"):
        check_target(cfg.output)

    cfg.output.mode = "append"
    _, appended = write(cfg, "run-2", materialized)
    assert appended.info["version"] == 1
    check_rows(DeltaTable(str(out)).to_pyarrow_table(), rows, expected, copies=2)

    cfg.output.mode = "overwrite"
    _, replaced = write(cfg, "run-3", materialized)
    table = DeltaTable(str(out))
    assert replaced.info["version"] == table.version() == 2
    check_rows(table.to_pyarrow_table(), rows, expected)
    check_rows(DeltaTable(str(out), version=1).to_pyarrow_table(), rows, expected, copies=2)

    _, emptied = write(cfg, "run-4", materialized.limit(0), verify=lambda p, stats: None)
    assert emptied.stats.rows == 0 and emptied.info["version"] == 3
    assert DeltaTable(str(out)).to_pyarrow_table().num_rows == 0


def _snapshot(fmt: str, out):
    """What a reader sees: the current snapshot id / version and the rows."""
    if fmt == "iceberg":
        table = iceberg_catalog(out).load_table("bertpipe.enriched")
        return table.current_snapshot().snapshot_id, len(table.metadata.metadata_log), table.scan().to_arrow()
    from deltalake import DeltaTable

    table = DeltaTable(str(out))
    return table.version(), None, table.to_pyarrow_table()


@pytest.mark.parametrize("fmt", ["iceberg", "delta"])
def test_failed_write_leaves_the_table_as_it_was(fmt, small_corpus, models, materialized, tmp_path):
    rows = small_corpus[1]
    out = tmp_path / "out"
    cfg = job(small_corpus, models, out, fmt, mode="append", table="bertpipe.enriched")
    write(cfg, "run-1", materialized)
    version, commits, data = _snapshot(fmt, out)
    assert data.num_rows == len(rows)

    def refuse(p, stats):
        assert stats.rows == len(rows) and stats.distinct_keys == len(rows) and stats.duplicate_ids == 0
        raise RuntimeError("refused by the check")

    with pytest.raises(RuntimeError, match="refused by the check"):
        write(cfg, "run-2", materialized, verify=refuse)

    def fail_late(batch: pa.Table) -> pa.Table:
        if "doc-023" in batch.column("id").to_pylist():
            raise ValueError("worker failure")
        return batch

    # One row per block: the other blocks are written (as files no snapshot lists) before the failure.
    failing = materialized.repartition(len(rows)).map_batches(fail_late, batch_format="pyarrow", batch_size=1)
    with pytest.raises(Exception, match="worker failure"):
        write(cfg, "run-3", failing)

    after_version, after_commits, after = _snapshot(fmt, out)
    assert (after_version, after_commits) == (version, commits)
    assert sorted(after.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert not list(out.rglob(f"{SCRATCH}*")), "the counting files of failed writes are deleted"


@pytest.mark.parametrize("where", ["driver", "distributed"])
def test_table_counts_in_the_driver_equal_the_distributed_counts(
    where, small_corpus, models, materialized, tmp_path, monkeypatch
):
    """A table output with repeated row keys and ids, null ids and errors, written by several tasks:
    the counts the check gets, from the scratch files read in the driver or by Ray Data aggregations,
    equal a Counter over the rows the table holds, and no scratch file is left. One format: the
    counting is the same code for both."""
    if where == "distributed":
        monkeypatch.setattr(data, "SMALL_OUTPUT_ROWS", 0)
        monkeypatch.setattr(data, "_stats_in_driver", None)  # fails if the driver path runs
    else:
        monkeypatch.setattr(data, "_surplus", None)
    out = tmp_path / "out"
    cfg = job(small_corpus, models, out, "delta", table="enriched")
    p = plan(cfg)
    base = conform(pa.concat_tables(ray.get(materialized.to_arrow_refs())), table_schema(p)).to_pylist()
    again = [{**r, "_error": ["bad_a", "bad_b", None][i % 3]} for i, r in enumerate(base[:10])]
    new_keys = [
        {**r, "_row_key": r["_row_key"] + "-x", "id": None if i % 4 == 0 else r["id"], "_error": "bad_a"}
        for i, r in enumerate(base[10:20])
    ]
    rows = pa.Table.from_pylist(base + again + new_keys, schema=table_schema(p))
    seen = []
    tasks = ray.data.from_arrow(rows).repartition(4)  # a scratch file per write task
    _, written = write(cfg, "run-1", tasks, verify=lambda p, stats: seen.append(stats))

    from deltalake import DeltaTable

    table = DeltaTable(str(out))
    got = written.stats
    assert seen == [got]
    assert (got.rows, got.distinct_keys, got.errors_by_reason, got.duplicate_ids) == counted(
        table.to_pyarrow_table(), "id"
    )
    assert got.rows == 44 and got.duplicate_ids == 17 and got.files == len(table.file_uris())
    assert not list(out.rglob(f"{SCRATCH}*"))


def test_config_errors(small_corpus, models, tmp_path):
    cfg = job(small_corpus, models, tmp_path / "out", "iceberg", mode="resume")
    with pytest.raises(ConfigError, match="output.mode resume is not supported"):
        check_target(cfg.output)
    cfg = job(small_corpus, models, tmp_path / "out", "iceberg", table="enriched")
    with pytest.raises(ConfigError, match="namespace.table"):
        check_target(cfg.output)
    cfg = job(small_corpus, models, tmp_path / "out", "delta", catalog={"type": "sql"})
    with pytest.raises(ConfigError, match="output.catalog applies to output.format iceberg"):
        check_target(cfg.output)


@pytest.mark.parametrize("fmt", ["iceberg", "delta"])
def test_error_mode_checks_again_before_the_commit(fmt, small_corpus, models, materialized, tmp_path):
    """Rows that reach the table while the run is going (another writer) stop the commit of mode error."""
    import deltalake

    out = tmp_path / "out"
    cfg = job(small_corpus, models, out, fmt, table="bertpipe.enriched")
    p = plan(cfg)
    other = conform(pa.concat_tables(ray.get(materialized.to_arrow_refs())), table_schema(p))

    def another_writer(stats):
        if fmt == "iceberg":
            iceberg_catalog(out).load_table("bertpipe.enriched").append(other)
        else:
            deltalake.write_deltalake(str(out), other, partition_by=PARTITION_BY)

    with pytest.raises(ConfigError, match="got data from elsewhere during the run"):
        write(cfg, "run-1", materialized, lambda p, stats: another_writer(stats))
    assert _snapshot(fmt, out)[2].num_rows == other.num_rows


def test_run_writes_a_delta_table_end_to_end(ray_session, small_corpus, models, expected, tmp_path):
    """``bertpipe run`` with ``output.format: delta``: the runner's own path, summary included."""
    from deltalake import DeltaTable

    out = tmp_path / "delta-run"
    summary = execute(job(small_corpus, models, out, "delta", table="enriched"))
    assert summary["rows_in"] == summary["rows_out"] == len(small_corpus[1])
    assert summary["table"]["format"] == "delta" and summary["table"]["version"] == 0
    check_rows(DeltaTable(str(out)).to_pyarrow_table(), small_corpus[1], expected)
