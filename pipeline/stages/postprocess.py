"""CPU stage: logits -> task output columns; internal columns are dropped here, before the write."""

from __future__ import annotations

import pyarrow as pa

from bertpipe import columns as C
from bertpipe.config import TaskKind
from bertpipe.models.loading import load_tokenizer
from bertpipe.stages.infer import ModelTask
from bertpipe.tasks import classification, ner


def output_fields(model_tasks: list[ModelTask]) -> list[pa.Field]:
    fields: list[pa.Field] = []
    for mt in model_tasks:
        module = ner if mt.task.kind == TaskKind.ner else classification
        fields.extend(module.output_fields(mt.task))
    return fields


class PostprocessStage:
    def __init__(self, model_tasks: list[ModelTask], text_column: str):
        self.model_tasks = model_tasks
        self.text_column = text_column
        self.processors = {}
        for mt in model_tasks:
            if mt.task.kind == TaskKind.ner:
                tokenizer = load_tokenizer(mt.info.source, mt.task)
                self.processors[mt.task.name] = ner.NerPostprocess(mt.task, mt.info, tokenizer)
            else:
                self.processors[mt.task.name] = classification.ClassificationPostprocess(mt.task, mt.info)

    def __call__(self, table: pa.Table) -> pa.Table:
        outputs: dict[str, pa.Array] = {}
        texts = None
        for mt in self.model_tasks:
            logits = table.column(C.logits(mt.task.name)).combine_chunks()
            processor = self.processors[mt.task.name]
            if mt.task.kind == TaskKind.ner:
                texts = texts if texts is not None else table.column(self.text_column).to_pylist()
                g = mt.group
                outputs.update(
                    processor(
                        texts,
                        table.column(C.token_ids(g)).combine_chunks(),
                        table.column(C.token_offsets(g)).combine_chunks(),
                        table.column(C.special_mask(g)).combine_chunks(),
                        logits,
                    )
                )
            else:
                outputs.update(processor(logits))
        failures = {
            row: reason
            for p in self.processors.values()
            for row, reason in getattr(p, "failures", {}).items()
        }
        if failures:
            errors = table.column(C.ERROR).to_pylist()
            for row, reason in failures.items():
                errors[row] = errors[row] or reason
            table = table.set_column(
                table.schema.get_field_index(C.ERROR), C.ERROR, pa.array(errors, pa.string())
            )
        keep = [name for name in table.column_names if not name.startswith(C.INTERNAL_PREFIX)]
        table = table.select(keep)
        for name, column in outputs.items():
            table = table.append_column(name, column)
        return table
