"""``kind: zero_shot``: labels nobody trained a model for, from an NLI model, as
``pipeline("zero-shot-classification")`` does.

Each text is paired with one hypothesis per candidate label (``hypothesis_template.format(label)``),
tokenised as a (text, hypothesis) pair truncating the text only, and every pair is one sequence of the
row in the model stage, so pairs are batched by the same token budget as any other sequence. The
entailment logits become scores: a softmax across the labels, or with ``multi_label`` (or a single
label) a softmax of entailment against contradiction per label.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from bertpipe import columns as C
from bertpipe.errors import ConfigError
from bertpipe.tasks.base import Kind, Postprocessor, TaskBase, TaskBatch, value_counts
from bertpipe.tasks.classification import TOP_TYPE, top_labels


class ZeroShotTask(TaskBase):
    kind: Literal["zero_shot"] = "zero_shot"
    candidate_labels: list[str] = Field(min_length=1)
    hypothesis_template: str = "This example is {}."
    multi_label: bool = False
    top_k: int = Field(default=1, ge=1)

    @field_validator("candidate_labels")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if any(not label.strip() for label in value) or len(set(value)) != len(value):
            raise ValueError("candidate labels must be unique, non-empty strings")
        return value

    @field_validator("hypothesis_template")
    @classmethod
    def _has_a_slot(cls, value: str) -> str:
        if value.format("x") == value:
            raise ValueError("must hold {} where the label goes, e.g. 'This example is {}.'")
        return value

    @property
    def hypotheses(self) -> list[str]:
        return [self.hypothesis_template.format(label) for label in self.candidate_labels]


def nli_ids(task: ZeroShotTask, id2label: dict[int, str]) -> tuple[int, int]:
    """The entailment and contradiction label ids (names starting with ``entail`` / ``contradict``)."""
    found = {}
    for prefix in ("entail", "contradict"):
        ids = [i for i, label in sorted(id2label.items()) if label.lower().startswith(prefix)]
        if not ids:
            labels = [id2label[i] for i in sorted(id2label)]
            raise ConfigError(
                f"task {task.name!r}: model {task.model} is not an NLI model: its labels {labels} name no "
                "entailment and contradiction"
            )
        found[prefix] = ids[0]
    return found["entail"], found["contradict"]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class ZeroShotPostprocess(Postprocessor):
    """Per row, one sequence per candidate label -> label, score and top-k."""

    def __init__(self, task: ZeroShotTask, info):
        super().__init__()
        self.task = task
        self.entail, self.contradict = nli_ids(task, info.id2label)
        self.num_labels = info.num_labels
        self.labels = np.array(task.candidate_labels, dtype=object)

    def __call__(self, batch: TaskBatch) -> dict[str, pa.Array]:
        windows = batch.logits
        n_rows, n = len(windows), len(self.labels)
        per_row = np.diff(windows.offsets.to_numpy()) if n_rows else np.zeros(0, np.int64)
        ok = per_row == n
        flat = windows.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        logits = np.zeros((n_rows, n, self.num_labels), np.float32)
        logits[ok] = flat.reshape(-1, n, self.num_labels)
        if self.task.multi_label or n == 1:
            scores = _softmax(logits[..., [self.contradict, self.entail]])[..., 1]
        else:
            scores = _softmax(logits[..., self.entail])
        order = np.argsort(scores, axis=1, kind="stable")[:, ::-1]  # as HF: reversed argsort
        best = order[:, 0]
        out = {
            C.label(self.task.name): pa.array(np.where(ok, self.labels[best], None), pa.string()),
            C.score(self.task.name): pa.array(scores[np.arange(n_rows), best], pa.float32(), mask=~ok),
        }
        if self.task.top_k > 1:
            out[C.top(self.task.name)] = top_labels(self.labels, scores, order, ok, self.task.top_k)
        return out


class ZeroShot(Kind):
    name = "zero_shot"
    config = ZeroShotTask
    auto_model = "AutoModelForSequenceClassification"
    trainable = False

    def check(self, task: ZeroShotTask, info) -> None:
        nli_ids(task, info.id2label)

    def all_windows(self, task: ZeroShotTask) -> bool:
        return True  # every sequence of a row: one per candidate label

    def own_tokens(self, task: ZeroShotTask) -> bool:
        return True

    def encode(self, task: ZeroShotTask, tokenizer, texts, inputs, max_length, stride):
        """(text, hypothesis) pairs, the text truncated, as the HF pipeline tokenises them."""
        hypotheses = task.hypotheses
        firsts = [t for t in texts for _ in hypotheses]
        enc = tokenizer(
            firsts,
            hypotheses * len(texts),
            truncation="only_first",
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids="token_type_ids" in tokenizer.model_input_names,
        )
        return enc, [r for r in range(len(texts)) for _ in hypotheses]

    def output_fields(self, task: ZeroShotTask, info) -> list[pa.Field]:
        fields = [pa.field(C.label(task.name), pa.string()), pa.field(C.score(task.name), pa.float32())]
        if task.top_k > 1:
            fields.append(pa.field(C.top(task.name), TOP_TYPE))
        return fields

    def postprocessor(self, task: ZeroShotTask, info, tokenizer) -> Postprocessor:
        return ZeroShotPostprocess(task, info)

    def tally(self, task: ZeroShotTask, outputs: dict[str, pa.Array]) -> dict[str, int]:
        return value_counts(outputs[C.label(task.name)])


KIND = ZeroShot()
