"""Planning: everything decided before Ray runs anything, without importing Ray or torch.

Models are inspected (config, labels, tokenizer, weights' hash) and grouped by tokenizer, input files
are discovered and checked, ids and partition columns resolved. ``bertpipe validate`` stops here, so
it is fast and runs anywhere; ``run`` and ``label`` hand the plan to ``bertpipe.engine.data``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from bertpipe import columns as C
from bertpipe.config import TABLE_INPUTS, ConfigError, JobConfig
from bertpipe.io.paths import Shard, discover, filesystem_for, redact
from bertpipe.io.reader import ShardReport, inspect_shard, try_casts
from bertpipe.io.schema import unify
from bertpipe.io.tables import TableInput, open_input_table
from bertpipe.models.loading import ModelInfo, inspect_model
from bertpipe.tasks import TaskBase, kind_of

log = logging.getLogger(__name__)

Inspector = Callable[[list[Shard]], list[ShardReport]]


@dataclass(frozen=True)
class ModelTask:
    """A task with its model's facts and the tokenizer group whose token columns it reads."""

    task: TaskBase
    info: ModelInfo
    group: str

    @property
    def first_window_only(self) -> bool:
        return not kind_of(self.task).all_windows(self.task)


@dataclass(frozen=True)
class TokenizerGroup:
    """Tasks that share one tokenizer; what the group needs decides how much tokenising is done."""

    key: str
    source: str  # a model folder or hub id whose tokenizer this is
    revision: str | None
    trust_remote_code: bool
    all_windows: bool  # overlapping windows over the whole text (NER, long_text: chunk)
    offsets: bool  # character offsets and special-token masks (NER)
    max_length: int | None = None  # a cap below runtime.max_length (a sentence encoder's max_seq_length)
    task: TaskBase | None = None  # a task whose kind tokenises its own inputs (pairs): its group alone


@dataclass(frozen=True)
class ModelPlan:
    """The models of a job: their facts, the tasks that run them and the tokenisations they need."""

    infos: dict[str, ModelInfo]
    model_tasks: list[ModelTask]
    groups: list[TokenizerGroup]

    def output_fields(self) -> list[pa.Field]:
        return [f for mt in self.model_tasks for f in kind_of(mt.task).output_fields(mt.task, mt.info)]

    def input_columns(self) -> list[str]:
        """Input columns the tasks read besides the text (a QA task's question column)."""
        return sorted({c for mt in self.model_tasks for c in kind_of(mt.task).input_columns(mt.task)})


@dataclass
class Plan:
    """A job's models, input files and their checks."""

    config: JobConfig
    models: ModelPlan
    shards: list[Shard]
    reports: list[ShardReport]
    skipped: list[dict[str, str]] = field(default_factory=list)
    derive_id: str | None = None
    schema: pa.Schema | None = None  # the input columns' one type across files (``bertpipe.io.schema``)
    table: TableInput | None = None  # a table input read whole; None for files and incremental reads
    key_column: str | None = None  # table inputs: ``_row_key`` is ``<table>#<this column>``
    key_prefix: str = ""

    @property
    def model_tasks(self) -> list[ModelTask]:
        return self.models.model_tasks

    @property
    def good_shards(self) -> list[Shard]:
        bad = {s["file"] for s in self.skipped}
        return [s for s in self.shards if s.url not in bad]

    def only(self, shards: list[Shard]) -> Plan:
        """The same plan restricted to ``shards`` (incremental runs)."""
        keep = {s.url for s in shards}
        reports = [r for r in self.reports if r.shard.url in keep]
        whole = self.table if len(keep) == len(self.shards) else None  # else only the new files are read
        return Plan(
            self.config,
            self.models,
            list(shards),
            reports,
            self.skipped,
            self.derive_id,
            self.schema,
            whole,
            self.key_column,
            self.key_prefix,
        )

    @property
    def rows_in(self) -> int:
        bad = {s["file"] for s in self.skipped}
        return sum(r.rows for r in self.reports if r.shard.url not in bad)

    @property
    def id_column(self) -> str:
        return self.derive_id or self.config.input.id_column


def plan_models(tasks: list[TaskBase]) -> ModelPlan:
    infos = {task.name: inspect_model(task) for task in tasks}
    for task in tasks:
        kind_of(task).check(task, infos[task.name])
    groups: dict[str, TokenizerGroup] = {}
    keys: dict[str, str] = {}
    for task in tasks:
        info, kind = infos[task.name], kind_of(task)
        cap = kind.max_length(task, info)
        own = kind.own_tokens(task)
        key = info.tokenizer_key + (f"_{cap}" if cap else "") + (f"_{task.name}" if own else "")
        keys[task.name] = key
        prev = groups.get(key)
        groups[key] = TokenizerGroup(
            key=key,
            source=prev.source if prev else info.source,
            revision=prev.revision if prev else info.revision,
            trust_remote_code=(prev.trust_remote_code if prev else False) or task.trust_remote_code,
            all_windows=(prev.all_windows if prev else False) or kind.all_windows(task),
            offsets=(prev.offsets if prev else False) or kind.offsets(task),
            max_length=cap,
            task=task if own else None,
        )
    model_tasks = [ModelTask(t, infos[t.name], keys[t.name]) for t in tasks]
    return ModelPlan(infos, model_tasks, list(groups.values()))


def check_shards(
    config: JobConfig, shards: list[Shard], inspect: Inspector, table: pa.Schema | None = None
) -> tuple[list, list[dict], pa.Schema]:
    """Apply ``input.on_bad_file`` to unreadable files, files without the text column and columns whose
    type conflicts with the job's one schema; returns the reports, the skipped files and that schema."""
    reports = inspect(shards)
    bad = {r.shard.url: r.problem for r in reports if r.problem}
    unified = unify(config.input, reports, table)
    bad.update(unified.bad)
    todo = [(r.shard, unified.casts[r.shard.url]) for r in reports if r.shard.url in unified.casts]
    if todo:  # casts that depend on the values (JSON strings as Parquet's dates): tried on them
        fs = filesystem_for(todo[0][0].url, config.input.storage_options)
        text, csv = config.input.text_column, config.input.csv
        with ThreadPoolExecutor(max_workers=4) as pool:
            problems = pool.map(lambda t: try_casts(fs, t[0], t[1], text, csv), todo)
            for (shard, _), problem in zip(todo, list(problems), strict=True):
                if problem and shard.url not in bad:
                    bad[shard.url] = problem
    if bad and config.input.on_bad_file == "fail":
        url, problem = next((r.shard.url, bad[r.shard.url]) for r in reports if r.shard.url in bad)
        more = f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise ConfigError(
            f"bad input file {redact(url)}: {problem}{more}; set input.on_bad_file: skip to skip"
        )
    skipped = [
        {"file": redact(r.shard.url), "reason": bad[r.shard.url]} for r in reports if r.shard.url in bad
    ]
    for item in skipped:
        log.warning("skipping bad input file %s: %s", item["file"], item["reason"])
    if skipped and len(skipped) == len(reports):
        raise ConfigError("every input file is bad; nothing to do")
    if skipped:  # the schema of the files that are read
        unified = unify(config.input, [r for r in reports if r.shard.url not in bad], table)
    return reports, skipped, unified.schema


def resolve_id_column(config: JobConfig, reports: list[ShardReport], skipped: list[dict]) -> str | None:
    """The column to derive ids into, or None when the input has its own ids in every file."""
    id_column = config.input.id_column or C.DERIVED_ID
    if config.input.id_column is None:
        return id_column
    bad = {s["file"] for s in skipped}
    has = [id_column in r.columns for r in reports if r.shard.url not in bad and r.rows]
    if all(has):
        return None
    if not any(has):
        log.info("input has no %r column: deriving stable ids from file path and row number", id_column)
        return id_column
    raise ConfigError(f"input.id_column {id_column!r} is present in some files and missing in others")


def check_columns(
    config: JobConfig, models: ModelPlan, input_columns: set[str], derive_id: str | None
) -> None:
    outputs = {f.name for f in models.output_fields()}
    missing = [c for c in models.input_columns() if c not in input_columns]
    if missing:
        raise ConfigError(f"input has no column {missing[0]!r}, which a task reads (question_column)")
    known = input_columns | outputs | {C.ROW_KEY, C.ERROR} | ({derive_id} if derive_id else set())
    for name in config.output.partition_by:
        if name not in known:
            raise ConfigError(f"output.partition_by: unknown column {name!r}")
    clashes = outputs & input_columns
    if clashes:
        raise ConfigError(f"input already has task output column(s) {sorted(clashes)}; rename the task")


def inspect_locally(config: JobConfig) -> Inspector:
    """Pre-flight checks in threads on this machine (``bertpipe validate``, local runs)."""

    def run(shards: list[Shard]) -> list[ShardReport]:
        if not shards:
            return []
        fs = filesystem_for(shards[0].url, config.input.storage_options)
        with ThreadPoolExecutor(max_workers=8) as pool:
            text, csv = config.input.text_column, config.input.csv
            return list(pool.map(lambda s: inspect_shard(fs, s, text, csv), shards))

    return run


def plan(config: JobConfig, inspect: Inspector | None = None) -> Plan:
    models = plan_models(config.tasks)
    cfg = config.input
    table, table_schema = None, None
    if cfg.format.value in TABLE_INPUTS:
        table, table_schema, shards = open_input_table(cfg)
    else:
        shards = discover(
            cfg.paths,
            cfg.format,
            cfg.storage_options,
            formats=("parquet", "jsonl", "csv"),
            partitioning=cfg.partitioning,
        )
    reports, skipped, schema = check_shards(config, shards, inspect or inspect_locally(config), table_schema)
    derive_id = None if table else resolve_id_column(config, reports, skipped)
    check_columns(config, models, set(schema.names), derive_id)
    key = (cfg.id_column, table.name) if table else (None, "")
    return Plan(config, models, shards, reports, skipped, derive_id, schema, table, *key)
