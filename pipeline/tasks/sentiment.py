"""``kind: sentiment``: a classification whose labels are normalised to positive / negative / neutral.

Models name their classes in many ways (``POSITIVE``, ``LABEL_1`` of two, ``5 stars``, ``neu``). The
mapping is decided once at start-up from ``id2label``; a model whose labels cannot be mapped is a config
error (set ``labels:`` on the task), never a guess.
"""

from __future__ import annotations

import re
from typing import Literal

from bertpipe.errors import ConfigError
from bertpipe.tasks.base import Postprocessor
from bertpipe.tasks.classification import Classification, ClassificationPostprocess, ClassificationTask

SENTIMENT_LABELS = ("negative", "neutral", "positive")
_NAMED = {
    "positive": "positive", "pos": "positive", "good": "positive",
    "negative": "negative", "neg": "negative", "bad": "negative",
    "neutral": "neutral", "neu": "neutral", "mixed": "neutral",
}  # fmt: skip
_STARS = re.compile(r"^\s*([1-5])\s*stars?\s*$", re.IGNORECASE)
_GENERIC = re.compile(r"^LABEL_(\d+)$")


class SentimentTask(ClassificationTask):
    kind: Literal["sentiment"] = "sentiment"
    labels: dict[str, Literal["positive", "negative", "neutral"]] | None = None


def _generic_map(labels: list[str]) -> dict[str, str] | None:
    """``LABEL_i``: two classes are negative/positive (SST-2), three negative/neutral/positive."""
    ids = [_GENERIC.match(label) for label in labels]
    if not all(ids):
        return None
    order = sorted(labels, key=lambda label: int(_GENERIC.match(label).group(1)))
    if len(order) == 2:
        return dict(zip(order, ["negative", "positive"], strict=True))
    if len(order) == 3:
        return dict(zip(order, ["negative", "neutral", "positive"], strict=True))
    return None


def normalise_sentiment_label(label: str) -> str | None:
    """positive / negative / neutral for a label that names one (``POS``, ``Negative``, ``4 stars``)."""
    named = _NAMED.get(label.strip().lower())
    if named:
        return named
    stars = _STARS.match(label)
    if stars:
        return {1: "negative", 2: "negative", 3: "neutral", 4: "positive", 5: "positive"}[int(stars.group(1))]
    return None


def sentiment_label_map(task: SentimentTask, info) -> dict[str, str]:
    """Model label -> positive/negative/neutral, or ConfigError naming the labels that cannot be mapped."""
    labels = [info.id2label[i] for i in sorted(info.id2label)]
    mapping = _generic_map(labels) or {}
    for label in labels:
        if task.labels and label in task.labels:
            mapping[label] = task.labels[label]
        elif label not in mapping and normalise_sentiment_label(label):
            mapping[label] = normalise_sentiment_label(label)
    missing = [label for label in labels if label not in mapping]
    if missing:
        raise ConfigError(
            f"task {task.name!r}: cannot map sentiment labels {missing} of {task.model} to "
            f"positive/negative/neutral; add `labels: {{{missing[0]}: positive, ...}}` to the task"
        )
    return mapping


class Sentiment(Classification):
    name = "sentiment"
    config = SentimentTask

    def check(self, task: SentimentTask, info) -> None:
        sentiment_label_map(task, info)

    def postprocessor(self, task: SentimentTask, info, tokenizer) -> Postprocessor:
        return ClassificationPostprocess(task, info, sentiment_label_map(task, info))

    label_hint = "positive/negative/neutral"
    label_order = SENTIMENT_LABELS

    def train_label(self, label: str) -> str | None:
        return normalise_sentiment_label(label)


KIND = Sentiment()
