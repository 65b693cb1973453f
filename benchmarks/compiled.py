"""The model stage eager against compiled (``runtime.compile: on``), at the shapes of bertpipe's batches.

    python benchmarks/compiled.py [--shapes 64x32,32x128,16x256,8x512] [--dtype auto] [--openvino]

Runs the benchmark's NER model (all-MiniLM-L6-v2 encoder, token head) through ``InferStage`` as an actor
does: a first process compiles into an empty cache (cold), a second one loads the compiled package from
it (warm), as a second ``bertpipe run`` on the machine would. Reports the compile time of each, real tokens
per second per shape and the argmax flips of the compiled model against eager fp32. ``--openvino``
also times OpenVINO (``openvino.convert_model`` of the same model) on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

RESULTS = Path(__file__).resolve().parent / "results"


def _stage(folder: Path, dtype: str, compiled: bool, threads: int):
    from bertpipe.config import RuntimeConfig
    from bertpipe.plan import plan_models
    from bertpipe.stages.infer import InferStage
    from bertpipe.tasks import parse_task

    task = parse_task({"name": "ner", "kind": "ner", "model": str(folder)})
    runtime = RuntimeConfig(dtype=dtype, precision_check_rows=0, threads_per_actor=threads)
    started = time.perf_counter()
    stage = InferStage(plan_models([task]).model_tasks, runtime, "cpu", compiled=compiled)
    return stage, time.perf_counter() - started


def _inputs(shapes: list[tuple[int, int]], seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {s: [rng.integers(1000, 20000, s[1]) for _ in range(s[0])] for s in shapes}


def _rate(call, seqs, repeats: int) -> float:
    call(seqs)
    started = time.perf_counter()
    for _ in range(repeats):
        call(seqs)
    return repeats * sum(len(s) for s in seqs) / (time.perf_counter() - started)


def child(args: argparse.Namespace) -> dict:
    """One process: eager and compiled stages, compile time, rates, flips against eager fp32."""
    import numpy as np

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    inputs = _inputs(shapes)
    eager, eager_s = _stage(args.model, args.dtype, False, args.threads)
    compiled, compiled_s = _stage(args.model, args.dtype, True, args.threads)
    exact, _ = _stage(args.model, "float32", False, args.threads)
    out = {"compile_s": round(compiled_s - eager_s, 1), "compiled": bool(compiled.compiled), "shapes": {}}
    out["dtype"] = str(compiled.dtype).replace("torch.", "")
    for shape, seqs in inputs.items():
        for stage in (eager, compiled, exact):
            stage.max_tokens, stage.max_rows = shape[0] * shape[1], shape[0]  # one batch of this shape
        fig = {}
        if not args.compile_only:
            fig["eager_tokens_per_s"] = round(
                _rate(lambda s: eager.run_sequences("ner", s), seqs, args.repeats)
            )
            fig["compiled_tokens_per_s"] = round(
                _rate(lambda s: compiled.run_sequences("ner", s), seqs, args.repeats)
            )
        ref = np.concatenate([x.argmax(-1) for x in exact.run_sequences("ner", seqs)])
        got = np.concatenate([x.argmax(-1) for x in compiled.run_sequences("ner", seqs)])
        fig["compiled_flips"] = float((ref != got).mean())
        if args.openvino:
            fig.update(_openvino(exact.models["ner"], seqs, args, ref))
        out["shapes"][f"{shape[0]}x{shape[1]}"] = fig
    return out


def _openvino(model, seqs, args: argparse.Namespace, ref) -> dict:
    """OpenVINO on the same model: converted from PyTorch once per process (dynamic shapes)."""
    import numpy as np
    import openvino as ov
    import torch

    if not hasattr(_openvino, "compiled"):
        started = time.perf_counter()
        example = {
            "input_ids": torch.ones(2, 16, dtype=torch.long),
            "attention_mask": torch.ones(2, 16, dtype=torch.long),
        }
        converted = ov.convert_model(model, example_input=example)
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if args.dtype == "bfloat16" else "f32"}
        hint["INFERENCE_NUM_THREADS"] = str(args.threads)
        _openvino.compiled = ov.Core().compile_model(converted, "CPU", hint)
        _openvino.seconds = time.perf_counter() - started

    def run(batch):
        ids = np.stack(batch)
        result = _openvino.compiled({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return result[0]

    rate = _rate(run, seqs, args.repeats)
    flips = float((np.asarray(run(seqs)).argmax(-1).reshape(-1) != ref).mean())
    return {
        "openvino_tokens_per_s": round(rate),
        "openvino_flips": flips,
        "openvino_convert_s": round(_openvino.seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="64x32,32x128,16x256,8x512", help="rows x tokens of each batch")
    p.add_argument("--dtype", default="auto", help="runtime.dtype (auto: bf16 on AMX/AVX512-BF16 CPUs)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--openvino", action="store_true")
    p.add_argument("--work", type=Path, default=RESULTS / "work")
    p.add_argument("--out", type=Path, default=RESULTS / "compiled.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    from benchmarks.models import build_models

    model = build_models(args.work / "models-s0", seed=0)["ner"]
    report = {"load_before": os.getloadavg(), "threads": args.threads}
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: the first run on a machine
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        base = [sys.executable, __file__, "--child", "--model", str(model), "--shapes", args.shapes]
        base += ["--dtype", args.dtype, "--threads", str(args.threads), "--repeats", str(args.repeats)]
        for run, extra in (("cold", ["--compile-only"]), ("warm", ["--openvino"] if args.openvino else [])):
            done = subprocess.run(base + extra, env=env, capture_output=True, text=True, check=True)
            report[run] = json.loads(done.stdout.strip().splitlines()[-1])
            print(run, json.dumps(report[run]), flush=True)
    report["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
