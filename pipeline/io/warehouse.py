"""Table outputs (``output.format: iceberg | delta``): the enriched rows as a table that DuckDB, Spark or
Trino can query and join back to the source on the id column.

Ray Data writes the data files from its workers and the driver commits them all at once at the end
(its ``IcebergDatasink`` / ``DeltaDatasink``, the sinks behind ``Dataset.write_iceberg`` and
``write_delta``). A run that fails leaves the table as it was: the files it had written are referenced
by no snapshot or version, so no reader sees them (Iceberg's orphan-file removal or Delta's
``vacuum`` deletes them). ``CheckedSink`` (``bertpipe.engine.data``) puts a gate in front of that
commit: it fits every block to the table schema, and its write tasks also write the row keys, ids and
errors of their rows into a scratch folder of the run under the table's location
(``_bertpipe_scratch-<run id>``, removed before the commit or after a failure), which the driver counts
with the Parquet path's checks (each row key exactly once, duplicate ids) before anything commits.

Modes: ``error`` appends to a table that must hold no rows (checked before the run and again just before
the commit); ``append`` adds a snapshot / version; ``merge`` upserts by the id column: the rows are
staged as Parquet under Ray's row checkpoint and counted as for a Parquet output, then merged in one
commit (Delta's ``MERGE``; Iceberg's overwrite-by-filter, a delete of the ids and an append, per chunk,
in one transaction), creating the table if it does not exist; ``incremental`` merges the rows of the
input files (or table versions) that are new since the ledger ``<output.path>/_state/ledger/``;
``overwrite`` replaces all rows in one commit (Iceberg records it as a delete snapshot followed by an
append snapshot, Delta as one version), so readers see the old rows until then and time travel keeps
them. A table keeps its partition columns for life: they must equal ``output.partition_by``. New columns
(a new task) are added as nullable columns (Iceberg commits that schema change as the write starts, Delta
with the data); Delta's overwrite replaces the schema, Iceberg's keeps old columns (null in the new
rows).

Types: NER spans and top-k lists (``list<struct>``) are stored as nested types in both formats, and
embedding vectors (``fixed_size_list<float>``) as ``list<float>``.
Iceberg v2 has no null type and neither format stores nanoseconds, so an input column that is null
in every file becomes a string column, nanosecond timestamps are truncated to microseconds, and
dictionary-encoded columns are stored as their values.

Iceberg tables live in the catalog of ``output.catalog`` (the keyword arguments of pyiceberg's
``load_catalog``, plus ``name``); by default a SQLite catalog ``<output.path>/catalog.db`` with the
data under ``<output.path>/warehouse``. Each snapshot carries the run id (``bertpipe.run_id``).
A Delta table lives at ``output.path``; ``output.storage_options`` go to ``deltalake`` (its keys, e.g.
``AWS_ENDPOINT_URL``) and ``output.table`` becomes the table's name.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.utils import get_protocol

from bertpipe import columns as C
from bertpipe.config import ConfigError, OutputConfig
from bertpipe.io.paths import redact
from bertpipe.io.reader import TEXT_PROBLEM

if TYPE_CHECKING:
    from bertpipe.plan import Plan

TABLE_FORMATS = ("iceberg", "delta")
DEFAULT_TABLE = "bertpipe.enriched"
RUN_ID_PROPERTY = "bertpipe.run_id"
_MODES = ("error", "overwrite", "append", "merge", "incremental")
UPSERT_MODES = ("merge", "incremental")
MERGE_CHUNK_ROWS = 50_000
SCRATCH = "_bertpipe_scratch"  # + "-<run id>": a run's counting files, under the table's location


def check_target(output: OutputConfig) -> _Iceberg | _Delta:
    """Pre-flight, before any model runs: the mode applies to tables, a table that exists is free for
    ``error`` and partitioned by ``output.partition_by``."""
    if output.mode.value not in _MODES:
        raise ConfigError(
            f"output.mode {output.mode.value} is not supported with output.format {output.format}; "
            "use error, overwrite, append, merge or incremental"
        )
    target = _Iceberg(output) if output.format == "iceberg" else _Delta(output)
    existing = target.partition_columns()
    if existing is None:
        return target
    if output.mode.value == "error" and target.has_data():
        raise ConfigError(f"{target} already has data; set output.mode to overwrite or append")
    if existing != list(output.partition_by):
        raise ConfigError(
            f"{target} is partitioned by {existing} but output.partition_by is {list(output.partition_by)}; "
            "a table keeps its partitioning: use the same columns or write a new table"
        )
    return target


def open_table(p: Plan) -> tuple[_Iceberg | _Delta, pa.Schema]:
    """Check the target again, create the table if it is new, and return it with its schema."""
    target = check_target(p.config.output)
    schema = table_schema(p)
    target.create(schema, p.config.output.partition_by)
    return target, schema


def table_schema(p: Plan) -> pa.Schema:
    """The columns ``build_dataset`` produces, typed for the table: input columns (the job's one schema
    over the good files), the derived id, ``_row_key``, ``_error``, the task outputs and
    ``_partition_original``.

    Known up front so that a block in which a column happens to be null or missing, which is the
    first block a sink sees often enough, cannot define the table."""
    inputs = p.schema
    text = p.config.input.text_column
    fields = [
        pa.field(f.name, pa.string() if f.name == text else _storable(f.type))
        for f in inputs
        if f.name != TEXT_PROBLEM
    ]
    if p.derive_id and p.derive_id not in inputs.names:
        fields.append(pa.field(p.derive_id, pa.string()))
    fields += [pa.field(C.ROW_KEY, pa.string()), pa.field(C.ERROR, pa.string())]
    fields += [pa.field(f.name, _storable(f.type)) for f in p.models.output_fields()]
    if p.config.output.partition_by:
        fields.append(pa.field(C.PARTITION_ORIGINAL, pa.string()))
    return pa.schema(fields)


def _storable(dtype: pa.DataType) -> pa.DataType:
    """The type a table stores: neither format has fixed-size lists (embeddings become list<float>),
    half floats or nanoseconds."""
    if pa.types.is_fixed_size_list(dtype):
        return pa.list_(_storable(dtype.value_type))
    if pa.types.is_float16(dtype):
        return pa.float32()
    if pa.types.is_null(dtype):
        return pa.string()
    if pa.types.is_dictionary(dtype):
        return _storable(dtype.value_type)
    if pa.types.is_timestamp(dtype) and dtype.unit == "ns":
        return pa.timestamp("us", dtype.tz)
    return dtype


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly the columns of ``schema``, in its order and types; missing ones are null."""
    unknown = set(table.column_names) - set(schema.names)
    if unknown:
        raise ValueError(f"columns {sorted(unknown)} are not in the table schema")
    columns = [
        table.column(f.name).cast(f.type, safe=not pa.types.is_timestamp(f.type))
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def staged_rows(fs, files: list[str], schema: pa.Schema) -> pa.RecordBatchReader:
    """The staged Parquet files as one stream in the table's schema, in chunks of about
    ``MERGE_CHUNK_ROWS`` rows (a merge costs a rewrite per chunk)."""

    def chunks():
        pending, rows = [], 0
        for path in files:
            with fs.open(path, "rb") as fh:
                pending.append(conform(pq.read_table(fh), schema))
            rows += pending[-1].num_rows
            if rows >= MERGE_CHUNK_ROWS:
                yield from pa.concat_tables(pending).combine_chunks().to_batches(max_chunksize=rows)
                pending, rows = [], 0
        if pending:
            yield from pa.concat_tables(pending).combine_chunks().to_batches(max_chunksize=max(rows, 1))

    return pa.RecordBatchReader.from_batches(schema, chunks())


def _local_path(url: str) -> str | None:
    """The absolute path of a local path or file:// URL; None for remote URLs."""
    if get_protocol(url) not in ("file", "local"):
        return None
    return os.path.abspath(url.split("://", 1)[-1])


def catalog_properties(output: OutputConfig) -> dict[str, Any]:
    """``output.catalog`` (``name`` defaults to "default", as in Ray), or the local SQLite catalog."""
    return iceberg_catalog_properties(output.catalog, output.path, "output")


def iceberg_catalog_properties(catalog: dict[str, Any], path: str | None, section: str) -> dict[str, Any]:
    """``catalog`` (``name`` defaults to "default", as in Ray), or the SQLite catalog bertpipe keeps in
    the local folder ``path`` (``catalog.db``, data under ``warehouse/``)."""
    if catalog:
        return {"name": "default", **catalog}
    root = _local_path(path) if path else None
    if root is None:
        raise ConfigError(
            f"{section}.format iceberg: set {section}.catalog; the default SQLite catalog needs a local "
            f"{section}.path{'s' if section == 'input' else ''}"
        )
    # Named "bertpipe", not "default": pyiceberg merges ~/.pyiceberg.yaml settings of the same name.
    return {
        "name": "bertpipe",
        "type": "sql",
        "uri": f"sqlite:///{root}/catalog.db",
        "warehouse": f"file://{root}/warehouse",
    }


class _Iceberg:
    format = "iceberg"

    def __init__(self, output: OutputConfig):
        self.identifier = output.table or DEFAULT_TABLE
        if "." not in self.identifier:
            raise ConfigError(f"output.table {self.identifier!r}: an Iceberg table is namespace.table")
        self.catalog_kwargs = catalog_properties(output)
        self.output = output

    def __str__(self) -> str:
        return f"Iceberg table {self.identifier}"

    def catalog(self):
        from pyiceberg.catalog import load_catalog

        props = dict(self.catalog_kwargs)
        name = props.pop("name")
        if not self.output.catalog:  # SQLite creates the database file, not its folder
            os.makedirs(_local_path(self.output.path), exist_ok=True)
        try:
            return load_catalog(name, **props)
        except Exception as exc:
            raise ConfigError(
                f"output.catalog: cannot load Iceberg catalog {name!r}: {redact(str(exc))}"
            ) from exc

    def table(self):
        catalog = self.catalog()
        return catalog.load_table(self.identifier) if catalog.table_exists(self.identifier) else None

    def partition_columns(self) -> list[str] | None:
        table = self.table()
        if table is None:
            return None
        schema = table.schema()
        return [
            schema.find_column_name(f.source_id)
            if str(f.transform) == "identity"
            else f"{f.transform}({f.name})"
            for f in table.spec().fields
        ]

    def has_data(self) -> bool:
        table = self.table()
        snapshot = table.current_snapshot() if table is not None else None
        return snapshot is not None and int(snapshot.summary["total-records"] or 0) > 0

    def create(self, schema: pa.Schema, partition_by: list[str]) -> None:
        """Create the table with identity partitions, in one catalog commit, unless it exists. A run that
        then fails leaves it empty, which ``error`` mode accepts."""
        catalog = self.catalog()
        if catalog.table_exists(self.identifier):
            return
        catalog.create_namespace_if_not_exists(catalog.namespace_from(self.identifier))
        with catalog.create_table_transaction(self.identifier, schema=schema) as txn:
            if partition_by:
                with txn.update_spec() as spec:
                    for name in partition_by:
                        spec.add_identity(name)

    def sink_args(self, run_id: str) -> dict[str, Any]:
        """Keyword arguments of Ray's Iceberg sink (``bertpipe.engine.data`` builds it)."""
        return {
            "table_identifier": self.identifier,
            "catalog_kwargs": self.catalog_kwargs,
            "snapshot_properties": {RUN_ID_PROPERTY: run_id},
        }

    def scratch(self, run_id: str) -> tuple[pafs.FileSystem, str]:
        """The run's scratch folder under the table's location, on the filesystem pyiceberg builds from
        the catalog's properties for the table's data files (same credentials and endpoint)."""
        from pyiceberg.io.pyarrow import PyArrowFileIO

        table = self.table()
        io = PyArrowFileIO(table.io.properties)
        location = f"{table.location().rstrip('/')}/{SCRATCH}-{run_id}"
        scheme, netloc, path = io.parse_location(location, io.properties)
        return io.fs_by_scheme(scheme, netloc), path

    @staticmethod
    def files(written) -> int:
        return len(written.data_files)

    def clear(self, run_id: str) -> None:
        """An overwrite with no rows still empties the table (Ray's sink skips the commit then)."""
        from pyiceberg.expressions import AlwaysTrue

        self.table().delete(AlwaysTrue(), snapshot_properties={RUN_ID_PROPERTY: run_id})

    def merge(self, rows: pa.RecordBatchReader, id_column: str, run_id: str) -> None:
        """Upsert by ``id_column`` in one transaction: per chunk, the rows whose id it holds are deleted
        and the chunk appended (pyiceberg's ``overwrite`` with a filter), so a row is replaced whole.
        pyiceberg's ``upsert`` would compare every column first, and cannot compare nested ones."""
        from pyiceberg.expressions import In

        table = self.table()
        with table.transaction() as txn:
            with txn.update_schema() as update:  # a new task's columns
                update.union_by_name(rows.schema)
            for batch in rows:
                chunk = pa.Table.from_batches([batch])
                ids = [i for i in chunk.column(id_column).to_pylist() if i is not None]
                properties = {RUN_ID_PROPERTY: run_id}
                if ids:
                    txn.overwrite(chunk, overwrite_filter=In(id_column, ids), snapshot_properties=properties)
                else:
                    txn.append(chunk, snapshot_properties=properties)

    def committed(self, run_id: str) -> dict[str, Any]:
        ours = [s for s in self.table().snapshots() if s.summary[RUN_ID_PROPERTY] == run_id]
        return {"snapshot_id": ours[-1].snapshot_id if ours else None}


class _Delta:
    format = "delta"

    def __init__(self, output: OutputConfig):
        if output.catalog:
            raise ConfigError(
                "output.catalog applies to output.format iceberg; a Delta table is at output.path"
            )
        self.uri = _local_path(output.path) or output.path
        self.storage_options = output.storage_options or None
        self.name = output.table
        self.partition_by = list(output.partition_by)

    def __str__(self) -> str:
        return f"Delta table {redact(self.uri)}"

    def table(self):
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options):
            return None
        return DeltaTable(self.uri, storage_options=self.storage_options)

    def partition_columns(self) -> list[str] | None:
        table = self.table()
        return None if table is None else list(table.metadata().partition_columns)

    def has_data(self) -> bool:
        table = self.table()
        return table is not None and bool(table.file_uris())

    def create(self, schema: pa.Schema, partition_by: list[str]) -> None:
        """Nothing to do: Ray's sink creates a new table with its first commit."""

    def sink_args(self, run_id: str) -> dict[str, Any]:
        """Keyword arguments of Ray's Delta sink (``bertpipe.engine.data`` builds it)."""
        return {
            "path": self.uri,
            "partition_by": self.partition_by or None,
            "storage_options": self.storage_options,
            "name": self.name,
        }

    def scratch(self, run_id: str) -> tuple[pafs.FileSystem, str]:
        """The run's scratch folder inside the table's folder (names starting with ``_`` are not Delta
        data), on deltalake's own storage with ``storage_options``, as its commits use."""
        name = f"{SCRATCH}-{run_id}"
        if local := _local_path(self.uri):
            return pafs.LocalFileSystem(), f"{local}/{name}"
        from deltalake.fs import DeltaStorageHandler

        return pafs.PyFileSystem(DeltaStorageHandler(self.uri, self.storage_options)), name

    @staticmethod
    def files(written) -> int:
        return len(written.add_actions)

    def clear(self, run_id: str) -> None:
        """Nothing to do: Ray's sink commits an empty overwrite, which empties the table."""

    def merge(self, rows: pa.RecordBatchReader, id_column: str, run_id: str) -> None:
        """Upsert by ``id_column`` with Delta's ``MERGE`` (one version); a new table is written whole."""
        from deltalake import CommitProperties, write_deltalake

        table = self.table()
        commit = CommitProperties(custom_metadata={RUN_ID_PROPERTY: run_id})
        if table is None:
            write_deltalake(
                self.uri,
                rows,
                partition_by=self.partition_by or None,
                name=self.name,
                storage_options=self.storage_options,
                commit_properties=commit,
            )
            return
        column = '"' + id_column.replace('"', '""') + '"'
        table.merge(
            rows,
            predicate=f"target.{column} = source.{column}",
            source_alias="source",
            target_alias="target",
            merge_schema=True,
            commit_properties=commit,
        ).when_matched_update_all().when_not_matched_insert_all().execute()

    def committed(self, run_id: str) -> dict[str, Any]:
        return {"version": self.table().version()}
