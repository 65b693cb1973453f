"""``runtime.compile``: compiled models label as the HF pipelines do, a compiler failure falls back to the
eager models with one warning, and ``auto`` compiles only jobs large enough to pay the compile back."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import STRIDE, WINDOW, base_config, make_texts
from transformers import pipeline as hf_pipeline

from bertpipe import columns as C
from bertpipe.config import JobConfig, RuntimeConfig
from bertpipe.models import loading
from bertpipe.plan import plan, plan_models
from bertpipe.runner import decide_compile
from bertpipe.stages.infer import WARM_UP_SHAPES, InferStage
from bertpipe.stages.postprocess import PostprocessStage
from bertpipe.stages.prepare import PrepareStage

RUNTIME = dict(dtype="float32", max_length=WINDOW, stride=STRIDE)


def _tasks(models) -> list[dict]:
    return [
        {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
        {"name": "entities", "kind": "ner", "model": str(models["ner"]), "aggregation": "simple"},
    ]


def _warnings(caplog) -> list[str]:
    """The warnings logged, each once (caplog may hold a record twice: the logger's handler and root's)."""
    return [r.getMessage() for r in dict.fromkeys(caplog.records) if r.levelno == logging.WARNING]


def _stages(models, texts: list[str], **runtime) -> tuple[InferStage, list[dict]]:
    """prepare -> infer -> postprocess in this process (no Ray), as the actors run them."""
    rt = RuntimeConfig(**RUNTIME, **runtime)
    job = JobConfig.model_validate(
        {"input": {"paths": ["x"]}, "output": {"path": "y"}, "tasks": _tasks(models)}
    )
    mp = plan_models(job.tasks)
    table = pa.table({"text": texts, C.ERROR: pa.nulls(len(texts), pa.string())})
    prepare = PrepareStage("text", mp.groups, rt.max_length, rt.window_stride, None)
    infer = InferStage(mp.model_tasks, rt, "cpu")
    return infer, PostprocessStage(mp.model_tasks, "text")(infer(prepare(table))).to_pylist()


@pytest.mark.slow
def test_compiled_models_label_as_the_hf_pipelines(models, pipeline_log):
    texts = make_texts(10, seed=41, max_words=300)  # windows past max_length, batches of several shapes
    infer, rows = _stages(models, texts, compile="on")
    assert set(infer.eager) == {"sentiment", "entities"}  # still compiled: nothing fell back
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in infer.models.values())
    assert "compiled 2 model(s)" in pipeline_log.text
    sentiment = hf_pipeline("text-classification", model=str(models["sentiment"]))
    for row, exp in zip(rows, sentiment(texts, truncation=True, max_length=WINDOW), strict=True):
        assert row["sentiment_label"] == exp["label"].lower()
        assert row["sentiment_score"] == pytest.approx(exp["score"], abs=1e-4)
    ner = hf_pipeline(
        "token-classification", model=str(models["ner"]), aggregation_strategy="simple", stride=STRIDE
    )
    for row, exp in zip(rows, ner(texts), strict=True):
        assert [(e["entity_group"], e["start"], e["end"]) for e in row["entities"]] == [
            (e["entity_group"], e["start"], e["end"]) for e in exp
        ]
        assert [e["score"] for e in row["entities"]] == pytest.approx([e["score"] for e in exp], abs=1e-4)


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(models, pipeline_log, monkeypatch):
    def broken(model, **kwargs):
        raise RuntimeError("inductor: no C++ compiler\nmore lines")

    texts = make_texts(6, seed=43, max_words=200)
    _, eager = _stages(models, texts, compile="off")
    monkeypatch.setattr(torch, "compile", broken)
    infer, rows = _stages(models, texts, compile="on")
    assert _warnings(pipeline_log) == [
        "torch.compile failed (RuntimeError: inductor: no C++ compiler); running the models eager"
    ]
    assert not infer.eager and rows == eager


def test_a_compiled_model_failing_mid_run_hands_over_to_eager(models, pipeline_log, monkeypatch):
    """A shape the compiled graph cannot run (after warm-up) reruns the batch eager, warning once."""

    class FailsAfterWarmUp(torch.nn.Module):
        calls = 0

        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config = model.config

        def forward(self, **inputs):
            FailsAfterWarmUp.calls += 1
            if FailsAfterWarmUp.calls > 2 * len(WARM_UP_SHAPES):  # past both models' warm-up
                raise RuntimeError("recompile failed")
            return self.model(**inputs)

    texts = make_texts(6, seed=47, max_words=200)
    _, eager = _stages(models, texts, compile="off")
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: FailsAfterWarmUp(model))
    infer, rows = _stages(models, texts, compile="on")
    assert "compiled 2 model(s)" in pipeline_log.text  # the warm-up went through
    assert _warnings(pipeline_log) == [
        "torch.compile failed (RuntimeError: recompile failed); running the models eager"
    ]
    assert not infer.eager and rows == eager


def _job(tmp_path: Path, models, rows: int, chars: int) -> JobConfig:
    (tmp_path / "in").mkdir()
    text = ("word " * (chars // 5)).strip()
    lines = (json.dumps({"id": str(i), "text": text}) + "\n" for i in range(rows))
    (tmp_path / "in" / "rows.jsonl").write_text("".join(lines))
    return JobConfig.model_validate(base_config(tmp_path / "in", tmp_path / "out", models))


def test_auto_leaves_a_small_job_eager_and_says_why(tmp_path, models, pipeline_log, monkeypatch):
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert decide_compile(plan(_job(tmp_path, models, 20, 300)), "cpu") is False
    assert "too few to pay back a compile" in pipeline_log.text


def test_auto_compiles_a_job_of_many_tokens(tmp_path, models, pipeline_log, monkeypatch):
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert decide_compile(plan(_job(tmp_path, models, 10_000, 600)), "cpu") is True
    assert "pay back the compile" in pipeline_log.text


def test_auto_leaves_cpu_models_eager_without_amx_but_compiles_for_a_gpu(
    tmp_path, models, pipeline_log, monkeypatch
):
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    job = plan(_job(tmp_path, models, 10_000, 600))
    assert decide_compile(job, "cpu") is False
    assert "no AMX" in pipeline_log.text
    assert decide_compile(job, "cuda") is True
