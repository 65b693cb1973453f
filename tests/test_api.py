"""``bertpipe.label`` and ``bertpipe.run`` against ``bertpipe run`` and the HF pipelines (the oracle)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from conftest import STRIDE, WINDOW, make_texts
from transformers import pipeline as hf_pipeline

import bertpipe
from bertpipe.progress import Progress
from bertpipe.tasks.sentiment import normalise_sentiment_label

RUNTIME = {"dtype": "float32", "max_length": WINDOW, "stride": STRIDE, "rows_per_block": 16}
BAD = [None, "", "   ", 42, "bad\x00text", 3.5]  # each a row run writes with an _error reason
TASK_COLUMNS = [
    "_error",
    "topic_label",
    "topic_score",
    "topic_top",
    "sentiment_label",
    "sentiment_score",
    "entities",
]


def tasks(models) -> list[dict]:
    return [
        {"name": "topic", "kind": "classification", "model": str(models["topic"]), "top_k": 2},
        {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
        {"name": "entities", "kind": "ner", "model": str(models["ner"]), "aggregation": "simple"},
    ]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Mixed lengths (windows past max_length) and bad rows of every kind a DataFrame can hold."""
    texts = make_texts(40, seed=31, max_words=300) + BAD
    return [{"id": f"r-{i:03d}", "text": t, "n": i} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def frame(rows) -> pd.DataFrame:
    df = pd.DataFrame(
        {"id": [r["id"] for r in rows], "text": pd.Series([r["text"] for r in rows], dtype=object)}
    )
    df["n"] = [r["n"] for r in rows]
    df.index = pd.Index([f"ix{i}" for i in reversed(range(len(df)))])  # not 0..n: the index must survive
    return df


@pytest.fixture(scope="module")
def ran(ray_session, rows, models, tmp_path_factory):
    """``bertpipe.run`` over the same rows as a JSONL file (mixed types, as a DataFrame holds them):
    its summary, its progress reports and the rows it wrote, by id."""
    root = tmp_path_factory.mktemp("api")
    (root / "in").mkdir()
    (root / "in" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reports = []
    summary = bertpipe.run(
        {
            "input": {"paths": [str(root / "in")]},
            "output": {"path": str(root / "out")},
            "tasks": tasks(models),
            "runtime": RUNTIME,
        },
        on_progress=lambda p: reports.append((p.rows, p.errors, p.total, p.task_counts())),
    )
    assert isinstance(summary, bertpipe.RunSummary)
    assert summary.rows_in == summary.rows_out == len(rows)
    assert summary.rows_error == len(BAD) and summary.rows_ok == len(rows) - len(BAD)
    table = pads.dataset(str(root / "out"), partitioning="hive").to_table()
    return summary, reports, {r["id"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def by_run(ran) -> dict[str, dict]:
    return ran[2]


def test_run_reports_progress_and_counts_what_it_wrote(ran, rows):
    summary, reports, written = ran
    assert reports and reports[-1][:3] == (len(rows), len(BAD), len(rows))  # the last report: all done
    assert all(a[0] <= b[0] for a, b in zip(reports, reports[1:], strict=False))
    labels = Counter(r["sentiment_label"] for r in written.values() if r["sentiment_label"])
    entities = Counter(e["entity_group"] for r in written.values() for e in r["entities"] or [])
    assert summary.task_counts["sentiment"] == dict(labels)
    assert summary.task_counts["entities"] == dict(entities)
    assert reports[-1][3] == summary.task_counts


def test_run_times_start_up_apart_from_the_rate_once_rows_flow(ran):
    timings = ran[0].timings
    assert 0 < timings["preflight_s"] < timings["first_rows_s"] < ran[0].seconds
    assert timings["rows_per_s_after_first"] > 0


def test_progress_rate_after_the_first_rows_leaves_start_up_out(monkeypatch):
    clock = iter([130.0, 131.0, 140.0, 140.0, 140.0, 140.0])
    monkeypatch.setattr("bertpipe.progress.time.time", lambda: next(clock))
    progress = Progress(total=1_000, started=100.0)
    batch = {"rows": 100, "errors": 0, "tasks": {}}
    progress.add(batch)  # 130: first rows after 30 s of start-up
    progress.add(batch)  # 131
    progress.add(batch)  # 140
    assert progress.rows_per_s_after_first == pytest.approx(200 / 10)
    assert progress.rows_per_s == pytest.approx(300 / 40)  # now 140
    assert progress.eta_s == pytest.approx(700 / 20)  # at the rate once rows flow


def _plain(value):
    """Arrow/pandas values as plain Python, NaN as None, for comparing rows."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def assert_same_as_run(got: dict, want: dict) -> None:
    for column in TASK_COLUMNS:
        a, b = _plain(got[column]), _plain(want[column])
        if column.endswith("_score") and a is not None and b is not None:
            assert a == pytest.approx(b, abs=1e-5), column
        elif column in ("topic_top", "entities") and a and b:
            assert [{k: v for k, v in e.items() if k != "score"} for e in a] == [
                {k: v for k, v in e.items() if k != "score"} for e in b
            ], column
            assert [e["score"] for e in a] == pytest.approx([e["score"] for e in b], abs=1e-5), column
        else:
            assert a == b, (column, got["id"])


def test_label_a_dataframe_equals_run_and_keeps_index_order_and_bad_texts(ray_session, frame, by_run, models):
    out = bertpipe.label(frame, tasks(models), id_column="id", runtime=RUNTIME)
    assert isinstance(out, pd.DataFrame)
    assert list(out.index) == list(frame.index) and list(out["id"]) == list(frame["id"])
    assert list(out.columns) == ["id", "text", "n", *TASK_COLUMNS]
    assert out["text"].tolist()[-len(BAD) :] == BAD  # bad texts come back as given, not nulled
    assert "_row_key" not in out.columns
    for record in out.to_dict("records"):
        assert_same_as_run(record, by_run[record["id"]])
    reasons = out["_error"].tolist()[-len(BAD) :]
    assert reasons == [
        "text is null",
        "text is empty",
        "text is empty",
        "text is not a string (int)",
        "text contains control characters",
        "text is not a string (float)",
    ]


def test_label_an_arrow_table_equals_run(ray_session, rows, by_run, models):
    good = [r for r in rows if isinstance(r["text"], str) or r["text"] is None]
    table = pa.Table.from_pylist(good)
    out = bertpipe.label(table, tasks(models), runtime=RUNTIME)
    assert isinstance(out, pa.Table)
    assert out.column_names == ["id", "text", "n", *TASK_COLUMNS]
    assert out.column("id").to_pylist() == table.column("id").to_pylist()
    assert out.column("text").to_pylist() == table.column("text").to_pylist()
    for record in out.to_pylist():
        assert_same_as_run(record, by_run[record["id"]])


def test_label_a_ray_dataset_is_lazy_and_equals_run(ray_session, rows, by_run, models, tmp_path):
    import ray

    good = [r for r in rows if isinstance(r["text"], str) or r["text"] is None]
    read = tmp_path / "read"

    def mark_when_read(batch):  # a step of the user's own pipeline (defined here: pickled by value)
        read.touch()
        return batch

    ds = ray.data.from_arrow(pa.Table.from_pylist(good)).map_batches(mark_when_read, num_cpus=0.25)
    out = bertpipe.label(ds, tasks(models), runtime=RUNTIME)
    assert isinstance(out, ray.data.Dataset)
    assert not read.exists()  # nothing ran: it composes with the user's pipeline
    out.write_parquet(str(tmp_path / "mine"))  # the user's own writer
    assert read.exists()
    written = pads.dataset(str(tmp_path / "mine")).to_table()
    assert sorted(written.column_names) == sorted(["id", "text", "n", *TASK_COLUMNS])
    assert sorted(written.column("id").to_pylist()) == sorted(r["id"] for r in good)
    for record in written.to_pylist():
        assert_same_as_run(record, by_run[record["id"]])


def test_label_equals_the_hf_pipelines(ray_session, frame, models):
    """The oracle directly: labels, scores and entity spans of the HF pipelines on the same texts."""
    ok = frame[frame["text"].map(lambda t: isinstance(t, str) and bool(t.strip()) and "\x00" not in t)]
    out = bertpipe.label(ok, tasks(models), runtime=RUNTIME)
    texts = ok["text"].tolist()
    sentiment = hf_pipeline("text-classification", model=str(models["sentiment"]))
    ner = hf_pipeline(
        "token-classification", model=str(models["ner"]), aggregation_strategy="simple", stride=STRIDE
    )
    for got, exp in zip(
        out.to_dict("records"), sentiment(texts, truncation=True, max_length=WINDOW), strict=True
    ):
        assert got["sentiment_label"] == normalise_sentiment_label(exp["label"])
        assert got["sentiment_score"] == pytest.approx(exp["score"], abs=1e-4)
    for got, exp in zip(out["entities"].tolist(), ner(texts), strict=True):
        assert [(e["entity_group"], e["start"], e["end"]) for e in got] == [
            (e["entity_group"], e["start"], e["end"]) for e in exp
        ]


def test_label_reuses_the_users_ray_and_leaves_it_running(ray_session, models):
    import ray

    node = ray.get_runtime_context().get_node_id()
    out = bertpipe.label(
        pd.DataFrame({"text": ["a short text", "another one"]}), tasks(models)[1:2], runtime=RUNTIME
    )
    assert out["sentiment_label"].notna().all()
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node


def test_label_errors_name_what_is_wrong(models):
    df = pd.DataFrame({"body": ["x"]})
    with pytest.raises(bertpipe.ConfigError, match="text_column 'text' is not a column"):
        bertpipe.label(df, tasks(models)[1:2])
    with pytest.raises(bertpipe.ConfigError, match=r"tasks\.0\.kind"):
        bertpipe.label(df, [{"name": "x", "kind": "summarise", "model": "m"}], text_column="body")
    with pytest.raises(bertpipe.ConfigError, match=r"runtime\.dtype"):
        bertpipe.label(df, tasks(models)[1:2], text_column="body", runtime={"dtype": "float8"})


def test_run_takes_a_path_and_overrides(ray_session, models, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"id": "1", "text": "fine"}) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(
        json.dumps(
            {
                "input": {"paths": [str(tmp_path / "in")]},
                "output": {"path": str(tmp_path / "unused")},
                "tasks": tasks(models)[1:2],
                "runtime": RUNTIME,
            }
        )
    )
    summary = bertpipe.run(config, [f"output.path={tmp_path / 'out'}"])
    assert summary.rows_ok == 1 and (tmp_path / "out" / "_SUCCESS").exists()
    again = bertpipe.run(
        bertpipe.load_config(config, [f"output.path={tmp_path / 'out'}", "output.mode=resume"])
    )
    assert again.nothing_to_do
    with pytest.raises(bertpipe.ConfigError, match="already has data"):
        bertpipe.run(config, [f"output.path={tmp_path / 'out'}"])


def test_the_readme_dataframe_example_runs(ray_session, models, capsys):
    """The README's first Python example, with the tiny sentiment model in place of the hub id."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in readme.split("```python\n")[1:] if "bertpipe.label(df" in b).split("```")[0]
    hub_id = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
    assert hub_id in block
    exec(block.replace(hub_id, str(models["sentiment"])), {})
    printed = capsys.readouterr().out
    assert "sentiment_label" in printed and "text is null" in printed
