"""Quality of the demo models on hand-written held-out sets (not made by the demo's templates).

    python examples/evaluate_demo_models.py [--models .bertpipe/models] [--json out.json]

Sentiment: accuracy on three sets (A: 82 reviews, B: 50, C: 60). NER: entity-level precision, recall
and F1, where an entity counts when its type, start and end match exactly
(``aggregation_strategy="simple"``). Uses ``transformers.pipeline``
directly, so the figures don't depend on bertpipe's own batching.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import pipeline

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def sentiment_accuracy(model_dir: Path, name: str) -> dict:
    rows = _rows(name)
    clf = pipeline("text-classification", model=str(model_dir))
    predictions = clf([r["text"] for r in rows], batch_size=32, truncation=True)
    correct = sum(p["label"].lower() == r["label"] for p, r in zip(predictions, rows, strict=True))
    return {"rows": len(rows), "correct": correct, "accuracy": round(correct / len(rows), 4)}


def ner_f1(model_dir: Path) -> dict:
    rows = _rows("heldout_ner.jsonl")
    ner = pipeline("token-classification", model=str(model_dir), aggregation_strategy="simple")
    predicted = ner([r["text"] for r in rows], batch_size=32)
    tp = fp = fn = 0
    for row, entities in zip(rows, predicted, strict=True):
        gold = {(e["label"], e["start"], e["end"]) for e in row["entities"]}
        got = {(e["entity_group"], e["start"], e["end"]) for e in entities}
        tp, fp, fn = tp + len(gold & got), fp + len(got - gold), fn + len(gold - got)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "rows": len(rows),
        "entities": tp + fn,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path(".bertpipe/models"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = {
        # Set A was used for error analysis when the templates were extended; B was written after that
        # change, C before a later template experiment (README, "The demo models").
        "sentiment_a": sentiment_accuracy(args.models / "sentiment", "heldout_sentiment.jsonl"),
        "sentiment_b": sentiment_accuracy(args.models / "sentiment", "heldout_sentiment_b.jsonl"),
        "sentiment_c": sentiment_accuracy(args.models / "sentiment", "heldout_sentiment_c.jsonl"),
        "ner": ner_f1(args.models / "ner"),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
