"""The pipeline against the reference: ``transformers.pipeline`` on the same models and texts."""

from __future__ import annotations

import duckdb
import pyarrow.dataset as pads
import pytest
from conftest import STRIDE, WINDOW, base_config
from transformers import pipeline as hf_pipeline

from bertpipe.config import JobConfig
from bertpipe.runner import execute
from bertpipe.tasks.sentiment import _auto_label

STRATEGIES = ["none", "simple", "first", "average", "max"]


@pytest.fixture(scope="module")
def run(ray_session, corpus, models, tmp_path_factory):
    input_dir, rows = corpus
    out = tmp_path_factory.mktemp("oracle") / "out"
    cfg = base_config(input_dir, out, models)
    cfg["tasks"] = [
        {"name": "topic", "kind": "classification", "model": str(models["topic"]), "top_k": 3},
        {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
    ] + [
        {"name": f"ner_{s}", "kind": "ner", "model": str(models["ner"]), "aggregation": s} for s in STRATEGIES
    ]
    cfg["output"]["partition_by"] = ["sentiment_label", "source"]
    summary = execute(JobConfig.model_validate(cfg))
    table = pads.dataset(str(out), partitioning="hive").to_table()
    by_id = {r["id"]: r for r in table.to_pylist()}
    return summary, by_id, rows, out


def test_every_id_exactly_once(run):
    summary, by_id, rows, out = run
    ids = duckdb.sql(f"select id from read_parquet('{out}/**/*.parquet', hive_partitioning=true)").fetchall()
    assert sorted(i for (i,) in ids) == sorted(r["id"] for r in rows)
    assert summary["rows_in"] == summary["rows_out"] == len(rows)
    assert summary["rows_error"] == 0


def test_partition_folders_and_columns(run):
    _, by_id, rows, out = run
    folders = {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert folders and all(f.startswith("sentiment_label=") for f in folders)
    sub = {p.name for p in out.glob("sentiment_label=*/*") if p.is_dir()}
    assert sub == {"source=news", "source=reviews", "source=forum"}
    read = duckdb.sql(
        "select sentiment_label, source, count(*) "
        f"from read_parquet('{out}/**/*.parquet', hive_partitioning=true) group by all"
    ).fetchall()
    assert sum(n for *_, n in read) == len(rows)
    assert all(label in {"positive", "negative"} for label, _, _ in read)
    assert all(by_id[r["id"]]["source"] == r["source"] for r in rows)


def test_classification_equals_hf(run, models):
    _, by_id, rows, _ = run
    texts = [r["text"] for r in rows]
    clf = hf_pipeline("text-classification", model=str(models["topic"]), top_k=3)
    expected = clf(texts, truncation=True, max_length=WINDOW, batch_size=16)
    assert min(e[0]["score"] - e[1]["score"] for e in expected) > 1e-3, "near-tie in the fixture model"
    for row, exp in zip(rows, expected, strict=True):
        got = by_id[row["id"]]
        assert got["topic_label"] == exp[0]["label"]
        assert got["topic_score"] == pytest.approx(exp[0]["score"], abs=1e-4)
        assert [t["label"] for t in got["topic_top"]] == [e["label"] for e in exp]
        assert [t["score"] for t in got["topic_top"]] == pytest.approx([e["score"] for e in exp], abs=1e-4)


def test_sentiment_equals_hf_with_normalised_labels(run, models):
    _, by_id, rows, _ = run
    clf = hf_pipeline("text-classification", model=str(models["sentiment"]))
    expected = clf([r["text"] for r in rows], truncation=True, max_length=WINDOW, batch_size=16)
    assert min(abs(e["score"] - 0.5) for e in expected) > 5e-4, "near-tie in the fixture model"
    labels = set()
    for row, exp in zip(rows, expected, strict=True):
        got = by_id[row["id"]]
        assert got["sentiment_label"] == _auto_label(exp["label"])
        assert got["sentiment_score"] == pytest.approx(exp["score"], abs=1e-4)
        labels.add(got["sentiment_label"])
    assert labels == {"positive", "negative"}, "the fixture model should predict both classes"


def _spans(entities, key="entity_group"):
    return [(e[key], e["start"], e["end"]) for e in entities]


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "none"])
def test_ner_equals_hf_with_stride(run, models, strategy):
    _, by_id, rows, _ = run
    ner = hf_pipeline(
        "token-classification", model=str(models["ner"]), aggregation_strategy=strategy, stride=STRIDE
    )
    expected = ner([r["text"] for r in rows])
    total = 0
    for row, exp in zip(rows, expected, strict=True):
        got = by_id[row["id"]][f"ner_{strategy}"]
        assert _spans(got) == _spans(exp), row["id"]
        assert [e["score"] for e in got] == pytest.approx([e["score"] for e in exp], abs=1e-4)
        assert [e["word"] for e in got] == [e["word"] for e in exp]
        total += len(got)
    assert total > 100


def test_ner_without_aggregation_equals_hf(run, models):
    """HF refuses ``stride`` without aggregation, so it sees one window: compare up to where the second
    window starts (all of it for short texts)."""
    _, by_id, rows, _ = run
    ner = hf_pipeline("token-classification", model=str(models["ner"]), aggregation_strategy="none")
    tok = ner.tokenizer
    expected = ner([r["text"] for r in rows])
    for row, exp in zip(rows, expected, strict=True):
        enc = tok(
            row["text"],
            truncation=True,
            max_length=WINDOW,
            stride=STRIDE,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        limit = len(row["text"]) + 1
        if len(enc["input_ids"]) > 1:
            limit = min(s for s, e in enc["offset_mapping"][1] if e > s)
        got = [e for e in by_id[row["id"]]["ner_none"] if e["start"] < limit]
        assert _spans(got) == _spans([e for e in exp if e["start"] < limit], key="entity"), row["id"]
        assert [e["score"] for e in got] == pytest.approx(
            [e["score"] for e in exp if e["start"] < limit], abs=1e-4
        )


def test_long_texts_have_entities_past_the_first_window(run, models):
    """Windows cover the whole text: entities are found beyond what one truncated window sees."""
    _, by_id, rows, _ = run
    tok = hf_pipeline("token-classification", model=str(models["ner"])).tokenizer
    beyond = 0
    for row in rows:
        enc = tok(row["text"], truncation=True, max_length=WINDOW, return_offsets_mapping=True)
        first_window_end = max(end for _, end in enc["offset_mapping"])
        beyond += sum(e["start"] >= first_window_end for e in by_id[row["id"]]["ner_simple"])
    assert beyond > 50
