"""Scale benchmark: what the driver and the commit cost as the corpus grows, with a model so small that it
is not the bottleneck (2 layers, hidden 64, MiniLM's vocabulary; sentiment + NER).

    python benchmarks/scale.py                          # 200k and 2M rows, 100,000 files, S3 commit
    python benchmarks/scale.py --rows 20000,200000 --files 10000 --s3-files 2000   # a quicker pass

For each corpus size, ``bertpipe run`` runs in a subprocess (its own local Ray); the driver's peak RSS
is sampled every 50 ms (the driver process only: Ray's workers are separate processes), and the run
summary's timings split pre-flight, write-and-count and commit, and give the start-up (seconds to the
first labelled rows) and the rate once rows flow. Driver bytes per row is the growth of
the peak RSS between the two sizes divided by the rows added. The many-files case runs ``bertpipe run``
over that many one-row Parquet files and reports the driver's CPU seconds per file. The S3 case starts
a moto server on 127.0.0.1, writes N files under their final names and counts the requests of a
manifest commit (``publish_in_place``) and of a rename commit (``publish``) of the same files.

Writes ``benchmarks/results/scale.json``; corpora and models are reused under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.corpus import sentence_pool  # noqa: E402
from benchmarks.models import build_models  # noqa: E402

CORES = os.cpu_count() or 1
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
MAX_WORDS = 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="200000,2000000", help="two corpus sizes, comma-separated")
    parser.add_argument("--files", type=int, default=100_000, help="one-row files for the many-files run")
    parser.add_argument("--s3-files", type=int, default=10_000, help="files committed on the S3 server")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "work-scale")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: rows,files,s3")
    return parser.parse_args(argv)


def short_texts(n: int, seed: int = 0) -> list[str]:
    """Rows of one or two demo sentences, cut to at most 30 words."""
    pool = sentence_pool(2000, seed)
    rng = np.random.default_rng(seed)
    first, second = rng.integers(0, len(pool), n), rng.integers(0, len(pool), n)
    two = rng.random(n) < 0.4
    return [
        " ".join(f"{pool[a]} {pool[b]}".split()[:MAX_WORDS]) if t else pool[a]
        for a, b, t in zip(first, second, two, strict=True)
    ]


def write_corpus(folder: Path, rows: int, per_file: int) -> None:
    if (folder / "DONE").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    texts = short_texts(rows)
    for number, start in enumerate(range(0, rows, per_file)):
        part = texts[start : start + per_file]
        ids = [f"r{i}" for i in range(start, start + len(part))]
        pq.write_table(pa.table({"id": ids, "text": part}), folder / f"part-{number:06d}.parquet")
    (folder / "DONE").write_text(f"{rows}\n")


def job(work: Path, name: str, source: Path, models: dict[str, Path]) -> Path:
    config = {
        "input": {"paths": [str(source / "*.parquet")]},
        "output": {"path": str(work / "out" / name), "mode": "overwrite"},
        "tasks": [
            {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
            {"name": "entities", "kind": "ner", "model": str(models["ner"])},
        ],
        # A model this small runs faster as one single-threaded actor per core than as one actor using
        # every core (its operations are too small to split across threads); a MiniLM-sized model is the
        # other way round (benchmarks/README.md, "Pool shape"). Half a CPU each leaves the rest to the
        # reader, tokeniser and writer.
        "runtime": {"max_length": 64, "actors": CORES, "threads_per_actor": 1, "cpus_per_actor": 0.5},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_job(config: Path) -> dict:
    """``bertpipe run`` with the driver's peak RSS and CPU time; returns the run summary plus those."""
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bertpipe", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    driver = psutil.Process(proc.pid)
    peak, cpu = 0, 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, cpu
        while not done.is_set():
            try:
                peak = max(peak, driver.memory_info().rss)
                times = driver.cpu_times()
                cpu = times.user + times.system
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"bertpipe run {config} failed:\n{err[-3000:]}")
    out_dir = Path(yaml.safe_load(config.read_text())["output"]["path"])
    run_id = (out_dir / "_SUCCESS").read_text().split()[-1]
    summary = json.loads((out_dir / "_runs" / f"{run_id}.json").read_text())
    committed = re.findall(r"committed in ([0-9.]+) s", err)
    timings = {**summary.get("timings", {}), "commit_s": float(committed[-1]) if committed else None}
    return {
        "rows": summary["rows_out"],
        "files": summary["files_in"],
        "wall_s": round(time.time() - started, 1),
        "rows_per_s": round(summary["rows_out"] / (time.time() - started), 1),
        "timings": timings,
        "driver_peak_rss_mib": round(peak / 2**20, 1),
        "driver_cpu_s": round(cpu, 1),
    }


def rows_part(args: argparse.Namespace, models: dict[str, Path]) -> dict:
    sizes = [int(x) for x in args.rows.split(",")]
    results = {}
    for rows in sizes:
        source = args.work / f"rows-{rows}"
        write_corpus(source, rows, per_file=max(1000, rows // 40))
        print(f"rows {rows}: running", flush=True)
        results[rows] = run_job(job(args.work, f"rows-{rows}", source, models))
        print(json.dumps(results[rows]), flush=True)
    small, large = sizes[0], sizes[-1]
    growth = (results[large]["driver_peak_rss_mib"] - results[small]["driver_peak_rss_mib"]) * 2**20
    return {
        "runs": results,
        "driver_bytes_per_row": round(growth / max(large - small, 1), 1),
        "commit_s": {rows: r["timings"].get("commit_s") for rows, r in results.items()},
    }


def files_part(args: argparse.Namespace, models: dict[str, Path]) -> dict:
    source = args.work / f"files-{args.files}"
    write_corpus(source, args.files, per_file=1)
    print(f"{args.files} files: running", flush=True)
    result = run_job(job(args.work, f"files-{args.files}", source, models))
    result["driver_ms_per_file"] = round(1000 * result["driver_cpu_s"] / args.files, 2)
    return result


def s3_part(args: argparse.Namespace) -> dict:
    """Requests of a manifest commit and of a rename commit of the same N files on a moto server."""
    from bertpipe.io.writer import OutputLocation, data_files, publish, publish_in_place, run_prefix

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = args.work / "moto.log"
    with log.open("wb") as fh:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=fh
        )
    try:
        time.sleep(3)
        options = {
            "key": "k",
            "secret": "s",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
        }

        def requests() -> int:
            return sum(' HTTP/1.1" ' in line for line in log.read_text(errors="replace").splitlines())

        import boto3
        import s3fs

        boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="k",
            aws_secret_access_key="s",
            region_name="us-east-1",
        ).create_bucket(Bucket="scale")
        fs = s3fs.S3FileSystem(**options)
        body = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": ["x"]}), body)
        data = body.getvalue().to_pybytes()
        result = {}
        for kind in ("manifest", "rename"):
            location = OutputLocation.from_url(f"s3://scale/{kind}/out", options)
            run = "20261201T000000Z-00000001"
            folder = location.path if kind == "manifest" else location.staging
            fs.pipe({f"{folder}/{run_prefix(run)}{i:06d}.parquet": data for i in range(args.s3_files)})
            listing = data_files(fs, location.path) if kind == "manifest" else []  # made by the count step
            before, started = requests(), time.time()
            if kind == "manifest":
                publish_in_place(location, "error", run, {}, listing)
            else:
                publish(location, "error", run, {})
            result[kind] = {"requests": requests() - before, "seconds": round(time.time() - started, 2)}
            print(kind, result[kind], flush=True)
        return {"files": args.s3_files, **result}
    finally:
        server.terminate()
        server.wait(10)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    models = build_models(args.work / "tiny-models", seed=0, encoder_shape=TINY)
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    if "rows" not in skip:
        report["rows"] = rows_part(args, models)
    if "files" not in skip:
        report["many_files"] = files_part(args, models)
    if "s3" not in skip:
        report["s3_commit"] = s3_part(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
