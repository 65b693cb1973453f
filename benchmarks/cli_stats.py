"""``bertpipe`` (the same CLI entry point) that also saves Ray Data's per-operator stats as JSON.

The runner keeps its dataset to itself, so ``ds.stats()`` is out of reach from outside. Ray Data can
retain the stats summary of every finished execution (``DataContext.enable_stats_summary_collection``,
read back with ``ray.data.list_stats_summaries()``, an API meant for benchmark utilities); this wrapper
turns that on and writes the summaries to ``$BENCH_STATS_FILE`` when the command ends. Nothing else
differs from ``python -m bertpipe``.

Usage: ``BENCH_STATS_FILE=stats.json python -m benchmarks.cli_stats run job.yaml [--set ...]``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray
import ray.data

from bertpipe.cli import main


def _total(stats) -> float | None:
    return None if stats is None else stats.sum


def operators(summary) -> list[dict]:
    """The operators of one execution, upstream first: span (first start to last end, operators
    overlap as they stream), summed wall and CPU time of their tasks, time in the UDF, rows out."""
    found = [op for parent in summary.parents for op in operators(parent)]
    for op in summary.operators_stats:
        found.append(
            {
                "operator": op.operator_name,
                "span_s": op.time_total_s,
                "wall_s": _total(op.wall_time),
                "cpu_s": _total(op.cpu_time),
                "udf_s": _total(op.function_body_time),
                "rows_out": _total(op.output_num_rows),
            }
        )
    return found


def write_stats(path: Path) -> None:
    if not ray.is_initialized():  # the command failed before Ray started: nothing was executed
        return
    summaries = ray.data.list_stats_summaries()
    path.write_text(json.dumps([{"dataset_s": s.time_total_s, "operators": operators(s)} for s in summaries]))


if __name__ == "__main__":
    stats_file = os.environ.get("BENCH_STATS_FILE")
    if stats_file:
        ray.data.DataContext.get_current().enable_stats_summary_collection = True
    try:
        main()  # exits through SystemExit, with Ray still up
    finally:
        if stats_file:
            write_stats(Path(stats_file))
