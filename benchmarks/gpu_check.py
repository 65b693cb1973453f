"""GPU check in one call: bertpipe on CUDA with BERT-base-shaped models, bf16 and fp16, against fp32.

    python benchmarks/gpu_check.py [--rows 4000] [--sample 200] [--max-tokens N] [--out FILE]

Models: BERT-base shape (12 layers, hidden 768, 12 heads, FFN 3072) built from its config, random seeded
weights and calibrated heads (``benchmarks.models``), MiniLM's WordPiece tokenizer; nothing downloaded.
Corpus: ``benchmarks.corpus`` (long-tailed lengths, Parquet + JSONL shards). For bf16 and fp16:

- end to end: ``bertpipe.runner.execute`` (local Ray, one GPU actor) on the whole corpus: rows/s, tokens/s;
- model stage alone: ``InferStage.run_sequences`` on the pre-tokenised corpus in this process, no Ray, so
  the gap to end to end is what tokenising, post-processing, Ray and the write cost;
- labels of a random sample against HF ``pipeline()`` fp32 on the CPU (sentiment agreement, NER entity
  F1), plus a bertpipe fp32 run on the GPU over the sample as the control (it should agree fully).

Useful FLOP/s (formula in ``benchmarks.measure``) are given as a share of a bf16 8192^3 GEMM timed in
the same call. Prints one JSON object (also to ``--out``). Without CUDA it says why and exits 2.
``--rehearse`` runs the same steps on the CPU with a tiny encoder, to try the script before spending
device time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
PRECISIONS = ("bfloat16", "float16")
MAX_LENGTH, STRIDE = 512, 128


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000, help="corpus rows (default 4000)")
    p.add_argument("--sample", type=int, default=200, help="rows checked against fp32 on the CPU")
    p.add_argument(
        "--max-tokens", type=int, help="runtime.max_tokens_per_batch (default: from the GPU memory)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bertpipe-gpu-check")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--rehearse", action="store_true", help="CPU and a tiny encoder: try the script out")
    return p.parse_args(argv)


def no_cuda_reason() -> str | None:
    try:
        import torch
    except ImportError as exc:
        return f"torch is not installed ({exc})"
    if not torch.cuda.is_available():
        build = torch.version.cuda or "a CPU-only build"
        return f"CUDA is not available to torch {torch.__version__} ({build}); run this on a GPU machine"
    return None


def emit(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=2, default=float)
    print(text, flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def gpu_info(device: str) -> dict:
    import torch

    if device == "cpu":
        return {"name": "cpu (rehearsal)", "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def job(source: Path, out: Path, models: dict, dtype: str, device: str, max_tokens: int | None):
    from benchmarks.ways import job_config
    from bertpipe.config import JobConfig

    raw = job_config(source, out, models, MAX_LENGTH, STRIDE)
    raw["runtime"].update(
        device=device,
        dtype=dtype,
        local_gpus=int(device == "cuda"),
        local_cpus=os.cpu_count(),
    )
    if max_tokens:
        raw["runtime"]["max_tokens_per_batch"] = max_tokens
    shutil.rmtree(out, ignore_errors=True)  # output.mode is error: every run writes a new output
    return JobConfig.model_validate(raw)


def model_stage(config, sequences: dict[str, list], tokens: int, flops: float, gemm: float) -> dict:
    """Only the model: token ids in, logits out, in this process (warmed up first)."""
    import torch

    from bertpipe.plan import plan_models
    from bertpipe.stages.infer import InferStage

    model_tasks = plan_models(config.tasks).model_tasks
    stage = InferStage(model_tasks, config.runtime, config.runtime.device)
    names = [mt.task.name for mt in model_tasks]
    for name in names:
        stage.run_sequences(name, sequences[name][:256])
    start = time.perf_counter()
    for name in names:
        stage.run_sequences(name, sequences[name])
    seconds = time.perf_counter() - start  # run_sequences returns host arrays: the device is done
    result = {
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "useful_flop_per_s": flops / seconds,
        "gemm_share": flops / seconds / gemm,
    }
    del stage
    if config.runtime.device == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    return result


def check(args: argparse.Namespace) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch
    from transformers import AutoTokenizer

    from benchmarks import measure as M
    from benchmarks.corpus import Corpus
    from benchmarks.models import build_models
    from benchmarks.ways import HFLabeller, read_predictions
    from bertpipe.engine.cluster import connect
    from bertpipe.runner import execute

    device, shape, n = ("cpu", TINY, 1024) if args.rehearse else ("cuda", BERT_BASE, 8192)
    result: dict = {
        "ok": True,
        "device": gpu_info(device),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    gemm = M.gemm_flops_per_s("bfloat16", n=n, repeats=10, device=device)
    result["gemm"] = {
        "bf16_flop_per_s": gemm,
        "fp16_flop_per_s": M.gemm_flops_per_s("float16", n=n, repeats=10, device=device),
    }
    args.work.mkdir(parents=True, exist_ok=True)
    built = build_models(args.work / f"encoder-{shape['hidden_size']}-s{args.seed}", args.seed, shape)
    models = {k: str(v) for k, v in built.items()}
    tokenizer = AutoTokenizer.from_pretrained(models["ner"])
    corpus = Corpus.ensure(args.work, args.rows, args.seed)
    table = corpus.table()
    texts = table.column("text").to_pylist()
    windows = M.token_windows(tokenizer, texts, MAX_LENGTH, STRIDE)
    workload = M.Workload(built, windows, MAX_LENGTH, STRIDE)
    tokens, flops = workload.tokens(windows), workload.flops(windows)
    result["workload"] = {
        "encoder": shape,
        "rows": args.rows,
        "tokens": tokens,
        "useful_flop": flops,
        "flops_formula": M.FLOPS_FORMULA,
        "ray_start_excluded": True,
    }

    index = np.random.default_rng(args.seed).choice(
        args.rows, size=min(args.sample, args.rows), replace=False
    )
    sample_dir = corpus.write_sample(args.work, table, index)
    ids = table.column("id").take(pa.array(index)).to_pylist()
    start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    labels, entities = HFLabeller(models, MAX_LENGTH, STRIDE).label([texts[i] for i in index])
    reference = {i: [s, e] for i, s, e in zip(ids, labels, entities, strict=True)}
    result["cpu_fp32_reference_s"] = time.perf_counter() - start

    enc = tokenizer(
        texts, truncation=True, max_length=MAX_LENGTH, stride=STRIDE, return_overflowing_tokens=True
    )
    all_windows = [np.asarray(w, np.int64) for w in enc["input_ids"]]
    starts = np.concatenate([[0], np.cumsum(windows.per_row)[:-1]])
    sequences = {"sentiment": [all_windows[s] for s in starts], "entities": all_windows}

    for dtype in PRECISIONS:
        config = job(corpus.shards, args.work / f"out-{dtype}", models, dtype, device, args.max_tokens)
        # Ray first, once, outside the timed runs
        connect(config.runtime.address, local_gpus=config.runtime.local_gpus)
        entry = {"model_stage": model_stage(config, sequences, tokens, flops, gemm)}
        summary = execute(config)
        seconds = summary["seconds"]
        entry["end_to_end"] = {
            "seconds": seconds,
            "rows_per_s": summary["rows_out"] / seconds,
            "tokens_per_s": tokens / seconds,
            "gemm_share": flops / seconds / gemm,
            "rows_error": summary["rows_error"],
            "device": summary["device"],
        }
        got = read_predictions(Path(config.output.path), set(ids))
        entry["vs_cpu_fp32"] = M.compare_predictions(got, reference, ids)
        result[dtype] = entry

    control = job(sample_dir, args.work / "out-float32", models, "float32", device, args.max_tokens)
    execute(control)
    got = read_predictions(Path(control.output.path), set(ids))
    result["float32_control_vs_cpu_fp32"] = M.compare_predictions(got, reference, ids)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = None if args.rehearse else no_cuda_reason()
    if reason:
        print(f"gpu_check: {reason}", file=sys.stderr)
        emit({"ok": False, "error": reason}, args.out)
        return 2
    try:
        result = check(args)
    except Exception as exc:  # noqa: BLE001 - one JSON answer per call, whatever broke
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    emit(result, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
