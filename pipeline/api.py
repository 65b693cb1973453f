"""The Python API: ``label`` for data in memory or a Ray Dataset, ``run`` for a job.

Both go through the same planning (``bertpipe.plan``) and the same Ray Data stages
(``bertpipe.engine.data.label_stages``) as the command line and Ray Jobs, so a row gets the same
labels, scores, spans and ``_error`` reasons whichever way it came in.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, Field, ValidationError, field_validator

from bertpipe import columns as C
from bertpipe.config import (
    ConfigError,
    JobConfig,
    RuntimeConfig,
    apply_overrides,
    format_validation_error,
    load_config,
)
from bertpipe.estimate import compile_decision, job_flops_per_token, text_tokens
from bertpipe.io.reader import text_as_string
from bertpipe.plan import ModelPlan, plan_models
from bertpipe.progress import Progress
from bertpipe.summary import RunSummary
from bertpipe.tasks import TaskBase, TaskConfig

log = logging.getLogger(__name__)

ROW = "_bertpipe_row"  # input order of in-memory rows while they travel; never returned
TEXT = "__text"  # the text as the stages read it (string or null); internal, dropped by postprocess


def run(
    config: str | Path | dict[str, Any] | JobConfig,
    overrides: Iterable[str] = (),
    *,
    on_progress: Callable[[Progress], None] | None = None,
    quiet: bool = False,
) -> RunSummary:
    """Run a job (a YAML path, a dict with the YAML's keys, or a ``JobConfig``) and return its summary.

    ``overrides`` are ``--set``-style ``key=value`` strings. User errors raise ``ConfigError`` (one
    line naming the key, file or task) before anything is written. ``on_progress`` receives a
    ``bertpipe.progress.Progress`` every second while the models run; ``quiet`` hides Ray Data's own
    progress bars and INFO lines."""
    from bertpipe.runner import execute

    overrides = list(overrides)
    if isinstance(config, (str, Path)):
        job = load_config(config, overrides)
    else:
        raw = config.model_dump(mode="json") if isinstance(config, JobConfig) else copy.deepcopy(config)
        if isinstance(config, JobConfig) and not overrides:
            job = config
        else:
            job = _validate(JobConfig, apply_overrides(raw, overrides), "config")
    return RunSummary.model_validate(execute(job, on_progress, quiet))


def label(
    data,
    tasks: Sequence[dict[str, Any] | TaskBase],
    *,
    text_column: str = "text",
    id_column: str | None = None,
    runtime: dict[str, Any] | RuntimeConfig | None = None,
):
    """Label ``data`` with ``tasks`` and return the same kind of object: a ``pandas.DataFrame``, a
    ``pyarrow.Table`` or a ``ray.data.Dataset`` (lazy: nothing runs until the caller consumes it).

    The result is the input, columns unchanged and rows in the input's order (a DataFrame keeps its
    index), plus the task columns and ``_error``, with the values ``bertpipe run`` writes. Bad rows keep
    their text as given and get an ``_error`` reason. ``id_column``, when given, must exist; duplicate
    ids are counted and logged, as ``input.on_duplicate_id: keep`` does. A Ray Dataset's rows come back
    in the order Ray Data yields them (set ``DataContext.execution_options.preserve_order`` for input
    order). Ray already initialised in this process is used and left running; otherwise a local Ray is
    started (or ``runtime.address`` / ``RAY_ADDRESS`` joined) and left up for the next call.
    """
    from bertpipe.engine.cluster import connect
    from bertpipe.engine.data import collect, from_arrow, is_dataset, label_stages, resolve_device

    args = _validate(_LabelArgs, {"tasks": list(tasks), "runtime": runtime or {}}, "label()")
    rt, task_configs = args.runtime, args.tasks
    models = plan_models(task_configs)
    connect(rt.address, local_cpus=rt.local_cpus, local_gpus=rt.local_gpus)
    device = resolve_device(rt.device)

    if is_dataset(data):
        ds = data.map_batches(
            TextColumn(text_column, id_column, models), batch_format="pyarrow", batch_size=None, num_cpus=0.25
        )
        compiled, reason = compile_decision(rt.compile, lambda: None, device)
        log.info("%s", reason)
        return label_stages(ds, models, rt, TEXT, None, device, compiled=compiled)

    columns = _columns(data)
    TextColumn(text_column, id_column, models).check(columns)
    if id_column is not None:
        ids = data.column(id_column).to_pylist() if isinstance(data, pa.Table) else data[id_column].tolist()
        _warn_duplicates(ids)
    texts, reasons = _texts(data, text_column)
    rows = pa.table(
        {
            ROW: pa.array(range(len(texts)), pa.int64()),
            TEXT: texts,
            C.ERROR: pa.array(reasons, pa.string()),
            **{name: _column(data, name) for name in models.input_columns()},  # e.g. a QA question column
        }
    )
    if rows.num_rows:
        blocks = [rows.slice(i, rt.rows_per_block) for i in range(0, rows.num_rows, rt.rows_per_block)]
        windows = [not mt.first_window_only for mt in models.model_tasks]

        def tokens() -> int:
            return sum(text_tokens(rows.column(TEXT), rt.max_length, w) for w in windows) // len(windows)

        flops = job_flops_per_token(models.model_tasks)
        compiled, reason = compile_decision(rt.compile, tokens, device, flops)
        log.info("%s", reason)
        labelled = collect(
            label_stages(from_arrow(blocks), models, rt, TEXT, None, device, compiled=compiled)
        )
        labelled = labelled.sort_by(ROW).drop_columns([ROW, *models.input_columns()])
    else:
        fields = [pa.field(C.ERROR, pa.string()), *models.output_fields()]
        labelled = pa.schema(fields).empty_table()
    if isinstance(data, pa.Table):
        for name in labelled.column_names:
            data = data.append_column(name, labelled.column(name))
        return data
    out = data.copy()
    for name in labelled.column_names:
        out[name] = labelled.column(name).to_pandas().to_numpy()
    return out


class _LabelArgs(BaseModel):
    """``tasks`` and ``runtime`` of ``label``, checked as the YAML's are (errors name ``tasks.N.key``)."""

    tasks: list[TaskConfig] = Field(min_length=1)
    runtime: RuntimeConfig

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskBase]) -> list[TaskBase]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return tasks


class TextColumn:
    """Adds the internal text column and ``_error`` to a batch, leaving the input columns as they are."""

    def __init__(self, text_column: str, id_column: str | None, models: ModelPlan):
        self.text_column = text_column
        self.id_column = id_column
        self.outputs = [f.name for f in models.output_fields()] + [C.ERROR]
        self.inputs = models.input_columns()

    def check(self, columns: list[str]) -> None:
        if self.text_column not in columns:
            raise ConfigError(f"text_column {self.text_column!r} is not a column (columns: {columns[:10]})")
        if self.id_column is not None and self.id_column not in columns:
            raise ConfigError(f"id_column {self.id_column!r} is not a column")
        for name in self.inputs:
            if name not in columns:
                raise ConfigError(f"column {name!r}, which a task reads (question_column), is not a column")
        clashes = sorted(set(self.outputs) & set(columns))
        if clashes:
            raise ConfigError(f"the input already has output column(s) {clashes}; rename the task")

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check(batch.column_names)
        texts, reasons = text_as_string(batch.column(self.text_column))
        return batch.append_column(TEXT, texts).append_column(C.ERROR, pa.array(reasons, pa.string()))


def _validate(model, raw: dict[str, Any], source: str):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def _columns(data) -> list[str]:
    if isinstance(data, pa.Table):
        return data.column_names
    import pandas as pd

    if not isinstance(data, pd.DataFrame):
        raise TypeError(
            f"label() takes a pandas DataFrame, a pyarrow Table or a Ray Dataset, not {type(data)}"
        )
    return [str(c) for c in data.columns]


def _column(data, name: str) -> pa.Array:
    """An input column other than the text as Arrow (values a task reads, e.g. questions)."""
    if isinstance(data, pa.Table):
        return data.column(name).combine_chunks()
    values = data[name].tolist()
    try:
        return pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep the strings, the rest is unusable
        return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def _texts(data, text_column: str) -> tuple[pa.Array, list[str | None]]:
    """Texts as Arrow strings (null where there is none to label) and a reason per row, as ``run`` gives."""
    if isinstance(data, pa.Table):
        return text_as_string(data.column(text_column))
    texts, reasons = [], []
    for value in data[text_column].tolist():
        text, reason = _python_text(value)
        texts.append(text)
        reasons.append(reason)
    return pa.array(texts, pa.string()), reasons


def _python_text(value) -> tuple[str | None, str | None]:
    """One value of a DataFrame column: missing values are null texts; other types are bad rows."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or _is_pandas_na(value):
        return None, None
    if isinstance(value, str):
        return value, None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "text is not valid UTF-8"
    return None, f"text is not a string ({_python_kind(value)})"


def _is_pandas_na(value) -> bool:
    import pandas as pd

    return value is pd.NA or value is pd.NaT


def _python_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, (list, tuple)) or hasattr(value, "__array__"):
        return "list"
    return "value"


def _warn_duplicates(ids: list) -> None:
    counts = Counter(i for i in ids if i is not None)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    if duplicates:
        log.warning("%d duplicate ids in the input; all rows kept", duplicates)
