"""NER span assembly over a batch against HF's ``TokenClassificationPipeline.postprocess``.

Both sides read the same windows and logits of tiny random BERT token classifiers: HF row by row (the
oracle), bertpipe's ``NerPostprocess`` for the whole batch at once, through the Arrow columns the
earlier stages write. Short windows (24 tokens, 8 of overlap) give long texts several windows, so the
merging of overlapping entities is compared too.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import break_span_assembly, make_texts
from tiny_models import build_token_classifier
from transformers import pipeline as hf_pipeline
from transformers.pipelines import AggregationStrategy, TokenClassificationPipeline

from bertpipe import columns as C
from bertpipe.models.loading import inspect_model
from bertpipe.tasks import ner, parse_task
from bertpipe.tasks.base import TaskBatch

STRATEGIES = ["none", "simple", "first", "average", "max"]
WINDOW, STRIDE = 24, 8
TEXTS = [
    "Jean-Luc Picard met Miles O'Brien and Dr. Beverly Crusher in São Paulo, near the Café Müller.",
    "Ünïcödé naïve façade: Zoë's rock'n'roll e-mail to McDonald-Smythe (re: ACME-Corp.) 🦜 東京 ☃",
    "x",
    ".",
    "'s",
    "  -- ' ",
    "Anne-Marie d'Arc-Lefèvre, von der Leyen & Ngũgĩ wa Thiong'o visited Kraków's Wawel on 3-4 May.",
    "🦜🦜 ☃☃ unknownzzzqqq 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
] + make_texts(10, seed=21, max_words=120)
_WINDOWS: dict[int, dict[str, list]] = {}


@pytest.fixture(scope="module", params=[3, 12, 31])
def model(request, tmp_path_factory):
    """A tiny token classifier; a smaller bias towards "O" than the oracle fixture: more entities."""
    folder = build_token_classifier(tmp_path_factory.mktemp(f"ner{request.param}"), seed=request.param)
    pipe = hf_pipeline("token-classification", model=str(folder))
    with torch.no_grad():
        pipe.model.classifier.bias[0] -= 2.5
    return folder, pipe


def _windows(pipe, texts):
    """Per text its windows as HF's pipeline cuts them, and their logits (kept for the module's tests)."""
    cache = _WINDOWS.setdefault(id(pipe), {})
    rows = []
    for text in texts:
        if text in cache:
            rows.append(cache[text])
            continue
        enc = pipe.tokenizer(
            text,
            truncation=True,
            max_length=WINDOW,
            stride=STRIDE,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        windows = []
        for ids, offsets, special in zip(
            enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], strict=True
        ):
            with torch.no_grad():
                logits = pipe.model(input_ids=torch.tensor([ids])).logits[0].numpy()
            windows.append((ids, offsets, special, logits))
        cache[text] = windows
        rows.append(windows)
    return rows


def _table(texts, rows, task, group):
    """The columns the prepare and model stages write; a row of None stands for a bad row (no windows)."""
    nested = {"ids": [], "offsets": [], "special": [], "logits": []}
    for windows in rows:
        nested["ids"].append([w[0] for w in windows])
        nested["offsets"].append([np.asarray(w[1], np.int32).reshape(-1).tolist() for w in windows])
        nested["special"].append([w[2] for w in windows])
        nested["logits"].append([w[3].reshape(-1) for w in windows])
    windows_of = pa.list_(pa.list_(pa.int32()))
    return pa.table(
        {
            "text": texts,
            C.token_ids(group): pa.array(nested["ids"], windows_of),
            C.token_offsets(group): pa.array(nested["offsets"], windows_of),
            C.special_mask(group): pa.array(nested["special"], pa.list_(pa.list_(pa.int8()))),
            C.logits(task): pa.array(nested["logits"], pa.list_(pa.list_(pa.float32()))),
        }
    )


def _expected(pipe, text, windows, strategy):
    outputs = [
        {
            "logits": torch.from_numpy(logits)[None],
            "input_ids": torch.tensor([ids]),
            "offset_mapping": torch.tensor([offsets]),
            "special_tokens_mask": torch.tensor([special]),
            "sentence": text,
        }
        for ids, offsets, special, logits in windows
    ]
    key = "entity" if strategy == "none" else "entity_group"
    found = pipe.postprocess(outputs, aggregation_strategy=AggregationStrategy(strategy))
    return [(e[key], e["word"], e["start"], e["end"], float(e["score"])) for e in found]


def _check(got, expected):
    assert [e[:4] for e in got] == [e[:4] for e in expected]
    np.testing.assert_allclose([e[4] for e in got], [e[4] for e in expected], atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_spans_equal_hf_postprocess(model, strategy):
    folder, pipe = model
    texts = ["first row, a slice boundary", *TEXTS, None, "the last row"]
    rows = _windows(pipe, [t or "" for t in texts])
    rows[-2] = []  # a bad row: no windows, null entities
    task = parse_task(dict(name="ents", kind="ner", model=str(folder), aggregation=strategy))
    info = inspect_model(task)
    post = ner.KIND.postprocessor(task, info, lambda: pipe.tokenizer)
    table = _table(texts, rows, "ents", "g").slice(1)  # a slice: offsets that do not start at 0
    got = post(TaskBatch(table, "ents", "g", "text"))["ents"].to_pylist()
    assert post.failures == {}
    assert got[-2] is None
    multi = entities = 0
    for text, windows, spans in zip(texts[1:], rows[1:], got, strict=True):
        if not windows:
            continue
        expected = _expected(pipe, text, windows, strategy)
        _check([tuple(e.values()) for e in spans], expected)
        entities += len(expected)
        multi += len(windows) > 1 and len(expected) > 0
    assert entities > 30 and multi >= 5, "the fixture should give entities, also in multi-window rows"


@pytest.mark.parametrize("strategy", ["simple", "first", "average", "max"])
def test_spans_equal_hf_without_word_prefix(model, strategy, monkeypatch):
    """Tokenizers without a continuing-subword prefix (byte-level BPE...): HF's space heuristic."""
    folder, pipe = model
    backend = pipe.tokenizer._tokenizer
    monkeypatch.setattr(pipe.tokenizer, "_tokenizer", _NoPrefix(backend))
    texts = TEXTS[:2] + TEXTS[6:9]
    rows = _windows(pipe, texts)
    task = parse_task(dict(name="ents", kind="ner", model=str(folder), aggregation=strategy))
    info = inspect_model(task)
    post = ner.KIND.postprocessor(task, info, lambda: pipe.tokenizer)
    assert not post.assembler.word_aware
    got = post(TaskBatch(_table(texts, rows, "ents", "g"), "ents", "g", "text"))["ents"].to_pylist()
    for text, windows, spans in zip(texts, rows, got, strict=True):
        _check([tuple(e.values()) for e in spans], _expected(pipe, text, windows, strategy))


class _NoPrefix:
    """The backend tokenizer, but its model claims no continuing-subword prefix."""

    def __init__(self, backend):
        self._backend = backend
        self.model = type("Model", (), {"continuing_subword_prefix": None})()

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_a_row_the_batch_cannot_take_fails_alone(model, monkeypatch):
    folder, pipe = model
    texts = ["boom " + TEXTS[0], *TEXTS[1:4]]
    rows = _windows(pipe, texts)
    task = parse_task(dict(name="ents", kind="ner", model=str(folder)))
    post = ner.KIND.postprocessor(task, inspect_model(task), lambda: pipe.tokenizer)
    break_span_assembly(monkeypatch)
    got = post(TaskBatch(_table(texts, rows, "ents", "g"), "ents", "g", "text"))["ents"].to_pylist()
    assert post.failures == {0: "ents spans failed: RuntimeError"}
    assert got[0] is None
    for text, windows, spans in zip(texts[1:], rows[1:], got[1:], strict=True):
        _check([tuple(e.values()) for e in spans], _expected(pipe, text, windows, "simple"))


def test_overlapping_entities_merge_as_hf():
    """Ties of length and score, nested and empty spans: HF's ``aggregate_overlapping_entities``."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 9))
        start = rng.integers(0, 12, n)
        end = start + rng.integers(0, 4, n)
        score = rng.choice(np.array([0.5, 0.75, 0.9], np.float32), n)
        spans = ner.Spans(
            np.zeros(n, np.int64),
            np.array(["PER"] * n, object),
            np.arange(n).astype(str).astype(object),
            start,
            end,
            score,
        )
        got = spans.merged(np.array([0]))
        entities = [
            {"word": str(i), "start": int(s), "end": int(e), "score": sc}
            for i, (s, e, sc) in enumerate(zip(start, end, score, strict=True))
        ]
        expected = TokenClassificationPipeline.aggregate_overlapping_entities(None, entities)
        assert got.word.tolist() == [e["word"] for e in expected]
