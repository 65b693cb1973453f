"""The Ray Data graph of a job: read -> prepare -> infer -> postprocess -> write.

This module turns a plan into Ray Data operators and is the only place that knows Ray Data's API:
the datasource, the actor pools of the stages, the row-level checkpoint, the Parquet writer and the
table sinks. The stages themselves are plain classes (``bertpipe.stages``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, Dataset, SaveMode
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import FileBasedDatasource, FilenameProvider
from ray.data.datasource.datasink import Datasink, WriteResult

from bertpipe import columns as C
from bertpipe.config import CsvOptions, RuntimeConfig
from bertpipe.io.partitions import PartitionSanitiser
from bertpipe.io.paths import Shard, ShardNaming, filesystem_for
from bertpipe.io.reader import ShardReport, conform_block, inspect_shard, normalise_block, read_shard
from bertpipe.io.tables import TableInput
from bertpipe.io.warehouse import conform
from bertpipe.io.writer import WriteStats, arrow_filesystem
from bertpipe.plan import Inspector, ModelPlan, Plan
from bertpipe.progress import Progress
from bertpipe.stages.infer import InferStage
from bertpipe.stages.postprocess import PostprocessStage
from bertpipe.stages.prepare import PrepareStage

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ read


class ShardDatasource(FileBasedDatasource):
    """Reads the input files (Ray groups them into read tasks); ``bertpipe.io.reader.read_shard`` turns
    each file into tables of ``rows_per_block`` rows.

    Ray keeps the list of paths in its object store, but each read task carries this object in its
    closure: so it holds no per-file table. A file's url, format and partitions are worked out again
    from its path (``ShardNaming``); only files that rule does not name (none that ``discover`` makes)
    are kept by path. A table of every file here cost the driver ~18 KB per input file at 100,000."""

    def __init__(
        self,
        shards: list[Shard],
        filesystem,
        text_column: str,
        derive_id: str | None,
        rows_per_block: int,
        schema: pa.Schema | None = None,
        csv: CsvOptions | None = None,
        key: tuple[str, str] | None = None,
    ):
        super().__init__([s.path for s in shards], filesystem=filesystem)
        self._naming = ShardNaming.of(shards)
        self._unnamed = {s.path: s for s in shards if not self._naming.names(s)}
        self._text_column = text_column
        self._derive_id = derive_id
        self._rows_per_block = rows_per_block
        self._schema = schema
        self._csv = csv
        self._key = key

    def _shard(self, path: str) -> Shard:
        return self._unnamed.get(path) or self._naming.shard(path)

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._shard(path).format == "parquet":
            return filesystem.open_input_file(path)  # Parquet needs random access to its footer
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        yield from read_shard(
            f,
            self._shard(path),
            self._text_column,
            self._derive_id,
            self._rows_per_block,
            schema=self._schema,
            csv=self._csv,
            key=self._key,
        )


def read_table(table: TableInput) -> Dataset:
    """A whole Delta or Iceberg table at the planned version, through Ray Data's readers."""
    if table.format == "delta":
        options = table.storage_options or None
        return ray.data.read_delta(
            table.location, version=table.version, storage_options=options, num_cpus=0.25
        )
    props = dict(table.catalog)
    return ray.data.read_iceberg(
        table_identifier=table.location,
        snapshot_id=table.version,
        catalog_kwargs={"name": props.pop("name"), **props},
        num_cpus=0.25,
    )


class TableRows:
    """A table reader's blocks as the file datasource yields them: the job's schema, ``_row_key`` from
    the id, ``_error`` for texts of the wrong type."""

    def __init__(self, schema: pa.Schema, text_column: str, key: tuple[str, str]):
        self.schema, self.text_column, self.key = schema, text_column, key

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = conform_block(batch, self.schema, self.text_column)
        return normalise_block(table, self.text_column, 0, "", None, self.key)


def inspect_on_ray(
    storage_options: dict[str, Any],
    text_column: str,
    csv: CsvOptions | None = None,
    files_per_task: int = 256,
) -> Inspector:
    """Pre-flight checks as Ray tasks, next to the data on a cluster: one task per batch of files (a task
    per file would cost the driver more than the check of a small file), threads within a task for
    object stores' latency."""

    @ray.remote(num_cpus=0.25)
    def check(batch: list[Shard]) -> list[ShardReport]:
        fs = filesystem_for(batch[0].url, storage_options)
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda s: inspect_shard(fs, s, text_column, csv), batch))

    def run(shards: list[Shard]) -> list[ShardReport]:
        batches = [shards[i : i + files_per_task] for i in range(0, len(shards), files_per_task)]
        return [r for reports in ray.get([check.remote(b) for b in batches]) for r in reports]

    return run


# ------------------------------------------------------------------------------------------------ stages


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return requested


def assigned_resources() -> dict:
    """What Ray scheduled the calling actor with; ``{}`` outside a Ray worker."""
    try:
        return ray.get_runtime_context().get_assigned_resources()
    except AssertionError:  # a driver, not a Ray worker
        return {}


# Ray Data cuts a task's output into blocks of up to 128 MiB by default: a read task over a few files of
# short rows then emits one block of ~25,000 rows, and the tokeniser, the model actors and the writers
# each wait for a whole such block (a 200k-row job moved in 9 steps, the writes at the end). Blocks of
# 2 MiB (~1,500 short rows, or a few hundred long texts with their token columns) keep every stage busy
# from the first seconds and bound what waits in the object store. Set for the job's datasets.
BLOCK_BYTES = 2 * 1024 * 1024

# Ray's default of one CPU per write task cannot be granted while the actor pools hold most of a small
# node's CPUs, so every labelled block waited in the object store until the pools finished, and the
# writes ran at the end (on 2 cores, a 200k-row job showed "Write: backpressured" throughout). Writing
# is mostly I/O and encoding; a quarter CPU lets it keep pace with the model stage.
WRITE_TASK = {"num_cpus": 0.25}

# A CPU model actor's OpenMP threads sleep between operations instead of spinning: torch's default spin
# (libgomp) keeps its threads busy for a while after each operation, and on a node where the reader,
# tokeniser, postprocessor and writer share the cores with the model that spinning takes their CPU
# (benchmarks/README.md, "Threads of a CPU model actor"). Merged into the job's runtime env by Ray.
CPU_MODEL_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def label_stages(
    ds: Dataset,
    models: ModelPlan,
    runtime: RuntimeConfig,
    text_column: str,
    max_chars: int | None,
    device: str,
    report: Callable[[dict], None] | None = None,
    compiled: bool | None = None,
) -> Dataset:
    """prepare (CPU actors) -> infer (model actors, GPUs when ``device`` is cuda) -> postprocess.

    ``ds`` holds ``text_column`` and ``_error``; the result holds every column of ``ds`` plus the task
    outputs. Shared by ``run`` (after the datasource) and ``label`` (after the user's dataset).
    ``compiled``: whether the model actors compile (None: ``runtime.compile`` is on)."""
    ds = ds.map_batches(
        PrepareStage,
        fn_constructor_kwargs=dict(
            text_column=text_column,
            groups=models.groups,
            max_length=runtime.max_length,
            stride=runtime.window_stride,
            max_chars=max_chars,
        ),
        batch_format="pyarrow",
        batch_size=None,
        compute=ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.25,
    )
    low, high = (runtime.actors, runtime.actors) if isinstance(runtime.actors, int) else runtime.actors
    actor_args = {"num_gpus": runtime.gpus_per_actor} if device == "cuda" else {}
    if device != "cuda" and "OMP_WAIT_POLICY" not in os.environ:
        actor_args["runtime_env"] = {"env_vars": CPU_MODEL_ENV}
    ds = ds.map_batches(
        InferStage,
        fn_constructor_kwargs=dict(
            model_tasks=models.model_tasks,
            runtime=runtime,
            device=device,
            worker_resources=assigned_resources,
            compiled=compiled,
        ),
        batch_format="pyarrow",
        batch_size=runtime.rows_per_block,  # rows per call; the stage cuts them into token-budget batches
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=runtime.cpus_per_actor,
        **actor_args,  # Ray restarts a dead actor and retries its batches by default (max_restarts=-1)
    )
    return ds.map_batches(
        PostprocessStage,
        fn_constructor_kwargs=dict(model_tasks=models.model_tasks, text_column=text_column, report=report),
        batch_format="pyarrow",
        batch_size=None,
        compute=ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.25,
    )


def build_dataset(
    p: Plan, device: str, report: Callable[[dict], None] | None = None, compiled: bool | None = None
) -> Dataset:
    """The lazy Ray Data plan of a job: read -> prepare -> infer -> postprocess (-> partition sanitiser)."""
    cfg, rt = p.config, p.config.runtime
    key = (p.key_column, p.key_prefix) if p.key_column else None
    ray.data.DataContext.get_current().target_max_block_size = BLOCK_BYTES
    if p.table is not None:
        ds = read_table(p.table).map_batches(
            TableRows(p.schema, cfg.input.text_column, key),
            batch_format="pyarrow",
            batch_size=rt.rows_per_block,
            num_cpus=0.25,
        )
    else:
        shards = p.good_shards
        fs = arrow_filesystem(filesystem_for(shards[0].url, cfg.input.storage_options))
        source = ShardDatasource(
            shards, fs, cfg.input.text_column, p.derive_id, rt.rows_per_block, p.schema, cfg.input.csv, key
        )
        ds = ray.data.read_datasource(source, num_cpus=0.25)
    ds = label_stages(ds, p.models, rt, cfg.input.text_column, cfg.input.max_chars, device, report, compiled)
    if cfg.output.partition_by:
        ds = ds.map_batches(
            PartitionSanitiser(cfg.output.partition_by),
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=0.25,
        )
    return ds


# ------------------------------------------------------------------------------------------------ progress


@ray.remote(num_cpus=0)
class _ProgressActor:
    def __init__(self, total: int):
        self.progress = Progress(total)

    def add(self, batch: dict) -> None:
        self.progress.add(batch)

    def get(self) -> Progress:
        return self.progress


def _send(actor, batch: dict) -> None:
    actor.add.remote(batch)


class ProgressFeed:
    """The postprocess stage's counts, gathered in one small actor; ``watching`` hands a ``Progress``
    to a callback from a driver thread every ``every`` seconds, and once more at the end."""

    def __init__(self, total: int):
        self.actor = _ProgressActor.remote(total)
        self.report = functools.partial(_send, self.actor)

    def snapshot(self) -> Progress:
        return ray.get(self.actor.get.remote())

    @contextmanager
    def watching(self, callback: Callable[[Progress], None] | None, every: float = 1.0) -> Iterator[None]:
        done = threading.Event()

        def pump() -> None:
            while not done.wait(every):
                callback(self.snapshot())

        thread = threading.Thread(target=pump, name="bertpipe-progress", daemon=True)
        if callback is not None:
            thread.start()
        try:
            yield
        finally:
            done.set()
            if callback is not None:
                thread.join()
                callback(self.snapshot())

    def close(self) -> None:
        ray.kill(self.actor)


def quiet_ray_data(quiet: bool) -> None:
    """Ray Data's own progress bars and INFO lines, off unless the user asked for detail (``-v``)."""
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    logging.getLogger("ray.data").setLevel(logging.WARNING if quiet else logging.INFO)
    # its notice that the bars are off is itself noise when we turned them off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR if quiet else logging.INFO)


# ------------------------------------------------------------------------------------------------ write


def write_staged_parquet(
    build: Callable[[], Dataset], location, partition_by: list[str], folder: str, file_prefix: str
) -> None:
    """Append the files of the dataset ``build()`` makes to ``folder`` (the staging folder, or the output
    itself for a manifest commit), named ``file_prefix...``, under Ray Data's row-level checkpoint.

    The checkpoint (two-phase, exactly-once file writes since Ray 2.60) is keyed by ``_row_key``. A
    dataset keeps the ``DataContext`` it was created with, so the checkpoint is configured before
    ``build`` runs. The runner deletes the checkpoint after publishing: Ray would drop it when
    execution ends, and a crash between that and the publish would make a resume redo every row."""
    from ray.data.checkpoint import CheckpointConfig

    context = ray.data.DataContext.get_current()
    context.checkpoint_config = CheckpointConfig(
        id_column=C.ROW_KEY,
        checkpoint_path=location.checkpoint,
        delete_checkpoint_on_success=False,
        override_filesystem=arrow_filesystem(location.fs),
    )
    try:
        build().write_parquet(
            folder,
            filesystem=arrow_filesystem(location.fs),
            partition_cols=partition_by or None,
            mode=SaveMode.APPEND,
            filename_provider=FilenameProvider(dataset_uuid=file_prefix.rstrip("_"), file_format="parquet"),
            ray_remote_args=WRITE_TASK,
        )
    finally:
        context.checkpoint_config = None  # the process may run other jobs (tests, notebooks)


# Up to this many rows the driver counts the staged files itself. Measured (2 cores, local disk): 200k rows
# in 0.3 s, 2M rows in 4.4 s with ~350 bytes per row of transient peak memory (the key strings and their
# hash table); the three Ray Data executions of the distributed count took 21 s for 200k rows. So the
# driver's transient share stays under ~175 MB, and only jobs that take minutes pay the distributed count.
SMALL_OUTPUT_ROWS = 500_000


def staged_stats(
    fs: pa.fs.FileSystem, files: list[str], id_column: str, id_is_row_key: bool, rows_hint: int
) -> WriteStats:
    """Count what was staged as distributed work, so that the driver holds totals only: rows and
    ``_error`` reasons per block, duplicate ``_row_key`` and id values by Ray Data hash aggregations over
    those columns alone (no other column is read). A derived id is the row key, so it is not checked
    twice. ``fs``: a pyarrow filesystem (the output's, or a table's own). Up to ``SMALL_OUTPUT_ROWS``
    rows the driver reads those columns itself: three Ray Data executions cost tens of seconds on a
    small machine, far more than reading them."""
    if not files:
        return WriteStats(0, 0, {}, 0, 0)
    columns = [C.ROW_KEY, C.ERROR] + ([] if id_is_row_key else [id_column])
    if rows_hint <= SMALL_OUTPUT_ROWS:
        return _stats_in_driver(fs, files, columns)
    ds = ray.data.read_parquet(files, filesystem=fs, columns=columns, partitioning=None)
    tallies = ds.map_batches(_tally_errors, batch_format="pyarrow", batch_size=None).take_all()
    rows = sum(t["rows"] for t in tallies)
    reasons: Counter = Counter()
    for t in tallies:
        reasons.update(json.loads(t["errors"]))
    partitions = max(2, min(200, rows_hint // 250_000))
    surplus_keys = _surplus(ds, C.ROW_KEY, partitions)
    surplus_ids = 0 if id_is_row_key else _surplus(ds, id_column, partitions)
    return WriteStats(rows, rows - surplus_keys, dict(reasons), len(files), surplus_ids)


def _stats_in_driver(fs: pa.fs.FileSystem, files: list[str], columns: list[str]) -> WriteStats:
    import pyarrow.parquet as pq

    tables = [pq.read_table(path, filesystem=fs, columns=columns, partitioning=None) for path in files]
    table = pa.concat_tables(tables, promote_options="permissive")
    reasons = json.loads(_tally_errors(table).column("errors")[0].as_py())

    def surplus(column: str) -> int:
        values = table.column(column).drop_null()
        return len(values) - pc.count_distinct(values).as_py()

    ids = surplus(columns[2]) if len(columns) > 2 else 0
    return WriteStats(table.num_rows, table.num_rows - surplus(C.ROW_KEY), reasons, len(files), ids)


def _tally_errors(block: pa.Table) -> pa.Table:
    counts = pc.value_counts(block.column(C.ERROR).drop_null()).to_pylist()
    errors = {c["values"]: c["counts"] for c in counts}
    return pa.table({"rows": [block.num_rows], "errors": [json.dumps(errors)]})


def _surplus(ds: Dataset, column: str, partitions: int) -> int:
    """Rows beyond the first of each value of ``column`` (nulls are not values)."""

    def repeats(groups: pa.Table) -> pa.Table:
        counts = groups.filter(pc.is_valid(groups.column(column))).column("count()")
        extra = pc.sum(pc.subtract(counts, 1)).as_py() if len(counts) else 0
        return pa.table({"extra": [extra or 0]})

    counted = ds.select_columns([column]).groupby(column, num_partitions=partitions).count()
    tallies = counted.map_batches(repeats, batch_format="pyarrow", batch_size=None).take_all()
    return sum(t["extra"] for t in tallies)


def _table_sink(target_format: str, mode: str, kwargs: dict[str, Any]) -> Datasink:
    """Ray's Iceberg or Delta sink. Ray 2.60 has no public class for them (only ``Dataset.write_iceberg``
    and ``write_delta``, which build and run the sink in one call), and ``CheckedSink`` must wrap the
    sink to check the counts before its commit, hence the private modules."""
    save_mode = SaveMode.OVERWRITE if mode == "overwrite" else SaveMode.APPEND
    if target_format == "iceberg":
        from ray.data._internal.datasource.iceberg_datasink import IcebergDatasink

        return IcebergDatasink(mode=save_mode, **kwargs)
    from ray.data._internal.datasource.delta_datasink import DeltaDatasink

    return DeltaDatasink(mode=save_mode, **kwargs)


def write_table(
    build: Callable[[], Dataset],
    target,
    schema: pa.Schema,
    id_column: str,
    id_is_row_key: bool,
    mode: str,
    run_id: str,
    before_commit: Callable[[WriteStats], None],
) -> WriteStats:
    """Write the dataset into an Iceberg or Delta table in one commit, gated by ``before_commit``."""
    inner = _table_sink(target.format, mode, target.sink_args(run_id))
    id_is_row_key = id_is_row_key or id_column == C.ROW_KEY
    scratch = target.scratch(run_id)
    sink = CheckedSink(inner, schema, id_column, id_is_row_key, target.files, scratch, before_commit)
    build().write_datasink(sink, ray_remote_args=WRITE_TASK)
    return sink.stats


@dataclass
class _Written:
    inner: Any  # what the wrapped sink's ``write`` returned
    rows: int
    counts: str | None  # the task's file of counted columns in the scratch folder; None without rows


class CheckedSink(Datasink):
    """Ray's table sink behind a gate: blocks are fitted to the table schema on their way to it, and the
    counts are checked on the driver before the sink commits.

    Counting needs every row key and id, which must not pass through the driver: each write task also
    writes the ``_row_key``, ``_error`` and id columns of its rows as one Parquet file into the run's
    scratch folder under the table's location (the target's ``scratch``: the table's own storage and
    credentials, which the write tasks already use), and returns only its row count and that file's
    path. The driver counts those files with ``staged_stats``, as for a Parquet output (distributed
    for large outputs), deletes the folder, and only then lets the check and the commit run; a failed
    write deletes it too. Paths are returned rather than the folder listed, so that the file of a write
    task that failed and was retried is never counted. Objects put by the write tasks into Ray's store
    would need no folder, but such an object is lost when the worker that put it exits."""

    def __init__(
        self,
        inner: Datasink,
        schema: pa.Schema,
        id_column: str,
        id_is_row_key: bool,
        files: Callable[[Any], int],
        scratch: tuple[pa.fs.FileSystem, str],
        before_commit: Callable[[WriteStats], None],
    ):
        self.inner = inner
        self.schema = schema
        self.id_column = id_column
        self.id_is_row_key = id_is_row_key
        self.files = files
        self.scratch = scratch
        self.before_commit = before_commit
        self.stats: WriteStats | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Write tasks get the schema, the scratch folder and the wrapped sink; the check runs on the
        driver only."""
        return {**self.__dict__, "before_commit": None}

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        fs, folder = self.scratch
        fs.create_dir(folder, recursive=True)  # a local disk needs it before the tasks write into it
        self.inner.on_write_start(self.schema)  # the table's schema, not the first block's

    def write(self, blocks: Iterable[Block], ctx) -> _Written:
        import pyarrow.parquet as pq

        fs, folder = self.scratch
        path = f"{folder}/{uuid.uuid4().hex}.parquet"
        columns = [C.ROW_KEY, C.ERROR] + ([] if self.id_is_row_key else [self.id_column])
        writer: pq.ParquetWriter | None = None
        rows = 0

        def fitted() -> Iterator[pa.Table]:
            nonlocal writer, rows
            for block in blocks:
                table = conform(BlockAccessor.for_block(block).to_arrow(), self.schema)
                if table.num_rows:
                    counted = table.select(columns)
                    writer = writer or pq.ParquetWriter(path, counted.schema, filesystem=fs)
                    writer.write_table(counted)
                    rows += table.num_rows
                yield table

        try:
            inner = self.inner.write(fitted(), ctx)
        finally:
            if writer is not None:
                writer.close()
        return _Written(inner, rows, path if writer is not None else None)

    def on_write_complete(self, write_result: WriteResult) -> None:
        written = [w for w in write_result.write_returns if w is not None]
        counts = [w.counts for w in written if w.counts is not None]
        rows = sum(w.rows for w in written)
        counted = staged_stats(self.scratch[0], counts, self.id_column, self.id_is_row_key, rows)
        stats = replace(counted, files=sum(self.files(w.inner) for w in written))
        self._drop_scratch()
        self.before_commit(stats)
        inner = [w.inner for w in written]
        self.inner.on_write_complete(WriteResult(write_result.num_rows, write_result.size_bytes, inner))
        self.stats = stats

    def on_write_failed(self, error: Exception) -> None:
        self._drop_scratch()  # also after a failed check: Ray calls this when on_write_complete raises
        self.inner.on_write_failed(error)

    def _drop_scratch(self) -> None:
        fs, folder = self.scratch
        with suppress(FileNotFoundError):  # dropped already, or the write failed before it started
            fs.delete_dir(folder)

    def get_name(self) -> str:
        return self.inner.get_name()

    @property
    def supports_distributed_writes(self) -> bool:
        return self.inner.supports_distributed_writes

    @property
    def min_rows_per_write(self) -> int | None:
        return self.inner.min_rows_per_write

    @property
    def min_bytes_per_write(self) -> int | None:
        return self.inner.min_bytes_per_write


# ------------------------------------------------------------------------------------------------ label


def is_dataset(data) -> bool:
    return isinstance(data, Dataset)


def from_arrow(blocks: list[pa.Table]) -> Dataset:
    return ray.data.from_arrow(blocks)


def collect(ds: Dataset) -> pa.Table:
    """Every block of ``ds`` as one table (in-memory ``label``)."""
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))
