"""The three ways to label a corpus, each run as a child process of ``run.py`` so that its start-up and
its whole process tree's memory count:

A  ``transformers.pipeline()`` per task in one process, fp32, ``batch_size=32``.
A2 the same in bf16 (``dtype=torch.bfloat16``): what a user who knows the hardware runs instead.
B  the canonical Ray Data pattern: ``read_parquet`` + ``map_batches`` with an actor class wrapping the same
   HF pipelines (``ActorPoolStrategy``, one actor per core, one torch thread each as Ray sets it). Each
   actor asks for (cores - 1) / cores CPUs: with whole CPUs the pool takes every core and Ray Data's
   file-listing task (1 CPU, not configurable in 2.60) never starts, a deadlock on small machines.
C  ``bertpipe run`` on a job YAML (through ``benchmarks.cli_stats``, which only adds Ray Data's stats).

A and B write ``{"timings": ..., "predictions": {id: [sentiment label, [[group, start, end], ...]]}}``;
C's predictions are read back from its output. Child usage: ``python -m benchmarks.ways a|b SPEC_JSON``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from benchmarks.measure import MemoryPeak

HF_BATCH = 32
B_ROWS_PER_CALL = 256
REPO = Path(__file__).resolve().parent.parent


def _entities(found: list[dict]) -> list[list]:
    return [[e["entity_group"], int(e["start"]), int(e["end"])] for e in found]


class HFLabeller:
    """Both HF pipelines on CPU, fp32 unless ``dtype`` says otherwise (A2: bfloat16): A runs one
    in-process, B one per Ray actor (a ``map_batches`` UDF).

    Same long-text handling as C: sentiment sees the first ``max_length`` tokens, NER every window
    (``stride`` tokens of overlap, HF merges the windows' entities)."""

    def __init__(self, models: dict[str, str], max_length: int, stride: int, dtype: str = "float32"):
        import torch
        from transformers import pipeline

        # explicit: transformers 5 defaults to the first GPU and to the dtype the weights were saved in
        common = {"device": "cpu", "dtype": getattr(torch, dtype), "batch_size": HF_BATCH}
        self.max_length = max_length
        self.sentiment = pipeline("text-classification", model=models["sentiment"], **common)
        self.ner = pipeline(
            "token-classification",
            model=models["ner"],
            aggregation_strategy="simple",
            stride=stride,
            **common,
        )
        self.ner.tokenizer.model_max_length = max_length  # the NER window is the tokenizer's max length

    def label(self, texts: list[str]) -> tuple[list[str], list[list]]:
        sentiment = self.sentiment(texts, truncation=True, max_length=self.max_length)
        entities = self.ner(texts)
        return [s["label"] for s in sentiment], [_entities(e) for e in entities]

    def __call__(self, batch: dict) -> dict:
        labels, entities = self.label(list(batch["text"]))
        return {"id": batch["id"], "sentiment": labels, "entities": [json.dumps(e) for e in entities]}


def run_a(spec: dict) -> dict:
    import pyarrow.parquet as pq

    start = time.perf_counter()
    table = pq.read_table(spec["sample"], columns=["id", "text"])
    labeller = HFLabeller(spec["models"], spec["max_length"], spec["stride"], spec.get("dtype", "float32"))
    loaded = time.perf_counter()
    labels, entities = labeller.label(table.column("text").to_pylist())
    done = time.perf_counter()
    ids = table.column("id").to_pylist()
    return {
        "timings": {"load_s": loaded - start, "infer_s": done - loaded, "in_process_s": done - start},
        "predictions": {i: [s, e] for i, s, e in zip(ids, labels, entities, strict=True)},
    }


def run_a2(spec: dict) -> dict:
    return run_a({**spec, "dtype": "bfloat16"})


def run_floor(spec: dict) -> dict:
    """The start-up floor of a small job: ``import bertpipe``, then both models loaded and run on the
    sample's texts (tokenised, one forward pass per task), nothing else."""
    start = time.perf_counter()
    import bertpipe  # noqa: F401

    imported = time.perf_counter()
    import pyarrow.parquet as pq
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    texts = pq.read_table(spec["sample"], columns=["text"]).column("text").to_pylist()
    loaders = {"sentiment": AutoModelForSequenceClassification, "ner": AutoModelForTokenClassification}
    for task, loader in loaders.items():
        tokenizer = AutoTokenizer.from_pretrained(spec["models"][task])
        model = loader.from_pretrained(spec["models"][task]).eval()
        batch = tokenizer(
            texts, truncation=True, max_length=spec["max_length"], padding=True, return_tensors="pt"
        )
        with torch.inference_mode():
            model(**batch)
    done = time.perf_counter()
    return {"timings": {"import_s": imported - start, "in_process_s": done - start}, "predictions": {}}


def run_b(spec: dict) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    start = time.perf_counter()
    ray.init(address="local", num_cpus=spec["cpus"], include_dashboard=False)
    ds = ray.data.read_parquet(spec["sample"], columns=["id", "text"])
    ds = ds.map_batches(
        HFLabeller,
        fn_constructor_kwargs={k: spec[k] for k in ("models", "max_length", "stride")},
        batch_size=B_ROWS_PER_CALL,
        compute=ActorPoolStrategy(size=spec["cpus"]),
        num_cpus=max(spec["cpus"] - 1, 1) / spec["cpus"],
    )
    rows = ds.take_all()
    done = time.perf_counter()
    ray.shutdown()
    return {
        "timings": {"in_process_s": done - start},
        "predictions": {r["id"]: [r["sentiment"], json.loads(r["entities"])] for r in rows},
    }


# ------------------------------------------------------------------------------------------------ parent


def child_env() -> dict[str, str]:
    """``benchmarks`` first on the path of every child and Ray worker (bertpipe is the installed package)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@dataclass
class ChildRun:
    wall_s: float
    memory: dict
    returncode: int
    log: Path

    first_file_s: float | None = None  # when the first Parquet file appeared under ``watch``


def run_child(
    command: list[str],
    log: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    watch: Path | None = None,
) -> ChildRun:
    """Run a child with its output in ``log``, timing it and sampling its process tree's memory; with
    ``watch``, also when the first Parquet file appears under that folder (staging included)."""
    first: list[float] = []
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=REPO, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            with MemoryPeak(proc.pid) as memory:
                while watch is not None and not first and proc.poll() is None:
                    if _has_parquet(watch):
                        first.append(time.perf_counter() - start)
                    elif time.perf_counter() - start > timeout:
                        break
                    time.sleep(0.1)
                proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # reported as a failed run (no exit code) by the caller
        finally:  # a timeout or Ctrl-C must not leave the child's Ray processes behind
            if proc.poll() is None:
                kill_tree(proc.pid)
        wall = time.perf_counter() - start
    return ChildRun(wall, memory.as_dict(), proc.returncode, log, first[0] if first else None)


def _has_parquet(folder: Path) -> bool:
    try:
        return next(folder.rglob("*.parquet"), None) is not None
    except OSError:  # the folder, or one inside it, appeared or went while walking
        return False


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(tree, timeout=30)


def run_hf_way(way: str, spec: dict, work: Path, timeout: float) -> tuple[ChildRun, dict]:
    spec_path, result_path = work / f"{way}-spec.json", work / f"{way}-result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    result_path.unlink(missing_ok=True)
    child = run_child(
        [sys.executable, "-m", "benchmarks.ways", way, str(spec_path)], work / f"{way}.log", timeout
    )
    if child.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"way {way.upper()} failed (exit {child.returncode}); see {child.log}")
    return child, json.loads(result_path.read_text())


def job_config(corpus_shards: Path, out: Path, models: dict[str, str], max_length: int, stride: int) -> dict:
    """C's job: both tasks with A's long-text handling; everything else as bertpipe defaults it."""
    return {
        "input": {"paths": [str(corpus_shards)]},
        "output": {"path": str(out), "partition_by": ["sentiment_label"]},
        "tasks": [
            {"name": "sentiment", "kind": "sentiment", "model": models["sentiment"]},
            {"name": "entities", "kind": "ner", "model": models["ner"], "aggregation": "simple"},
        ],
        "runtime": {"dtype": "auto", "max_length": max_length, "stride": stride},
    }


def run_bertpipe(
    name: str, config: dict, overrides: list[str], work: Path, timeout: float
) -> tuple[ChildRun, dict, dict]:
    """``bertpipe run`` as a child; returns the run, its run summary and Ray Data's stats (the labelling
    execution's, see ``cli_stats``; empty if there were none)."""
    path, stats = work / f"{name}-job.yaml", work / f"{name}-raydata-stats.json"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    stats.unlink(missing_ok=True)
    out = Path(config["output"]["path"])
    # a new output every time (output.mode: error): overwriting one with a run history fails (README)
    shutil.rmtree(out, ignore_errors=True)
    overrides = [a for o in overrides for a in ("--set", o)]
    child = run_child(
        [sys.executable, "-m", "benchmarks.cli_stats", "run", str(path), *overrides],
        work / f"{name}.log",
        timeout,
        env={**child_env(), "BENCH_STATS_FILE": str(stats)},
        watch=out,
    )
    if child.returncode != 0 or not (out / "_SUCCESS").exists():
        raise RuntimeError(f"bertpipe run {name} failed (exit {child.returncode}); see {child.log}")
    run_id = (out / "_SUCCESS").read_text().split()[-1]  # the last committed run
    summary = json.loads((out / "_runs" / f"{run_id}.json").read_text())
    executions = json.loads(stats.read_text()) if stats.exists() else []
    # The labelling execution is the longest; the count checks that follow it are short aggregations.
    labelling = max(executions, key=lambda e: e["dataset_s"] or 0, default=None)
    return child, summary, labelling or {"dataset_s": None, "operators": []}


def read_predictions(out: Path, ids: set[str]) -> dict[str, list]:
    import pyarrow.dataset as pads

    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table(
        columns=["id", "sentiment_label", "entities"]
    )
    return {
        r["id"]: [r["sentiment_label"], _entities(r["entities"])] for r in table.to_pylist() if r["id"] in ids
    }


def main(argv: list[str]) -> int:
    way, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = {"a": run_a, "a2": run_a2, "b": run_b, "floor": run_floor}[way](spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
