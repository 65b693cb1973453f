"""One schema across the shards of a job: the type of every input column, decided before any model runs.

Parquet files carry types; JSON and CSV carry text that Arrow's readers type by inference, file by
file, so the same column can come out int64 in one JSONL file, double in another and null in a third.
No library unifies that the way a warehouse needs (pyarrow's ``unify_schemas`` refuses string against
date, and DuckDB's ``union_by_name`` widens conflicts to VARCHAR silently), so the rules are here:

- ``input.schema`` types a column explicitly: every file is cast to it (a file without it has nulls).
- Otherwise Parquet files give a column's type; JSON and CSV values are read as that type.
- Integers and floats widen to float64 (narrower ints to the wider int), whichever file has which.
- A column that is null in one file (all-null JSON, an empty CSV column) takes the others' type.
- Where no file gives a type, the type most files agree on is the reference.
- A real conflict (a struct where the others have strings, a number where they have strings) makes the
  odd file bad, named with the column and both types. A cast that depends on the values (JSON strings
  read as Parquet's date) is tried on the file's values in the pre-flight check
  (``bertpipe.plan.check_shards``), so a value that cannot be cast is a bad file too.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from bertpipe.config import InputConfig
from bertpipe.io.reader import TEXT_PROBLEM, ShardReport


def normal(dtype: pa.DataType) -> pa.DataType:
    """Types that hold the same values compare equal: categorical as its values, large strings as strings."""
    if pa.types.is_dictionary(dtype):
        return normal(dtype.value_type)
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return pa.string()
    if pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return pa.binary()
    return dtype


def _numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)


def widen(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type that holds both without looking at values, or None for a conflict."""
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if _numeric(a) and _numeric(b):
        if pa.types.is_integer(a) and pa.types.is_integer(b) and a.bit_width != b.bit_width:
            if pa.types.is_signed_integer(a) == pa.types.is_signed_integer(b):
                return a if a.bit_width > b.bit_width else b
            return pa.int64() if max(a.bit_width, b.bit_width) < 64 else None
        return pa.float64()
    if pa.types.is_nested(a) and pa.types.is_nested(b):  # structs with other fields, lists of nulls
        try:
            merged = pa.unify_schemas(
                [pa.schema([("x", a)]), pa.schema([("x", b)])], promote_options="permissive"
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None
        return merged.field("x").type
    if pa.types.is_timestamp(a) and pa.types.is_timestamp(b) and a.tz == b.tz:
        return a if ["s", "ms", "us", "ns"].index(a.unit) >= ["s", "ms", "us", "ns"].index(b.unit) else b
    return None


def castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether Arrow can cast ``source`` values to ``target`` at all (whether each value fits is tried
    on the values)."""
    if pa.types.is_nested(source) or pa.types.is_nested(target):
        return widen(target, source) == target
    try:
        pa.array([], source).cast(target)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


class Unified:
    """The job's input schema, the files it makes bad, and the casts to try on a file's values."""

    def __init__(self) -> None:
        self.schema: pa.Schema = pa.schema([])
        self.bad: dict[str, str] = {}  # file url -> why
        self.casts: dict[str, dict[str, pa.DataType]] = {}  # file url -> {column: type} to try on values


def unify(config: InputConfig, reports: list[ShardReport], table: pa.Schema | None = None) -> Unified:
    """The schema of ``reports``' good files (see the module's rules); a table input's own schema
    (``table``) declares types as ``input.schema`` does. The text column is a string: its odd values
    become error rows, never a bad file."""
    text = config.text_column
    declared = {f.name: normal(f.type) for f in table or []}
    declared.update({name: normal(dtype) for name, dtype in config.arrow_schema().items()})
    readable = [r for r in reports if not r.problem and r.schema is not None]
    order: dict[str, None] = dict.fromkeys(f.name for f in table or [] if f.name != text)
    types: dict[str, list[tuple[ShardReport, pa.DataType]]] = {}
    for report in readable:
        for f in report.schema:
            if f.name in (TEXT_PROBLEM, text):
                continue
            order.setdefault(f.name)
            types.setdefault(f.name, []).append((report, normal(f.type)))
    for name in declared.keys() - {text}:
        order.setdefault(name)  # declared but in no file (or beyond a big JSONL file's sample)
    out = Unified()
    fields = []
    for name in order:
        entries = types.get(name, [])
        target = declared.get(name) or _reference(entries)
        for report, dtype in entries:
            url = report.shard.url
            if pa.types.is_null(dtype) or widen(target, dtype) == target:
                continue
            if _value_cast(dtype, target, report.shard.format, name in declared):
                out.casts.setdefault(url, {})[name] = target  # tried on the values
                continue
            out.bad.setdefault(url, f"schema differs: column {name!r} is {dtype} here, {target} elsewhere")
        fields.append(pa.field(name, target))
    if table is not None:
        fields.insert(min(table.names.index(text), len(fields)), pa.field(text, pa.string()))
    elif any(text in r.schema.names for r in readable):
        position = next(r.schema.names.index(text) for r in readable if text in r.schema.names)
        fields.insert(min(position, len(fields)), pa.field(text, pa.string()))
    out.schema = pa.schema(fields)
    return out


def _value_cast(dtype: pa.DataType, target: pa.DataType, fmt: str, declared: bool) -> bool:
    """Whether a file's ``dtype`` may be read as ``target``, value by value: any castable type when
    ``input.schema`` says so; CSV text parsed as any flat type; a JSON string as what Parquet has."""
    if declared:
        return castable(dtype, target)
    if fmt == "csv":
        return not pa.types.is_nested(dtype) and not pa.types.is_nested(target)
    return fmt == "jsonl" and pa.types.is_string(dtype) and castable(dtype, target)


def _reference(entries: list[tuple[ShardReport, pa.DataType]]) -> pa.DataType:
    """The type files agree on: Parquet's if any Parquet file has one, else the one most files have
    (so one odd file is the one flagged); then widened by every file's type that widens it (int and
    float to float64)."""
    typed = [t for r, t in entries if r.shard.format == "parquet" and not pa.types.is_null(t)]
    every = [t for _, t in entries if not pa.types.is_null(t)]
    if not every:
        return pa.null()
    reference = Counter(typed or every).most_common(1)[0][0]
    for dtype, _ in Counter(typed).most_common() + Counter(every).most_common():
        reference = widen(reference, dtype) or reference
    return reference
