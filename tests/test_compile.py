"""``runtime.compile``: compiled models label as the HF pipelines do, a second start loads them from the
cache without compiling, a compiler failure falls back to the eager models with one warning, and ``auto``
compiles only jobs large enough to pay the compile back."""

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
from bertpipe import estimate
from bertpipe.config import JobConfig, RuntimeConfig
from bertpipe.models import loading
from bertpipe.plan import plan, plan_models
from bertpipe.runner import decide_compile
from bertpipe.stages import compiled as compiled_models
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


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bertpipe" / "compiled"


def _refuse_compiling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("compiled although the package was cached")

    monkeypatch.setattr(compiled_models, "export_and_compile", refuse)


@pytest.mark.slow
def test_compiled_models_label_as_the_hf_pipelines_and_load_from_the_cache(
    models, pipeline_log, empty_cache, monkeypatch
):
    texts = make_texts(10, seed=41, max_words=300)  # windows past max_length, batches of several shapes
    infer, rows = _stages(models, texts, compile="on")
    assert set(infer.compiled) == {"sentiment", "entities"}  # still compiled: nothing fell back
    assert "compiled 2 model(s)" in pipeline_log.text and "(0 from the cache" in pipeline_log.text
    assert len(list(empty_cache.glob("*.pt2"))) == 2  # one package per model, no partial one left
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

    _refuse_compiling(monkeypatch)  # a second start (a later run) loads both packages
    pipeline_log.clear()
    again, rows_again = _stages(models, texts, compile="on")
    assert set(again.compiled) == {"sentiment", "entities"}
    assert "(2 from the cache" in pipeline_log.text
    assert rows_again == rows


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(
    models, pipeline_log, empty_cache, monkeypatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no C++ compiler\nmore lines")

    texts = make_texts(6, seed=43, max_words=200)
    _, eager = _stages(models, texts, compile="off")
    monkeypatch.setattr(compiled_models, "export_and_compile", broken)
    infer, rows = _stages(models, texts, compile="on")
    assert _warnings(pipeline_log) == [
        "compiling the models failed (RuntimeError: inductor: no C++ compiler); running them eager"
    ]
    assert not infer.compiled and rows == eager
    assert not list(empty_cache.glob("*.pt2"))  # nothing half-made is left for the next run


def test_a_compiled_model_failing_mid_run_hands_over_to_eager(models, pipeline_log, monkeypatch):
    """A batch the compiled model cannot run (after the warm-up) reruns eager, warning once."""
    calls = 0

    def fails_after_warm_up(forward, *args, wait=True):
        def run(**inputs):
            nonlocal calls
            calls += 1
            if calls > 2 * len(WARM_UP_SHAPES):  # past both models' warm-up
                raise RuntimeError("shape outside the compiled range")
            with torch.inference_mode():
                return forward(**inputs)

        return run, False

    texts = make_texts(6, seed=47, max_words=200)
    _, eager = _stages(models, texts, compile="off")
    monkeypatch.setattr("bertpipe.stages.infer.load_or_compile", fails_after_warm_up)
    infer, rows = _stages(models, texts, compile="on")
    assert "compiled 2 model(s)" in pipeline_log.text  # the warm-up went through
    assert _warnings(pipeline_log) == [
        "compiling the models failed (RuntimeError: shape outside the compiled range); running them eager"
    ]
    assert not infer.compiled and rows == eager


def test_actors_starting_together_share_out_the_models(models, pipeline_log, monkeypatch):
    """While another actor holds the sentiment model's package lock, this one takes the NER model first,
    then waits for the sentiment package instead of compiling it too."""
    taken = []

    def other_actor_compiles_sentiment(forward, key, *args, wait=True):
        kind = "sentiment" if "Sequence" in type(forward.model).__name__ else "ner"
        taken.append((kind, wait))
        if kind == "sentiment" and not wait:
            return None

        def run(**inputs):
            with torch.inference_mode():
                return forward(**inputs)

        return run, kind == "sentiment"  # the waited-for package comes from the other actor: a cache hit

    monkeypatch.setattr("bertpipe.stages.infer.load_or_compile", other_actor_compiles_sentiment)
    infer, _ = _stages(models, make_texts(2, seed=53, max_words=20), compile="on")
    # NER taken at once; sentiment tried again once the NER model is done, then waited for
    assert taken == [("sentiment", False), ("ner", False), ("sentiment", False), ("sentiment", True)]
    assert set(infer.compiled) == {"sentiment", "entities"}
    assert "compiled 2 model(s)" in pipeline_log.text and "(1 from the cache" in pipeline_log.text


def test_a_package_being_compiled_elsewhere_is_not_waited_for_when_told_not_to(tmp_path, empty_cache):
    """``wait=False`` returns at once while another process holds the package's lock."""
    from filelock import FileLock

    empty_cache.mkdir(parents=True)
    with FileLock(str(empty_cache / "k.pt2.lock")):
        assert compiled_models.load_or_compile(None, "k", "cpu", False, 512, wait=False) is None


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


def test_auto_compiles_a_job_of_many_tokens_for_models_of_minilms_size(
    tmp_path, models, pipeline_log, monkeypatch
):
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    job = plan(_job(tmp_path, models, 10_000, 600))  # about 1.5M tokens per model
    monkeypatch.setattr(estimate, "job_flops_per_token", lambda _: estimate.MINILM_FLOPS_PER_TOKEN)
    assert decide_compile(job, "cpu") is True
    assert "pay back the compile (from 1,000,000 for models of this size)" in pipeline_log.text


def test_auto_needs_more_tokens_to_compile_smaller_models(tmp_path, models, pipeline_log, monkeypatch):
    """The same job on the tiny test models stays eager: they save too little per token."""
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    job = plan(_job(tmp_path, models, 10_000, 600))
    flops = estimate.job_flops_per_token(job.model_tasks)
    assert flops == loading.encoder_flops_per_token(json.loads((models["ner"] / "config.json").read_text()))
    assert estimate.compile_min_tokens(flops) > 10 * estimate.COMPILE_MIN_TOKENS
    assert decide_compile(job, "cpu") is False
    assert "too few to pay back a compile" in pipeline_log.text


def test_the_size_measure_counts_minilms_encoder_from_its_own_config():
    """The reference size is what ``encoder_flops_per_token`` reads from the real MiniLM's config.json."""
    config = json.loads((loading.shipped_encoder_dir() / "config.json").read_text())
    assert loading.encoder_flops_per_token(config) == estimate.MINILM_FLOPS_PER_TOKEN
    assert estimate.compile_min_tokens(estimate.MINILM_FLOPS_PER_TOKEN) == estimate.COMPILE_MIN_TOKENS
    assert estimate.compile_min_tokens(None) == estimate.COMPILE_MIN_TOKENS


def test_auto_leaves_cpu_models_eager_without_amx_but_compiles_for_a_gpu(
    tmp_path, models, pipeline_log, monkeypatch
):
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    job = plan(_job(tmp_path, models, 10_000, 600))
    assert decide_compile(job, "cpu") is False
    assert "no AMX" in pipeline_log.text
    monkeypatch.setattr(estimate, "job_flops_per_token", lambda _: estimate.MINILM_FLOPS_PER_TOKEN)
    assert decide_compile(job, "cuda") is True
