"""Validation metrics, small enough to own instead of pulling in scikit-learn or seqeval.

Classification: accuracy and macro-F1 over the labels seen in truth or prediction (scikit-learn's
``f1_score(average="macro")``). NER: entity-level micro precision/recall/F1 over BIO sequences,
with chunks decoded the way seqeval's default (lenient) mode does it: an ``I-X`` after ``O`` or
after another type starts a new entity.
"""

from __future__ import annotations

from collections.abc import Sequence


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1; per-class F1 is 0 where a class has no true or no predicted rows."""
    pairs = list(zip(y_true, y_pred, strict=True))
    if not pairs:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    correct = sum(t == p for t, p in pairs)
    f1s = []
    for label in sorted(set(y_true) | set(y_pred)):
        tp = sum(t == label and p == label for t, p in pairs)
        fp = sum(t != label and p == label for t, p in pairs)
        fn = sum(t == label and p != label for t, p in pairs)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": correct / len(pairs), "macro_f1": sum(f1s) / len(f1s)}


def bio_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities ``(type, first, last)`` (inclusive token indices) decoded from one BIO sequence."""
    entities = []
    current: tuple[str, int] | None = None  # (type, first index) of the open entity
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, kind = tag.partition("-")
        continues = prefix == "I" and current is not None and current[0] == kind
        if current is not None and not continues:
            entities.append((current[0], current[1], i - 1))
            current = None
        if prefix in ("B", "I") and not continues:
            current = (kind, i)
    return entities


def entity_metrics(
    true_seqs: Sequence[Sequence[str]], pred_seqs: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Micro precision/recall/F1 over exact-match entities (same type, same first and last token)."""
    tp = n_true = n_pred = 0
    for truth, pred in zip(true_seqs, pred_seqs, strict=True):
        true_set, pred_set = set(bio_entities(truth)), set(bio_entities(pred))
        tp += len(true_set & pred_set)
        n_true += len(true_set)
        n_pred += len(pred_set)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
