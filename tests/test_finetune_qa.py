"""``bertpipe finetune`` with ``kind: qa``: SQuAD-style rows -> start/end positions, and a real Ray Train
run whose folder ``bertpipe run`` loads as a ``kind: qa`` model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from tiny_models import build_qa_model, build_sequence_classifier, tiny_tokenizer
from transformers import BertForSequenceClassification

import bertpipe
from bertpipe.config import ConfigError
from bertpipe.tasks import KINDS
from bertpipe.train import FinetuneConfig, run_finetune
from bertpipe.train.data import read_labelled

QA = KINDS["qa"]
WORDS = [
    "the",
    "shop",
    "sells",
    "red",
    "apples",
    "and",
    "we",
    "like",
    "fresh",
    "bread",
    "today",
    "near",
    "park",
]
QUESTION = "how much does it cost?"


def price_rows(n: int, seed: int = 0) -> list[dict]:
    """Word contexts with one number in them (the answer, at a varying place) or none (unanswerable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        before, after = rng.sample(WORDS, rng.randint(1, 6)), rng.sample(WORDS, rng.randint(1, 6))
        if i % 6 == 5:
            rows.append(
                {
                    "context": " ".join(before + after),
                    "question": QUESTION,
                    "answers": {"text": [], "answer_start": []},
                }
            )
            continue
        price = str(rng.randint(10, 99))
        prefix = " ".join([*before, ""])
        rows.append(
            {
                "context": prefix + price + " " + " ".join(after),
                "question": QUESTION,
                "answers": {"text": [price], "answer_start": [len(prefix)]},
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def qa_config(tmp_path: Path, data: Path, **fields) -> FinetuneConfig:
    return FinetuneConfig.model_validate(
        {
            "kind": "qa",
            "base_model": "unused",
            "data": {"paths": [str(data)]},
            "output_dir": str(tmp_path / "m"),
            **fields,
        }
    )


def test_features_mark_the_answer_tokens_and_cls_outside_the_window():
    tokenizer = tiny_tokenizer()
    context = " ".join(["filler"] * 40) + " the answer is saint petersburg indeed " + " ".join(["more"] * 40)
    start = context.index("saint")
    targets = [(QUESTION, (start, start + len("saint petersburg"))), (QUESTION, None)]
    arrays = QA.train_features(tokenizer, [context, "no price here"], targets, max_length=32, stride=8)

    n = len(arrays["input_ids"])
    assert n > 3 and {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "start_positions",
        "end_positions",
    } <= set(arrays)
    hits = [w for w in range(n) if arrays["start_positions"][w] != 0]
    assert hits, "some window holds the whole answer"
    for w in hits:
        ids = arrays["input_ids"][w][arrays["start_positions"][w] : arrays["end_positions"][w] + 1]
        assert tokenizer.decode(ids) == "saint petersburg"
    # windows without the whole answer, and the unanswerable row's window, point at [CLS]
    assert all(arrays["end_positions"][w] == 0 for w in range(n) if w not in hits)
    assert arrays["input_ids"][-1][0] == tokenizer.cls_token_id


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"context": "a b c", "question": "q?", "answers": {"text": ["b"], "answer_start": [0]}},
            "not at character 0",
        ),
        (
            {"context": "a b c", "question": "", "answers": {"text": [], "answer_start": []}},
            "question must be",
        ),
        (
            {"context": "a b c", "question": "q?", "answers": {"text": ["b"], "answer_start": []}},
            "1 texts but 0",
        ),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, row, message):
    good = {"context": "x y", "question": "q?", "answers": {"text": ["y"], "answer_start": [2]}}
    data = write_jsonl(tmp_path / "train.jsonl", [good, row])
    with pytest.raises(ConfigError, match=rf"train.jsonl row 2: .*{message}"):
        read_labelled(qa_config(tmp_path, data), [str(data)], "data.paths")


def test_qa_takes_no_labels(tmp_path):
    with pytest.raises(ValueError, match="qa is trained without labels"):
        qa_config(tmp_path, tmp_path / "x.jsonl", labels=["a", "b"])


def exact_match(table, name: str, rows: list[dict]) -> float:
    gold = {r["id"]: (r["answers"]["text"] or [""])[0] for r in rows}
    got = {r["id"]: r[f"{name}_answer"] for r in table.to_pylist()}
    return sum(got[i] == gold[i] for i in gold) / len(gold)


@pytest.mark.slow
def test_finetune_qa_learns_and_runs_as_a_qa_task(tmp_path, ray_local):
    # a bare encoder (no head) gets a new qa head; a random qa model is the untrained comparison
    classifier = build_sequence_classifier(tmp_path / "with_head", ["x", "y"], initializer_range=0.02)
    encoder = tmp_path / "encoder"
    BertForSequenceClassification.from_pretrained(classifier).bert.save_pretrained(encoder)
    tiny_tokenizer().save_pretrained(encoder)
    base = build_qa_model(tmp_path / "base")
    rows = price_rows(72)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = qa_config(
        tmp_path,
        data,
        base_model=str(encoder),
        output_dir=str(tmp_path / "qa"),
        epochs=4,
        batch_size=8,
        learning_rate=5e-3,
        max_length=32,
        stride=8,
        dtype="float32",
    )
    result = run_finetune(cfg)

    assert result["labels"] is None and (result["train_rows"], result["validation_rows"]) == (65, 7)
    assert result["best_metric"] == "val_span_accuracy"
    assert result["best_score"] == max(e["val_span_accuracy"] for e in result["epochs"]) >= 0.5
    losses = result["loss_history"]
    assert sum(losses[-3:]) < sum(losses[:3])
    folder = Path(result["output_dir"])
    assert (folder / "model.safetensors").exists()
    assert json.loads((folder / "training_summary.json").read_text())["kind"] == "qa"

    # bertpipe run loads the folder as a qa model; the tuned head answers the training rows, the base does not
    for i, row in enumerate(rows):
        row["id"] = f"r{i}"
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "rows.jsonl", rows)
    task = {
        "kind": "qa",
        "question_column": "question",
        "max_answer_len": 5,
        "handle_impossible_answer": True,
    }
    bertpipe.run(
        {
            "input": {"paths": [str(tmp_path / "in")], "text_column": "context", "id_column": "id"},
            "output": {"path": str(tmp_path / "out")},
            "tasks": [
                {"name": "tuned", "model": str(folder), **task},
                {"name": "base", "model": str(base), **task},
            ],
            "runtime": {"dtype": "float32", "max_length": 32, "stride": 8},
        },
        quiet=True,
    )
    table = pads.dataset(str(tmp_path / "out"), partitioning="hive").to_table()
    texts = {r["id"]: r["context"] for r in rows}
    for out in table.to_pylist():
        for name in ("tuned", "base"):
            start, end = out[f"{name}_start"], out[f"{name}_end"]
            assert texts[out["id"]][start:end] == out[f"{name}_answer"]
    tuned, untrained = exact_match(table, "tuned", rows), exact_match(table, "base", rows)
    assert tuned >= 0.8 and tuned > untrained + 0.5, (tuned, untrained)
