"""What every task kind declares, in one place: its config keys, its outputs and what it needs.

A kind is one module in ``bertpipe.tasks`` with a config class (``TaskBase`` plus the kind's own keys)
and a ``Kind`` object that answers what the rest of the system asks of a task: checks against the
model, the Arrow fields it writes, whether it needs every window of a long text and character
offsets, the model class it runs, how logits become outputs, and the head it trains. The registry in
``bertpipe.tasks`` maps the ``kind:`` string to it, so adding a kind is one file plus its tests.

Nothing here imports torch or Ray: planning (``bertpipe validate``) reads these declarations only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, field_validator

from bertpipe import columns as C

if TYPE_CHECKING:
    from bertpipe.models.loading import ModelInfo

_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


class TaskBase(BaseModel):
    """Keys every task takes; each kind's config class adds its own (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str
    kind: str
    model: str
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_a_column_prefix(cls, value: str) -> str:
        if not _TASK_NAME.match(value):
            raise ValueError("must be lower_snake_case (a-z, 0-9, _), start with a letter, at most 41 chars")
        return value


@dataclass
class TaskBatch:
    """What a postprocessor reads of one batch: its task's logits and, on demand, texts and tokens."""

    table: pa.Table
    task: str
    group: str  # the tokenizer group whose token columns the task reads
    text_column: str
    _texts: list | None = field(default=None, repr=False)

    def column(self, name: str) -> pa.Array:
        return self.table.column(name).combine_chunks()

    @property
    def logits(self) -> pa.ListArray:
        """Per row, per window, the flattened logits (tokens x labels for token tasks)."""
        return self.column(C.logits(self.task))

    @property
    def texts(self) -> list:
        if self._texts is None:
            self._texts = self.table.column(self.text_column).to_pylist()
        return self._texts

    def tokens(self) -> tuple[pa.ListArray, pa.ListArray, pa.ListArray]:
        """Windows of token ids, flattened (start, end) character offsets and special-token masks."""
        g = self.group
        return self.column(C.token_ids(g)), self.column(C.token_offsets(g)), self.column(C.special_mask(g))


def value_counts(values: pa.Array) -> dict[str, int]:
    """Non-null values and how often each occurs."""
    counts = pc.value_counts(values.drop_null())
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))


class Postprocessor:
    """Logits of one task -> its output columns. ``failures`` names rows whose outputs failed."""

    def __init__(self) -> None:
        self.failures: dict[int, str] = {}

    def __call__(self, batch: TaskBatch) -> dict[str, pa.Array]:
        raise NotImplementedError


class Kind:
    """The declarations of one task kind. Subclasses set the class attributes and override methods."""

    name: ClassVar[str]
    config: ClassVar[type[TaskBase]]
    auto_model: ClassVar[str]  # the transformers Auto class that loads the model, e.g. for its head
    token_level: ClassVar[bool] = False  # one prediction per token (NER) rather than per text
    train_metric: ClassVar[str] = "val_macro_f1"  # what fine-tuning keeps the best epoch by
    trainable: ClassVar[bool] = True  # ``bertpipe finetune`` trains this kind
    # The trained head: the module kept in fp32 under autocast, and the tensor-name prefixes that prove a
    # checkpoint has it (``head_tensors = None``: the kind needs no head, e.g. an encoder's embeddings).
    head_module: ClassVar[str | None] = "classifier"
    head_tensors: ClassVar[tuple[str, ...] | None] = ("classifier.", "score.", "classification_head.")
    compared: ClassVar[str] = "labels"  # what the start-up precision check compares with fp32

    def inspect(self, task: TaskBase, folder: Path, config: dict) -> dict[str, Any]:
        """Facts of the model folder the kind needs beyond ``config.json``'s labels (kept in
        ``ModelInfo.details``); raise ConfigError naming the task."""
        return {}

    def check(self, task: TaskBase, info: ModelInfo) -> None:
        """Checks that need the model's config (its labels); raise ConfigError naming the task."""

    def max_length(self, task: TaskBase, info: ModelInfo) -> int | None:
        """A cap on tokens per window below ``runtime.max_length`` (e.g. a sentence encoder's
        ``max_seq_length``); None: the runtime's."""
        return None

    # ---- kinds whose model reads more than the text (question/context and text/hypothesis pairs)
    def own_tokens(self, task: TaskBase) -> bool:
        """The kind tokenises its own inputs with ``encode`` (in a tokenizer group of its own)."""
        return False

    def input_columns(self, task: TaskBase) -> list[str]:
        """Input columns the task reads besides the text (they must exist in the input)."""
        return []

    def input_problem(self, task: TaskBase, values: dict[str, Any]) -> str | None:
        """Why a row's ``input_columns`` values cannot be used (its ``_error``), or None."""
        return None

    def encode(
        self,
        task: TaskBase,
        tokenizer,
        texts: list[str],
        inputs: dict[str, list],
        max_length: int,
        stride: int,
    ) -> tuple[dict[str, list], list[int]]:
        """Tokenise the rows' model inputs: per sequence ``input_ids`` (and ``token_type_ids``,
        ``offset_mapping``, ``special_tokens_mask``, ``word_ids`` where the kind reads them back), and the
        row of each sequence."""
        raise NotImplementedError

    # ---- the model stage
    def model_outputs(self, task: TaskBase, info: ModelInfo, out, attention_mask):
        """What the model stage keeps of a forward pass, per sequence: (labels,) or (tokens, labels)."""
        return out.logits

    def disagreement(self, task: TaskBase, fast: list[np.ndarray], exact: list[np.ndarray]) -> float:
        """The share of predictions in reduced precision that differ from fp32 (argmax labels)."""
        a = np.concatenate([x.argmax(-1).reshape(-1) for x in fast])
        b = np.concatenate([x.argmax(-1).reshape(-1) for x in exact])
        return float((a != b).mean())

    def all_windows(self, task: TaskBase) -> bool:
        """Every overlapping window of a long text, or only the first (truncation)."""
        return False

    def offsets(self, task: TaskBase) -> bool:
        """Character offsets and special-token masks from the tokenizer."""
        return False

    def output_fields(self, task: TaskBase, info: ModelInfo) -> list[pa.Field]:
        """The Arrow fields the task writes (``info``: its model's facts, e.g. a vector's dimension)."""
        raise NotImplementedError

    def tally(self, task: TaskBase, outputs: dict[str, pa.Array]) -> dict[str, int]:
        """Counts of what this batch's outputs hold (labels, entity types), for progress and the run
        summary; ``outputs`` are the columns ``postprocessor`` returned."""
        return {}

    def postprocessor(self, task: TaskBase, info: ModelInfo, tokenizer: Callable[[], Any]) -> Postprocessor:
        """``tokenizer()`` loads the task's tokenizer, for kinds that need it to read tokens back."""
        raise NotImplementedError

    # ---- fine-tuning: the head is ``auto_model``'s; labels are read through these
    label_hint: ClassVar[str | None] = None  # what a label must name, where the kind restricts labels
    label_order: ClassVar[tuple[str, ...] | None] = None  # the order of the head's labels, if fixed

    labelled: ClassVar[bool] = (
        True  # False: no label list; the kind reads rows and scores with the hooks below
    )

    def train_label(self, label: str) -> str | None:
        """A label of the training data or config as the head stores it; None: not a label of this kind."""
        return label

    def train_labels(self, labels: list[str]) -> list[str] | None:
        """A base model head's labels as fine-tuning compares them with the data's (None: unusable,
        e.g. two classes that name one label)."""
        normalised = [self.train_label(label) for label in labels]
        if None in normalised or len(set(normalised)) != len(normalised):
            return None
        return normalised

    def train_model_kwargs(self, labels: list[str] | None) -> dict[str, Any]:
        """Config keys ``auto_model.from_pretrained`` gets for the head (its labels)."""
        extra = {} if self.token_level else {"problem_type": "single_label_classification"}
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
            **extra,
        }

    def train_predict(self, out) -> np.ndarray:
        """What validation keeps of a forward pass (a torch output): the argmax labels."""
        return out.logits.argmax(-1).cpu().numpy()

    # ---- fine-tuning of kinds that are not ``labelled`` (e.g. qa's answer spans)
    def train_columns(self, data) -> list[str]:
        """The columns of a training row (``data``: the fine-tune config's ``data`` section)."""
        raise NotImplementedError

    def train_row(self, values: dict[str, Any], where: str) -> tuple[str, Any]:
        """One training row checked: (text, target); raise ConfigError naming ``where``."""
        raise NotImplementedError

    def train_features(
        self, tokenizer, texts: list[str], targets: list, max_length: int, stride: int
    ) -> dict[str, np.ndarray]:
        """Right-padded model inputs (``input_ids``, ``attention_mask``...) and targets, one entry per
        sequence (a long row may give several)."""
        raise NotImplementedError

    def train_scores(self, arrays: dict[str, np.ndarray], predictions: np.ndarray) -> dict[str, float]:
        """Validation scores (named without ``val_``) of ``train_predict``'s output for ``arrays``."""
        raise NotImplementedError
