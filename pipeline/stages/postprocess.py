"""CPU stage: logits -> task output columns, each through its kind; internal columns are dropped here."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from bertpipe import columns as C
from bertpipe.models.loading import load_tokenizer
from bertpipe.plan import ModelTask
from bertpipe.tasks import kind_of
from bertpipe.tasks.base import TaskBatch


class PostprocessStage:
    """``__call__(table) -> table``. ``report``, when given, receives each batch's counts (rows, errors,
    and per task what its kind tallies): the run's progress and the summary's label counts."""

    def __init__(
        self, model_tasks: list[ModelTask], text_column: str, report: Callable[[dict], None] | None = None
    ):
        self.model_tasks = model_tasks
        self.text_column = text_column
        self.report = report
        self.processors = {
            mt.task.name: kind_of(mt.task).postprocessor(
                mt.task, mt.info, lambda mt=mt: load_tokenizer(mt.info.source, mt.task)
            )
            for mt in model_tasks
        }

    def __call__(self, table: pa.Table) -> pa.Table:
        outputs: dict[str, pa.Array] = {}
        texts = None
        for mt in self.model_tasks:
            batch = TaskBatch(table, mt.task.name, mt.group, self.text_column, texts)
            outputs.update(self.processors[mt.task.name](batch))
            texts = batch._texts  # read once for every task that needs them
        failures = {row: reason for p in self.processors.values() for row, reason in p.failures.items()}
        if failures:
            errors = table.column(C.ERROR).to_pylist()
            for row, reason in failures.items():
                errors[row] = errors[row] or reason
            table = table.set_column(
                table.schema.get_field_index(C.ERROR), C.ERROR, pa.array(errors, pa.string())
            )
        if self.report is not None:
            self.report(
                {
                    "rows": table.num_rows,
                    "errors": table.num_rows - table.column(C.ERROR).null_count,
                    "tasks": {
                        mt.task.name: kind_of(mt.task).tally(mt.task, outputs) for mt in self.model_tasks
                    },
                }
            )
        keep = [name for name in table.column_names if not name.startswith(C.INTERNAL_PREFIX)]
        table = table.select(keep)
        for name, column in outputs.items():
            table = table.append_column(name, column)
        return table
