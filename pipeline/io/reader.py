"""Reading shards: a pre-flight check of every file, then a Ray Data datasource that streams them.

Why a datasource of our own (a ``FileBasedDatasource`` subclass, which only implements how one file is
read): each row needs its row number within its file for the stable ``_row_key``; Parquet and JSONL
shards become one dataset of Arrow blocks (a union of ``read_json`` pandas blocks with ``read_parquet``
Arrow blocks breaks ``map_batches``); and a text column of the wrong type must become error rows
instead of failing the whole block.

The pre-flight check (``inspect_shard``) reads Parquet footers and parses JSONL files fully, so a
malformed line, a truncated file or a schema that differs between shards is found before any model
runs, with exact row counts for the run summary. It costs one extra read of JSONL inputs.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from pipeline import columns as C
from pipeline.io.paths import Shard


@dataclass
class ShardReport:
    shard: Shard
    rows: int = 0
    schema: pa.Schema | None = None
    problem: str | None = None  # why the file is bad, None when it is fine
    columns: list[str] = field(default_factory=list)


def _open(fs, shard: Shard):
    compression = "gzip" if shard.path.endswith(".gz") else None
    return fs.open(shard.path, "rb", compression=compression)


TEXT_PROBLEM = "__text_problem"  # set by the JSONL fallback for text values that were not strings


def _parse_jsonl(data: bytes, text_column: str) -> pa.Table:
    """Fast path with Arrow's JSON reader; files with mixed-type columns fall back to Python."""
    if not data.strip():
        return pa.table({})
    try:
        return pajson.read_json(io.BytesIO(data))
    except pa.ArrowInvalid:
        rows = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"line {number}: malformed JSON ({exc.__class__.__name__})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {number}: not a JSON object") from None
            rows.append(row)
        return _table_from_mixed_rows(rows, text_column)


def _table_from_mixed_rows(rows: list[dict], text_column: str) -> pa.Table:
    """Non-string texts become null with a reason; other mixed-type columns keep each value's JSON text."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name == text_column:
            columns[name] = pa.array([v if isinstance(v, str) else None for v in values], pa.string())
            columns[TEXT_PROBLEM] = pa.array(
                [
                    None if v is None or isinstance(v, str) else f"text is not a string ({_py_kind(v)})"
                    for v in values
                ],
                pa.string(),
            )
            continue
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values],
                pa.string(),
            )
    return pa.table(columns)


def _py_kind(value) -> str:
    return {int: "int", float: "float", bool: "bool", list: "list", dict: "dict"}.get(type(value), "value")


def inspect_shard(fs, shard: Shard, text_column: str) -> ShardReport:
    report = ShardReport(shard)
    try:
        if shard.format == "parquet":
            with fs.open(shard.path, "rb") as fh:
                meta = pq.ParquetFile(fh)
                report.rows, report.schema = meta.metadata.num_rows, meta.schema_arrow
        else:
            with _open(fs, shard) as fh:
                table = _parse_jsonl(fh.read(), text_column)
            report.rows, report.schema = table.num_rows, table.schema
    except (OSError, ValueError, pa.ArrowException, EOFError) as exc:
        report.problem = f"unreadable {shard.format} file: {str(exc).splitlines()[0] if str(exc) else exc}"
        return report
    report.columns = [name for name in report.schema.names if name != TEXT_PROBLEM]
    if report.rows and text_column not in report.columns:
        report.problem = f"no text column {text_column!r} (columns: {', '.join(report.columns[:10])})"
    return report


def _text_as_string(column: pa.ChunkedArray) -> tuple[pa.Array, list[str | None]]:
    """The text column as Arrow strings, and a reason for each value that was not a string."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string()), [None] * len(column)
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.string()), [None] * len(column)
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        texts, reasons = [], []
        for value in column.to_pylist():
            try:
                texts.append(value.decode("utf-8") if value is not None else None)
                reasons.append(None)
            except UnicodeDecodeError:
                texts.append(None)
                reasons.append("text is not valid UTF-8")
        return pa.array(texts, pa.string()), reasons
    kind = _arrow_kind(column.type)
    return pa.nulls(len(column), pa.string()), [
        None if v is None else f"text is not a string ({kind})" for v in column.to_pylist()
    ]


def _arrow_kind(dtype: pa.DataType) -> str:
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_floating(dtype):
        return "float"
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return "list"
    if pa.types.is_struct(dtype) or pa.types.is_map(dtype):
        return "dict"
    return str(dtype)


def normalise_block(
    table: pa.Table, text_column: str, row_start: int, shard_url: str, derive_id: str | None
) -> pa.Table:
    """Text as string with ``_error`` for wrong types, ``_row_key``, and a derived id when asked."""
    texts, reasons = _text_as_string(table.column(text_column))
    if TEXT_PROBLEM in table.column_names:
        problems = table.column(TEXT_PROBLEM).to_pylist()
        reasons = [p or r for p, r in zip(problems, reasons, strict=True)]
        table = table.drop_columns([TEXT_PROBLEM])
    table = table.set_column(table.schema.get_field_index(text_column), text_column, texts)
    n = table.num_rows
    keys = pa.array([f"{shard_url}#{row_start + i}" for i in range(n)], pa.string())
    if derive_id:
        table = table.append_column(derive_id, keys) if derive_id not in table.column_names else table
    table = table.append_column(C.ROW_KEY, keys)
    return table.append_column(C.ERROR, pa.array(reasons, pa.string()))


class ShardDatasource(FileBasedDatasource):
    """One read task per file; blocks of ``rows_per_block`` rows, normalised by ``normalise_block``."""

    def __init__(
        self, shards: list[Shard], filesystem, text_column: str, derive_id: str | None, rows_per_block: int
    ):
        super().__init__([s.path for s in shards], filesystem=filesystem)
        self._by_path = {s.path: s for s in shards}
        self._text_column = text_column
        self._derive_id = derive_id
        self._rows_per_block = rows_per_block

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._by_path[path].format == "parquet":
            return filesystem.open_input_file(path)  # Parquet needs random access to its footer
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        shard = self._by_path[path]
        if shard.format == "parquet":
            batches = (
                pa.Table.from_batches([b]) for b in pq.ParquetFile(f).iter_batches(self._rows_per_block)
            )
        else:
            table = _parse_jsonl(f.read(), self._text_column)
            batches = (
                table.slice(i, self._rows_per_block) for i in range(0, table.num_rows, self._rows_per_block)
            )
        row = 0
        for block in batches:
            yield normalise_block(block, self._text_column, row, shard.url, self._derive_id)
            row += block.num_rows
