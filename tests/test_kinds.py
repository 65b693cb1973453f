"""``embedding``, ``zero_shot`` and ``qa`` against their references on the same models and texts:
``sentence_transformers.SentenceTransformer.encode`` on the shipped all-MiniLM-L6-v2,
``pipeline("zero-shot-classification")`` on a tiny NLI model, and transformers 5.2.0's
``pipeline("question-answering")`` (removed from later transformers) on a tiny QA model, run from an
isolated install in a subprocess. Plus DuckDB over the written vectors, ``label()``, table outputs and
bf16."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from conftest import STRIDE, WINDOW, make_texts, write_shards
from tiny_models import build_nli_classifier, build_qa_model, shipped_encoder_dir
from transformers import pipeline as hf_pipeline

import bertpipe
from bertpipe import columns as C
from bertpipe.config import ConfigError, RuntimeConfig
from bertpipe.plan import plan_models
from bertpipe.stages.infer import InferStage
from bertpipe.stages.postprocess import PostprocessStage
from bertpipe.stages.prepare import PrepareStage
from bertpipe.tasks import parse_task

LABELS = ["sports", "politics", "science and technology", "cooking"]
QUESTIONS = ["Who wrote it?", "Where did it happen?", "What is the main product?"]
RUNTIME = {"dtype": "float32", "max_length": WINDOW, "stride": STRIDE, "rows_per_block": 16}
QA_REFERENCE = "transformers==5.2.0"
DIM = 384


@pytest.fixture(scope="module")
def kind_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kind_models")
    return {
        "encoder": str(shipped_encoder_dir()),
        "nli": str(build_nli_classifier(root / "nli", model_max_length=WINDOW)),
        "qa": str(build_qa_model(root / "qa", model_max_length=WINDOW)),
    }


def kind_tasks(models: dict[str, str]) -> list[dict]:
    return [
        {"name": "embedding", "kind": "embedding", "model": models["encoder"]},
        {"name": "zs", "kind": "zero_shot", "model": models["nli"], "candidate_labels": LABELS, "top_k": 4},
        {
            "name": "zm",
            "kind": "zero_shot",
            "model": models["nli"],
            "candidate_labels": LABELS,
            "multi_label": True,
            "hypothesis_template": "The topic is {}.",
            "top_k": 4,
        },
        {
            "name": "qa",
            "kind": "qa",
            "model": models["qa"],
            "question_column": "question",
            "top_k": 3,
            "handle_impossible_answer": True,
        },
        {"name": "qa1", "kind": "qa", "model": models["qa"], "question": QUESTIONS[0], "max_answer_len": 5},
    ]


@pytest.fixture(scope="module")
def kind_rows() -> list[dict]:
    """Mixed lengths (QA contexts past max_length), a duplicate and a near-duplicate text (for the
    dedup query), and bad rows: no text, an empty text, a null question."""
    texts = make_texts(30, seed=41, max_words=300)
    texts += [texts[5], texts[5] + " indeed", None, "", texts[7]]
    rows = [
        {"id": f"doc-{i:03d}", "text": t, "question": QUESTIONS[i % 3], "source": ["a", "b"][i % 2]}
        for i, t in enumerate(texts)
    ]
    rows[-1]["question"] = None
    return rows


@pytest.fixture(scope="module")
def kind_run(ray_session, kind_rows, kind_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    write_shards(root / "in", kind_rows, n_parquet=2, n_jsonl=1)
    summary = bertpipe.run(
        {
            "input": {"paths": [str(root / "in")]},
            "output": {"path": str(root / "out")},
            "tasks": kind_tasks(kind_models),
            "runtime": RUNTIME,
        }
    )
    table = pads.dataset(str(root / "out"), partitioning="hive").to_table()
    return summary, table, {r["id"]: r for r in table.to_pylist()}, root / "out"


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["text"] and r["question"]]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
def test_bad_rows_have_errors_and_no_outputs(kind_run, kind_rows):
    summary, table, by_id, _ = kind_run
    assert summary.rows_out == len(kind_rows)
    assert summary.errors_by_reason == {"text is null": 1, "text is empty": 1, "question is null": 1}
    for row in kind_rows:
        got = by_id[row["id"]]
        if row in _ok(kind_rows):
            assert got["_error"] is None and got["embedding"] is not None and got["qa_answer"] is not None
        else:
            assert got["_error"] and got["embedding"] is None and got["zs_label"] is None
            assert got["qa_answer"] is None and got["qa_top"] is None
    assert summary.task_counts["embedding"] == {"vectors": len(_ok(kind_rows))}


@pytest.mark.slow
def test_embedding_equals_sentence_transformers(kind_run, kind_rows, kind_models):
    from sentence_transformers import SentenceTransformer

    _, table, by_id, _ = kind_run
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    model = SentenceTransformer(kind_models["encoder"], device="cpu")
    assert model.max_seq_length == 256
    model.max_seq_length = WINDOW  # runtime.max_length caps the folder's max_seq_length
    ok = _ok(kind_rows)
    expected = model.encode([r["text"] for r in ok], batch_size=16)
    got = np.array([by_id[r["id"]]["embedding"] for r in ok], np.float32)
    assert _cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the folder's Normalize


def readme_sql(marker: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return next(b for b in readme.split("```sql\n")[1:] if marker in b).split("```")[0]


@pytest.mark.slow
def test_duckdb_nearest_neighbours_and_dedup_equal_numpy(kind_run, kind_rows):
    """The README's DuckDB queries over the written Parquet give numpy's neighbours and duplicates."""
    _, table, by_id, out = kind_run
    ok = _ok(kind_rows)
    ids = [r["id"] for r in ok]
    vectors = np.array([by_id[i]["embedding"] for i in ids], np.float64)
    sims = vectors @ vectors.T
    path = f"{out}/**/*.parquet"
    query = readme_sql("array_cosine_similarity(q.vec").replace("labelled/**/*.parquet", path)
    for probe in ("doc-001", "doc-005", "doc-020"):
        got = duckdb.sql(query.replace("doc-0001", probe)).fetchall()
        i = ids.index(probe)
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:5]
        assert [g[0] for g in got] == [ids[j] for j in order]
        assert [g[1] for g in got] == pytest.approx([sims[i, j] for j in order], abs=1e-5)
    dedup = readme_sql("0.95").replace("labelled/**/*.parquet", path)
    got = {(a, b) for a, b, _ in duckdb.sql(dedup).fetchall()}
    expected = {(ids[i], ids[j]) for i in range(len(ids)) for j in range(len(ids)) if ids[i] < ids[j]}
    expected = {(a, b) for a, b in expected if sims[ids.index(a), ids.index(b)] > 0.95}
    assert got == expected
    assert ("doc-005", "doc-030") in got and ("doc-005", "doc-031") in got  # the duplicate, the near one


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zs", "zm"])
def test_zero_shot_equals_hf(kind_run, kind_rows, kind_models, name):
    _, _, by_id, _ = kind_run
    task = next(t for t in kind_tasks(kind_models) if t["name"] == name)
    classifier = hf_pipeline("zero-shot-classification", model=kind_models["nli"])
    ok = _ok(kind_rows)
    expected = classifier(
        [r["text"] for r in ok],
        candidate_labels=LABELS,
        multi_label=task.get("multi_label", False),
        hypothesis_template=task.get("hypothesis_template", "This example is {}."),
    )
    seen, clear = set(), 0
    for row, exp in zip(ok, expected, strict=True):
        got = by_id[row["id"]]
        labels = [t["label"] for t in got[f"{name}_top"]]
        reference = dict(zip(exp["labels"], exp["scores"], strict=True))
        assert {t["label"]: t["score"] for t in got[f"{name}_top"]} == pytest.approx(reference, abs=1e-4)
        # The same order; labels whose reference scores tie within 1e-5 (a random model's) may swap.
        assert all(reference[a] >= reference[b] - 1e-5 for a, b in zip(labels, labels[1:], strict=False))
        if min(-np.diff(exp["scores"])) > 1e-5:
            clear += 1
            assert labels == exp["labels"] and got[f"{name}_label"] == exp["labels"][0]
        assert got[f"{name}_label"] == labels[0]
        assert got[f"{name}_score"] == pytest.approx(exp["scores"][0], abs=1e-4)
        seen.add(got[f"{name}_label"])
    assert len(seen) > 1, "the fixture model should predict more than one label"
    assert clear > len(ok) // 2, "most rows should have no near-ties"


_OFFLINE = re.compile(
    r"NewConnectionError|Max retries|Name or service not known|Temporary failure in name|"
    r"Network is unreachable|Connection refused|timed out|No matching distribution"
)


def reference_transformers() -> Path:
    """An isolated ``pip install --target`` of transformers 5.2.0 (and what it needs, e.g. tokenizers
    and huggingface_hub versions the project's transformers excludes), built once and cached; the
    venv's torch is used. Skips only when PyPI cannot be reached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bertpipe-tests"
    target = cache / QA_REFERENCE.replace("==", "-")
    if (target / ".complete").exists():
        return target
    building = cache / f"{target.name}.building-{os.getpid()}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-input",
            "--target",
            str(building),
            QA_REFERENCE,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        if _OFFLINE.search(proc.stderr + proc.stdout):
            pytest.skip(f"PyPI is unreachable, so the {QA_REFERENCE} QA reference cannot be installed")
        pytest.fail(f"pip install {QA_REFERENCE} failed:\n{proc.stderr[-2000:]}")
    (building / ".complete").touch()
    if not target.exists():
        building.rename(target)
    return target


def reference_answers(model: str, jobs: list[dict], work: Path) -> list[list[list[dict]]]:
    """Per job (``pairs`` of question and context, ``params`` of the pipeline), per pair, the answers."""
    env_dir = reference_transformers()
    (work / "in.json").write_text(json.dumps({"model": model, "jobs": jobs}))
    env = {**os.environ, "PYTHONPATH": str(env_dir), "TRANSFORMERS_VERBOSITY": "error"}
    script = Path(__file__).with_name("qa_reference.py")
    subprocess.run(
        [sys.executable, str(script), str(work / "in.json"), str(work / "out.json")],
        env=env,
        check=True,
        timeout=600,
    )
    result = json.loads((work / "out.json").read_text())
    assert result["version"] == "5.2.0"
    return result["answers"]


@pytest.mark.slow
def test_qa_equals_transformers_5_2_pipeline(kind_run, kind_rows, kind_models, tmp_path):
    _, _, by_id, _ = kind_run
    ok = _ok(kind_rows)
    common = {"max_seq_len": WINDOW, "doc_stride": STRIDE}
    checks = [
        ("qa", [r["question"] for r in ok], {"top_k": 3, "handle_impossible_answer": True, **common}),
        ("qa1", [QUESTIONS[0]] * len(ok), {"top_k": 1, "max_answer_len": 5, **common}),
    ]
    tok = hf_pipeline("zero-shot-classification", model=kind_models["nli"]).tokenizer
    long_contexts = sum(len(tok(r["text"])["input_ids"]) > WINDOW for r in ok)
    assert long_contexts >= 5, "the corpus must have contexts longer than max_length"
    jobs = [
        {"pairs": [[q, r["text"]] for q, r in zip(questions, ok, strict=True)], "params": params}
        for _, questions, params in checks
    ]
    expected_by_job = reference_answers(kind_models["qa"], jobs, tmp_path)
    for (name, _, params), expected in zip(checks, expected_by_job, strict=True):
        empty = 0
        for row, exp in zip(ok, expected, strict=True):
            got = by_id[row["id"]]
            answers = (
                got[f"{name}_top"]
                if params["top_k"] > 1
                else [{k: got[f"{name}_{k}"] for k in ("answer", "score", "start", "end")}]
            )
            assert [(a["answer"], a["start"], a["end"]) for a in answers] == [
                (e["answer"], e["start"], e["end"]) for e in exp
            ], row["id"]
            assert [a["score"] for a in answers] == pytest.approx([e["score"] for e in exp], abs=1e-3)
            assert got[f"{name}_answer"] == exp[0]["answer"]
            assert row["text"][got[f"{name}_start"] : got[f"{name}_end"]] == got[f"{name}_answer"]
            empty += exp[0]["answer"] == ""
        if params.get("handle_impossible_answer"):
            assert 0 < empty < len(ok), "some rows, not all, must come out unanswerable"


@pytest.mark.slow
def test_label_api_equals_run(kind_run, kind_rows, kind_models):
    _, _, by_id, _ = kind_run
    frame = pd.DataFrame(kind_rows[:8] + kind_rows[-3:])  # a few rows, and the bad ones
    tasks = [t for t in kind_tasks(kind_models) if t["name"] in ("embedding", "zs", "qa")]
    out = bertpipe.label(frame, tasks, runtime=RUNTIME)
    assert list(out.columns[: len(frame.columns)]) == list(frame.columns)
    assert out["question"].tolist() == frame["question"].tolist()
    for i, row in enumerate(frame.to_dict("records")):
        want = by_id[row["id"]]
        got = out.iloc[i]
        assert (got["_error"] if isinstance(got["_error"], str) else None) == want["_error"]
        if want["_error"]:
            continue
        np.testing.assert_allclose(np.asarray(got["embedding"]), want["embedding"], atol=1e-6)
        assert got["zs_label"] == want["zs_label"] and got["qa_answer"] == want["qa_answer"]
        assert got["qa_start"] == want["qa_start"] and got["qa_end"] == want["qa_end"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["delta", "iceberg"])
def test_table_outputs_store_vectors_as_lists(kind_run, kind_rows, kind_models, tmp_path, fmt):
    _, _, by_id, _ = kind_run
    rows = kind_rows[:6] + kind_rows[-3:]
    write_shards(tmp_path / "in", rows, n_parquet=1, n_jsonl=0)
    half = {"name": "emb_half", "kind": "embedding", "model": kind_models["encoder"], "precision": "float16"}
    tasks = [half] + [t for t in kind_tasks(kind_models) if t["name"] == "qa"]
    out = tmp_path / "out"
    bertpipe.run(
        {
            "input": {"paths": [str(tmp_path / "in")]},
            "output": {"path": str(out), "format": fmt},
            "tasks": tasks,
            "runtime": RUNTIME,
        }
    )
    if fmt == "delta":
        from deltalake import DeltaTable

        table = DeltaTable(str(out)).to_pyarrow_table()
    else:
        from test_warehouse import iceberg_catalog

        table = iceberg_catalog(out).load_table("bertpipe.enriched").scan().to_arrow()
    assert pa.types.is_list(table.schema.field("emb_half").type)
    assert pa.types.is_float32(table.schema.field("emb_half").type.value_type)
    assert table.num_rows == len(rows)
    for got in table.to_pylist():
        want = by_id[got["id"]]
        assert got["_error"] == want["_error"]
        if want["embedding"] is not None:  # float16 in the pipeline, stored as float32
            np.testing.assert_allclose(got["emb_half"], want["embedding"], atol=1e-3)
        else:
            assert got["emb_half"] is None
        assert got["qa_answer"] == want["qa_answer"]
        # pyiceberg writes a null list<struct> as an empty list (NER spans and top-k lists alike)
        null_as_empty = fmt == "iceberg" and want["qa_top"] is None and got["qa_top"] == []
        assert got["qa_top"] == want["qa_top"] or null_as_empty


def _stages(tasks: list[dict], texts: list[str], runtime: RuntimeConfig) -> pa.Table:
    """The three stages in this process (no Ray)."""
    models = plan_models([parse_task(t) for t in tasks])
    table = pa.table({"text": texts, C.ERROR: pa.nulls(len(texts), pa.string())})
    prepare = PrepareStage("text", models.groups, runtime.max_length, runtime.window_stride, None)
    infer = InferStage(models.model_tasks, runtime, "cpu")
    return PostprocessStage(models.model_tasks, "text")(infer(prepare(table)))


@pytest.mark.slow
def test_embedding_defaults_bf16_and_chunks(kind_models, pipeline_log):
    """The folder's max_seq_length (256) under the default runtime, against sentence-transformers as
    shipped; bf16 (emulated on CPUs without bf16) with its start-up check; chunked long texts."""
    from sentence_transformers import SentenceTransformer

    texts = make_texts(6, seed=3, max_words=400)  # the 400-word text is past 256 tokens
    expected = SentenceTransformer(kind_models["encoder"], device="cpu").encode(texts)
    task = {"name": "vec", "kind": "embedding", "model": kind_models["encoder"]}
    half = {**task, "name": "half", "precision": "float16"}
    fp32 = _stages([task, half], texts, RuntimeConfig(dtype="float32"))
    got = np.array(fp32.column("vec").to_pylist(), np.float32)
    assert _cosines(got, expected).min() >= 0.9999
    assert fp32.schema.field("half").type == pa.list_(pa.float16(), DIM)
    np.testing.assert_allclose(np.array(fp32.column("half").to_pylist(), np.float32), got, atol=1e-3)
    bf16 = _stages([task], texts, RuntimeConfig(dtype="bfloat16", precision_check_rows=4))
    assert _cosines(np.array(bf16.column("vec").to_pylist(), np.float32), expected).min() >= 0.999
    assert any("bfloat16 vectors (cosine < 0.999)" in r.getMessage() for r in pipeline_log.records)
    chunked = _stages([{**task, "long_text": "chunk"}], texts, RuntimeConfig(dtype="float32", max_length=64))
    chunks = np.array(chunked.column("vec").to_pylist(), np.float32)
    np.testing.assert_allclose(np.linalg.norm(chunks, axis=1), 1.0, atol=1e-5)
    short = [i for i, t in enumerate(texts) if len(t.split()) < 20]
    assert short and _cosines(chunks[short], expected[short]).min() >= 0.9999  # one window: unchanged
    assert _cosines(chunks, expected).min() < 0.99  # long texts: every window counts


def test_kind_config_errors(kind_models, tmp_path, models):
    with pytest.raises(ConfigError, match=r"not an NLI model: its labels \['NEGATIVE', 'POSITIVE'\]"):
        plan_models(
            [
                parse_task(
                    {
                        "name": "z",
                        "kind": "zero_shot",
                        "model": str(models["sentiment"]),
                        "candidate_labels": ["a"],
                    }
                )
            ]
        )
    with pytest.raises(ValueError, match="exactly one of question"):
        parse_task({"name": "q", "kind": "qa", "model": kind_models["qa"]})
    with pytest.raises(ValueError, match="must hold {}"):
        parse_task(
            {
                "name": "z",
                "kind": "zero_shot",
                "model": "x",
                "candidate_labels": ["a"],
                "hypothesis_template": "no slot",
            }
        )
    with pytest.raises(ConfigError, match="no trained ForQuestionAnswering head"):
        plan_models(
            [parse_task({"name": "q", "kind": "qa", "model": kind_models["nli"], "question": "Who?"})]
        )
    dense = tmp_path / "dense"
    dense.mkdir()
    for f in shipped_encoder_dir().iterdir():
        (dense / f.name).symlink_to(f)
    modules = json.loads((shipped_encoder_dir() / "modules.json").read_text())
    modules.insert(
        2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (dense / "modules.json").unlink()
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="has a sentence_transformers.models.Dense module"):
        plan_models([parse_task({"name": "e", "kind": "embedding", "model": str(dense)})])
    plain = plan_models([parse_task({"name": "e", "kind": "embedding", "model": str(models["topic"])})])
    assert plain.model_tasks[0].info.details == {
        "pooling": ["mean"],
        "normalize": False,
        "max_seq_length": None,
        "dim": 32,
    }


def test_bf16_checks_and_estimates_for_pairs(kind_models, kind_rows, tmp_path, pipeline_log):
    """Zero-shot and QA in bf16 (emulated where the CPU lacks it) are checked against fp32 at start-up,
    each by what its predictions are; ``validate``'s estimate counts their pair tokens."""
    from conftest import write_config

    from bertpipe import load_config
    from bertpipe.estimate import estimate
    from bertpipe.plan import plan

    tasks = [t for t in kind_tasks(kind_models) if t["name"] in ("zs", "qa1")]
    texts = [r["text"] for r in kind_rows[:6]]
    out = _stages(tasks, texts, RuntimeConfig(**{**RUNTIME, "dtype": "bfloat16", "precision_check_rows": 8}))
    messages = [r.getMessage() for r in pipeline_log.records]
    assert any("task zs: bfloat16 labels" in m and "fp32" in m for m in messages)
    assert any("task qa1: bfloat16 answer start/end tokens" in m and "fp32" in m for m in messages)
    assert out.column("zs_label").null_count == 0 and out.column("qa1_answer").null_count == 0
    write_shards(tmp_path / "in", kind_rows[:6], n_parquet=1, n_jsonl=0)
    config = write_config(
        tmp_path / "job.yaml",
        input={"paths": [str(tmp_path / "in")]},
        output={"path": str(tmp_path / "out")},
        tasks=tasks,
        runtime=RUNTIME,
    )
    cost = estimate(plan(load_config(config)), "cpu")
    tok = hf_pipeline("zero-shot-classification", model=kind_models["nli"]).tokenizer
    pairs = [(t, f"This example is {label}.") for t in texts for label in LABELS]
    expected = tok([a for a, _ in pairs], [b for _, b in pairs], truncation="only_first", max_length=WINDOW)
    assert cost.tokens["zs"] == sum(len(ids) for ids in expected["input_ids"])
    assert cost.tokens["qa1"] > sum(len(tok(t)["input_ids"]) for t in texts)  # question and overlaps too


def test_a_missing_question_column_is_a_config_error(ray_session, kind_models, tmp_path):
    from bertpipe.config import JobConfig
    from bertpipe.plan import plan

    write_shards(tmp_path / "in", [{"id": "a", "text": "x"}], n_parquet=1, n_jsonl=0)
    task = next(t for t in kind_tasks(kind_models) if t["name"] == "qa")
    config = JobConfig.model_validate(
        {
            "input": {"paths": [str(tmp_path / "in")]},
            "output": {"path": str(tmp_path / "out")},
            "tasks": [task],
        }
    )
    with pytest.raises(ConfigError, match="input has no column 'question'"):
        plan(config)
    with pytest.raises(ConfigError, match="column 'question', which a task reads"):
        bertpipe.label(pd.DataFrame({"text": ["x"]}), [task])
