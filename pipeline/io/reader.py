"""Reading shards: a pre-flight check of every file, then how one file becomes normalised Arrow blocks
(streamed by the Ray Data datasource in ``bertpipe.engine.data``).

Why a datasource of our own (a ``FileBasedDatasource`` subclass, which only implements how one file is
read): each row needs its row number within its file for the stable ``_row_key``; Parquet and JSONL
shards become one dataset of Arrow blocks (a union of ``read_json`` pandas blocks with ``read_parquet``
Arrow blocks breaks ``map_batches``); and a text of the wrong type or not valid UTF-8 must become an
error row instead of failing the whole block or file.

The pre-flight check (``inspect_shard``) reads Parquet footers, parses CSV files and JSONL files up to
8 MiB fully, and types a bigger JSONL file by its first 8 MiB while counting its rows as lines, so a
malformed line, a truncated file or a schema that differs between shards is found before any model
runs, with exact row counts for the run summary. A Parquet data page that is corrupt behind an intact
footer, and a fault after the sample of a big JSONL file, are found only when the file is read
(``read_shard``), and stop the run naming the file.

JSON and CSV carry no types: Arrow infers them per file, and would turn ISO date strings into
timestamps. Such columns are parsed again as strings, so that a value is never changed by inference;
the job's one schema (``bertpipe.io.schema``) then decides each column's type, and every block is
cast to it as it is read (``conform_block``). Hive partition values of the file's path are added as
columns (strings until the schema types them).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from bertpipe import columns as C
from bertpipe.config import CsvOptions
from bertpipe.errors import ConfigError
from bertpipe.io.paths import Shard, redact


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


_SURROGATE = re.compile("[\ud800-\udfff]")  # what surrogateescape makes of bytes that are not UTF-8
TEXT_PROBLEM = "__text_problem"  # set by the JSONL fallback for text values that were not strings


def _parse_jsonl(data: bytes, text_column: str) -> pa.Table:
    """Fast path with Arrow's JSON reader; files with mixed-type columns or invalid UTF-8 fall back to Python.

    Arrow rejects a whole file for one undecodable byte or one lone surrogate escape (``"\\ud800"``), so
    the fallback decodes each line with ``surrogateescape``: such a text becomes an error row (``text is
    not valid UTF-8``) and the rest of the file is kept; elsewhere in the row the bad characters become
    U+FFFD, as ``bytes.decode(errors="replace")`` would do.
    """
    if not data.strip():
        return pa.table({})
    try:
        table = pajson.read_json(io.BytesIO(data))
        if _has_temporal(table.schema):
            explicit = pa.schema([f.with_type(_temporal_as_string(f.type)) for f in table.schema])
            options = pajson.ParseOptions(explicit_schema=explicit, unexpected_field_behavior="infer")
            table = pajson.read_json(io.BytesIO(data), parse_options=options)
        return table
    except (pa.ArrowInvalid, UnicodeDecodeError):
        rows = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number}: malformed JSON ({exc.__class__.__name__})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {number}: not a JSON object") from None
            rows.append(row)
        return _table_from_mixed_rows(rows, text_column)


def _temporal_as_string(dtype: pa.DataType) -> pa.DataType:
    """``dtype`` with every date, time and timestamp (also nested) as string: what the text said."""
    if pa.types.is_temporal(dtype):
        return pa.string()
    if pa.types.is_struct(dtype):
        return pa.struct([f.with_type(_temporal_as_string(f.type)) for f in dtype])
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return pa.list_(dtype.value_field.with_type(_temporal_as_string(dtype.value_type)))
    return dtype


def _has_temporal(schema: pa.Schema) -> bool:
    return any(_temporal_as_string(f.type) != f.type for f in schema)


def _csv_options(shard: Shard, csv: CsvOptions | None) -> tuple:
    csv = csv or CsvOptions()
    tab = shard.path.lower().endswith((".tsv", ".tsv.gz"))
    delimiter = csv.delimiter or ("\t" if tab else ",")
    return (
        pacsv.ReadOptions(encoding=csv.encoding, block_size=1 << 24),
        pacsv.ParseOptions(delimiter=delimiter, quote_char=csv.quote, newlines_in_values=True),
    )


def _parse_csv(data: bytes, shard: Shard, csv: CsvOptions | None, types: dict | None = None) -> pa.Table:
    """A CSV/TSV file with a header row. ``types`` (the job's schema) parse columns straight into their
    types; others are inferred, but dates and times stay strings. Invalid UTF-8 is left to the text
    column's check (an error row), not made a bad file. An empty field is null, as Spark and DuckDB
    read it; ``""`` is the empty string."""
    read, parse = _csv_options(shard, csv)

    def parse_with(column_types: dict) -> pa.Table:
        convert = pacsv.ConvertOptions(
            column_types=column_types,
            check_utf8=False,
            strings_can_be_null=True,  # an empty field is null, a quoted empty one ("") the empty string
            quoted_strings_can_be_null=False,
        )
        return pacsv.read_csv(
            io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert
        )

    table = parse_with(dict(types or {}))
    if _has_temporal(table.schema):
        strings = {f.name: _temporal_as_string(f.type) for f in table.schema if f.name not in (types or {})}
        table = parse_with({**strings, **(types or {})})
    return table


def _table_from_mixed_rows(rows: list[dict], text_column: str) -> pa.Table:
    """Non-string texts become null with a reason; other mixed-type columns keep each value's JSON text."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name == text_column:
            problems = [_json_text_problem(v) for v in values]
            columns[name] = pa.array(
                [v if p is None else None for v, p in zip(values, problems, strict=True)], pa.string()
            )
            columns[TEXT_PROBLEM] = pa.array(problems, pa.string())
            continue
        name, values = _replace_surrogates(name), [_replace_surrogates(v) for v in values]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values],
                pa.string(),
            )
    return pa.table(columns)


def _json_text_problem(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return f"text is not a string ({_py_kind(value)})"
    return "text is not valid UTF-8" if _SURROGATE.search(value) else None


def _replace_surrogates(value):
    """Strings (also nested, also keys) with undecodable bytes or lone surrogates -> U+FFFD in their place."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


def _py_kind(value) -> str:
    return {int: "int", float: "float", bool: "bool", list: "list", dict: "dict"}.get(type(value), "value")


READ_ERRORS = (OSError, ValueError, pa.ArrowException, EOFError)


def _unreadable(shard: Shard, exc: Exception) -> str:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"unreadable {shard.format} file: {first}"


def _read_whole(f, shard: Shard, text_column: str, csv: CsvOptions | None, types: dict | None = None):
    if shard.format == "csv":
        return _parse_csv(f.read(), shard, csv, {**(types or {}), text_column: pa.string()})
    return _parse_jsonl(f.read(), text_column)


JSONL_SAMPLE_BYTES = 8 << 20
_JSON_LINE = re.compile(rb"^[ \t\r\f\v]*\S", re.MULTILINE)  # a line that is not blank: one row


def _jsonl_rows_and_schema(data: bytes, text_column: str) -> tuple[int, pa.Schema]:
    """Exact row count and the column types of a JSONL file, without parsing a big file twice.

    A file up to ``JSONL_SAMPLE_BYTES`` is parsed whole, as the read stage will. A bigger one is typed
    by its first ``JSONL_SAMPLE_BYTES`` (whole lines) and its rows are counted as non-blank lines, which
    is what the reader makes rows of; the read stage parses it fully and stops the run naming the file
    if a later line is malformed or has a column or type the sample did not show (Spark's JSON schema
    sampling works the same way; ``input.schema`` declares such columns)."""
    if len(data) <= JSONL_SAMPLE_BYTES:
        table = _parse_jsonl(data, text_column)
        return table.num_rows, table.schema
    head = data[: data.rfind(b"\n", 0, JSONL_SAMPLE_BYTES) + 1] or data
    return len(_JSON_LINE.findall(data)), _parse_jsonl(head, text_column).schema


def with_partitions(table: pa.Table, shard: Shard) -> pa.Table:
    """The file's hive partition values as string columns, unless the file has such a column."""
    for key, value in shard.partitions:
        if key not in table.column_names:
            table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
    return table


def inspect_shard(fs, shard: Shard, text_column: str, csv: CsvOptions | None = None) -> ShardReport:
    report = ShardReport(shard)
    try:
        if shard.format == "parquet":
            with fs.open(shard.path, "rb") as fh:
                meta = pq.ParquetFile(fh)
                report.rows, report.schema = meta.metadata.num_rows, meta.schema_arrow
        elif shard.format == "jsonl":
            with _open(fs, shard) as fh:
                report.rows, report.schema = _jsonl_rows_and_schema(fh.read(), text_column)
        else:
            with _open(fs, shard) as fh:
                table = _read_whole(fh, shard, text_column, csv)
            report.rows, report.schema = table.num_rows, table.schema
    except READ_ERRORS as exc:
        report.problem = _unreadable(shard, exc)
        return report
    report.schema = with_partitions(report.schema.empty_table(), shard).schema
    report.columns = [name for name in report.schema.names if name != TEXT_PROBLEM]
    if report.rows and text_column not in report.columns:
        report.problem = f"no text column {text_column!r} (columns: {', '.join(report.columns[:10])})"
    return report


def try_casts(
    fs, shard: Shard, casts: dict[str, pa.DataType], text_column: str, csv: CsvOptions | None
) -> str | None:
    """Why the file's values of ``casts``' columns cannot be read as their types, or None when they can
    (the pre-flight check of casts that depend on the values)."""
    try:
        with fs.open(shard.path, "rb") if shard.format == "parquet" else _open(fs, shard) as fh:
            if shard.format == "csv":
                _read_whole(fh, shard, text_column, csv, dict(casts))
                return None
            for block in file_blocks(fh, shard, text_column, 1 << 16, columns=list(casts)):
                for name, dtype in casts.items():
                    try:
                        block.column(name).cast(dtype)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                        found = block.column(name).type
                        first = str(exc).splitlines()[0]
                        return f"column {name!r}: {found} values cannot be read as {dtype} ({first})"
    except READ_ERRORS as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        wanted = ", ".join(f"{name!r} as {dtype}" for name, dtype in casts.items())
        return f"values cannot be read as the other files' types ({wanted}): {first}"
    return None


def text_as_string(column: pa.ChunkedArray) -> tuple[pa.Array, list[str | None]]:
    """The text column as Arrow strings, and a reason for each value that was not a string."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()  # a pandas categorical written to Parquet reads back so
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            column.validate(full=True)  # Parquet writers may store invalid UTF-8 in a string column
        except pa.ArrowInvalid:
            column = column.cast(pa.large_binary())  # decoded row by row below
        else:
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
    table: pa.Table,
    text_column: str,
    row_start: int,
    shard_url: str,
    derive_id: str | None,
    key: tuple[str, str] | None = None,
) -> pa.Table:
    """Text as string with ``_error`` for wrong types, ``_row_key``, and a derived id when asked.
    ``key`` (a table input's id column and name) makes ``_row_key`` ``<name>#<id>``."""
    texts, reasons = text_as_string(table.column(text_column))
    if TEXT_PROBLEM in table.column_names:
        problems = table.column(TEXT_PROBLEM).to_pylist()
        reasons = [p or r for p, r in zip(problems, reasons, strict=True)]
        table = table.drop_columns([TEXT_PROBLEM])
    table = table.set_column(table.schema.get_field_index(text_column), text_column, texts)
    n = table.num_rows
    if key is not None:
        ids = table.column(key[0]).to_pylist()
        keys = pa.array([f"{key[1]}#{i}" for i in ids], pa.string())
    else:
        keys = pa.array([f"{shard_url}#{row_start + i}" for i in range(n)], pa.string())
    if derive_id:
        table = table.append_column(derive_id, keys) if derive_id not in table.column_names else table
    table = table.append_column(C.ROW_KEY, keys)
    return table.append_column(C.ERROR, pa.array(reasons, pa.string()))


def conform_block(table: pa.Table, schema: pa.Schema | None, text_column: str) -> pa.Table:
    """``table`` with the columns of the job's ``schema`` in its order and types (missing ones null).
    The text column keeps its type (``text_as_string`` turns odd values into error rows), and the JSONL
    fallback's text problems pass through."""
    if schema is None:
        return table
    columns, fields = [], []
    for f in schema:
        if f.name == text_column and f.name in table.column_names:
            columns.append(table.column(f.name))
            fields.append(table.schema.field(f.name))
        elif f.name in table.column_names:
            column = table.column(f.name)
            columns.append(column if column.type == f.type else column.cast(f.type))
            fields.append(f)
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
            fields.append(f)
    if TEXT_PROBLEM in table.column_names:
        columns.append(table.column(TEXT_PROBLEM))
        fields.append(table.schema.field(TEXT_PROBLEM))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def file_blocks(
    f,
    shard: Shard,
    text_column: str,
    rows_per_block: int,
    schema: pa.Schema | None = None,
    csv: CsvOptions | None = None,
    columns: list[str] | None = None,
) -> Iterator[pa.Table]:
    """The rows of one open file in blocks, with its partition values, cast to ``schema``."""
    if shard.format == "parquet":
        parquet = pq.ParquetFile(f)
        present = [c for c in columns if c in parquet.schema_arrow.names] if columns is not None else None
        tables = (pa.Table.from_batches([b]) for b in parquet.iter_batches(rows_per_block, columns=present))
    else:
        types = {f.name: f.type for f in schema if f.name != text_column} if schema is not None else None
        whole = _read_whole(f, shard, text_column, csv, types if shard.format == "csv" else None)
        unknown = sorted(set(whole.column_names) - set(schema.names if schema else ()) - {TEXT_PROBLEM})
        if schema is not None and unknown:
            raise ValueError(
                f"column {unknown[0]!r} is not in the file's pre-flight sample; declare it in input.schema"
            )
        tables = (whole.slice(i, rows_per_block) for i in range(0, whole.num_rows, rows_per_block))
    for block in tables:
        yield conform_block(with_partitions(block, shard), schema, text_column)


def read_shard(
    f,
    shard: Shard,
    text_column: str,
    derive_id: str | None,
    rows_per_block: int,
    *,
    schema: pa.Schema | None = None,
    csv: CsvOptions | None = None,
    key: tuple[str, str] | None = None,
) -> Iterator[pa.Table]:
    """The rows of one open file in normalised blocks of ``rows_per_block`` rows, in the job's schema.

    The pre-flight check reads only Parquet footers, so a corrupt data page shows up here: it stops the
    run with a line naming the file, whatever ``on_bad_file`` says, because rows of the file may already
    be on their way."""

    def blocks() -> Iterator[pa.Table]:
        try:
            yield from file_blocks(f, shard, text_column, rows_per_block, schema, csv)
        except READ_ERRORS as exc:
            raise ConfigError(f"bad input file {redact(shard.url)}: {_unreadable(shard, exc)}") from exc

    row = 0
    for block in blocks():
        yield normalise_block(block, text_column, row, shard.url, derive_id, key)
        row += block.num_rows
