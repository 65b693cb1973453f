"""The benchmark end to end at a tiny size: every way runs and the figures hang together.

A tiny random encoder with the benchmark's calibrated heads (both sentiment labels and plenty of
entities occur) and C forced to fp32: then bertpipe, the HF pipelines (A) and Ray Data around them (B)
must give the same labels and entities, so a benchmark that configured the ways differently (windows,
stride, truncation) fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.models import build_models  # noqa: E402

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.mark.slow
def test_benchmark_tiny(tmp_path):
    models = tmp_path / "models"
    build_models(models, seed=1, encoder_shape=TINY)
    out = tmp_path / "latest.json"
    command = [sys.executable, "benchmarks/run.py", "--rows", "40", "--sample", "12", "--gemm-n", "256"]
    command += ["--models", str(models), "--work", str(tmp_path / "work"), "--out", str(out)]
    command += ["--set", "runtime.dtype=float32", "--timeout", "240", "--startup-rows", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())

    ways = report["ways"]
    assert [ways[w]["rows"] for w in ("A", "A2", "B", "C")] == [12, 12, 12, 40]
    assert ways["C"]["rows_error"] == 0
    for f in ways.values():
        assert f["rows_per_s"] > 0 and f["tokens"] > f["rows"] and f["padding_waste"] >= 0
        assert f["gemm_share"] > 0 and f["memory"]["peak_pss_mib"] > 0
        assert f["model_gemm_share_fp32"] > 0 and f["model_gemm_share_bf16"] > 0
    assert ways["A"]["tokens"] == ways["B"]["tokens"]
    assert ways["C"]["memory"]["processes"] > 3, "Ray's processes belong to C's tree"
    stages = {part for op in ways["C"]["time"]["operators"] for part in op["stage"].split("+")}
    assert {"read", "tokenise", "model", "postprocess", "write"} <= stages

    comparison = report["comparison"]
    for way in ("B", "C"):
        assert comparison[f"{way}_vs_A"]["sentiment_agreement"] == 1.0
        assert comparison[f"{way}_vs_A"]["ner"]["f1"] == 1.0
    assert comparison["C_vs_A"]["ner"]["entities_ref"] > 0
    assert 0 < comparison["sample_positive_share_A"] < 1
    assert report["goals"]["C/A rows/s"]["value"] == pytest.approx(comparison["C/A rows_per_s"])
    assert comparison["C/A2 rows_per_s"] > 0
    startup = report["startup"]
    assert startup["rows"] == 10 and 0 < startup["first_file_s"] < startup["end_to_end_s"]
    assert 0 < startup["floor_import_s"] < startup["floor_s"]
    assert report["gemm"]["fp32_model_flop_per_s"] > 0 and "avx2" in report["machine"]["isa"]
