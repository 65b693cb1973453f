"""The run: check everything that can be checked up front, then stream read -> prepare -> infer ->
postprocess -> write on Ray Data, verify the counts and publish. The only module that imports Ray.

The path of one row: ``io/reader.py`` (read, ``_row_key``) -> ``stages/prepare.py`` (``_error``,
tokens) -> ``stages/infer.py`` (logits) -> ``stages/postprocess.py`` with ``tasks/*`` (labels, spans) ->
``io/writer.py`` (staging, publish).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from bertpipe import __version__
from bertpipe import columns as C
from bertpipe.config import ConfigError, JobConfig, RuntimeConfig, TaskKind
from bertpipe.io.paths import Shard, discover, redact, redact_options
from bertpipe.io.reader import ShardReport, inspect_shard
from bertpipe.io.state import Intent, Ledger, OutputLock, config_fingerprint, settle_checkpoint
from bertpipe.io.writer import OutputLocation, WriteStats, arrow_filesystem, publish, staged_stats
from bertpipe.models.loading import ModelInfo, inspect_model
from bertpipe.stages.infer import ModelTask
from bertpipe.stages.prepare import TokenizerGroup
from bertpipe.tasks.sentiment import sentiment_label_map

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything decided before Ray runs anything: models, groups, shards and their checks."""

    config: JobConfig
    infos: dict[str, ModelInfo]
    model_tasks: list[ModelTask]
    groups: list[TokenizerGroup]
    shards: list[Shard]
    reports: list[ShardReport]
    skipped: list[dict[str, str]] = field(default_factory=list)
    derive_id: str | None = None

    @property
    def good_shards(self) -> list[Shard]:
        bad = {s["file"] for s in self.skipped}
        return [s for s in self.shards if s.url not in bad]

    def only(self, shards: list[Shard]) -> Plan:
        """The same plan restricted to ``shards`` (incremental runs)."""
        keep = {s.url for s in shards}
        return Plan(
            self.config,
            self.infos,
            self.model_tasks,
            self.groups,
            list(shards),
            [r for r in self.reports if r.shard.url in keep],
            self.skipped,
            self.derive_id,
        )

    @property
    def rows_in(self) -> int:
        bad = {s["file"] for s in self.skipped}
        return sum(r.rows for r in self.reports if r.shard.url not in bad)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def plan_models(config: JobConfig) -> tuple[dict[str, ModelInfo], list[ModelTask], list[TokenizerGroup]]:
    infos = {task.name: inspect_model(task) for task in config.tasks}
    for task in config.tasks:
        if task.kind == TaskKind.sentiment:
            sentiment_label_map(task, infos[task.name])
        if task.kind == TaskKind.ner and task.top_k != 1:
            raise ConfigError(f"tasks.{task.name}.top_k applies to classification and sentiment only")
    groups: dict[str, TokenizerGroup] = {}
    for task in config.tasks:
        info = infos[task.name]
        needs_windows = task.kind == TaskKind.ner or task.long_text == "chunk"
        prev = groups.get(info.tokenizer_key)
        groups[info.tokenizer_key] = TokenizerGroup(
            key=info.tokenizer_key,
            source=prev.source if prev else info.source,
            revision=prev.revision if prev else info.revision,
            trust_remote_code=(prev.trust_remote_code if prev else False) or task.trust_remote_code,
            all_windows=(prev.all_windows if prev else False) or needs_windows,
            offsets=(prev.offsets if prev else False) or task.kind == TaskKind.ner,
        )
    model_tasks = [ModelTask(t, infos[t.name], infos[t.name].tokenizer_key) for t in config.tasks]
    return infos, model_tasks, list(groups.values())


def check_shards(config: JobConfig, shards: list[Shard], inspect) -> tuple[list[ShardReport], list[dict]]:
    """Apply ``input.on_bad_file`` to unreadable files, files without the text column and schema drift."""
    reports = inspect(shards)
    bad = {r.shard.url: r.problem for r in reports if r.problem}
    readable = [r for r in reports if not r.problem and r.schema is not None]
    # The type most files agree on is the reference, so one odd file is the one flagged.
    votes: dict[str, Counter] = {}
    for report in readable:
        for f in report.schema:
            if f.name != config.input.text_column and not pa.types.is_null(f.type):
                votes.setdefault(f.name, Counter())[_value_type(f.type)] += 1
    for report in readable:
        for f in report.schema:
            if f.name not in votes or pa.types.is_null(f.type):
                continue
            expected = votes[f.name].most_common(1)[0][0]
            if _value_type(f.type) != expected:
                bad[report.shard.url] = (
                    f"schema differs: column {f.name!r} is {f.type} here, {expected} elsewhere"
                )
    if bad and config.input.on_bad_file == "fail":
        url, problem = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise ConfigError(
            f"bad input file {redact(url)}: {problem}{more}; set input.on_bad_file: skip to skip"
        )
    skipped = [{"file": redact(url), "reason": problem} for url, problem in bad.items()]
    for item in skipped:
        log.warning("skipping bad input file %s: %s", item["file"], item["reason"])
    if len(skipped) == len(reports):
        raise ConfigError("every input file is bad; nothing to do")
    return reports, skipped


def _value_type(dtype: pa.DataType) -> pa.DataType:
    """Dictionary-encoded (categorical) columns compare as their values."""
    return dtype.value_type if pa.types.is_dictionary(dtype) else dtype


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


def check_columns(config: JobConfig, reports: list[ShardReport], derive_id: str | None) -> None:
    known = (
        {c for r in reports for c in r.columns} | {C.ROW_KEY, C.ERROR} | ({derive_id} if derive_id else set())
    )
    for task in config.tasks:
        if task.kind == TaskKind.ner:
            known.add(task.name)
        else:
            known |= {C.label(task.name), C.score(task.name)}
    for name in config.output.partition_by:
        if name not in known:
            raise ConfigError(f"output.partition_by: unknown column {name!r}")
    clashes = {C.label(t.name) for t in config.tasks} & {c for r in reports for c in r.columns}
    if clashes:
        raise ConfigError(f"input already has task output column(s) {sorted(clashes)}; rename the task")


def plan(config: JobConfig, inspect) -> Plan:
    infos, model_tasks, groups = plan_models(config)
    shards = discover(config.input.paths, config.input.format, config.input.storage_options)
    reports, skipped = check_shards(config, shards, inspect)
    derive_id = resolve_id_column(config, reports, skipped)
    check_columns(config, reports, derive_id)
    return Plan(config, infos, model_tasks, groups, shards, reports, skipped, derive_id)


def inspect_locally(config: JobConfig):
    """Pre-flight checks in threads on this machine (``bertpipe validate``)."""
    from concurrent.futures import ThreadPoolExecutor

    from bertpipe.io.paths import filesystem_for

    def run(shards: list[Shard]) -> list[ShardReport]:
        if not shards:
            return []
        fs = filesystem_for(shards[0].url, config.input.storage_options)
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda s: inspect_shard(fs, s, config.input.text_column), shards))

    return run


def inspect_on_ray(config: JobConfig):
    """Pre-flight checks as Ray tasks, next to the data on a cluster."""
    import ray

    from bertpipe.io.paths import filesystem_for

    @ray.remote(num_cpus=0.25)
    def check(shard: Shard) -> ShardReport:
        return inspect_shard(
            filesystem_for(shard.url, config.input.storage_options), shard, config.input.text_column
        )

    return lambda shards: ray.get([check.remote(s) for s in shards])


def init_ray(runtime: RuntimeConfig) -> None:
    """Join ``runtime.address`` (or ``RAY_ADDRESS``, which Ray Jobs set for their driver), else start a
    fresh local Ray: a bare ``ray.init()`` would try to join a stale cluster recorded in /tmp/ray."""
    import ray

    if ray.is_initialized():
        return
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=runtime.local_cpus,
            num_gpus=runtime.local_gpus,
            include_dashboard=False,
            log_to_driver=True,
        )


def resolve_device(requested: str) -> str:
    import ray

    if requested == "auto":
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return requested


def build_dataset(p: Plan, device: str):
    """The lazy Ray Data plan: read -> prepare -> infer -> postprocess (-> partition sanitiser)."""
    import ray
    from ray.data import ActorPoolStrategy

    from bertpipe.io.partitions import PartitionSanitiser
    from bertpipe.io.paths import filesystem_for
    from bertpipe.io.reader import ShardDatasource
    from bertpipe.stages.infer import InferStage
    from bertpipe.stages.postprocess import PostprocessStage
    from bertpipe.stages.prepare import PrepareStage

    cfg, rt = p.config, p.config.runtime
    shards = p.good_shards
    fs = arrow_filesystem(filesystem_for(shards[0].url, cfg.input.storage_options))
    source = ShardDatasource(shards, fs, cfg.input.text_column, p.derive_id, rt.rows_per_block)
    ds = ray.data.read_datasource(source, num_cpus=0.25)
    ds = ds.map_batches(
        PrepareStage,
        fn_constructor_kwargs=dict(
            text_column=cfg.input.text_column,
            groups=p.groups,
            max_length=rt.max_length,
            stride=rt.window_stride,
            max_chars=cfg.input.max_chars,
        ),
        batch_format="pyarrow",
        batch_size=None,
        compute=ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.25,
    )
    low, high = (rt.actors, rt.actors) if isinstance(rt.actors, int) else rt.actors
    gpu = {"num_gpus": rt.gpus_per_actor} if device == "cuda" else {}
    ds = ds.map_batches(
        InferStage,
        fn_constructor_kwargs=dict(model_tasks=p.model_tasks, runtime=rt, device=device),
        batch_format="pyarrow",
        batch_size=rt.rows_per_block,  # rows per call; the stage cuts them into token-budget batches
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=rt.cpus_per_actor,
        **gpu,  # Ray restarts a dead actor and retries its batches by default (max_restarts=-1)
    )
    ds = ds.map_batches(
        PostprocessStage,
        fn_constructor_kwargs=dict(model_tasks=p.model_tasks, text_column=cfg.input.text_column),
        batch_format="pyarrow",
        batch_size=None,
        compute=ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.25,
    )
    if cfg.output.partition_by:
        ds = ds.map_batches(
            PartitionSanitiser(cfg.output.partition_by),
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=0.25,
        )
    return ds


def run_summary(p: Plan, run_id: str, started: float, stats, device: str) -> dict[str, Any]:
    ended = time.time()
    seconds = max(ended - started, 1e-9)
    config = p.config.model_dump(mode="json")
    config["input"]["storage_options"] = redact_options(p.config.input.storage_options)
    config["output"]["storage_options"] = redact_options(p.config.output.storage_options)
    config["input"]["paths"] = [redact(x) for x in p.config.input.paths]
    config["output"]["path"] = redact(p.config.output.path)
    config["output"]["catalog"] = redact_options(p.config.output.catalog)
    return {
        "run_id": run_id,
        "bertpipe_version": __version__,
        "config": config,
        "models": [
            {
                "task": i.task,
                "kind": i.kind.value,
                "model": redact(t.task.model),
                "source": redact(i.source),
                "revision": i.revision,
                "weights_sha256": i.weights_sha256,
                "weight_files": list(i.weight_files),
                "labels": [i.id2label[k] for k in sorted(i.id2label)],
            }
            for t, i in ((mt, mt.info) for mt in p.model_tasks)
        ],
        "device": device,
        "files_in": len(p.good_shards),
        "skipped_files": p.skipped,
        "rows_in": p.rows_in,
        "rows_out": stats.rows,
        "rows_ok": stats.rows - sum(stats.errors_by_reason.values()),
        "rows_error": sum(stats.errors_by_reason.values()),
        "errors_by_reason": stats.errors_by_reason,
        "duplicate_ids": stats.duplicate_ids,
        "output_files": stats.files,
        "start": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "end": datetime.fromtimestamp(ended, timezone.utc).isoformat(),
        "seconds": round(seconds, 3),
        "rows_per_s": round(stats.rows / seconds, 2),
    }


def _prepare_output(config: JobConfig, location: OutputLocation) -> tuple[str, Intent | None]:
    """Decide how this run publishes, and whether it resumes an interrupted one (its intent)."""
    mode = config.output.mode.value
    if mode == "resume":
        intent = Intent.load(location)
        if intent is None and location.is_complete():
            return "complete", None
        if intent is None:
            log.info("no interrupted run to resume at %s; starting a fresh one", redact(config.output.path))
            return "error", None
        if intent.fingerprint != config_fingerprint(config):
            raise ConfigError(
                f"the config differs from the interrupted run {intent.run_id} (inputs, tasks or output "
                "layout changed); resume needs the same config, or use output.mode: overwrite"
            )
        log.info("resuming run %s (publish mode %s)", intent.run_id, intent.mode)
        return intent.mode, intent
    if mode == "error" and location.has_data():
        raise ConfigError(
            f"output.path {redact(config.output.path)} already has data; "
            "set output.mode to overwrite, append or incremental"
        )
    return mode, None


def _checkpointing(location: OutputLocation):
    """Ray Data's row-level checkpoint (two-phase, exactly-once file writes since 2.60), keyed by
    ``_row_key``. We delete it ourselves after publishing: Ray would drop it when execution ends, and a
    crash between that and the publish would make a resume process every row again."""
    from ray.data.checkpoint import CheckpointConfig

    return CheckpointConfig(
        id_column=C.ROW_KEY,
        checkpoint_path=location.checkpoint,
        delete_checkpoint_on_success=False,
        override_filesystem=arrow_filesystem(location.fs),
    )


def execute(config: JobConfig) -> dict[str, Any]:
    """Run the job; returns the run summary. Raises ConfigError for user errors (nothing written)."""
    if config.output.format != "parquet":
        return execute_table(config)
    started = time.time()
    run_id = new_run_id()
    location = OutputLocation.from_url(config.output.path, config.output.storage_options)
    publish_mode, intent = _prepare_output(config, location)
    if publish_mode == "complete":
        log.info("output %s is complete; nothing to resume", redact(config.output.path))
        return {"run_id": run_id, "nothing_to_do": True, "rows_in": 0, "rows_out": 0}
    # A local run checks its files in this process, so that bad input fails before Ray even starts.
    p = plan(config, inspect_on_ray(config) if config.runtime.address else inspect_locally(config))
    ledger = Ledger.load(location) if publish_mode == "incremental" else None
    if ledger is not None:
        p = p.only(ledger.changed(p.good_shards))
        if not p.shards:
            log.info("incremental: no new or changed input files; nothing written")
            return {"run_id": run_id, "nothing_to_do": True, "rows_in": 0, "rows_out": 0}
    lock = OutputLock(location, intent.run_id if intent else run_id)
    lock.acquire(take_over_from=intent.run_id if intent else None)
    try:
        if intent is None:
            location.reset_staging()
            if location.fs.exists(location.checkpoint):
                location.fs.rm(location.checkpoint, recursive=True)
            Intent(run_id, publish_mode, config_fingerprint(config), started).save(location)
        elif settled := settle_checkpoint(location):
            log.info("finished %d checkpoint commits the interrupted run left half done", settled)
        summary = _run_and_publish(config, p, location, run_id, publish_mode, ledger, started)
    finally:
        lock.release()
    return summary


def _run_and_publish(
    config: JobConfig,
    p: Plan,
    location: OutputLocation,
    run_id: str,
    publish_mode: str,
    ledger: Ledger | None,
    started: float,
) -> dict[str, Any]:
    import ray
    from ray.data._internal.savemode import SaveMode

    init_ray(config.runtime)
    device = resolve_device(config.runtime.device)
    context = ray.data.DataContext.get_current()
    context.checkpoint_config = _checkpointing(location)
    try:
        ds = build_dataset(p, device)
        with unwrapped_config_errors():
            ds.write_parquet(
                location.staging,
                filesystem=arrow_filesystem(location.fs),
                partition_cols=config.output.partition_by or None,
                mode=SaveMode.APPEND,
            )
    finally:
        context.checkpoint_config = None  # the process may run other jobs (tests, notebooks)
    stats = staged_stats(location, p.derive_id or config.input.id_column)
    verify_counts(p, stats)
    summary = run_summary(p, run_id, started, stats, device)
    Intent.remove(location)
    publish(
        location,
        "append" if publish_mode == "incremental" else publish_mode,
        run_id,
        summary,
        before_success=(lambda: _record_ledger(ledger, p, location, run_id)) if ledger else None,
    )
    location.fs.rm(location.checkpoint, recursive=True)
    return summary


@contextmanager
def unwrapped_config_errors() -> Iterator[None]:
    """A ConfigError raised inside a Ray task (a corrupt Parquet page) comes back wrapped, with a
    traceback and retry notes; the user gets the original one line."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(str(getattr(exc, "cause", exc)).splitlines()[0]) from exc


def verify_counts(p: Plan, stats: WriteStats) -> None:
    """Nothing is published unless every row read was written once (and duplicate ids are allowed)."""
    if stats.duplicate_ids and p.config.input.on_duplicate_id == "fail":
        raise ConfigError(
            f"{stats.duplicate_ids} duplicate ids in input.id_column "
            f"{p.config.input.id_column!r} (input.on_duplicate_id: fail); the output was not published"
        )
    if stats.duplicate_ids:
        log.warning(
            "%d duplicate ids in the input; all rows kept (input.on_duplicate_id: keep)", stats.duplicate_ids
        )
    if stats.rows != p.rows_in or stats.distinct_keys != stats.rows:
        raise RuntimeError(
            f"row count check failed: {p.rows_in} rows in, {stats.rows} rows written, "
            f"{stats.distinct_keys} distinct row keys; the output was not published"
        )


def execute_table(config: JobConfig) -> dict[str, Any]:
    """Iceberg / Delta output: the table format's own commit replaces staging and publish."""
    from bertpipe.io.warehouse import check_target, write_table

    started = time.time()
    run_id = new_run_id()
    check_target(config.output)
    p = plan(config, inspect_on_ray(config) if config.runtime.address else inspect_locally(config))
    init_ray(config.runtime)
    device = resolve_device(config.runtime.device)
    with unwrapped_config_errors():
        written = write_table(
            build_dataset(p, device), p, run_id, verify=lambda stats: verify_counts(p, stats)
        )
    summary = run_summary(p, run_id, started, written.stats, device)
    summary["table"] = written.info
    return summary


def _record_ledger(ledger: Ledger, p: Plan, location: OutputLocation, run_id: str) -> None:
    if Ledger.load(location).generation != ledger.generation:
        raise RuntimeError("the incremental ledger changed during this run (a concurrent run?)")
    ledger.record(p.good_shards, run_id)
    ledger.save(location)
