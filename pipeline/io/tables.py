"""Tables as input (``input.format: iceberg | delta``): a warehouse table enriched into another table.

A table is planned like a folder of files: its current data files (Parquet, from the Delta log's add
actions or the Iceberg snapshot's scan plan) become shards, so the pre-flight check, the one schema
(the table's own types, ``input.schema`` on top) and the incremental ledger work as for files. A full
run reads the table through Ray Data's ``read_delta`` / ``read_iceberg``, which apply what a file list
cannot (Delta deletion vectors, Iceberg delete files). An incremental run reads only the data files
added since the ledger's record (the versions or snapshots after it), so it suits tables that are
appended to; rows deleted or updated in later versions need a full run.

Each row's ``_row_key`` is ``<table>#<id>``, from the id column a table input must name, so it is
stable across runs and versions (files are rewritten by compaction; ids are not).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
from fsspec.core import url_to_fs

from bertpipe.config import ConfigError, InputConfig
from bertpipe.io.paths import Shard, redact


@dataclass(frozen=True)
class TableInput:
    """The table a job reads, at the version or snapshot planned."""

    format: str  # "delta" | "iceberg"
    name: str  # shown to the user, and the prefix of ``_row_key``
    location: str  # Delta: the table's URI; Iceberg: its identifier
    version: int | None  # Delta version or Iceberg snapshot id
    storage_options: dict[str, Any] = field(default_factory=dict)
    catalog: dict[str, Any] = field(default_factory=dict)  # Iceberg catalog properties, with ``name``

    def __str__(self) -> str:
        return f"{'Delta' if self.format == 'delta' else 'Iceberg'} table {redact(self.location)}"


def _local(url: str) -> str:
    return os.path.abspath(url.split("://", 1)[-1]) if "://" not in url or url.startswith("file://") else url


def open_input_table(cfg: InputConfig) -> tuple[TableInput, pa.Schema, list[Shard]]:
    """The table of ``input``, its Arrow schema and its data files; a missing table, version or id
    column is a ConfigError naming it."""
    table, schema, shards = _delta(cfg) if cfg.format.value == "delta" else _iceberg(cfg)
    for key, column in (("input.text_column", cfg.text_column), ("input.id_column", cfg.id_column)):
        if column not in schema.names:
            raise ConfigError(
                f"{key} {column!r} is not a column of {table} (columns: {', '.join(schema.names[:10])})"
            )
    return table, schema, shards


def _delta(cfg: InputConfig) -> tuple[TableInput, pa.Schema, list[Shard]]:
    from deltalake import DeltaTable

    uri = _local(cfg.paths[0])
    options = cfg.storage_options or None
    if not DeltaTable.is_deltatable(uri, storage_options=options):
        raise ConfigError(f"input.paths: no Delta table at {redact(cfg.paths[0])}")
    try:
        dt = DeltaTable(uri, version=cfg.version, storage_options=options)
    except Exception as exc:  # deltalake raises its own errors for a version that is not there
        raise ConfigError(f"input.version {cfg.version}: {redact(str(exc).splitlines()[0])}") from exc
    table = TableInput("delta", f"delta:{redact(uri)}", uri, dt.version(), dict(cfg.storage_options))
    partition_columns = list(dt.metadata().partition_columns)
    fs, root = url_to_fs(dt.table_uri, **cfg.storage_options)
    shards = []
    for action in pa.table(dt.get_add_actions(flatten=True)).to_pylist():
        path = f"{root.rstrip('/')}/{unquote(action['path'])}"
        url = path if dt.table_uri.startswith("file:") else f"{fs.protocol[0]}://{path}"
        values = {c: action[f"partition.{c}"] for c in partition_columns}
        parts = tuple((c, str(v)) for c, v in values.items() if v is not None)
        shards.append(Shard(path, url, "parquet", int(action["size_bytes"]), "", parts))
    return table, pa.schema(dt.schema().to_arrow()), sorted(shards, key=lambda s: s.path)


def _iceberg(cfg: InputConfig) -> tuple[TableInput, pa.Schema, list[Shard]]:
    from pyiceberg.catalog import load_catalog

    from bertpipe.io.warehouse import iceberg_catalog_properties

    props = iceberg_catalog_properties(cfg.catalog, cfg.paths[0] if cfg.paths else None, "input")
    kwargs = {k: v for k, v in props.items() if k != "name"}
    try:
        catalog = load_catalog(props["name"], **kwargs)
        exists = catalog.table_exists(cfg.table)
    except Exception as exc:
        raise ConfigError(f"input.catalog: cannot load Iceberg catalog: {redact(str(exc))}") from exc
    if not exists:
        raise ConfigError(f"input.table {cfg.table}: no such table in Iceberg catalog {props['name']!r}")
    loaded = catalog.load_table(cfg.table)
    snapshot = loaded.current_snapshot()
    table = TableInput(
        "iceberg", f"iceberg:{cfg.table}", cfg.table, snapshot.snapshot_id if snapshot else None, {}, props
    )
    shards = []
    if snapshot is not None:
        for task in loaded.scan(snapshot_id=snapshot.snapshot_id).plan_files():
            fs, path = url_to_fs(task.file.file_path)
            url = path if task.file.file_path.startswith("file:") else task.file.file_path
            shards.append(Shard(path, url, "parquet", int(task.file.file_size_in_bytes), ""))
    return table, loaded.schema().as_arrow(), sorted(shards, key=lambda s: s.path)
