"""``bertpipe inspect`` and ``bertpipe report`` on a real output: the numbers equal DuckDB group-bys and
Python counts written here, tables read like Parquet, and the HTML page draws every plot in headless
Chromium, offline, without a console error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import base_config, make_texts, write_shards

from bertpipe.config import JobConfig
from bertpipe.report.inspect import RUN_FIELDS, TOP_ENTITIES, inspect_output
from bertpipe.runner import execute

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
BAD_TEXTS = {3: None, 11: "", 19: "  \n ", 27: None, 30: "a bell \u0007 rings", 38: ""}
REASONS = {"text is null": 2, "text is empty": 3, "text contains control characters": 1}
KINDS = {"topic": "classification", "sentiment": "sentiment", "entities": "ner"}


def bertpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bertpipe", *args], capture_output=True, text=True, timeout=300, env=ENV
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 rows in Parquet and JSONL shards, six of them bad (three reasons)."""
    folder = tmp_path_factory.mktemp("inspect_corpus")
    rows = [{"id": f"doc-{i:02d}", "text": t} for i, t in enumerate(make_texts(40, seed=21, max_words=150))]
    for i, text in BAD_TEXTS.items():
        rows[i]["text"] = text
    write_shards(folder, rows, n_parquet=2, n_jsonl=1)
    return folder


def run_job(corpus: Path, models, out: Path, **output) -> Path:
    cfg = base_config(corpus, out, models)
    cfg["output"].update(output)
    execute(JobConfig.model_validate(cfg))
    return out


@pytest.fixture(scope="module")
def output(ray_session, corpus, models, tmp_path_factory) -> Path:
    """Partitioned by a label, so that hive partitions (error rows' null label included) are read back."""
    return run_job(
        corpus, models, tmp_path_factory.mktemp("inspect") / "out", partition_by=["sentiment_label"]
    )


@pytest.fixture(scope="module")
def report(output) -> dict:
    proc = bertpipe("inspect", str(output), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def query(output: Path, sql: str) -> list[tuple]:
    src = f"read_parquet('{output}/**/*.parquet', hive_partitioning=true)"
    return duckdb.connect().execute(sql.format(src=src)).fetchall()


def test_inspect_json_equals_duckdb(output, report):
    (summary,) = [json.loads(p.read_text()) for p in (output / "_runs").glob("*.json")]
    assert report["rows"] == summary["rows_out"] == 40
    assert report["rows_ok"] == summary["rows_ok"] == 40 - sum(REASONS.values())
    assert report["rows_error"] == summary["rows_error"]
    errors = dict(query(output, "select _error, count(*) from {src} where _error is not null group by 1"))
    assert report["errors_by_reason"] == errors == REASONS
    assert list(report["errors_by_reason"].values()) == sorted(REASONS.values(), reverse=True)
    assert {name: task["kind"] for name, task in report["tasks"].items()} == KINDS
    for task in ("topic", "sentiment"):
        labels = dict(
            query(
                output,
                f"select {task}_label, count(*) from {{src}} where {task}_label is not null group by 1",
            )
        )
        assert report["tasks"][task]["labels"] == labels
        assert list(report["tasks"][task]["labels"].values()) == sorted(labels.values(), reverse=True)
        scores = [
            s for (s,) in query(output, f"select {task}_score from {{src}} where {task}_score is not null")
        ]
        quantiles = report["tasks"][task]["scores"]
        assert (quantiles["min"], quantiles["max"]) == (min(scores), max(scores))
        for key, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
            assert quantiles[key] == pytest.approx(float(np.quantile(scores, q)), rel=1e-6)
        assert sum(report["tasks"][task]["score_histogram"]["counts"]) == len(scores)
    entities = dict(
        query(
            output, "select e.entity_group, count(*) from (select unnest(entities) e from {src}) group by 1"
        )
    )
    assert report["tasks"]["entities"]["entities"] == entities
    assert set(entities) == {"PER", "ORG", "LOC"}
    assert report["runs"] == [{k: summary[k] for k in RUN_FIELDS}]
    assert report["complete"] is True and report["format"] == "parquet"


def test_top_entities_are_the_texts_as_written(output, report):
    """Counted here in Python from the spans' character offsets into each row's text."""
    counts: dict[str, Counter] = {}
    for text, spans in query(output, "select text, entities from {src} where _error is null"):
        for e in spans:
            counts.setdefault(e["entity_group"], Counter())[text[e["start"] : e["end"]]] += 1
    task = report["tasks"]["entities"]
    assert task["entity_text"] == "text"
    for group, counter in counts.items():
        expected = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ENTITIES]
        assert [(e["text"], e["count"]) for e in task["top_entities"][group]] == expected


def test_without_run_summaries_tasks_come_from_column_shapes(output, report, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(output, bare, ignore=shutil.ignore_patterns("_runs"))
    found = inspect_output(str(bare))
    assert {name: task["kind"] for name, task in found["tasks"].items()} == {
        "topic": "classification",
        "sentiment": "classification",
        "entities": "ner",
    }
    assert found["runs"] == []
    assert found["tasks"]["entities"]["entity_text"] == "word"
    assert found["tasks"]["entities"]["entities"] == report["tasks"]["entities"]["entities"]
    for task in ("topic", "sentiment"):
        assert found["tasks"][task]["labels"] == report["tasks"][task]["labels"]
        assert found["tasks"][task]["scores"] == report["tasks"][task]["scores"]


def test_inspect_tables(output, report):
    proc = bertpipe("inspect", str(output))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for needle in (
        "rows_error",
        "text contains control characters",
        "topic (classification)",
        "entities (ner)",
    ):
        assert needle in proc.stdout
    assert next(iter(report["runs"]))["run_id"] in proc.stdout


@pytest.mark.parametrize("what", ["missing", "empty", "input"])
def test_not_an_output_is_one_line_and_exit_2(what, corpus, tmp_path):
    path = {"missing": tmp_path / "nowhere", "empty": tmp_path, "input": corpus}[what]
    for command in (
        ["inspect", str(path), "--json"],
        ["report", str(path), "--html", str(tmp_path / "r.html")],
    ):
        proc = bertpipe(*command)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stdout == ""
        lines = [line for line in proc.stderr.splitlines() if line.startswith("bertpipe: error:")]
        assert len(lines) == 1 and str(path) in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "r.html").exists()


def test_neither_ray_nor_torch_is_imported(output, tmp_path):
    code = (
        "import sys; from bertpipe import cli; from bertpipe.report.html import render; "
        "from bertpipe.report.inspect import inspect_output; render(inspect_output(sys.argv[1])); "
        "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(output)], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_table_outputs_read_like_parquet(fmt, ray_session, corpus, models, report, tmp_path):
    """The same rows written as a Delta or Iceberg table (default layout) give the same numbers; tasks
    come from column shapes, since table outputs keep no run summaries."""
    out = run_job(corpus, models, tmp_path / "out", format=fmt)
    args = ["--table", "bertpipe.enriched"] if fmt == "iceberg" else []
    proc = bertpipe("inspect", str(out), "--json", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)
    assert found["format"] == fmt
    for key in ("rows", "rows_ok", "rows_error", "errors_by_reason"):
        assert found[key] == report[key]
    for task in ("topic", "sentiment"):
        assert found["tasks"][task]["labels"] == report["tasks"][task]["labels"]
    assert found["tasks"]["entities"]["entities"] == report["tasks"]["entities"]["entities"]
    assert found["runs"] == []


def chromium(page: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with the network unreachable, so that the page must work offline."""
    binary = shutil.which("chromium")
    assert binary, "the HTML report test needs Debian's chromium (scripts/test installs it)"
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def page_errors(proc: subprocess.CompletedProcess) -> list[str]:
    """The page's console output (Chromium logs every console message and uncaught error as CONSOLE)."""
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.slow
def test_html_report_renders_every_plot_offline(output, report, tmp_path):
    html = tmp_path / "report.html"
    proc = bertpipe("report", str(output), "--html", str(html))
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = html.read_text()
    assert re.search(r"<script[^>]*\ssrc=", page) is None  # plotly.js is embedded, not fetched
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1  # once, with the first figure

    expected = ["errors", "runs"]
    for name, task in report["tasks"].items():
        if task["kind"] == "ner":
            expected += [f"entities-{name}", *(f"top-{name}-{group}" for group in task["top_entities"])]
        else:
            expected += [f"labels-{name}", f"scores-{name}"]
    rendered = chromium(html, "--dump-dom")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert page_errors(rendered) == []
    plots = re.split(r'<div id="([^"]+)" class="plotly-graph-div', rendered.stdout)[1:]
    plots = dict(zip(plots[::2], plots[1::2], strict=True))
    assert sorted(plots) == sorted(expected)
    for div, markup in plots.items():
        assert 'class="main-svg"' in markup, div  # plotly drew the figure
        assert 'class="point"' in markup, div  # and its bars

    shot = tmp_path / "report.png"
    taken = chromium(html, f"--screenshot={shot}", "--window-size=1200,3000")
    assert taken.returncode == 0 and page_errors(taken) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


@pytest.mark.slow
def test_console_errors_are_caught(tmp_path):
    """The console check above can fail: a page with an error and a console.error trips it."""
    page = tmp_path / "broken.html"
    page.write_text('<script>console.error("broken"); notAFunction();</script>')
    assert len(page_errors(chromium(page, "--dump-dom"))) == 2
