"""The stages as plain classes (no Ray): token-budget batching, long-text pooling, precision checks,
GPU out-of-memory splitting. References are computed independently with HF models called directly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import break_span_assembly, make_texts, shipped_encoder_dir
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bertpipe import columns as C
from bertpipe.config import RuntimeConfig
from bertpipe.models.loading import inspect_model
from bertpipe.plan import ModelTask, TokenizerGroup, plan_models
from bertpipe.stages.infer import InferStage, gpu_token_budget, plan_batches
from bertpipe.stages.postprocess import PostprocessStage
from bertpipe.stages.prepare import PrepareStage
from bertpipe.tasks import parse_task


def test_plan_batches_respects_the_budget_and_covers_every_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 512, size=1000)
    batches = plan_batches(lengths, max_tokens=4096, max_rows=64, descending=False)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1000))
    for batch in batches:
        assert len(batch) <= 64
        assert len(batch) == 1 or lengths[batch].max() * len(batch) <= 4096
    padded = sum(lengths[b].max() * len(b) for b in batches)
    fixed = sum(lengths[i : i + 32].max() * len(lengths[i : i + 32]) for i in range(0, 1000, 32))
    assert padded / lengths.sum() < 1.05 < fixed / lengths.sum(), "sorting should remove most padding"
    descending = plan_batches(lengths, 4096, 64, descending=True)
    assert lengths[descending[0]].max() == lengths.max(), "large-first on GPU: the peak comes first"


def test_a_sequence_longer_than_the_budget_gets_its_own_batch():
    assert [b.tolist() for b in plan_batches(np.array([5, 900, 6]), 512, 8, descending=False)] == [
        [0, 2],
        [1],
    ]


def _task(name, kind, model, **extra) -> ModelTask:
    task = parse_task(dict(name=name, kind=kind, model=str(model), **extra))
    info = inspect_model(task)
    return ModelTask(task, info, info.tokenizer_key)


def _run_stages(model_tasks, texts, runtime: RuntimeConfig) -> pa.Table:
    groups = [
        TokenizerGroup(
            mt.group,
            mt.info.source,
            None,
            False,
            all_windows=any(not m.first_window_only for m in model_tasks),
            offsets=any(m.task.kind == "ner" for m in model_tasks),
        )
        for mt in model_tasks[:1]
    ]
    table = pa.table({"text": texts, C.ERROR: pa.nulls(len(texts), pa.string())})
    table = PrepareStage("text", groups, runtime.max_length, runtime.window_stride, None)(table)
    table = InferStage(model_tasks, runtime, "cpu")(table)
    return PostprocessStage(model_tasks, "text")(table)


def test_long_text_chunk_pools_window_scores(models):
    """Reference: the same windows run one by one through the HF model, softmax, then mean/max."""
    runtime = RuntimeConfig(dtype="float32", max_length=64, stride=16)
    texts = make_texts(12, seed=3, max_words=300)
    tasks = [
        _task("mean", "classification", models["topic"], long_text="chunk"),
        _task("best", "classification", models["topic"], long_text="chunk", chunk_pooling="max"),
    ]
    out = _run_stages(tasks, texts, runtime)
    tok = AutoTokenizer.from_pretrained(models["topic"])
    model = AutoModelForSequenceClassification.from_pretrained(models["topic"]).eval()
    for i, text in enumerate(texts):
        enc = tok(text, truncation=True, max_length=64, stride=16, return_overflowing_tokens=True)
        with torch.no_grad():
            probs = np.stack(
                [
                    torch.softmax(model(input_ids=torch.tensor([ids])).logits[0], -1).numpy()
                    for ids in enc["input_ids"]
                ]
            )
        for name, pooled in (("mean", probs.mean(0)), ("best", probs.max(0))):
            assert out.column(C.label(name))[i].as_py() == model.config.id2label[int(pooled.argmax())]
            assert out.column(C.score(name))[i].as_py() == pytest.approx(float(pooled.max()), abs=1e-4)
    assert any(len(tok(t)["input_ids"]) > 64 for t in texts), "some texts must need several windows"


def test_bf16_check_compares_with_fp32_and_logs(models, pipeline_log):
    runtime = RuntimeConfig(dtype="bfloat16", max_length=128, precision_check_rows=8)
    out = _run_stages([_task("topic", "classification", models["topic"])], make_texts(10, seed=4), runtime)
    messages = [r.getMessage() for r in pipeline_log.records]
    assert any("bfloat16 labels" in m and "fp32" in m for m in messages)
    assert out.column(C.label("topic")).null_count == 0


def test_bf16_weights_give_the_same_logits_as_autocast_over_fp32(models):
    """Storing Linear weights in bf16 must be a pure speed-up: the numbers autocast would produce."""
    from transformers import AutoModelForTokenClassification

    for name, kind, auto in (
        ("topic", "classification", AutoModelForSequenceClassification),
        ("ner", "ner", AutoModelForTokenClassification),
    ):
        stage = InferStage(
            [_task(name, kind, models[name])],
            RuntimeConfig(dtype="bfloat16", precision_check_rows=0),
            "cpu",
        )
        model = stage.models[name]
        assert model.classifier.head.weight.dtype == torch.float32
        assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
        assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float32
        seqs = [np.arange(1, n + 1) % 900 + 100 for n in (7, 19, 33)]
        got = [stage._forward(model, 0, [seq])[0] for seq in seqs]  # same shapes as the reference
        reference = auto.from_pretrained(models[name]).eval()
        for seq, logits in zip(seqs, got, strict=True):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                hidden = reference.bert(input_ids=torch.tensor([seq])).last_hidden_state
                if kind != "ner":
                    hidden = reference.bert.pooler(hidden)
            with torch.inference_mode():
                expected = reference.classifier(hidden.float())[0].numpy()
            np.testing.assert_array_equal(logits, expected)


def test_int8_quantisation_runs_and_is_checked(models, pipeline_log):
    runtime = RuntimeConfig(dtype="float32", quantize="int8", max_length=128, precision_check_rows=8)
    out = _run_stages([_task("topic", "classification", models["topic"])], make_texts(10, seed=4), runtime)
    assert any("int8 labels" in r.getMessage() for r in pipeline_log.records)
    assert out.column(C.label("topic")).null_count == 0


def test_out_of_memory_batch_is_split_and_budget_remembered(models, monkeypatch):
    """A fake GPU that runs out of memory above 64 padded tokens: every row still gets its logits."""
    stage = InferStage(
        [_task("topic", "classification", models["topic"])],
        RuntimeConfig(dtype="float32", max_tokens_per_batch=4096, precision_check_rows=0),
        "cpu",
    )
    real_forward = stage._forward

    def forward(model, pad_id, seqs, exact=False, **kwargs):
        if max(len(s) for s in seqs) * len(seqs) > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(model, pad_id, seqs, exact, **kwargs)

    seqs = [np.arange(1, n + 1) % 1000 + 1000 for n in (10, 12, 14, 9, 11, 13, 10, 12)]
    expected = [real_forward(stage.models["topic"], 0, [s])[0] for s in seqs]
    monkeypatch.setattr(stage, "_forward", forward)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    got = stage.run_sequences("topic", seqs)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-4)
    assert stage.max_tokens < 4096


def test_gpu_budgets_grow_with_free_memory_and_keep_what_the_user_set(models, monkeypatch):
    """On a GPU the defaults scale to its free memory (bounded); a budget set in the config stays."""
    from transformers import BertConfig

    base, small = BertConfig(), BertConfig(hidden_size=384, intermediate_size=1536)
    h200 = gpu_token_budget(139 * 2**30, [base], 512, 2)
    small_gpu = gpu_token_budget(16 * 2**30, [base], 512, 2)
    assert 8192 < small_gpu < h200 <= 1 << 20 and h200 % 1024 == 0
    assert gpu_token_budget(139 * 2**30, [small, base], 512, 2) == h200  # the largest model decides
    assert gpu_token_budget(2**30, [base], 512, 2) == 8192  # never below the CPU default

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (139 * 2**30, 141 * 2**30))
    task = [_task("topic", "classification", models["topic"])]
    default = InferStage(task, RuntimeConfig(precision_check_rows=0), "cpu")
    default._size_gpu_batches(RuntimeConfig())
    assert default.max_tokens > 8192 and default.max_rows == default.max_tokens // 64
    chosen = RuntimeConfig(max_tokens_per_batch=4096, max_rows_per_batch=32)
    kept = InferStage(task, chosen, "cpu")
    kept._size_gpu_batches(chosen)
    assert (kept.max_tokens, kept.max_rows) == (4096, 32)


def test_a_span_failure_marks_only_its_row(models, monkeypatch):
    break_span_assembly(monkeypatch)
    texts = ["boom " + t for t in make_texts(1, seed=8)] + make_texts(5, seed=9)
    out = _run_stages([_task("entities", "ner", models["ner"])], texts, RuntimeConfig(dtype="float32"))
    assert out.column(C.ERROR).to_pylist() == ["entities spans failed: RuntimeError"] + [None] * 5
    spans = out.column("entities").to_pylist()
    assert spans[0] is None and all(s is not None for s in spans[1:])


def test_tasks_with_the_same_tokenizer_share_one_tokenisation(models, tmp_path):
    from tiny_models import build_sequence_classifier

    from bertpipe.config import JobConfig

    other = build_sequence_classifier(tmp_path / "other", ["a", "b"], model_max_length=64)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["bertpipezzz"])  # another vocabulary: tokenises differently
    tokenizer.save_pretrained(other)
    cfg = JobConfig.model_validate(
        {
            "input": {"paths": ["unused"]},
            "output": {"path": "unused"},
            "tasks": [
                {"name": "topic", "kind": "classification", "model": str(models["topic"])},
                {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
                {"name": "entities", "kind": "ner", "model": str(models["ner"])},
                {"name": "cased", "kind": "classification", "model": str(other)},
            ],
        }
    )
    planned = plan_models(cfg.tasks)
    model_tasks, groups = planned.model_tasks, planned.groups
    assert len(groups) == 2
    shared = {mt.group for mt in model_tasks if mt.task.name != "cased"}
    assert len(shared) == 1 and model_tasks[3].group not in shared
    group = next(g for g in groups if g.key in shared)
    assert group.all_windows and group.offsets, "NER in the group needs windows and offsets"


class _FirstTwoWindows:
    """A tokenizer that behaves like tokenizers 0.23.1-0.23.2: only the first two overflow windows."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *args, **kwargs):
        enc = self.tok(*args, **kwargs)
        return {key: values[:2] for key, values in enc.items()}

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_tokenizer_that_drops_windows_is_refused_before_the_run(models, monkeypatch):
    """The driver probes every windowing tokenizer: a text must be covered to its last character."""
    import bertpipe.models.loading as loading

    tok = AutoTokenizer.from_pretrained(models["ner"])
    assert loading.windows_problem(tok) is None
    assert "windows cover" in loading.windows_problem(_FirstTwoWindows(tok))

    real_load = loading._planning_tokenizer
    monkeypatch.setattr(loading, "_planning_tokenizer", lambda *a: _FirstTwoWindows(real_load(*a)))
    ner = parse_task(dict(name="entities", kind="ner", model=str(models["ner"])))
    with pytest.raises(loading.ConfigError, match="tokenizer of .* cannot window long texts"):
        loading.inspect_model(ner)
    topic = parse_task(dict(name="topic", kind="classification", model=str(models["topic"])))
    assert inspect_model(topic).task == "topic"  # truncating tasks need one window only


def test_the_model_stage_returns_freed_heap_memory_after_each_block(models, monkeypatch):
    """Without a trim glibc keeps the freed activations of every block shape (benchmarks: 1.5x PSS)."""
    import bertpipe.stages.infer as infer

    if infer._malloc_trim() is None:
        pytest.skip("not glibc")
    calls = []
    monkeypatch.setattr(infer, "_malloc_trim", lambda: calls.append)
    runtime = RuntimeConfig(dtype="float32", max_length=128, precision_check_rows=0)
    _run_stages([_task("topic", "classification", models["topic"])], make_texts(6, seed=2), runtime)
    assert calls == [0]


def test_models_fine_tuned_from_one_base_share_one_tokenisation(tmp_path):
    """A trainer saves its own truncation and padding settings; they do not change the tokens, which
    bertpipe sets for every call, so the models share one tokenisation. A different normaliser does not."""
    from tiny_models import build_sequence_classifier, build_token_classifier

    plain = build_sequence_classifier(tmp_path / "plain", ["a", "b"])
    tagger = build_token_classifier(tmp_path / "tagger")
    trained = build_sequence_classifier(tmp_path / "trained", ["x", "y", "z"])
    tok = AutoTokenizer.from_pretrained(trained)
    tok.backend_tokenizer.enable_truncation(max_length=128)
    tok.backend_tokenizer.enable_padding(length=128)
    tok.save_pretrained(trained)
    cased = build_sequence_classifier(tmp_path / "cased", ["a", "b"])
    AutoTokenizer.from_pretrained(cased, do_lower_case=False).save_pretrained(cased)

    tasks = [
        parse_task(dict(name=n, kind=k, model=str(m)))
        for n, k, m in [
            ("plain", "classification", plain),
            ("tagger", "ner", tagger),
            ("trained", "classification", trained),
            ("cased", "classification", cased),
        ]
    ]
    models = plan_models(tasks)
    groups = {mt.task.name: mt.group for mt in models.model_tasks}
    assert groups["plain"] == groups["tagger"] == groups["trained"] != groups["cased"]
    assert len(models.groups) == 2
    texts = ["Ana María de la Fuente visited Eindhoven.", "GREAT value, would buy again!!"]
    ids = {
        n: AutoTokenizer.from_pretrained(m)(texts, truncation=True, max_length=512)["input_ids"]
        for n, m in [("plain", plain), ("trained", trained), ("cased", cased)]
    }
    assert ids["plain"] == ids["trained"] != ids["cased"], "equal keys must mean equal tokens"


def test_tokenizers_load_as_autotokenizer_loads_them(models, tmp_path):
    """``open_tokenizer`` skips ``AutoTokenizer`` (whose config module imports torch) only where it
    would pick the same class: same class, same tokens, offsets, windows and pair type ids."""
    from tiny_models import build_sequence_classifier

    from bertpipe.models.loading import _declared_tokenizer_class, open_tokenizer

    cased = build_sequence_classifier(tmp_path / "cased", ["a", "b"])
    AutoTokenizer.from_pretrained(cased, do_lower_case=False).save_pretrained(cased)
    undeclared = build_sequence_classifier(tmp_path / "undeclared", ["a", "b"])
    settings = undeclared / "tokenizer_config.json"
    settings.write_text(
        json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "tokenizer_class"})
    )
    assert _declared_tokenizer_class(undeclared) is None
    texts = ["Ana María de la Fuente visited PSV Eindhoven.", "GREAT value!! " * 40, "naïve O'Neill-Hart"]
    for folder in [models["ner"], models["topic"], cased, undeclared, shipped_encoder_dir()]:
        ours, reference = open_tokenizer(str(folder)), AutoTokenizer.from_pretrained(folder)
        assert type(ours) is type(reference)
        kwargs = dict(truncation=True, max_length=32, stride=8, return_overflowing_tokens=True)
        kwargs.update(return_offsets_mapping=True, return_special_tokens_mask=True)
        assert ours(texts, **kwargs).data == reference(texts, **kwargs).data
        assert ours(texts, texts[::-1]).data == reference(texts, texts[::-1]).data


def test_the_tokenising_stage_does_not_import_torch(models):
    """Every fresh tokenising Ray worker would pay torch's import (~3 s of CPU) for nothing."""
    script = (
        "import sys, pyarrow as pa\n"
        "from bertpipe import columns as C\n"
        "from bertpipe.plan import TokenizerGroup\n"
        "from bertpipe.stages.prepare import PrepareStage\n"
        f"group = TokenizerGroup('g', {str(models['ner'])!r}, None, False, all_windows=True, offsets=True)\n"
        "table = pa.table({'text': ['Ana visited Eindhoven.'], C.ERROR: pa.nulls(1, pa.string())})\n"
        "out = PrepareStage('text', [group], 64, 16, None)(table)\n"
        "assert out.num_rows == 1 and out.column(C.ERROR).null_count == 1\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
