"""The fine-tune config: YAML validated by pydantic, same conventions as the job config.

Schema (defaults shown)::

    kind: classification            # classification | sentiment | ner | qa
    base_model: PATH_OR_HUB_ID      # any BERT-family checkpoint; a bare encoder gets a new head
    data:
      paths: [train.jsonl]          # files, folders, globs or fsspec URLs (s3://...); Parquet or JSONL(.gz)
      format: auto                  # auto (by extension) | parquet | jsonl
      text_column: text
      label_column: label           # classification / sentiment
      entities_column: entities     # ner: list of {start, end, label} character spans
      context_column: context       # qa: SQuAD-style rows (context, question,
      question_column: question     #   answers: {text: [...], answer_start: [...]}; empty lists: no answer)
      answers_column: answers
      validation_paths: []          # a fixed validation set instead of validation_fraction
      storage_options: {}           # fsspec options for both (credentials are not written to the summary)
    labels: null                    # label list, order = ids; ner: entity types or full BIO tags
    output_dir: models/sentiment
    overwrite: false                # replace an existing non-empty output_dir
    validation_fraction: 0.1
    seed: 0
    epochs: 3
    batch_size: 32                  # rows per worker per step (global batch = batch_size * num_workers)
    group_by_length: true           # batch rows of similar length (less padding; false: plain shuffle)
    learning_rate: 5e-5
    weight_decay: 0.01
    warmup_ratio: 0.1
    max_length: 128
    stride: 32                      # qa: tokens shared by overlapping context windows
    max_steps: null                 # stop after this many optimizer steps (quick runs, tests)
    dtype: auto                     # auto | float32 | bfloat16 (autocast; optimizer stays fp32)
    trust_remote_code: false
    allow_pickle: false             # refuse .bin-only weights unless allowed
    runtime:
      address: null                 # Ray address; null starts a local Ray if none is running
      num_workers: 1
      use_gpu: false
      cpus_per_worker: 2            # also the torch thread count of each worker
      storage_path: null            # Ray Train checkpoints; default: hidden folder beside output_dir
                                    # (must be shared storage on a multi-node cluster)

``kind: sentiment`` is classification whose labels are normalised to lowercase
positive / negative / neutral (by the sentiment task's own rules: ``POS``, ``bad``, ``4 stars``...), so
the folder plugs into a sentiment task without a label map. ``kind: qa`` trains an extractive
question-answering head (start/end token logits) on SQuAD-style rows; it has no labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from bertpipe.config import InputFormat, _Strict, load_yaml_as
from bertpipe.tasks import KINDS, Kind


class FinetuneData(_Strict):
    paths: list[str] = Field(min_length=1)
    format: InputFormat = InputFormat.auto
    text_column: str = "text"
    label_column: str = "label"
    entities_column: str = "entities"
    context_column: str = "context"
    question_column: str = "question"
    answers_column: str = "answers"
    validation_paths: list[str] = Field(default_factory=list)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("paths", "validation_paths", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class FinetuneRuntime(_Strict):
    address: str | None = None
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(default=2, ge=1)
    storage_path: str | None = None


class FinetuneConfig(_Strict):
    kind: str  # a task kind of bertpipe.tasks; its module declares the head and how labels read
    base_model: str
    data: FinetuneData
    labels: list[str] | None = Field(default=None, min_length=1)
    output_dir: str
    overwrite: bool = False
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 0
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=32, ge=1)
    group_by_length: bool = True
    learning_rate: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_length: int = Field(default=128, ge=8)
    stride: int = Field(default=32, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    runtime: FinetuneRuntime = Field(default_factory=FinetuneRuntime)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        trainable = [name for name, kind in KINDS.items() if kind.trainable]
        if value not in trainable:
            raise ValueError(f"must be one of {', '.join(trainable)}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_fit_the_kind(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return value
        if any(not label.strip() for label in value):
            raise ValueError("labels must be non-empty strings")
        kind = KINDS.get(info.data.get("kind"))
        if kind is None:
            return value  # the kind's own error is reported
        if not kind.labelled:
            raise ValueError(f"{kind.name} is trained without labels")
        bad = [label for label in value if kind.train_label(label) is None]
        if bad:
            raise ValueError(f"{kind.name} labels must be {kind.label_hint}, got {', '.join(bad)}")
        value = [kind.train_label(label) for label in value]
        dupes = sorted({label for label in value if value.count(label) > 1})
        if dupes:
            raise ValueError(f"labels must be unique, repeated: {', '.join(dupes)}")
        if not kind.token_level and len(value) < 2:
            raise ValueError("a classifier needs at least 2 labels")
        return value

    @property
    def score_metric(self) -> str:
        """The validation metric that picks the best epoch."""
        return self.task_kind.train_metric

    @property
    def task_kind(self) -> Kind:
        return KINDS[self.kind]


def load_finetune_config(path: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read and validate a fine-tune YAML; every problem is one ConfigError line naming the key."""
    return load_yaml_as(FinetuneConfig, path, overrides)
