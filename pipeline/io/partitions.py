"""Partition values that are always safe folder names.

pyarrow percent-encodes hive partition values (``a/b`` -> ``col=a%2Fb``, ``../../etc`` ->
``col=..%2F..%2Fetc``) and decodes them on read, so ordinary values round-trip exactly and can never
leave the output path. What encoding cannot fix is length: a folder name over 255 bytes fails on every
filesystem. Such values are shortened to a readable prefix plus a hash, and the row keeps the original
in ``_partition_original`` (a JSON object ``{column: value}``), so nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import quote

import pyarrow as pa

from bertpipe import columns as C

MAX_ENCODED_BYTES = 200


def safe_partition_value(value: str) -> str:
    if len(quote(value, safe="")) <= MAX_ENCODED_BYTES:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    prefix = value[:40]
    while len(quote(prefix, safe="")) > MAX_ENCODED_BYTES - 20:
        prefix = prefix[:-1]
    return f"{prefix}~{digest}"


class PartitionSanitiser:
    """``__call__(table) -> table``: shortens over-long string partition values, keeping originals."""

    def __init__(self, partition_by: list[str]):
        self.partition_by = partition_by

    def __call__(self, table: pa.Table) -> pa.Table:
        originals: list[dict[str, str]] = [{} for _ in range(table.num_rows)]
        for name in self.partition_by:
            column = table.column(name)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                continue
            values = column.to_pylist()
            safe = [v if v is None else safe_partition_value(v) for v in values]
            for i, (v, s) in enumerate(zip(values, safe, strict=True)):
                if v != s:
                    originals[i][name] = v
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(safe, column.type))
        kept = pa.array([json.dumps(o, ensure_ascii=False) if o else None for o in originals], pa.string())
        return table.append_column(C.PARTITION_ORIGINAL, kept)
