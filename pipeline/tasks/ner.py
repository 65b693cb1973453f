"""``kind: ner``: per-token logits of every window -> entity spans with character offsets.

The span logic (sub-word fusion, the ``simple/first/average/max`` strategies, merging the entities of
overlapping windows) is HF's own: the postprocessor drives ``TokenClassificationPipeline.postprocess``
with logits computed by our batched model stage, so results equal ``pipeline("ner", stride=...)`` by
construction. Only the tokenizer and ``id2label`` are needed, so no model is loaded in this CPU stage.
"""

from __future__ import annotations

import warnings
from enum import Enum
from types import SimpleNamespace
from typing import Literal

import numpy as np
import pyarrow as pa

from bertpipe.tasks.base import Kind, Postprocessor, TaskBase, TaskBatch, value_counts

ENTITY_TYPE = pa.list_(
    pa.struct(
        [
            ("entity_group", pa.string()),
            ("word", pa.string()),
            ("start", pa.int32()),
            ("end", pa.int32()),
            ("score", pa.float32()),
        ]
    )
)


class Aggregation(str, Enum):
    """Same strategies as ``transformers.pipelines.AggregationStrategy``."""

    none = "none"
    simple = "simple"
    first = "first"
    average = "average"
    max = "max"


class NerTask(TaskBase):
    kind: Literal["ner"] = "ner"
    aggregation: Aggregation = Aggregation.simple


def _span_assembler(tokenizer, id2label: dict[int, str]):
    """HF's token-classification postprocess without a model: it only reads the tokenizer and id2label.

    Built here, not at import, so that planning never imports torch through transformers' pipelines."""
    from transformers import TokenClassificationPipeline

    class SpanAssembler(TokenClassificationPipeline):
        def __init__(self):  # deliberately skips Pipeline.__init__, which would want a model
            self.tokenizer = tokenizer
            self.model = SimpleNamespace(config=SimpleNamespace(id2label=id2label))

    return SpanAssembler()


def _ragged(list_array: pa.ListArray) -> tuple[np.ndarray, pa.Array]:
    return list_array.offsets.to_numpy(), list_array.flatten()


class NerPostprocess(Postprocessor):
    def __init__(self, task: NerTask, info, tokenizer):
        from transformers.pipelines import AggregationStrategy

        super().__init__()
        self.task = task
        self.num_labels = info.num_labels
        self.strategy = AggregationStrategy(task.aggregation.value)
        self.assembler = _span_assembler(tokenizer, info.id2label)

    def row_entities(self, text: str, windows: list[dict]) -> list[dict]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            entities = self.assembler.postprocess(windows, aggregation_strategy=self.strategy)
        return [
            {
                "entity_group": e.get("entity_group", e.get("entity")),
                "word": e["word"],
                "start": e["start"],
                "end": e["end"],
                "score": float(e["score"]),
            }
            for e in entities
        ]

    def __call__(self, batch: TaskBatch) -> dict[str, pa.Array]:
        """Per row: windows of token ids/offsets/special mask (prepare stage) and logits (model stage)."""
        import torch

        ids, offsets, special = batch.tokens()
        logits = batch.logits
        row_off, _ = _ragged(logits)
        win_ids_off, ids_flat = _ragged(ids.flatten())
        _, offsets_flat = _ragged(offsets.flatten())
        _, special_flat = _ragged(special.flatten())
        _, logits_flat = _ragged(logits.flatten())
        ids_np = ids_flat.to_numpy(zero_copy_only=False)
        offsets_np = offsets_flat.to_numpy(zero_copy_only=False).reshape(-1, 2)
        special_np = special_flat.to_numpy(zero_copy_only=False)
        logits_np = logits_flat.to_numpy(zero_copy_only=False).reshape(-1, self.num_labels)
        ids_win_starts = ids.offsets.to_numpy()

        results = []
        self.failures = {}
        for row in range(len(logits)):
            first, last = row_off[row], row_off[row + 1]
            if first == last:
                results.append(None)
                continue
            text = batch.texts[row]
            windows = []
            for w in range(first, last):
                # Token arrays of window w are aligned across ids, offsets, special mask and logits.
                lo, hi = win_ids_off[w], win_ids_off[w + 1]
                windows.append(
                    {
                        "logits": torch.from_numpy(logits_np[lo:hi].copy())[None],
                        "input_ids": ids_np[None, lo:hi],
                        "offset_mapping": offsets_np[None, lo:hi],
                        "special_tokens_mask": torch.from_numpy(special_np[lo:hi].copy())[None],
                        "sentence": text,
                    }
                )
            assert ids_win_starts[row] == first, "window lists of ids and logits are misaligned"
            try:
                results.append(self.row_entities(text, windows))
            except Exception as exc:  # noqa: BLE001 - one odd row must not fail the batch
                results.append(None)
                self.failures[row] = f"{self.task.name} spans failed: {type(exc).__name__}"
        return {self.task.name: pa.array(results, ENTITY_TYPE)}


class Ner(Kind):
    name = "ner"
    config = NerTask
    auto_model = "AutoModelForTokenClassification"
    token_level = True
    train_metric = "val_entity_f1"

    def all_windows(self, task: NerTask) -> bool:
        return True

    def offsets(self, task: NerTask) -> bool:
        return True

    def output_fields(self, task: NerTask, info) -> list[pa.Field]:
        return [pa.field(task.name, ENTITY_TYPE)]

    def postprocessor(self, task: NerTask, info, tokenizer) -> Postprocessor:
        return NerPostprocess(task, info, tokenizer())

    def tally(self, task: NerTask, outputs: dict[str, pa.Array]) -> dict[str, int]:
        """Entities by type."""
        return value_counts(outputs[task.name].flatten().field("entity_group"))


KIND = Ner()
