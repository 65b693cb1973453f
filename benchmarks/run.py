"""Benchmark bertpipe (C) against HF ``pipeline()`` in fp32 (A) and bf16 (A2) and the canonical Ray Data
pattern (B), and time a small job's start-up.

    python benchmarks/run.py [--rows 20000] [--sample 2000] [--scale10] [--models DIR] [--set KEY=VALUE]

Prints a table and writes ``benchmarks/results/latest.json``. See ``benchmarks/README.md`` for what each
figure means and how it is computed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks import measure as M  # noqa: E402
from benchmarks.corpus import Corpus  # noqa: E402
from benchmarks.models import resolve_models  # noqa: E402
from benchmarks.ways import (  # noqa: E402
    B_ROWS_PER_CALL,
    HF_BATCH,
    REPO,
    job_config,
    read_predictions,
    run_bertpipe,
    run_hf_way,
)

RESULTS = REPO / "benchmarks" / "results"
GOALS = {  # the targets: (key in "figures", comparison, target)
    "C/A rows/s": (">=", 5.0),
    "sentiment agreement C vs A": (">=", 0.995),
    "NER entity F1 C vs A": (">=", 0.99),
    "C useful FLOP/s / bf16 GEMM": (">=", 0.40),
    "C peak memory 10x / 1x (PSS)": ("<=", 1.3),
}
STAGES = {  # Ray Data operator name -> the stage it is; fused operators are named "A->B"
    "ReadShard": "read",
    "PrepareStage": "tokenise",
    "InferStage": "model",
    "PostprocessStage": "postprocess",
    "PartitionSanitiser": "partition names",
    "Write": "write",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000, help="corpus rows for C (default 20000)")
    p.add_argument("--sample", type=int, default=2000, help="random sample rows for A, B and agreement")
    p.add_argument("--scale10", action="store_true", help="also run C on 10x the rows (memory flatness)")
    p.add_argument("--models", type=Path, help="folder with fine-tuned sentiment/ and ner/ models")
    p.add_argument("--ways", default="A,A2,B,C", help="subset to run, e.g. A,C (default A,A2,B,C)")
    p.add_argument("--startup-rows", type=int, default=100, help="rows of the start-up job (0: skip it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="bertpipe --set for C")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=RESULTS / "work", help="corpus, models, outputs, logs")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    p.add_argument("--gemm-n", type=int, default=4096, help="size of the timed square GEMMs")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds allowed per way")
    args = p.parse_args(argv)
    args.ways = {w.strip().upper() for w in args.ways.split(",") if w.strip()}
    if not args.ways <= {"A", "A2", "B", "C"} or (args.scale10 and "C" not in args.ways):
        p.error("--ways takes A, A2, B and C; --scale10 needs C")
    if not 0 < args.sample <= args.rows:
        p.error("--sample must be between 1 and --rows")
    return args


def machine() -> dict:
    import ray
    import torch
    import transformers

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "model name" in line), "")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "bf16_isa": [f for f in ("amx_bf16", "avx512_bf16") if f in flags],
        "isa": [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2") if f" {f}" in flags],
        "memory_gib": round(M.psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "commit": commit.strip(),
    }


def figures(work: M.Workload, w: M.Windows, seconds: float, padded: int) -> dict:
    tokens, flops = work.tokens(w), work.flops(w)
    return {
        "rows": len(w.per_row),
        "seconds": seconds,
        "rows_per_s": len(w.per_row) / seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "padding_waste": M.padding_waste(padded, tokens),
        "useful_flop": flops,
        "useful_flop_per_s": flops / seconds,
    }


def padded_hf(w: M.Windows, rows_per_call: int) -> int:
    """HF pipelines pad each batch of 32 (rows for sentiment, windows for NER) in input order."""
    return sum(
        M.padded_fixed(block.first, HF_BATCH) + M.padded_fixed(block.lengths, HF_BATCH)
        for block in w.blocks(_chunks(len(w.per_row), rows_per_call))
    )


def padded_bertpipe(w: M.Windows, runtime: dict) -> int:
    """bertpipe's plan per model call: ``map_batches`` hands the model stage ``rows_per_block`` rows at a
    time, whose sequences are sorted and cut by the token budget, task by task. Which rows share a call
    depends on how Ray streams the shards; lengths are independent of position, so consecutive rows
    give the same figure on average."""
    budget = runtime["max_tokens_per_batch"], runtime["max_rows_per_batch"]
    blocks = w.blocks(_chunks(len(w.per_row), runtime["rows_per_block"]))
    return sum(M.padded_budget(b.first, *budget) + M.padded_budget(b.lengths, *budget) for b in blocks)


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - first) for first in range(0, n, size)]


def stage_times(summary: dict, stats: dict, wall: float) -> dict:
    """Where C's time goes: Ray Data's operators (their span and the summed time of their tasks), and
    the time outside the dataset (start-up, pre-flight checks, Ray start, count check and publish)."""
    operators = [
        {"stage": "+".join(_stage(part) for part in op["operator"].split("->")), **op}
        for op in stats["operators"]
    ]
    outside = summary["seconds"] - stats["dataset_s"] if stats["dataset_s"] else None
    return {
        "process_s": wall,
        "run_summary_s": summary["seconds"],
        "dataset_s": stats["dataset_s"],
        "before_and_after_dataset_s": outside,
        "interpreter_and_imports_s": wall - summary["seconds"],
        "operators": operators,
    }


def _stage(operator: str) -> str:
    return next((stage for key, stage in STAGES.items() if key in operator), operator)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    print(f"models, corpus ({args.rows} rows) and token counts ...", flush=True)
    models = resolve_models(args.models, args.work, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(models["ner"])
    max_length = min(512, tokenizer.model_max_length)
    stride = max_length // 4
    corpus = Corpus.ensure(args.work, args.rows, args.seed)
    table = corpus.table()
    wl = M.Workload(
        models,
        M.token_windows(tokenizer, table.column("text").to_pylist(), max_length, stride),
        max_length,
        stride,
    )
    index = np.random.default_rng(args.seed).choice(args.rows, size=args.sample, replace=False)
    sample_dir = corpus.write_sample(args.work, table, index)
    sample_w = wl.windows.rows(index)
    sample_ids = table.column("id").take(pa.array(index)).to_pylist()
    print("bf16 and fp32 GEMM rates ...", flush=True)
    ffn = (8192, wl.shapes["ner"].hidden, wl.shapes["ner"].intermediate)  # a token budget x the FFN
    gemm = {
        "n": args.gemm_n,
        "bf16_flop_per_s": M.gemm_flops_per_s("bfloat16", args.gemm_n),
        "fp32_flop_per_s": M.gemm_flops_per_s("float32", args.gemm_n),
        "model_ffn_mkn": ffn,
        "bf16_model_ffn_flop_per_s": M.gemm_flops_per_s("bfloat16", mkn=ffn),
        **model_gemm(wl.shapes["ner"], budget_tokens(args.overrides)),
    }

    spec = {
        "sample": str(sample_dir),
        "models": {k: str(v) for k, v in models.items()},
        "max_length": max_length,
        "stride": stride,
        "cpus": os.cpu_count(),
    }
    ways, predictions = {}, {}
    for way in ("A", "A2", "B"):
        if way not in args.ways:
            continue
        print(f"way {way} on {args.sample} rows ...", flush=True)
        child, result = run_hf_way(way.lower(), spec, args.work, args.timeout)
        padded = padded_hf(sample_w, B_ROWS_PER_CALL if way == "B" else args.sample)
        ways[way] = {
            **figures(wl, sample_w, child.wall_s, padded),
            "in_process": result["timings"],
            "memory": child.memory,
        }
        predictions[way] = result["predictions"]

    for name, rows in (("C", args.rows), ("C10", args.rows * 10)):
        if "C" not in args.ways or (name == "C10" and not args.scale10):
            continue
        print(f"way {name}: bertpipe run on {rows} rows ...", flush=True)
        c_corpus = corpus if rows == args.rows else Corpus.ensure(args.work, rows, args.seed)
        if name == "C10":
            texts = c_corpus.table().column("text").to_pylist()
            w = M.token_windows(tokenizer, texts, max_length, stride)
            del texts
        else:
            w = wl.windows
        out = args.work / f"{name}-out"
        config = job_config(c_corpus.shards, out, spec["models"], max_length, stride)
        child, summary, stats = run_bertpipe(name, config, args.overrides, args.work, args.timeout)
        runtime = summary["config"]["runtime"]
        padded = padded_bertpipe(w, runtime)
        ways[name] = {
            **figures(wl, w, child.wall_s, padded),
            "rows_error": summary["rows_error"],
            "runtime": runtime,
            "time": stage_times(summary, stats, child.wall_s),
            "memory": child.memory,
        }
        if name == "C":
            predictions["C"] = read_predictions(out, set(sample_ids))

    startup = None
    if args.startup_rows and "C" in args.ways:
        startup = run_startup(args, corpus, table, spec)

    gemm["bf16_flop_per_s_after"] = M.gemm_flops_per_s("bfloat16", args.gemm_n)
    ceiling = max(gemm["bf16_flop_per_s"], gemm["bf16_flop_per_s_after"])  # load only ever lowers it
    for f in ways.values():
        f["gemm_share"] = f["useful_flop_per_s"] / ceiling
        for dtype in ("bf16", "fp32"):
            f[f"model_gemm_share_{dtype}"] = f["useful_flop_per_s"] / gemm[f"{dtype}_model_flop_per_s"]
        model = [op for op in f.get("time", {}).get("operators", []) if op["stage"] == "model"]
        if model and model[0]["wall_s"]:
            f["model_stage_gemm_share"] = f["useful_flop"] / model[0]["wall_s"] / ceiling
            f["model_stage_model_gemm_share_bf16"] = (
                f["useful_flop"] / model[0]["wall_s"] / gemm["bf16_model_flop_per_s"]
            )
    report = {
        "machine": machine(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "benchmark_seconds": time.time() - started,
        "args": {
            k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
        },
        "workload": workload_info(wl, corpus, sample_w, models),
        "gemm": gemm,
        "flops_formula": M.FLOPS_FORMULA,
        "ways": ways,
        "startup": startup,
        "comparison": compare(ways, predictions, sample_ids),
    }
    report["goals"] = goals(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print_report(report)
    print(f"\nwritten: {args.out}")
    return 0


def budget_tokens(overrides: list[str]) -> int:
    """C's token budget per forward pass: ``--set runtime.max_tokens_per_batch=N`` or the default."""
    from bertpipe.config import RuntimeConfig

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("runtime.max_tokens_per_batch=")]
    return int(given[-1]) if given else RuntimeConfig().max_tokens_per_batch


def model_gemm(shape: M.Shape, tokens: int) -> dict:
    """The ceiling of the model's own shapes: the GEMMs of one encoder layer on a full token budget
    (tokens x hidden x hidden four times, tokens x hidden x intermediate and back once each), timed in
    bf16 and fp32; their FLOP-weighted rate is what the model stage could reach if only its GEMMs ran."""
    h, i = shape.hidden, shape.intermediate
    parts = [((tokens, h, h), 4), ((tokens, h, i), 1), ((tokens, i, h), 1)]
    out = {"model_gemm_shapes": [list(mkn) for mkn, _ in parts]}
    for dtype, name in (("bf16", "bfloat16"), ("fp32", "float32")):
        flops = seconds = 0.0
        for mkn, count in parts:
            f = 2 * mkn[0] * mkn[1] * mkn[2] * count
            flops += f
            seconds += f / M.gemm_flops_per_s(name, mkn=mkn)
        out[f"{dtype}_model_flop_per_s"] = flops / seconds
    return out


def run_startup(args: argparse.Namespace, corpus: Corpus, table: pa.Table, spec: dict) -> dict:
    """A small job end to end (``bertpipe run`` on ``--startup-rows`` rows: its time to the first written
    file and its whole time) against its floor: ``import bertpipe`` and the models' forward passes."""
    rows = args.startup_rows
    small = corpus.write_sample(args.work / "startup", table, np.arange(min(rows, table.num_rows)))
    out = args.work / "startup-out"
    print(f"start-up: bertpipe run on {rows} rows, and its floor ...", flush=True)
    config = job_config(small, out, spec["models"], spec["max_length"], spec["stride"])
    child, summary, _ = run_bertpipe("startup", config, args.overrides, args.work, args.timeout)
    floor, result = run_hf_way("floor", {**spec, "sample": str(small)}, args.work, args.timeout)
    return {
        "rows": summary["rows_out"],
        "first_file_s": child.first_file_s,
        "end_to_end_s": child.wall_s,
        "floor_s": floor.wall_s,
        "floor_import_s": result["timings"]["import_s"],
        "end_to_end / floor": child.wall_s / floor.wall_s,
    }


def workload_info(wl: M.Workload, corpus: Corpus, sample_w: M.Windows, models: dict[str, Path]) -> dict:
    w = wl.windows
    first = w.first
    return {
        "models": {k: str(v) for k, v in models.items()},
        "shapes": {k: vars(v) | {"labels": wl.labels[k]} for k, v in wl.shapes.items()},
        "max_length": wl.max_length,
        "stride": wl.stride,
        "corpus_rows": corpus.rows,
        "corpus_shards": len(corpus.shard_rows),
        "tokens_per_row": {
            "first_window_mean": float(first.mean()),
            "first_window_p50": float(np.median(first)),
            "rows_over_one_window": float((w.per_row > 1).mean()),
            "ner_windows_mean": float(w.per_row.mean()),
            "ner_tokens_mean": float(w.lengths.sum() / len(w.per_row)),
        },
        "sample_rows": len(sample_w.per_row),
    }


def compare(ways: dict, predictions: dict, sample_ids: list[str]) -> dict:
    out = {}
    if "A" in predictions:
        ref = predictions["A"]
        out["sample_positive_share_A"] = M.positive_share(ref, sample_ids)
        for way in ("B", "C"):
            if way in predictions:
                out[f"{way}_vs_A"] = M.compare_predictions(predictions[way], ref, sample_ids)
    for way in ("A", "A2", "B"):
        if way in ways and "C" in ways:
            out[f"C/{way} rows_per_s"] = ways["C"]["rows_per_s"] / ways[way]["rows_per_s"]
            in_process = ways[way]["rows"] / ways[way]["in_process"]["in_process_s"]
            out[f"C/{way} rows_per_s without start-up"] = (
                ways["C"]["rows"] / ways["C"]["time"]["run_summary_s"] / in_process
            )
    if "C" in ways and "C10" in ways:
        for kind in ("pss", "rss"):
            key = f"peak_{kind}_mib"
            out[f"C10/C peak {kind}"] = ways["C10"]["memory"][key] / ways["C"]["memory"][key]
    return out


def goals(report: dict) -> dict:
    comp, ways = report["comparison"], report["ways"]
    values = {
        "C/A rows/s": comp.get("C/A rows_per_s"),
        "sentiment agreement C vs A": comp.get("C_vs_A", {}).get("sentiment_agreement"),
        "NER entity F1 C vs A": comp.get("C_vs_A", {}).get("ner", {}).get("f1"),
        "C useful FLOP/s / bf16 GEMM": ways.get("C", {}).get("gemm_share"),
        "C peak memory 10x / 1x (PSS)": comp.get("C10/C peak pss"),
    }
    result = {}
    for name, (op, target) in GOALS.items():
        value = values[name]
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        result[name] = {"value": value, "target": f"{op} {target}", "met": met}
    return result


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file: do not squeeze the table into 80 columns
    table = Table(title="bertpipe benchmark", title_justify="left")
    for column in (
        "way",
        "rows",
        "seconds",
        "rows/s",
        "tokens/s",
        "padding waste",
        "GFLOP/s",
        "of bf16 GEMM",
        "of model-shape bf16 GEMM",
        "of model-shape fp32 GEMM",
        "peak PSS MiB",
        "peak RSS MiB",
    ):
        table.add_column(column, justify="right")
    for way, f in report["ways"].items():
        table.add_row(
            way,
            str(f["rows"]),
            f"{f['seconds']:.1f}",
            f"{f['rows_per_s']:.2f}",
            f"{f['tokens_per_s']:.0f}",
            f"{f['padding_waste']:.1%}",
            f"{f['useful_flop_per_s'] / 1e9:.1f}",
            f"{f['gemm_share']:.1%}",
            f"{f['model_gemm_share_bf16']:.1%}",
            f"{f['model_gemm_share_fp32']:.1%}",
            f"{f['memory']['peak_pss_mib']:.0f}",
            f"{f['memory']['peak_rss_mib']:.0f}",
        )
    console.print(table)
    gemm = report["gemm"]
    console.print(
        f"bf16 GEMM {gemm['bf16_flop_per_s'] / 1e9:.0f} GFLOP/s "
        f"(after the ways: {gemm['bf16_flop_per_s_after'] / 1e9:.0f}), "
        f"fp32 GEMM {gemm['fp32_flop_per_s'] / 1e9:.0f} GFLOP/s, bf16 GEMM of the model's FFN shape "
        f"{gemm['bf16_model_ffn_flop_per_s'] / 1e9:.0f} GFLOP/s; model-shape GEMMs (one layer on a "
        f"token budget) bf16 {gemm['bf16_model_flop_per_s'] / 1e9:.0f}, fp32 "
        f"{gemm['fp32_model_flop_per_s'] / 1e9:.0f} GFLOP/s; ISA {' '.join(report['machine']['isa'])}; "
        f"load average before "
        f"{report['load_average']['before'][0]:.1f}, after {report['load_average']['after'][0]:.1f}"
    )
    if "C" in report["ways"]:
        t = report["ways"]["C"]["time"]
        stages = Table(title="where C's time goes", title_justify="left")
        for column in ("part", "span s", "task wall s (sum)", "task cpu s (sum)"):
            stages.add_column(column, justify="right")
        stages.add_row("interpreter + imports", f"{t['interpreter_and_imports_s']:.1f}", "", "")
        if t["before_and_after_dataset_s"] is not None:
            stages.add_row(
                "plan, Ray start, count check, publish", f"{t['before_and_after_dataset_s']:.1f}", "", ""
            )
        for op in t["operators"]:
            stages.add_row(
                f"{op['stage']}: {op['operator']}",
                f"{op['span_s']:.1f}",
                f"{op['wall_s'] or 0:.1f}",
                f"{op['cpu_s'] or 0:.1f}",
            )
        console.print(stages)
        if "model_stage_gemm_share" in report["ways"]["C"]:
            console.print(
                f"C's model stage alone (useful FLOPs / its task time): "
                f"{report['ways']['C']['model_stage_gemm_share']:.1%} of the all-core bf16 GEMM"
            )
    if report["startup"]:
        s = report["startup"]
        first = "-" if s["first_file_s"] is None else f"{s['first_file_s']:.1f} s"
        console.print(
            f"start-up: {s['rows']}-row job end to end {s['end_to_end_s']:.1f} s (first file written at "
            f"{first}); floor (import bertpipe {s['floor_import_s']:.1f} s + the models' forward passes) "
            f"{s['floor_s']:.1f} s; ratio {s['end_to_end / floor']:.2f}"
        )
    comp = report["comparison"]
    for way in ("A", "A2"):
        if f"C/{way} rows_per_s" in comp:
            console.print(f"C/{way} rows/s: {comp[f'C/{way} rows_per_s']:.2f}")
    goal_table = Table(title="goals", title_justify="left")
    for column in ("goal", "value", "target", "met"):
        goal_table.add_column(column, justify="right")
    for name, g in report["goals"].items():
        value = "-" if g["value"] is None else f"{g['value']:.4g}"
        goal_table.add_row(name, value, g["target"], {True: "yes", False: "NO", None: "-"}[g["met"]])
    console.print(goal_table)


if __name__ == "__main__":
    sys.exit(main())
