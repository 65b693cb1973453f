"""What a job will cost, told before it runs (``bertpipe validate``): rows and tokens per task counted
on a sample and scaled to the pre-flight row count, and a duration from a calibration forward pass.

The sample runs through the real prepare and model stages (as plain classes, in this process), so the
token counts follow the job's windows and truncation exactly, and the timing its batching and dtype.
An estimate, not a promise: the sample is the first rows of the first files, and a cluster's actors
and device may differ from this machine's.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import pyarrow as pa

from bertpipe import columns as C
from bertpipe.io.paths import filesystem_for
from bertpipe.io.reader import read_shard
from bertpipe.plan import Plan


@dataclass
class Estimate:
    sample_rows: int
    rows: int  # the job's rows (pre-flight counts)
    tokens: dict[str, int]  # per task, scaled to the job's rows
    seconds: float  # model time for the whole job on ``device``, one actor per ``runtime.actors``
    device: str
    exact: bool  # the sample was the whole input


def sample_rows(p: Plan, limit: int) -> pa.Table:
    """The first ``limit`` rows of the input, normalised as the read stage does."""
    cfg = p.config.input
    tables, count = [], 0
    for shard in p.good_shards:
        fs = filesystem_for(shard.url, cfg.storage_options)
        with fs.open(shard.path, "rb", compression="gzip" if shard.path.endswith(".gz") else None) as fh:
            blocks = read_shard(fh, shard, cfg.text_column, p.derive_id, limit, schema=p.schema, csv=cfg.csv)
            for block in blocks:
                tables.append(block.slice(0, limit - count))
                count += tables[-1].num_rows
                break
        if count >= limit:
            break
    return pa.concat_tables(tables, promote_options="permissive")


def estimate(p: Plan, device: str = "cpu", limit: int = 128) -> Estimate:
    from bertpipe.stages.infer import InferStage
    from bertpipe.stages.prepare import PrepareStage

    cfg, rt = p.config, p.config.runtime
    table = sample_rows(p, limit)
    prepared = PrepareStage(
        cfg.input.text_column, p.models.groups, rt.max_length, rt.window_stride, cfg.input.max_chars
    )(table)
    scale = p.rows_in / max(table.num_rows, 1)
    tokens = {}
    for mt in p.model_tasks:
        windows = prepared.column(C.token_ids(mt.group)).combine_chunks()
        per_row = [w[:1] if mt.first_window_only else w for w in windows.to_pylist()]
        tokens[mt.task.name] = round(sum(len(x) for row in per_row for x in row) * scale)
    quiet = copy.deepcopy(rt)
    quiet.precision_check_rows = 0
    stage = InferStage(p.model_tasks, quiet, device)
    stage(prepared.slice(0, min(8, prepared.num_rows)))  # warm-up: first calls allocate
    started = time.perf_counter()
    stage(prepared)
    seconds = (time.perf_counter() - started) * scale
    actors = rt.actors if isinstance(rt.actors, int) else rt.actors[1]
    return Estimate(
        sample_rows=table.num_rows,
        rows=p.rows_in,
        tokens=tokens,
        seconds=round(seconds / actors, 3),
        device=stage.device,
        exact=table.num_rows == p.rows_in,
    )
