"""The demo command in its reduced CI form: it trains, labels the sample corpus, and its output passes
the same checks as any run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.dataset as pads
import pytest

from bertpipe.demo import datagen

pytestmark = pytest.mark.slow


def test_quick_demo_output_is_complete(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bertpipe", "demo", "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo" / "out"
    assert (out / "_SUCCESS").exists()
    table = pads.dataset(str(out), partitioning="hive").to_table()
    expected_ids = sorted(r["id"] for r in datagen.make_sample_corpus(120, seed=0))
    assert sorted(table.column("id").to_pylist()) == expected_ids
    for column in (
        "topic_label",
        "topic_score",
        "topic_top",
        "sentiment_label",
        "sentiment_score",
        "entities",
        "embedding",
        "_error",
        "_row_key",
        "source",
    ):
        assert column in table.column_names
    assert {p.name.split("=")[0] for p in out.iterdir() if p.is_dir() and "=" in p.name} == {
        "sentiment_label"
    }
    assert set(table.column("sentiment_label").to_pylist()) <= {"positive", "negative", "neutral"}
    assert set(table.column("topic_label").to_pylist()) <= set(datagen.TOPIC_LABELS)
    summary = json.loads(next((out / "_runs").glob("*.json")).read_text())
    assert summary["rows_in"] == summary["rows_out"] == 120
    for model in ("sentiment", "topic", "ner"):
        assert (tmp_path / "models" / model / "model.safetensors").exists()
    sentiment_config = json.loads((tmp_path / "models" / "sentiment" / "config.json").read_text())
    assert set(sentiment_config["id2label"].values()) == set(datagen.DEMO_SENTIMENT_LABELS)
    # Word-level aggregation: an entity never starts or ends inside a run of letters and digits
    # (punctuation is a word of its own to the tokenizer).
    for text, entities in zip(
        table.column("text").to_pylist(), table.column("entities").to_pylist(), strict=True
    ):
        for e in entities or []:
            surface = text[e["start"] : e["end"]]
            before, after = text[e["start"] - 1 : e["start"]], text[e["end"] : e["end"] + 1]
            splits = (before.isalnum() and surface[0].isalnum()) or (
                after.isalnum() and surface[-1].isalnum()
            )
            assert not splits, (text[e["start"] - 5 : e["end"] + 5], e)
    assert "examples" in proc.stdout
    assert "nearest to:" in proc.stdout and "cosine" in proc.stdout
    noises = ("Failed to query Ray Train Controller", "LOAD REPORT", "Failed to send resource request")
    for noise in (*noises, "Reporting training result"):
        assert noise not in proc.stdout + proc.stderr
