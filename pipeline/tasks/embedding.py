"""``kind: embedding``: one vector per text, as ``sentence_transformers.SentenceTransformer.encode``.

A sentence-transformers folder is read as sentence-transformers reads it: ``modules.json`` (a
Transformer, then Pooling, then optionally Normalize), the pooling config (``cls``, ``mean``, ``max``,
``mean_sqrt_len``, ``weightedmean``, ``lasttoken``; several modes are concatenated in that order) and
``sentence_bert_config.json``'s ``max_seq_length``, which caps the tokens per window. A plain encoder
folder (no ``modules.json``) gets mean pooling without normalisation; ``pooling:`` and ``normalize:``
override either. Pooling runs in the model stage (in fp32, on the hidden states under the attention
mask), so only one vector per window leaves it. With ``long_text: chunk`` the vectors of a text's
overlapping windows are averaged before normalising; ``truncate`` (the default, as sentence-transformers
does) embeds the first window only.

Modules other than Transformer, Pooling and Normalize (``Dense`` projections, ...) are refused at
planning: the vectors would not be the model's. sentence-transformers is not needed at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from bertpipe.errors import ConfigError
from bertpipe.tasks.base import Kind, Postprocessor, TaskBase, TaskBatch

# sentence-transformers' Pooling concatenates its modes in this order.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
_MODULE = "sentence_transformers.models."


class EmbeddingTask(TaskBase):
    kind: Literal["embedding"] = "embedding"
    pooling: Literal["auto", "cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken"] = "auto"
    normalize: bool | None = None  # None: as the folder says (a Normalize module), else false
    precision: Literal["float32", "float16"] = "float32"  # of the stored vectors
    long_text: Literal["truncate", "chunk"] = "truncate"


def _read_json(path: Path, task: TaskBase) -> dict | list:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"task {task.name!r}: cannot read {path}: {exc}") from exc


def sentence_transformers_layout(task: EmbeddingTask, folder: Path, config: dict) -> dict:
    """Pooling modes, normalisation, max_seq_length and dimension of a model folder."""
    modes, normalize, max_seq_length = ["mean"], False, None
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modes = []
        for module in _read_json(modules_file, task):
            kind = module.get("type", "").removeprefix(_MODULE)
            path = folder / module.get("path", "")
            if kind == "Transformer":
                if module.get("path", "") not in ("", "."):
                    raise ConfigError(
                        f"task {task.name!r}: {task.model} keeps its Transformer in {module['path']!r}; "
                        "give that folder as model:"
                    )
                settings = folder / "sentence_bert_config.json"
                if settings.is_file():
                    max_seq_length = _read_json(settings, task).get("max_seq_length")
            elif kind == "Pooling":
                pooling = _read_json(path / "config.json", task)
                modes = [m for m in POOLING_MODES if pooling.get(_POOLING_KEYS[m])]
            elif kind == "Normalize":
                normalize = True
            else:
                raise ConfigError(
                    f"task {task.name!r}: {task.model} has a {module.get('type')} module; bertpipe embeds "
                    "with Transformer, Pooling and Normalize modules only"
                )
        if not modes:
            raise ConfigError(f"task {task.name!r}: {task.model} has no Pooling module with a known mode")
    if task.pooling != "auto":
        modes = [task.pooling]
    if task.normalize is not None:
        normalize = task.normalize
    hidden = config.get("hidden_size") or config.get("d_model") or config.get("dim")
    if not hidden:
        raise ConfigError(f"task {task.name!r}: config.json of {task.model} names no hidden_size")
    return {
        "pooling": modes,
        "normalize": normalize,
        "max_seq_length": int(max_seq_length) if max_seq_length else None,
        "dim": int(hidden) * len(modes),
    }


def pool(hidden, attention_mask, modes: list[str]):
    """sentence-transformers' Pooling, in fp32: one vector per sequence, the modes concatenated."""
    import torch

    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    lengths = mask.sum(1).clamp(min=1e-9)
    vectors = []
    for mode in modes:
        if mode == "cls":
            vectors.append(hidden[:, 0])
        elif mode == "max":
            vectors.append(hidden.masked_fill(mask == 0, -1e9).max(1).values)
        elif mode == "mean":
            vectors.append((hidden * mask).sum(1) / lengths)
        elif mode == "mean_sqrt_len":
            vectors.append((hidden * mask).sum(1) / torch.sqrt(lengths))
        elif mode == "weightedmean":
            weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
            weighted = mask * weights[None, :, None]
            vectors.append((hidden * weighted).sum(1) / weighted.sum(1).clamp(min=1e-9))
        else:  # lasttoken, padding on the right
            last = attention_mask.sum(1) - 1
            vectors.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    return torch.cat(vectors, dim=-1)


def vector_type(task: EmbeddingTask, dim: int) -> pa.DataType:
    value = pa.float16() if task.precision == "float16" else pa.float32()
    return pa.list_(value, dim)


class EmbeddingPostprocess(Postprocessor):
    """Window vectors -> one vector per row: averaged over windows, then normalised if asked."""

    def __init__(self, task: EmbeddingTask, info):
        super().__init__()
        self.task = task
        self.normalize = info.details["normalize"]
        self.dim = info.details["dim"]
        self.type = vector_type(task, self.dim)

    def __call__(self, batch: TaskBatch) -> dict[str, pa.Array]:
        windows = batch.logits
        n_rows = len(windows)
        per_row = np.diff(windows.offsets.to_numpy()) if n_rows else np.zeros(0, np.int64)
        flat = windows.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        vectors = flat.reshape(-1, self.dim)
        ok = per_row > 0
        pooled = np.zeros((n_rows, self.dim), dtype=np.float32)
        if ok.any():
            starts = np.concatenate([[0], np.cumsum(per_row)[:-1]])[ok]
            pooled[ok] = np.add.reduceat(vectors, starts, axis=0) / per_row[ok, None]
        if self.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        values = pa.array(pooled.reshape(-1), self.type.value_type)
        array = pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~ok))
        return {self.task.name: array}


class Embedding(Kind):
    name = "embedding"
    config = EmbeddingTask
    auto_model = "AutoModel"
    trainable = False  # fine-tune sentence encoders with sentence-transformers
    head_module = None
    head_tensors = None
    compared = "vectors (cosine < 0.999)"

    def inspect(self, task: EmbeddingTask, folder: Path, config: dict) -> dict:
        return sentence_transformers_layout(task, folder, config)

    def max_length(self, task: EmbeddingTask, info) -> int | None:
        return info.details["max_seq_length"]

    def all_windows(self, task: EmbeddingTask) -> bool:
        return task.long_text == "chunk"

    def output_fields(self, task: EmbeddingTask, info) -> list[pa.Field]:
        return [pa.field(task.name, vector_type(task, info.details["dim"]))]

    def model_outputs(self, task: EmbeddingTask, info, out, attention_mask):
        return pool(out.last_hidden_state, attention_mask, info.details["pooling"])

    def disagreement(self, task: EmbeddingTask, fast: list[np.ndarray], exact: list[np.ndarray]) -> float:
        a, b = np.stack(fast), np.stack(exact)
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return float((cosine < 0.999).mean())

    def postprocessor(self, task: EmbeddingTask, info, tokenizer) -> Postprocessor:
        return EmbeddingPostprocess(task, info)

    def tally(self, task: EmbeddingTask, outputs: dict[str, pa.Array]) -> dict[str, int]:
        column = outputs[task.name]
        return {"vectors": len(column) - column.null_count}


KIND = Embedding()
