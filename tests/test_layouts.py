"""Input layouts that warehouses have: hive folders (``dt=.../``), hidden files beside the data, Parquet,
JSONL and CSV shards of one folder with one schema, declared types, and which file is bad and why."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import WINDOW, base_config, make_texts, write_config
from ray import cloudpickle
from transformers import pipeline as hf_pipeline
from typer.testing import CliRunner

from bertpipe.cli import app
from bertpipe.config import ConfigError, JobConfig
from bertpipe.engine.data import ShardDatasource
from bertpipe.io.paths import Shard, ShardNaming, discover
from bertpipe.io.reader import read_shard
from bertpipe.plan import check_shards, inspect_locally
from bertpipe.runner import execute
from bertpipe.tasks.sentiment import normalise_sentiment_label

ALL = ("parquet", "jsonl", "csv")


def jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def config(folder: Path, out: Path, models, **input_options) -> JobConfig:
    cfg = base_config(folder, out, models)
    cfg["tasks"] = [cfg["tasks"][1]]  # sentiment: one model keeps the runs short
    cfg["input"].update(input_options)
    return JobConfig.model_validate(cfg)


def checked(cfg: JobConfig):
    """Discovery and the pre-flight check as ``plan`` runs them: (shards, skipped, schema)."""
    shards = discover(cfg.input.paths, cfg.input.format, {}, formats=ALL, partitioning=cfg.input.partitioning)
    _, skipped, schema = check_shards(cfg, shards, inspect_locally(cfg))
    return shards, skipped, schema


def read_all(cfg: JobConfig, shards, schema) -> pa.Table:
    tables = []
    for shard in shards:
        with open(shard.path, "rb") as fh:
            tables += read_shard(fh, shard, "text", None, 2, schema=schema, csv=cfg.input.csv)
    return pa.concat_tables(tables)


@pytest.fixture(scope="module")
def warehouse_folder(tmp_path_factory):
    """``events/dt=.../`` with Parquet, JSONL and a Latin-1 CSV shard, and what other tools leave beside
    them: a Delta log, ``_SUCCESS``, a hidden folder, an earlier bertpipe output's ``_runs``/``_state``."""
    root = tmp_path_factory.mktemp("warehouse") / "events"
    texts = make_texts(18, seed=21, max_words=80)
    rows = []
    for i, text in enumerate(texts):
        day = f"2026-11-{20 + i % 9:02d}"
        rows.append({"id": f"e{i:02d}", "text": text, "day": day, "amount": i, "note": None})
    parquet, lines, csv = rows[:6], rows[6:12], rows[12:]
    (root / "dt=2026-11-28").mkdir(parents=True)
    pq.write_table(  # Parquet says: day is a string, amount an integer, note a string
        pa.Table.from_pylist(parquet).cast(
            pa.schema(
                [
                    ("id", pa.string()),
                    ("text", pa.string()),
                    ("day", pa.string()),
                    ("amount", pa.int64()),
                    ("note", pa.string()),
                ]
            )
        ),
        root / "dt=2026-11-28" / "part-0.parquet",
    )
    # JSONL: the same ISO dates (Arrow would infer timestamps), floats for amount, note null everywhere
    jsonl(root / "dt=2026-11-29" / "part-1.jsonl", [{**r, "amount": r["amount"] + 0.5} for r in lines])
    # CSV in Latin-1 with a text that spans lines inside quotes
    csv[0]["text"] = 'Café "au lait",\nsecond line'
    body = "id;text;day;amount;note\n" + "".join(
        f'{r["id"]};"{r["text"].replace(chr(34), chr(34) * 2)}";{r["day"]};{r["amount"]};\n' for r in csv
    )
    (root / "dt=2026-11-30").mkdir()
    (root / "dt=2026-11-30" / "part-2.csv").write_bytes(body.encode("latin-1"))
    for noise in (
        "_delta_log/00000000000000000000.json",
        "_runs/r.json",
        "_state/ledger.json",
        "dt=2026-11-29/.spark-staging/part.jsonl",
        "dt=2026-11-29/_temporary/0/part.parquet",
    ):
        (root / noise).parent.mkdir(parents=True, exist_ok=True)
        (root / noise).write_text('{"commitInfo": {"operation": "WRITE"}}\n')
    (root / "_SUCCESS").write_text("")
    dts = ["2026-11-28"] * 6 + ["2026-11-29"] * 6 + ["2026-11-30"] * 6
    return root, [{**r, "dt": dt} for r, dt in zip(rows, dts, strict=True)]


CSV_OPTIONS = {"csv": {"delimiter": ";", "encoding": "latin-1"}}


def test_discovery_skips_hidden_files_and_reads_hive_keys(warehouse_folder, tmp_path):
    root, _ = warehouse_folder
    shards = discover([str(root)], "auto", {}, formats=ALL, partitioning="hive")
    assert [(Path(s.path).relative_to(root).as_posix(), s.partitions) for s in shards] == [
        ("dt=2026-11-28/part-0.parquet", (("dt", "2026-11-28"),)),
        ("dt=2026-11-29/part-1.jsonl", (("dt", "2026-11-29"),)),
        ("dt=2026-11-30/part-2.csv", (("dt", "2026-11-30"),)),
    ]
    # the root itself may be a partition folder (the daily job reads one day); a glob finds the same
    [one] = discover([str(root / "dt=2026-11-29")], "auto", {}, formats=ALL, partitioning="hive")
    assert one.partitions == (("dt", "2026-11-29"),)
    globbed = discover([f"{root}/dt=*/part-*"], "auto", {}, formats=ALL, partitioning="hive")
    assert [s.path for s in globbed] == [s.path for s in shards]
    assert all(s.partitions == () for s in discover([str(root)], "auto", {}, formats=ALL))
    encoded = tmp_path / "t" / "region=a%2Fb" / "x.jsonl"  # as pyarrow's writer encodes a/b
    jsonl(encoded, [{"text": "x"}])
    assert discover([str(tmp_path / "t")], "jsonl", {}, partitioning="hive")[0].partitions == (
        ("region", "a/b"),
    )


def test_the_reader_names_every_discovered_file_from_its_path(warehouse_folder):
    """What read tasks carry instead of a table of every file gives each file's url, format and
    partitions as ``discover`` found them: mixed formats in hive folders, one declared format, s3 urls."""
    root, _ = warehouse_folder
    mixed = discover([str(root)], "auto", {}, formats=ALL, partitioning="hive")
    declared = discover([f"{root}/dt=2026-11-29/*"], "jsonl", {}, partitioning="hive")
    plain = discover([str(root)], "auto", {}, formats=ALL)
    on_s3 = [replace(s, path=f"bucket{s.path}", url=f"s3://bucket{s.path}") for s in mixed]
    for shards in (mixed, declared, plain, on_s3):
        naming = ShardNaming.of(shards)
        assert all(naming.names(s) for s in shards)
        assert [naming.shard(s.path).url for s in shards] == [s.url for s in shards]
    # a file the rule does not name (not one discover makes) is kept by path
    odd = Shard(str(root / "odd.txt"), str(root / "odd.txt"), "parquet", 1, "v")
    assert not ShardNaming.of(mixed).names(odd)


def test_read_tasks_do_not_grow_with_the_number_of_files(ray_session, tmp_path):
    """Each read task pickles the datasource: 2,000 files must cost it no more than 20 do."""
    folder = tmp_path / "many"
    for i in range(2000):
        jsonl(folder / f"dt=d{i % 7}" / f"part-{i:05d}.jsonl", [{"text": "x"}])

    def pickled_size(n: int) -> int:
        shards = discover([str(folder)], "auto", {}, partitioning="hive")[:n]
        source = ShardDatasource(shards, pa.fs.LocalFileSystem(), "text", None, rows_per_block=16)
        assert not source._unnamed
        return len(cloudpickle.dumps(source))

    assert pickled_size(2000) < pickled_size(20) + 1024


def test_validate_a_folder_beside_a_delta_log_and_an_earlier_output(warehouse_folder, models, tmp_path):
    root, rows = warehouse_folder
    cfg = config(root, tmp_path / "out", models, **CSV_OPTIONS).model_dump(mode="json", by_alias=True)
    result = CliRunner().invoke(
        app, ["validate", str(write_config(tmp_path / "job.yaml", **cfg)), "--no-estimate"]
    )
    assert result.exit_code == 0, result.output
    assert "3 (0 skipped by policy)" in result.stdout and f"│ {len(rows)} " in result.stdout


def test_one_schema_across_parquet_jsonl_and_csv(warehouse_folder, models, tmp_path):
    root, rows = warehouse_folder
    cfg = config(root, tmp_path / "out", models, **CSV_OPTIONS)
    shards, skipped, schema = checked(cfg)
    assert skipped == []
    assert schema == pa.schema(
        [
            ("id", pa.string()),
            ("text", pa.string()),
            ("day", pa.string()),
            ("amount", pa.float64()),
            ("note", pa.string()),
            ("dt", pa.string()),
        ]
    )
    got = read_all(cfg, shards, schema)
    assert sorted(got.column("id").to_pylist()) == sorted(r["id"] for r in rows)  # each once
    assert got.column_names[:6] == schema.names
    expected = {r["id"]: r for r in rows}
    for row in got.to_pylist():
        want = expected[row["id"]]
        assert (row["text"], row["day"], row["dt"], row["note"]) == (
            want["text"],
            want["day"],
            want["dt"],
            None,
        )
        assert row["amount"] == pytest.approx(want["amount"] + (0.5 if want["dt"] == "2026-11-29" else 0))
    assert 'Café "au lait",\nsecond line' in got.column("text").to_pylist()

    # input.schema types columns (hive keys too); partitioning: none leaves the folders alone
    typed = config(root, tmp_path / "out", models, schema={"day": "date32", "dt": "date32"}, **CSV_OPTIONS)
    shards, _, schema = checked(typed)
    assert schema.field("day").type == schema.field("dt").type == pa.date32()
    got = read_all(typed, shards, schema)
    assert {str(d) for d in got.column("dt").to_pylist()} == {"2026-11-28", "2026-11-29", "2026-11-30"}
    _, _, schema = checked(config(root, tmp_path / "out", models, partitioning="none", **CSV_OPTIONS))
    assert "dt" not in schema.names


def test_parquet_types_win_over_json_text(models, tmp_path):
    """A Parquet date column reads JSONL's ISO strings as dates; a string that is no date is a bad file."""
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(
        pa.table({"id": ["p0"], "text": ["a"], "day": pa.array([19000], pa.date32()), "n": [None]}),
        folder / "a.parquet",
    )
    jsonl(folder / "b.jsonl", [{"id": "j0", "text": "b", "day": "2026-11-28", "n": 3}])
    cfg = config(folder, tmp_path / "out", models)
    shards, skipped, schema = checked(cfg)
    assert skipped == [] and schema.field("day").type == pa.date32() and schema.field("n").type == pa.int64()
    assert [str(d) for d in read_all(cfg, shards, schema).column("day").to_pylist()] == [
        "2022-01-08",
        "2026-11-28",
    ]
    jsonl(folder / "c.jsonl", [{"id": "j1", "text": "c", "day": "last tuesday"}])
    with pytest.raises(ConfigError) as info:
        checked(cfg)
    assert str(info.value).startswith(
        f"bad input file {folder / 'c.jsonl'}: column 'day': string values cannot be read as date32[day] ("
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ({"tags": {"a": 1}}, "schema differs: column 'tags' is struct<a: int64> here, string elsewhere"),
        ({"tags": 7}, "schema differs: column 'tags' is int64 here, string elsewhere"),
    ],
)
def test_real_conflicts_name_the_column_both_types_and_the_file(models, tmp_path, line, problem):
    folder = tmp_path / "in"
    jsonl(folder / "a.jsonl", [{"id": "a", "text": "x", "tags": "red"}])
    jsonl(folder / "b.jsonl", [{"id": "b", "text": "y", "tags": "blue"}])
    jsonl(folder / "c.jsonl", [{"id": "c", "text": "z", **line}])
    with pytest.raises(ConfigError) as info:
        checked(config(folder, tmp_path / "out", models))
    assert str(info.value) == (
        f"bad input file {folder / 'c.jsonl'}: {problem}; set input.on_bad_file: skip to skip"
    )
    # declared, the number is read as text; the struct still cannot be
    cfg = config(folder, tmp_path / "out", models, schema={"tags": "string"}, on_bad_file="skip")
    _, skipped, schema = checked(cfg)
    assert schema.field("tags").type == pa.string()
    assert len(skipped) == (1 if isinstance(line["tags"], dict) else 0)


def test_input_schema_and_csv_options_are_checked_as_config(models, tmp_path):
    with pytest.raises(ValueError, match="day: unknown Arrow type 'dat'"):
        config(tmp_path, tmp_path / "out", models, schema={"day": "dat"})
    with pytest.raises(ValueError, match="unknown encoding 'latin-9x'"):
        config(tmp_path, tmp_path / "out", models, csv={"encoding": "latin-9x"})


@pytest.mark.slow
def test_hive_folder_end_to_end(ray_session, warehouse_folder, models, tmp_path):
    """Every row once, ``dt`` as the output's folder level (not also in the files), the JSONL dates as
    the Parquet ones, labels as ``transformers.pipeline``'s, and DuckDB reads it back."""
    root, rows = warehouse_folder
    out = tmp_path / "out"
    cfg = config(root, out, models, **CSV_OPTIONS)
    cfg.output.partition_by = ["dt"]
    summary = execute(cfg)
    assert summary["rows_in"] == summary["rows_out"] == summary["rows_ok"] == len(rows)
    assert summary["skipped_files"] == []
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("dt=")) == [
        "dt=2026-11-28",
        "dt=2026-11-29",
        "dt=2026-11-30",
    ]
    assert all("dt" not in pq.read_schema(f).names for f in out.glob("dt=*/*.parquet"))
    got = duckdb.sql(
        f"select id, text, day, dt, amount, sentiment_label, sentiment_score "
        f"from read_parquet('{out}/**/*.parquet', hive_partitioning=true) order by id"
    ).fetchall()
    assert [(r[0], r[1], r[2], str(r[3])) for r in got] == [
        (r["id"], r["text"], r["day"], r["dt"]) for r in sorted(rows, key=lambda r: r["id"])
    ]
    sentiment = hf_pipeline("text-classification", model=str(models["sentiment"]))
    oracle = sentiment([r[1] for r in got], truncation=True, max_length=WINDOW)
    for row, want in zip(got, oracle, strict=True):
        assert row[5] == normalise_sentiment_label(want["label"])
        assert row[6] == pytest.approx(want["score"], abs=1e-4)
