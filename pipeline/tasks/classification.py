"""``kind: classification``: logits -> label, score and top-k, as ``TextClassificationPipeline`` does.

Long texts (``long_text: chunk``) are scored window by window, and the per-window probabilities are
averaged (or max-pooled), so a verdict in the last paragraph counts.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from bertpipe import columns as C
from bertpipe.tasks.base import Kind, Postprocessor, TaskBase, TaskBatch, value_counts

TOP_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))


class ClassificationTask(TaskBase):
    kind: Literal["classification"] = "classification"
    top_k: int = Field(default=1, ge=1)
    function_to_apply: Literal["default", "softmax", "sigmoid", "none"] = "default"
    long_text: Literal["truncate", "chunk"] = "truncate"
    chunk_pooling: Literal["mean", "max"] = "mean"


def activation(task: ClassificationTask, info) -> str:
    """The function HF applies by default: sigmoid for multi-label or 1-label models, else softmax."""
    if task.function_to_apply != "default":
        return task.function_to_apply
    if info.problem_type == "multi_label_classification" or info.num_labels == 1:
        return "sigmoid"
    if info.problem_type == "regression":
        return "none"
    return "softmax"


def apply_activation(logits: np.ndarray, function: str) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if function == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return logits


class ClassificationPostprocess(Postprocessor):
    """Turns ``__logits_{task}`` (per row: windows x labels) into the task's output columns.

    ``label_map`` renames the model's labels in ``{task}_label`` (sentiment); ``{task}_top`` keeps them.
    """

    def __init__(self, task: ClassificationTask, info, label_map: dict[str, str] | None = None):
        super().__init__()
        self.task = task
        self.function = activation(task, info)
        self.labels = np.array([info.id2label[i] for i in range(info.num_labels)], dtype=object)
        self.label_map = label_map

    def __call__(self, batch: TaskBatch) -> dict[str, pa.Array]:
        window_logits = batch.logits  # list<list<float32>> per row, empty for rows with an error
        n_rows = len(window_logits)
        windows_per_row = np.diff(window_logits.offsets.to_numpy()) if n_rows else np.zeros(0, np.int64)
        flat = window_logits.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        num_labels = len(self.labels)
        scores = apply_activation(flat.reshape(-1, num_labels), self.function)

        ok = windows_per_row > 0
        pooled = np.zeros((n_rows, num_labels), dtype=np.float32)
        if ok.any():
            starts = np.concatenate([[0], np.cumsum(windows_per_row)[:-1]])[ok]
            if self.task.chunk_pooling == "max":
                pooled[ok] = np.maximum.reduceat(scores, starts, axis=0)
            else:
                pooled[ok] = np.add.reduceat(scores, starts, axis=0) / windows_per_row[ok, None]

        order = np.argsort(-pooled, axis=1, kind="stable")
        best = order[:, 0]
        best_labels = self.labels[best]
        if self.label_map is not None:
            best_labels = np.array([self.label_map[label] for label in best_labels], dtype=object)
        best_scores = pooled[np.arange(n_rows), best]
        out = {
            C.label(self.task.name): pa.array(np.where(ok, best_labels, None), pa.string()),
            C.score(self.task.name): pa.array(best_scores, pa.float32(), mask=~ok),
        }
        if self.task.top_k > 1:
            out[C.top(self.task.name)] = top_labels(self.labels, pooled, order, ok, self.task.top_k)
        return out


def top_labels(labels: np.ndarray, scores: np.ndarray, order: np.ndarray, ok: np.ndarray, k: int) -> pa.Array:
    """The ``k`` best labels of each row with their scores (``order``: label indices, best first)."""
    k = min(k, len(labels))
    tops = [
        [{"label": labels[j], "score": float(scores[i, j])} for j in order[i, :k]] if ok[i] else None
        for i in range(len(ok))
    ]
    return pa.array(tops, TOP_TYPE)


class Classification(Kind):
    name = "classification"
    config = ClassificationTask
    auto_model = "AutoModelForSequenceClassification"

    def all_windows(self, task: ClassificationTask) -> bool:
        return task.long_text == "chunk"

    def output_fields(self, task: ClassificationTask, info) -> list[pa.Field]:
        fields = [pa.field(C.label(task.name), pa.string()), pa.field(C.score(task.name), pa.float32())]
        if task.top_k > 1:
            fields.append(pa.field(C.top(task.name), TOP_TYPE))
        return fields

    def postprocessor(self, task: ClassificationTask, info, tokenizer) -> Postprocessor:
        return ClassificationPostprocess(task, info)

    def tally(self, task: ClassificationTask, outputs: dict[str, pa.Array]) -> dict[str, int]:
        return value_counts(outputs[C.label(task.name)])


KIND = Classification()
