"""What a finished output holds: rows, errors by reason, per task its labels and scores or its entities,
and the run history from ``_runs/``.

DuckDB computes every number, over the output's Parquet files (hive partitions decoded), a Delta
table's Arrow dataset or an Iceberg table's current snapshot, so that each query reads only the columns
it needs. The tasks come from the latest run summary's config. Table outputs keep no ``_runs/``, so
there (and wherever the summaries are gone) tasks are found by column shape: ``{task}_label`` with
``{task}_score`` is a classification task, a list of entity structs a NER task.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import duckdb

from bertpipe import columns as C
from bertpipe.errors import ConfigError

TOP_ENTITIES = 10
HISTOGRAM_BINS = 20
RUN_FIELDS = ("run_id", "start", "rows_out", "rows_ok", "rows_error", "seconds", "rows_per_s")
QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9}
_ENTITY_FIELDS = {"entity_group", "word", "start", "end", "score"}


def inspect_output(path: str, table: str | None = None) -> dict[str, Any]:
    """Everything ``bertpipe inspect`` shows, as JSON-ready values. ``table`` names an Iceberg table
    (default ``bertpipe.enriched``). Raises ConfigError, naming ``path``, for anything but an output
    with rows."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{path}: no such output folder")
    con = duckdb.connect()
    fmt, table = _open(con, root, table)
    columns = {name: dtype for name, dtype, *_ in con.execute("select * from src limit 0").description}
    if C.ERROR not in columns:
        raise ConfigError(f"{path}: not a bertpipe output (no {C.ERROR} column)")
    rows, errors = con.execute(f"select count(*), count({C.ERROR}) from src").fetchone()
    if rows == 0:
        raise ConfigError(f"{path}: the output has no rows")
    summaries = _summaries(root) if fmt == "parquet" else []
    latest = next((s for s in reversed(summaries) if s.get("config")), None)
    text = latest["config"]["input"]["text_column"] if latest else None
    tasks = {}
    for name, kind in _tasks(latest, columns):
        if kind == "ner":
            tasks[name] = _entities(con, name, text if text in columns else None)
        else:
            tasks[name] = {"kind": kind, **_labels(con, name)}
    return {
        "output": str(root),
        "format": fmt,
        "table": table,
        "complete": (root / "_SUCCESS").is_file() if fmt == "parquet" else True,
        "rows": rows,
        "rows_ok": rows - errors,
        "rows_error": errors,
        "errors_by_reason": dict(
            con.execute(
                f"select {C.ERROR}, count(*) n from src where {C.ERROR} is not null "
                "group by 1 order by n desc, 1"
            ).fetchall()
        ),
        "tasks": tasks,
        "runs": [{k: s.get(k) for k in RUN_FIELDS} for s in summaries],
    }


def _open(con: duckdb.DuckDBPyConnection, root: Path, table: str | None) -> tuple[str, str | None]:
    """Make the output's rows the view ``src``; returns the output format and the Iceberg table."""
    iceberg = (root / "catalog.db").is_file()
    if table is not None and not iceberg:
        raise ConfigError(f"{root}: --table applies to Iceberg outputs (a catalog.db beside the data)")
    if (root / "_delta_log").is_dir():
        deltalake = _warehouse_module("deltalake", root)
        con.register("src", deltalake.DeltaTable(str(root)).to_pyarrow_dataset())
        return "delta", None
    if iceberg:
        return "iceberg", _open_iceberg(con, root, table)
    if next(root.rglob("*.parquet"), None) is None:
        raise ConfigError(
            f"{root}: not a bertpipe output (no Parquet files, Delta log or Iceberg catalog.db)"
        )
    con.read_parquet(str(root / "**" / "*.parquet"), hive_partitioning=True).create_view("src")
    return "parquet", None


def _open_iceberg(con: duckdb.DuckDBPyConnection, root: Path, table: str | None) -> str:
    """The default layout of ``output.format: iceberg``: the SQLite catalog ``catalog.db`` in the output.
    Returns the table's identifier."""
    catalog_module = _warehouse_module("pyiceberg.catalog", root)
    from bertpipe.config import OutputConfig
    from bertpipe.io.warehouse import DEFAULT_TABLE, catalog_properties

    identifier = table or DEFAULT_TABLE
    props = catalog_properties(OutputConfig(path=str(root), format="iceberg"))
    catalog = catalog_module.load_catalog(props.pop("name"), **props)
    if not catalog.table_exists(identifier):
        raise ConfigError(f"{root}: catalog.db has no table {identifier} (--table names the table)")
    catalog.load_table(identifier).scan().to_duckdb("src", connection=con)
    return identifier


def _warehouse_module(name: str, root: Path):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"{root}: reading this table needs {name}: pip install 'bertpipe[warehouse]'"
        ) from None


def _summaries(root: Path) -> list[dict[str, Any]]:
    """The run summaries, oldest first (a run id starts with its UTC start time)."""
    summaries = [json.loads(p.read_text()) for p in (root / "_runs").glob("*.json")]
    return sorted(summaries, key=lambda s: s["run_id"])


def _tasks(latest: dict[str, Any] | None, columns: dict[str, duckdb.DuckDBPyType]) -> list[tuple[str, str]]:
    """(name, kind) of each task whose columns the output holds."""
    if latest:
        found = [(t["name"], t["kind"]) for t in latest["config"]["tasks"]]
    else:
        found = [
            (name, "ner") if _is_entities(dtype) else (name[: -len("_label")], "classification")
            for name, dtype in columns.items()
            if _is_entities(dtype) or (name.endswith("_label") and C.score(name[: -len("_label")]) in columns)
        ]
    return [(name, kind) for name, kind in found if (name if kind == "ner" else C.label(name)) in columns]


def _is_entities(dtype: duckdb.DuckDBPyType) -> bool:
    return (
        dtype.id == "list"
        and dtype.child.id == "struct"
        and {name for name, _ in dtype.child.children} == _ENTITY_FIELDS
    )


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _labels(con: duckdb.DuckDBPyConnection, task: str) -> dict[str, Any]:
    label, score = _q(C.label(task)), _q(C.score(task))
    labels = con.execute(
        f"select {label}, count(*) n from src where {label} is not null group by 1 order by n desc, 1"
    ).fetchall()
    q = list(QUANTILES.values())
    lo, mid, hi = con.execute(
        f"select min({score}), quantile_cont({score}, {q}), max({score}) from src where {score} is not null"
    ).fetchone()
    if lo is None:  # every row is an error row
        return {"labels": {}, "scores": None, "score_histogram": {"edges": [], "counts": []}}
    return {
        "labels": dict(labels),
        "scores": {"min": lo, **dict(zip(QUANTILES, mid, strict=True)), "max": hi},
        "score_histogram": _histogram(con, score, lo, hi),
    }


def _histogram(con: duckdb.DuckDBPyConnection, score: str, lo: float, hi: float) -> dict[str, list]:
    """Equal-width bins from the lowest to the highest score (the report's histogram)."""
    bins = HISTOGRAM_BINS if hi > lo else 1
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = dict(
        con.execute(
            f"select least(floor(({score} - $lo) / $width)::int, {bins - 1}) b, count(*) from src "
            f"where {score} is not null group by b",
            {"lo": lo, "width": width},
        ).fetchall()
    )
    return {
        "edges": [lo + i * width for i in range(bins + 1)],
        "counts": [counts.get(i, 0) for i in range(bins)],
    }


def _entities(con: duckdb.DuckDBPyConnection, task: str, text: str | None) -> dict[str, Any]:
    """Entity counts by type and the most frequent entities of each type. An entity is its text as
    written in the row's text column when that is known (``word`` is WordPiece output, lower-cased by
    uncased models), else its ``word``."""
    spans = (
        f"select e.entity_group grp, substring(t, e['start'] + 1, e['end'] - e['start']) txt "
        f"from (select unnest({_q(task)}) e, {_q(text)} t from src)"
        if text
        else f"select e.entity_group grp, e.word txt from (select unnest({_q(task)}) e from src)"
    )
    counts = con.execute(
        f"select grp, count(*) n from ({spans}) group by grp order by n desc, grp"
    ).fetchall()
    top = con.execute(
        f"select grp, txt, count(*) n from ({spans}) group by grp, txt "
        f"qualify row_number() over (partition by grp order by n desc, txt) <= {TOP_ENTITIES} "
        "order by grp, n desc, txt"
    ).fetchall()
    return {
        "kind": "ner",
        "entity_text": "text" if text else "word",
        "entities": dict(counts),
        "top_entities": {
            group: [{"text": txt, "count": n} for grp, txt, n in top if grp == group] for group, _ in counts
        },
    }
