"""CPU cost per row of each stage, without Ray: read -> prepare -> infer -> postprocess -> write.

    python benchmarks/stage_costs.py                         # 20,000 short rows, 512-row blocks
    python benchmarks/stage_costs.py --profile postprocess   # and cProfile's top functions of a stage

The stages run as plain classes in this process on the tiny sentiment + NER models and the short-row
corpus of ``benchmarks/scale.py`` (built under its ``--work`` folder if missing). Costs are CPU seconds
of this process (``time.process_time``), so they hold on a loaded machine better than wall time does;
Ray's own per-block costs (scheduling, moving blocks between actors) are not in them.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.models import build_models  # noqa: E402
from benchmarks.scale import TINY, write_corpus  # noqa: E402

STAGES = ("read", "prepare", "infer", "postprocess", "write")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--block", type=int, default=512, help="rows per block (runtime.rows_per_block)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model stage")
    parser.add_argument("--dtype", default="float32", help="runtime.dtype of the model stage")
    parser.add_argument("--profile", choices=STAGES, help="print cProfile's top functions of this stage")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "work-scale")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bertpipe import columns as C
    from bertpipe.config import RuntimeConfig
    from bertpipe.models.loading import inspect_model
    from bertpipe.plan import ModelTask, TokenizerGroup
    from bertpipe.stages.infer import InferStage
    from bertpipe.stages.postprocess import PostprocessStage
    from bertpipe.stages.prepare import PrepareStage
    from bertpipe.tasks import parse_task

    args = parse_args(argv)
    models = build_models(args.work / "tiny-models", seed=0, encoder_shape=TINY)
    source = args.work / f"rows-{args.rows}"
    write_corpus(source, args.rows, per_file=max(1000, args.rows // 40))

    def model_task(name: str, kind: str) -> ModelTask:
        task = parse_task({"name": name, "kind": kind, "model": str(models[name])})
        info = inspect_model(task)
        return ModelTask(task, info, info.tokenizer_key)

    tasks = [model_task("sentiment", "sentiment"), model_task("ner", "ner")]
    runtime = RuntimeConfig(
        dtype=args.dtype, max_length=64, precision_check_rows=0, threads_per_actor=args.threads
    )
    group = TokenizerGroup(tasks[0].group, tasks[0].info.source, None, False, all_windows=True, offsets=True)
    stages = {
        "prepare": PrepareStage("text", [group], runtime.max_length, runtime.window_stride, None),
        "infer": InferStage(tasks, runtime, "cpu"),
        "postprocess": PostprocessStage(tasks, "text"),
    }
    cost = dict.fromkeys(STAGES, 0.0)
    profile = cProfile.Profile()

    def timed(stage: str, fn, *a):
        started = time.process_time()
        if stage == args.profile:
            profile.enable()
        result = fn(*a)
        if stage == args.profile:
            profile.disable()
        cost[stage] += time.process_time() - started
        return result

    rows = 0
    for path in sorted(source.glob("*.parquet")):
        table = timed("read", pq.read_table, path)
        table = table.append_column(C.ERROR, pa.nulls(table.num_rows, pa.string()))
        for start in range(0, table.num_rows, args.block):
            block = table.slice(start, args.block)
            for name, stage in stages.items():
                block = timed(name, stage, block)
            timed("write", pq.write_table, block, io.BytesIO())
            rows += block.num_rows
    print(f"{rows} rows, {args.block}-row blocks, {args.threads} torch thread(s), {args.dtype}")
    for stage, seconds in cost.items():
        print(f"{stage:12s} {seconds:7.2f} s CPU {1e6 * seconds / rows:8.1f} us/row")
    total = sum(cost.values())
    print(
        f"{'all':12s} {total:7.2f} s CPU {1e6 * total / rows:8.1f} us/row ({rows / total:.0f} rows per CPU-s)"
    )
    if args.profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
