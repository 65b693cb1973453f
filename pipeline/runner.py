"""A job end to end: check everything that can be checked up front, stream the Ray Data graph into the
output, verify the counts and commit. Parquet and table outputs share every step but the final write.

The path of one row: ``io/reader.py`` (read, ``_row_key``) -> ``stages/prepare.py`` (``_error``,
tokens) -> ``stages/infer.py`` (logits) -> ``stages/postprocess.py`` with ``tasks/*`` (labels, spans) ->
``io/writer.py`` (staging, publish) or ``io/warehouse.py`` (table commit). ``engine/data.py`` wires
them into Ray Data.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from bertpipe import __version__
from bertpipe.config import ConfigError, JobConfig
from bertpipe.io.paths import redact, redact_options
from bertpipe.io.state import Intent, Ledger, OutputLock, check_lock, config_fingerprint, settle_checkpoint
from bertpipe.io.writer import (
    OutputLocation,
    WriteStats,
    arrow_filesystem,
    committed_runs,
    data_files,
    publish,
    publish_in_place,
    run_prefix,
)
from bertpipe.plan import Plan, inspect_locally, plan
from bertpipe.progress import Progress

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def run_summary(p: Plan, run_id: str, started: float, stats: WriteStats, device: str) -> dict[str, Any]:
    ended = time.time()
    seconds = max(ended - started, 1e-9)
    config = p.config.model_dump(mode="json")
    config["input"]["storage_options"] = redact_options(p.config.input.storage_options)
    config["output"]["storage_options"] = redact_options(p.config.output.storage_options)
    config["input"]["paths"] = [redact(x) for x in p.config.input.paths]
    config["output"]["path"] = redact(p.config.output.path)
    config["output"]["catalog"] = redact_options(p.config.output.catalog)
    config["input"]["catalog"] = redact_options(p.config.input.catalog)
    return {
        "run_id": run_id,
        "bertpipe_version": __version__,
        "config": config,
        "models": [
            {
                "task": i.task,
                "kind": i.kind,
                "model": redact(mt.task.model),
                "source": redact(i.source),
                "revision": i.revision,
                "weights_sha256": i.weights_sha256,
                "weight_files": list(i.weight_files),
                "labels": [i.id2label[k] for k in sorted(i.id2label)],
            }
            for mt, i in ((mt, mt.info) for mt in p.model_tasks)
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


def nothing_to_do(run_id: str) -> dict[str, Any]:
    return {"run_id": run_id, "nothing_to_do": True, "rows_in": 0, "rows_out": 0}


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


class ParquetTarget:
    """Hive-partitioned Parquet under Ray's row checkpoint, verified, then committed: staged beside the
    output and published by rename, or written in place and committed by manifest (``output.commit``)."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.location = OutputLocation.from_url(config.output.path, config.output.storage_options)
        commit = config.output.commit
        self.in_place = commit == "manifest" or (commit == "auto" and self.location.object_store)
        self.listing: list[str] = []  # the data files found after the write: counted, then committed
        self.intent: Intent | None = None
        self.ledger: Ledger | None = None
        self.lock: OutputLock | None = None

    def begin(self) -> bool:
        """Decide how this run publishes and whether it resumes an interrupted one; False: nothing to do.
        Only reads: ``validate`` runs it too."""
        config, location = self.config, self.location
        mode = config.output.mode.value
        if mode == "resume":
            self.intent = Intent.load(location)
            if self.intent is None and location.is_complete():
                log.info("output %s is complete; nothing to resume", redact(config.output.path))
                return False
            if self.intent is None:
                log.info(
                    "no interrupted run to resume at %s; starting a fresh one", redact(config.output.path)
                )
                mode = "error"
            elif self.intent.fingerprint != config_fingerprint(config):
                raise ConfigError(
                    f"the config differs from the interrupted run {self.intent.run_id} (inputs, tasks or "
                    "output layout changed); resume needs the same config, or use output.mode: overwrite"
                )
            else:
                log.info("resuming run %s (publish mode %s)", self.intent.run_id, self.intent.mode)
                mode = self.intent.mode
        elif mode == "merge":
            raise ConfigError("output.mode merge applies to output.format iceberg or delta (upsert by id)")
        elif mode == "error" and location.has_data():
            raise ConfigError(
                f"output.path {redact(config.output.path)} already has data; "
                "set output.mode to overwrite, append or incremental"
            )
        check_lock(location, self.intent.run_id if self.intent else None)
        self.publish_mode = mode
        return True

    def select(self, p: Plan) -> Plan:
        """Incremental runs process only new or changed input files."""
        if self.publish_mode != "incremental":
            return p
        # A run interrupted at its commit (its intent is still there) may have written its ledger part
        # without its _SUCCESS: that part counts only if _SUCCESS names the run.
        interrupted = self.intent or Intent.load(self.location)
        uncommitted = None
        if interrupted and interrupted.run_id not in committed_runs(self.location):
            uncommitted = interrupted.run_id
        self.ledger = Ledger.load(self.location, uncommitted)
        return p.only(self.ledger.changed(p.good_shards))

    @contextmanager
    def writing(self, run_id: str, started: float) -> Iterator[None]:
        """Hold the output's lock; a fresh run starts with an empty staging folder and its intent."""
        location, intent = self.location, self.intent
        self.lock = OutputLock(location, intent.run_id if intent else run_id)
        self.lock.acquire(take_over_from=intent.run_id if intent else None)
        try:
            if intent is None:
                location.reset_staging()
                if location.fs.exists(location.checkpoint):
                    location.fs.rm(location.checkpoint, recursive=True)
                Intent(run_id, self.publish_mode, config_fingerprint(self.config), started).save(location)
            elif settled := settle_checkpoint(location):
                log.info("finished %d checkpoint commits the interrupted run left half done", settled)
            yield
        finally:
            self.lock.release()

    @property
    def resumes(self) -> str | None:
        """The interrupted run this one finishes: it commits under that run's id."""
        return self.intent.run_id if self.intent else None

    def write(self, build, p: Plan, run_id: str) -> WriteStats:
        from bertpipe.engine.data import staged_stats, write_staged_parquet

        location = self.location
        folder = location.path if self.in_place else location.staging
        write_staged_parquet(build, location, self.config.output.partition_by, folder, run_prefix(run_id))
        files = self.listing = data_files(location.fs, folder)
        if self.in_place:  # the output may hold other runs' files
            files = [f for f in files if f.rsplit("/", 1)[-1].startswith(run_prefix(run_id))]
        fs = arrow_filesystem(location.fs)
        stats = staged_stats(fs, files, p.id_column, p.derive_id is not None, p.rows_in)
        verify_counts(p, stats)
        return stats

    def commit(self, p: Plan, run_id: str, summary: dict[str, Any]) -> None:
        location, ledger = self.location, self.ledger
        mode = "append" if self.publish_mode == "incremental" else self.publish_mode

        def record_ledger() -> None:
            ledger.append(location, p.good_shards, run_id)

        before_success = record_ledger if ledger else None
        if self.in_place:
            # The intent goes last: a run killed during this commit is finished by ``resume``.
            publish_in_place(location, mode, run_id, summary, self.listing, before_success)
            location.fs.rm(location.staging, recursive=True)
        else:
            Intent.remove(location)
            publish(location, mode, run_id, summary, before_success)
        location.fs.rm(location.checkpoint, recursive=True)


class TableTarget:
    """Iceberg / Delta: the table format's own commit replaces publish. ``merge`` and ``incremental``
    stage the rows as Parquet first (one writer at a time, under the output's lock), then upsert them."""

    def __init__(self, config: JobConfig, verify: Callable[[Plan, WriteStats], None] = verify_counts):
        from bertpipe.io.warehouse import UPSERT_MODES, check_target

        self.config = config
        self.verify = verify  # runs on the counts of everything written, before the table commits
        check_target(config.output)  # before any model is loaded
        self.info: dict[str, Any] = {}
        self.upsert = config.output.mode.value in UPSERT_MODES
        output = config.output
        self.location = OutputLocation.from_url(output.path, output.storage_options) if self.upsert else None
        self.ledger: Ledger | None = None

    def begin(self) -> bool:
        if self.location is not None:
            check_lock(self.location)
        return True

    def select(self, p: Plan) -> Plan:
        """Incremental runs process only new or changed input files (for a table input: the data files
        of the versions or snapshots after those recorded)."""
        if self.config.output.mode.value != "incremental":
            return p
        self.ledger = Ledger.load(self.location)
        return p.only(self.ledger.changed(p.good_shards))

    @contextmanager
    def writing(self, run_id: str, started: float) -> Iterator[None]:
        """The catalog (Iceberg) or the log (Delta) serialises concurrent commits; a merge also holds
        the output's lock, for its staging folder."""
        if self.location is None:
            yield
            return
        lock = OutputLock(self.location, run_id)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def write(self, build, p: Plan, run_id: str) -> WriteStats:
        from bertpipe.engine.data import write_table
        from bertpipe.io.warehouse import open_table

        target, schema = open_table(p)
        mode = self.config.output.mode.value
        if self.upsert:
            stats = self._merge(build, p, run_id, target, schema)
            self.info = {
                "format": target.format,
                "table": str(target),
                "mode": mode,
                **target.committed(run_id),
            }
            return stats
        id_column = p.id_column if p.id_column in schema.names else "_row_key"

        def before_commit(stats: WriteStats) -> None:
            self.verify(p, stats)
            if mode == "error" and target.has_data():
                raise ConfigError(f"{target} got data from elsewhere during the run; not writing into it")

        derived = p.derive_id is not None
        stats = write_table(build, target, schema, id_column, derived, mode, run_id, before_commit)
        if stats.rows == 0 and mode == "overwrite":
            target.clear(run_id)
        self.info = {"format": target.format, "table": str(target), "mode": mode, **target.committed(run_id)}
        return stats

    def _merge(self, build, p: Plan, run_id: str, target, schema) -> WriteStats:
        """Stage, count and verify as for Parquet, then upsert the staged rows by id in one commit."""
        from bertpipe.engine.data import staged_stats, write_staged_parquet
        from bertpipe.io.warehouse import staged_rows

        location, id_column = self.location, p.id_column
        location.reset_staging()
        if location.fs.exists(location.checkpoint):
            location.fs.rm(location.checkpoint, recursive=True)
        write_staged_parquet(build, location, [], location.staging, run_prefix(run_id))
        files = data_files(location.fs, location.staging)
        fs = arrow_filesystem(location.fs)
        stats = staged_stats(fs, files, id_column, p.derive_id is not None, p.rows_in)
        self.verify(p, stats)
        if stats.duplicate_ids:
            raise ConfigError(
                f"output.mode {self.config.output.mode.value}: {stats.duplicate_ids} duplicate ids in "
                f"{id_column!r}; a merge needs one input row per id. Nothing was written"
            )
        if stats.rows:
            target.merge(staged_rows(location.fs, files, schema), id_column, run_id)
        for path in (location.staging, location.checkpoint):
            if location.fs.exists(path):
                location.fs.rm(path, recursive=True)
        return stats

    def commit(self, p: Plan, run_id: str, summary: dict[str, Any]) -> None:
        summary["table"] = self.info
        if self.ledger is not None:  # after the table's commit: a crash between re-merges the same rows
            self.ledger.append(self.location, p.good_shards, run_id)


def check_output(config: JobConfig) -> tuple[ParquetTarget | TableTarget, bool]:
    """The job's output, checked before any model runs, by ``run`` and ``validate`` alike: the mode
    against what the output holds, a lock another run holds, a table's catalog and partitioning.
    No data is written (a default Iceberg catalog creates its SQLite file); False: nothing to do (the
    output a resume would finish is complete). A storage error on the way (permissions, a bucket that
    does not exist) is reported as the output path's."""
    try:
        target = ParquetTarget(config) if config.output.format == "parquet" else TableTarget(config)
        return target, target.begin()
    except OSError as exc:
        raise ConfigError(f"output.path {redact(config.output.path)}: {redact(str(exc))}") from exc


def execute(
    config: JobConfig, on_progress: Callable[[Progress], None] | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Run the job; returns the run summary. Raises ConfigError for user errors (nothing written).

    ``on_progress`` gets the run's progress every second from a driver thread; ``quiet`` hides Ray
    Data's own progress bars and INFO lines."""
    from bertpipe.engine.cluster import connect
    from bertpipe.engine.data import (
        ProgressFeed,
        build_dataset,
        inspect_on_ray,
        quiet_ray_data,
        resolve_device,
    )

    started = time.time()
    run_id = new_run_id()
    target, todo = check_output(config)
    if not todo:
        return nothing_to_do(run_id)
    run_id = getattr(target, "resumes", None) or run_id
    # A local run checks its files in this process, so that bad input fails before Ray even starts.
    if config.runtime.address:
        connect(config.runtime.address)
        inspect = inspect_on_ray(config.input.storage_options, config.input.text_column, config.input.csv)
    else:
        inspect = inspect_locally(config)
    p = target.select(plan(config, inspect))
    if not p.shards:
        log.info("incremental: no new or changed input files; nothing written")
        return nothing_to_do(run_id)
    timings = {"preflight_s": time.time() - started}
    with target.writing(run_id, started):
        connect(
            config.runtime.address, local_cpus=config.runtime.local_cpus, local_gpus=config.runtime.local_gpus
        )
        device = resolve_device(config.runtime.device)
        compiled = decide_compile(p, device)
        quiet_ray_data(quiet)
        feed = ProgressFeed(p.rows_in)
        try:
            with unwrapped_config_errors(), feed.watching(on_progress):
                writing_since = time.time()
                stats = target.write(lambda: build_dataset(p, device, feed.report, compiled), p, run_id)
                timings["write_and_count_s"] = time.time() - writing_since
            progress = feed.snapshot()
            task_counts = progress.task_counts()
            if progress.first_at is not None:  # start-up: Ray's workers started, the models loaded
                timings["first_rows_s"] = progress.first_at - started
            if progress.rows_per_s_after_first is not None:
                timings["rows_per_s_after_first"] = progress.rows_per_s_after_first
        finally:
            feed.close()
        summary = run_summary(p, run_id, started, stats, device)
        summary["task_counts"] = task_counts
        committing_since = time.time()
        summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
        target.commit(p, run_id, summary)
        # Not in the summary: the summary is written by the commit it would time.
        log.info("committed in %.3f s", time.time() - committing_since)
    return summary


def decide_compile(p: Plan, device: str) -> bool:
    """``runtime.compile``, with ``auto`` decided from the device, the pre-flight row count and the first
    rows' text lengths; the reason goes to the log."""
    from bertpipe.estimate import compile_decision, job_flops_per_token, preflight_tokens

    compiled, reason = compile_decision(
        p.config.runtime.compile, lambda: preflight_tokens(p), device, job_flops_per_token(p.model_tasks)
    )
    log.info("%s", reason)
    return compiled


@contextmanager
def unwrapped_config_errors() -> Iterator[None]:
    """A ConfigError raised inside a Ray task (a corrupt Parquet page) comes back wrapped, with a
    traceback and retry notes; the user gets the original one line."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(str(getattr(exc, "cause", exc)).splitlines()[0]) from exc
