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
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

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


CHARS_PER_TOKEN = 4  # English WordPiece text, roughly: a cheap count, good enough to decide a compile
# A compile pays back from about this many tokens per model. Measured on all-MiniLM-L6-v2 on a 2-core
# AMX CPU: the compiled model saved about 15 us per token against eager bf16 and compiling took ~30 s
# (2M tokens); a later run loads the cached package in a fraction of a second and gains from its first
# token. The driver cannot tell which of the two a run will be, so the threshold lies between them.
COMPILE_MIN_TOKENS = 1_000_000
MINILM_FLOPS_PER_TOKEN = 21_233_664  # ``encoder_flops_per_token`` of all-MiniLM-L6-v2 (6 layers, 384 wide)


def compile_min_tokens(flops_per_token: float | None) -> int:
    """Tokens per model from which compiling pays back, for models of ``flops_per_token``.

    A smaller model saves less per token, though far from in proportion (compiling also sheds the
    per-operation overhead that dominates small layers): on a 2-core AMX CPU all-MiniLM-L6-v2 saved ~15 us
    per token and ``benchmarks/scale.py``'s tiny models, 162x fewer FLOPs per token, ~1.5 us (eager
    6,243-6,415 rows/s of 18.7 tokens against 9,121-10,551 compiled, two models), for a compile of
    about 30 s either way. So the threshold grows with the square root of how much smaller than MiniLM
    the model is, a fit through those two points. Larger models keep MiniLM's threshold: they save more
    per token but also take longer to compile, which the fit does not know."""
    if not flops_per_token:
        return COMPILE_MIN_TOKENS
    return round(COMPILE_MIN_TOKENS * max(1.0, (MINILM_FLOPS_PER_TOKEN / flops_per_token) ** 0.5))


def job_flops_per_token(model_tasks) -> float | None:
    """The mean ``flops_per_token`` of the job's models (None when no config tells it)."""
    known = [mt.info.flops_per_token for mt in model_tasks if mt.info.flops_per_token]
    return sum(known) / len(known) if known else None


def text_tokens(texts: pa.ChunkedArray | pa.Array, max_length: int, windows: bool) -> int:
    """Tokens of ``texts`` estimated from their length: whole texts in windows, or the first window."""
    chars = pc.utf8_length(texts).fill_null(0).to_numpy(zero_copy_only=False)
    tokens = chars // CHARS_PER_TOKEN + 2
    return int(tokens.sum() if windows else tokens.clip(max=max_length).sum())


def preflight_tokens(p: Plan, limit: int = 256) -> int:
    """The job's tokens per model, on average: the first rows' text lengths scaled to the pre-flight row
    count. Reads ``limit`` rows; no tokenizer or model is loaded."""
    table = sample_rows(p, limit)
    texts = table.column(p.config.input.text_column)
    if not pa.types.is_string(texts.type) and not pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.string(), safe=False)
    counts = [
        text_tokens(texts, p.config.runtime.max_length, not mt.first_window_only) for mt in p.model_tasks
    ]
    return round(sum(counts) / max(len(counts), 1) * p.rows_in / max(table.num_rows, 1))


def compile_decision(
    setting: str,
    tokens: Callable[[], int | None],
    device: str = "cpu",
    flops_per_token: float | None = None,
) -> tuple[bool, str]:
    """Whether to compile the models for ``runtime.compile`` and why, for the log. ``auto`` decides from
    the CPU, then from ``tokens()``, the job's estimated tokens per model (None when unknown), which is
    only counted when the CPU does not decide already (the runner reads the first rows for it), against
    ``compile_min_tokens`` of the models' size.

    ``auto`` leaves CPU models eager on a CPU without AMX: there a compiled all-MiniLM-L6-v2 job ran only
    2-3% faster end to end than eager bf16 with its package already cached, against about 25 s of compile
    per model on a first run (benchmarks/README.md, "The compiled model stage").
    The CPU is the driver's; on a cluster whose workers differ from it, set ``on`` or ``off``."""
    from bertpipe.models.loading import cpu_flags

    if setting != "auto":
        return setting == "on", f"runtime.compile: {setting}"
    if device == "cpu" and "amx_bf16" not in cpu_flags():
        return False, (
            "runtime.compile: auto, this CPU has no AMX, where compiled jobs measured only 2-3% faster "
            "end to end than eager bf16: not compiling"
        )
    count = tokens()
    if count is None:
        return False, "runtime.compile: auto, the job's size is not known beforehand: not compiling"
    threshold = compile_min_tokens(flops_per_token)
    if count >= threshold:
        return True, (
            f"runtime.compile: auto, about {count:,} tokens per model pay back the compile "
            f"(from {threshold:,} for models of this size): compiling"
        )
    return False, (
        f"runtime.compile: auto, about {count:,} tokens per model are too few to pay back a compile "
        f"(from {threshold:,} for models of this size): not compiling"
    )


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
    stage = InferStage(p.model_tasks, quiet, device, compiled=False)  # eager: validate stays quick
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
