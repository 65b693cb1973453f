"""The job config: YAML validated by pydantic. Unknown keys are errors; messages name the key.

The names here are the user-facing contract (see README "Config reference").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from bertpipe.errors import ConfigError
from bertpipe.tasks import KINDS, TaskConfig

ModelT = TypeVar("ModelT", bound=BaseModel)
ENV_PREFIX = "BERTPIPE_"

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputFormat(str, Enum):
    auto = "auto"
    parquet = "parquet"
    jsonl = "jsonl"


class SourceFormat(str, Enum):
    """A job's input: files (``auto`` by extension, or one format) or a table."""

    auto = "auto"
    parquet = "parquet"
    jsonl = "jsonl"
    csv = "csv"
    iceberg = "iceberg"
    delta = "delta"


TABLE_INPUTS = ("iceberg", "delta")


class CsvOptions(_Strict):
    """How CSV/TSV shards are parsed: a header row, then values; quoted values may hold newlines."""

    delimiter: str | None = Field(default=None, min_length=1, max_length=1)  # "," (.tsv: tab)
    quote: str = Field(default='"', min_length=1, max_length=1)
    encoding: str = "utf-8"

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        return value


def arrow_type(alias: str):
    """An Arrow type from its name as pyarrow prints it: ``string``, ``int64``, ``float64``, ``bool``,
    ``date32``, ``timestamp[us]``, ``timestamp[us, tz=UTC]``, ``decimal128(12, 2)``."""
    import re

    import pyarrow as pa

    text = alias.strip()
    if m := re.fullmatch(r"timestamp\[(s|ms|us|ns)(?:,\s*tz=([^\]]+))?\]", text):
        return pa.timestamp(m.group(1), m.group(2))
    if m := re.fullmatch(r"decimal128\((\d+),\s*(\d+)\)", text):
        return pa.decimal128(int(m.group(1)), int(m.group(2)))
    try:
        return pa.type_for_alias(text)
    except ValueError:
        examples = "e.g. string, int64, float64, date32, timestamp[us]"
        raise ValueError(f"unknown Arrow type {alias!r} ({examples})") from None


_PATHS_SCHEMA = {
    "title": "Paths",
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
}


class InputConfig(_Strict):
    # ``schema`` is a BaseModel method, hence the field ``schema_`` under that name in YAML and dumps.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_by_name=True, serialize_by_alias=True
    )
    # One path may be given as a string (``_one_path_is_a_list``); the schema says so for editors too.
    paths: Annotated[list[str], WithJsonSchema(_PATHS_SCHEMA)] = Field(default_factory=list)
    format: SourceFormat = SourceFormat.auto
    partitioning: Literal["hive", "none"] = "hive"
    schema_: dict[str, str] = Field(default_factory=dict, alias="schema")  # column -> Arrow type
    csv: CsvOptions = Field(default_factory=CsvOptions)
    table: str | None = None  # iceberg: namespace.table
    catalog: dict[str, Any] = Field(default_factory=dict)  # iceberg: pyiceberg catalog properties
    version: int | None = Field(default=None, ge=0)  # delta: the version to read (default: latest)
    text_column: str = "text"
    id_column: str | None = "id"
    storage_options: dict[str, Any] = Field(default_factory=dict)
    max_chars: int | None = Field(default=None, gt=0)
    on_bad_file: Literal["fail", "skip"] = "fail"
    on_duplicate_id: Literal["keep", "fail"] = "keep"

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("schema_")
    @classmethod
    def _arrow_types(cls, value: dict[str, str]) -> dict[str, str]:
        for name, alias in value.items():
            try:
                arrow_type(alias)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _source(self) -> InputConfig:
        fmt = self.format.value
        if fmt == "iceberg":
            if not self.table or "." not in self.table:
                raise ValueError("input.format iceberg reads input.table, namespace.table")
            if not self.catalog and len(self.paths) != 1:
                raise ValueError(
                    "input.format iceberg: set input.catalog, or input.paths: [FOLDER] for the SQLite "
                    "catalog bertpipe keeps there"
                )
        elif not self.paths:
            raise ValueError("input.paths: at least one path is required")
        elif fmt == "delta" and len(self.paths) != 1:
            raise ValueError("input.format delta reads one table: input.paths: [TABLE_PATH]")
        if fmt in TABLE_INPUTS and not self.id_column:
            raise ValueError(f"input.format {fmt}: set input.id_column, the key of the table's rows")
        if self.version is not None and fmt != "delta":
            raise ValueError("input.version applies to input.format delta")
        if (self.table or self.catalog) and fmt != "iceberg":
            raise ValueError("input.table and input.catalog apply to input.format iceberg")
        return self

    def arrow_schema(self):
        """``input.schema`` as Arrow types."""
        return {name: arrow_type(alias) for name, alias in self.schema_.items()}


class OutputMode(str, Enum):
    error = "error"
    overwrite = "overwrite"
    append = "append"
    resume = "resume"
    incremental = "incremental"
    merge = "merge"  # Iceberg and Delta: upsert by input.id_column


class OutputConfig(_Strict):
    path: str
    format: Literal["parquet", "iceberg", "delta"] = "parquet"
    partition_by: list[str] = Field(default_factory=list)
    mode: OutputMode = OutputMode.error
    storage_options: dict[str, Any] = Field(default_factory=dict)
    table: str | None = None
    catalog: dict[str, Any] = Field(default_factory=dict)
    # How a Parquet output is committed: ``rename`` stages beside the output and publishes by renaming
    # (one rename on a local disk, a copy of every byte on an object store); ``manifest`` writes files
    # under their final names and commits a manifest and ``_SUCCESS``; ``auto``: manifest on object
    # stores, rename elsewhere. See the README, "What readers see during a commit".
    commit: Literal["auto", "rename", "manifest"] = "auto"


class RuntimeConfig(_Strict):
    address: str | None = None
    local_cpus: int | None = Field(default=None, ge=1)  # only when starting a local Ray (address null)
    local_gpus: int | None = Field(default=None, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal["none", "int8"] = "none"
    # compile the models ahead of time (stages/compiled.py): ``auto`` when the job's tokens pay it back
    compile: Literal["auto", "on", "off"] = "auto"
    actors: int | tuple[int, int] = 1
    gpus_per_actor: float = Field(default=1, gt=0)
    cpus_per_actor: float = Field(default=1, gt=0)
    threads_per_actor: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=512, ge=8)
    stride: int | None = Field(default=None, ge=0)
    max_tokens_per_batch: int = Field(default=8192, ge=64)
    max_rows_per_batch: int = Field(default=256, ge=1)
    rows_per_block: int = Field(default=512, ge=1)
    precision_check_rows: int = Field(default=16, ge=0)

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare ``on`` / ``off`` as a boolean."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("actors")
    @classmethod
    def _pool_size(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("must be a positive int or [min, max] with 1 <= min <= max")
        return value

    @model_validator(mode="after")
    def _stride_fits(self) -> RuntimeConfig:
        if self.stride is not None and self.stride >= self.max_length - 2:
            raise ValueError("runtime.stride must be smaller than runtime.max_length - 2")
        return self

    @property
    def window_stride(self) -> int:
        """Overlap between windows of long texts; a quarter of a window unless set."""
        return self.stride if self.stride is not None else self.max_length // 4


class JobConfig(_Strict):
    input: InputConfig
    output: OutputConfig
    tasks: list[TaskConfig] = Field(min_length=1)  # one config class per kind, see bertpipe.tasks
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _unique_task_names(self) -> JobConfig:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique, repeated: {', '.join(dupes)}")
        return self


def set_key(raw: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """Set the dotted ``key`` in ``raw``; numeric parts index into lists (``tasks.0.model``). Missing
    mappings are created, list items are not: ``origin`` (``--set KEY``, a variable) names the culprit."""
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{origin}: {where} has {len(node)} items; {part!r} is not an index in it")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
        else:
            raise ConfigError(f"{origin}: {where} is not a mapping or a list")
        if i == len(parts) - 1:
            node[index] = value
        else:
            node = node.setdefault(index, {}) if isinstance(node, dict) else node[index]


def _yaml_value(value: str, origin: str) -> Any:
    """A ``--set`` or environment value as YAML (``[x, y]``, ``3``, ``null``); empty is the empty string."""
    try:
        return yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: the value is not valid YAML: {str(exc).splitlines()[0]}") from exc


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b.c=VALUE`` overrides; VALUE is parsed as YAML (``[x, y]``, ``3``, ``null``)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        origin = f"--set {key.strip()}"
        set_key(raw, key, _yaml_value(value, origin), origin)
    return raw


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str], sections: Iterable[str]) -> None:
    """Apply ``BERTPIPE_OUTPUT__PATH=/x`` as ``output.path``: ``__`` is a dot, keys are lower-cased, the
    value is YAML as with ``--set``. Only variables that start with a config section count, so others
    (``BERTPIPE_TORCH`` of scripts/setup) are no keys."""
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if key.split(".")[0] in sections:
            log.info("config key %s set from the environment (%s)", key, name)
            set_key(raw, key, _yaml_value(environ[name], name), name)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a local file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {p}: cannot read it: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return raw


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key, e.g. ``tasks.1.kind: Input should be ...``."""
    lines = []
    for err in exc.errors():
        # pydantic puts the chosen kind into the location of a task's keys (tasks.0.ner.aggregation)
        loc = err["loc"]
        loc = [p for i, p in enumerate(loc) if not (p in KINDS and i and isinstance(loc[i - 1], int))]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):  # the kind itself is wrong
            loc.append("kind")
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {key}: {msg}")
    return "; ".join(lines)


def load_yaml_as(
    model: type[ModelT],
    path: str | Path,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelT:
    """Read a YAML file, apply ``environ``'s ``BERTPIPE_*`` keys, then the overrides, and validate it;
    every problem is one line naming the key."""
    raw = read_yaml(path)
    if environ is not None:
        apply_environment(raw, environ, model.model_fields)
    apply_overrides(raw, overrides or [])
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """A job config from a YAML file. ``BERTPIPE_*`` environment variables override the file and
    ``--set``-style ``key=value`` overrides win over both, so a Ray Job or a container can be configured
    from its environment and a command line still has the last word."""
    return load_yaml_as(JobConfig, path, list(overrides), os.environ)
