"""Quality of the demo models on hand-written held-out sets, never trained on, against the goals.

    python examples/evaluate_demo_models.py [--models .bertpipe/models] [--json out.json]

Sentiment: accuracy on seven sets (A, B, C: positive/negative reviews; D to G: positive, negative and
neutral reviews and factual sentences, each written after the demo's hand-written training text of its
time; F and G by writers who did not read it, G after all of it), and on all of them together. NER:
entity-level precision, recall and F1 on two sets, where an entity counts when its type, start and end
match exactly, with the word-level aggregation the demo uses (``first``). Uses ``transformers.pipeline``
directly, so the figures don't depend on bertpipe's own batching.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import pipeline

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SENTIMENT_SETS = {
    "A": "heldout_sentiment.jsonl",
    "B": "heldout_sentiment_b.jsonl",
    "C": "heldout_sentiment_c.jsonl",
    "D": "heldout_sentiment_d.jsonl",
    "E": "heldout_sentiment_e.jsonl",
    "F": "heldout_sentiment_f.jsonl",
    "G": "heldout_sentiment_g.jsonl",
}
NER_SETS = {"A": "heldout_ner.jsonl", "B": "heldout_ner_b.jsonl"}
GOALS = {"sentiment": ("accuracy", 0.90), "ner": ("f1", 0.85)}
AGGREGATION = "first"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def sentiment_results(model_dir: Path) -> dict[str, dict]:
    clf = pipeline("text-classification", model=str(model_dir))
    results, total = {}, [0, 0]
    for name, file in SENTIMENT_SETS.items():
        rows = _rows(file)
        predictions = clf([r["text"] for r in rows], batch_size=32, truncation=True)
        correct = sum(p["label"].lower() == r["label"] for p, r in zip(predictions, rows, strict=True))
        results[name] = _accuracy(correct, len(rows))
        total = [total[0] + correct, total[1] + len(rows)]
    results["all"] = _accuracy(*total)
    return results


def _accuracy(correct: int, rows: int) -> dict:
    return {"rows": rows, "correct": correct, "accuracy": round(correct / rows, 4)}


def ner_results(model_dir: Path) -> dict[str, dict]:
    ner = pipeline("token-classification", model=str(model_dir), aggregation_strategy=AGGREGATION)
    return {name: _entity_scores(ner, _rows(file)) for name, file in NER_SETS.items()}


def _entity_scores(ner, rows: list[dict]) -> dict:
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
        "sentiment": sentiment_results(args.models / "sentiment"),
        "ner": ner_results(args.models / "ner"),
    }
    for task, sets in result.items():
        metric, goal = GOALS[task]
        for name, scores in sets.items():
            scores["goal"] = f"{metric} >= {goal}"
            scores["met"] = scores[metric] >= goal
            label = "all sets" if name == "all" else f"set {name}"
            verdict = "met" if scores["met"] else "NOT met"
            value = f"{metric} {scores[metric]:.3f} ({scores['rows']} rows)"
            print(f"{task:9} {label:8} {value}, goal {goal}: {verdict}")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
