"""Labelled training data: read Parquet/JSONL(.gz) with pyarrow, check it, pick labels, tokenise once.

Files are found and opened with fsspec, as the labelling job's inputs are: local paths, folders, globs
and URLs (``s3://...`` with ``data.storage_options``).

Every data problem is a ConfigError naming the file and the 1-based row, raised on the driver
before any worker starts. Tokenisation happens here, once, into padded numpy arrays; the engine
puts them in the Ray object store and workers read them zero-copy.

NER rows carry character spans ``{start, end, label}`` (end exclusive). Every token that overlaps a
span is tagged: the first ``B-<label>``, the rest ``I-<label>`` (subword pieces included, so
``aggregation_strategy="simple"`` regroups them); special tokens get -100 and are ignored by loss
and metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from bertpipe.config import ConfigError
from bertpipe.io.paths import Shard, discover, filesystem_for, redact
from bertpipe.io.reader import _open
from bertpipe.tasks import KINDS, Kind
from bertpipe.train.config import FinetuneConfig

IGNORE_INDEX = -100
_JSON_BLOCK_BYTES = 1 << 24  # a JSONL line must fit in one block

Span = tuple[int, int, str]


@dataclass
class LabelledRows:
    """Texts with their targets (a label, or sorted entity spans) and where each row came from."""

    texts: list[str] = field(default_factory=list)
    targets: list[str] | list[list[Span]] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)

    def where(self, i: int) -> str:
        path, row = self.origins[i]
        return f"{path} row {row}"


def _read_table(fs, shard: Shard, columns: list[str]) -> pa.Table:
    where = redact(shard.url)
    try:
        with _open(fs, shard) as fh:
            if shard.format == "parquet":
                parquet = pq.ParquetFile(fh)
                present = set(parquet.schema_arrow.names)
                table = parquet.read(columns=[c for c in columns if c in present])
            else:
                table = pa_json.read_json(fh, read_options=pa_json.ReadOptions(block_size=_JSON_BLOCK_BYTES))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{where}: cannot read as {shard.format}: {str(exc).splitlines()[0]}") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"{where}: missing column {missing[0]!r} (columns: {', '.join(table.column_names)})"
        )
    return table


def read_labelled(cfg: FinetuneConfig, patterns: Sequence[str], key: str) -> LabelledRows:
    """Read, check and normalise every labelled row of the files ``patterns`` (config ``key``) name."""
    data = cfg.data
    kind = cfg.task_kind
    is_ner = kind.token_level
    target_column = data.entities_column if is_ner else data.label_column
    columns = [data.text_column, target_column] if kind.labelled else kind.train_columns(data)
    rows = LabelledRows()
    for shard in discover(list(patterns), data.format, data.storage_options, key):
        fs = filesystem_for(shard.url, data.storage_options)
        table = _read_table(fs, shard, columns)
        url = redact(shard.url)
        if not kind.labelled:
            for i, values in enumerate(table.select(columns).to_pylist(), start=1):
                text, target = kind.train_row(values, f"{url} row {i}")
                rows.texts.append(text)
                rows.targets.append(target)
                rows.origins.append((url, i))
            continue
        texts = table.column(data.text_column).to_pylist()
        targets = table.column(target_column).to_pylist()
        for i, (text, target) in enumerate(zip(texts, targets, strict=True), start=1):
            where = f"{url} row {i}"
            if not isinstance(text, str):
                raise ConfigError(f"{where}: {data.text_column!r} must be a string, got {text!r}")
            rows.texts.append(text)
            rows.targets.append(
                _spans(text, target, where) if is_ner else _label(cfg.task_kind, target, where)
            )
            rows.origins.append((url, i))
    if not rows.texts:
        raise ConfigError(f"{key}: the data files have no rows")
    return rows


def _label(kind: Kind, value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise ConfigError(f"{where}: label must be a non-empty string or integer, got {value!r}")
    label = str(value).strip()
    normalised = kind.train_label(label)
    if normalised is None:
        raise ConfigError(f"{where}: {kind.name} label must be {kind.label_hint}, got {label!r}")
    return normalised


def _spans(text: str, value: object, where: str) -> list[Span]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: entities must be a list of {{start, end, label}}, got {value!r}")
    spans = []
    for entity in value:
        if not isinstance(entity, dict) or not {"start", "end", "label"} <= entity.keys():
            raise ConfigError(f"{where}: each entity needs start, end and label, got {entity!r}")
        start, end, label = entity["start"], entity["end"], entity["label"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            raise ConfigError(f"{where}: entity start/end must be integers, got {entity!r}")
        if not 0 <= start < end <= len(text):
            raise ConfigError(
                f"{where}: entity span [{start}, {end}) is out of range for a text of {len(text)} chars"
            )
        if not isinstance(label, str) or not label.strip() or label.startswith(("B-", "I-")) or label == "O":
            raise ConfigError(
                f"{where}: entity label must be a type such as PER (no B-/I- prefix), got {label!r}"
            )
        spans.append((start, end, label.strip()))
    spans.sort()
    for (_, prev_end, _), (start, _, _) in pairwise(spans):
        if start < prev_end:
            raise ConfigError(f"{where}: entity spans overlap at character {start}")
    return spans


def is_bio_tag_list(labels: Sequence[str]) -> bool:
    """True when ``labels`` are already BIO tags (O, B-X, I-X) rather than entity types."""
    return "O" in labels and all(lab == "O" or lab.startswith(("B-", "I-")) for lab in labels)


def bio_tags(types: Sequence[str]) -> list[str]:
    """The BIO tag list for entity types: O first, then B-/I- pairs in the given order."""
    return ["O", *(f"{prefix}-{t}" for t in types for prefix in ("B", "I"))]


def resolve_labels(
    cfg: FinetuneConfig, rows: Sequence[LabelledRows], base_labels: list[str] | None
) -> list[str]:
    """The model's label list (order = ids); for NER the BIO tags.

    Order of preference: ``labels`` from the config; the base model's head labels (``base_labels``,
    already normalised for sentiment) when they cover everything in the data, so its trained head is
    kept; otherwise the data's labels, sorted (sentiment in negative/neutral/positive order).
    """
    is_ner = cfg.task_kind.token_level
    if cfg.labels is not None:
        labels = list(cfg.labels)
        if is_ner and not is_bio_tag_list(labels):
            labels = bio_tags(labels)
        if is_ner and not _bio_pairs_ok(labels):
            raise ConfigError("labels: BIO tags need both B-X and I-X for every entity type X")
        _check_known(cfg, rows, labels)
        return labels
    seen = set().union(*(_types(target, is_ner) for data in rows for target in data.targets))
    if is_ner and not seen:
        raise ConfigError("data.paths: the data has no entities; set labels to train on all-O rows")
    if base_labels and seen <= _known(base_labels, is_ner) and (not is_ner or _bio_pairs_ok(base_labels)):
        return list(base_labels)
    if is_ner:
        return bio_tags(sorted(seen))
    if cfg.task_kind.label_order:
        labels = [label for label in cfg.task_kind.label_order if label in seen]
    else:  # integer labels (as strings) in numeric order
        labels = sorted(seen, key=lambda label: (0, int(label), "") if label.isdigit() else (1, 0, label))
    if len(labels) < 2:
        raise ConfigError(f"data.paths: a classifier needs at least 2 labels, the data has {labels}")
    return labels


def _known(labels: Sequence[str], is_ner: bool) -> set[str]:
    """Labels a target may use: entity types of BIO tags for NER, else the labels themselves."""
    if not is_ner:
        return set(labels)
    return {tag[2:] for tag in labels if tag != "O"} if is_bio_tag_list(labels) else set()


def _types(target: str | list[Span], is_ner: bool) -> frozenset[str]:
    return frozenset(label for _, _, label in target) if is_ner else frozenset([target])


def _bio_pairs_ok(tags: Sequence[str]) -> bool:
    types = {tag[2:] for tag in tags if tag != "O"}
    return all(f"B-{t}" in tags and f"I-{t}" in tags for t in types)


def _check_known(cfg: FinetuneConfig, rows: Sequence[LabelledRows], labels: list[str]) -> None:
    is_ner = cfg.task_kind.token_level
    known = _known(labels, is_ner)
    for data in rows:
        for i, target in enumerate(data.targets):
            unknown = sorted(_types(target, is_ner) - known)
            if unknown:
                raise ConfigError(
                    f"{data.where(i)}: unknown label {unknown[0]!r} (labels: {', '.join(labels)})"
                )


def spans_to_bio(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[str | None]:
    """BIO tag per token from character spans; None for tokens with an empty offset (special tokens)."""
    tags: list[str | None] = []
    k = 0  # first span that can still overlap the current token (tokens and spans both run left to right)
    previous = None  # span index of the previous token, to tell B from I
    for start, end in offsets:
        if start == end:
            tags.append(None)
            continue
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        hit = k if k < len(spans) and spans[k][0] < end else None
        if hit is None:
            tags.append("O")
        else:
            tags.append(("I-" if hit == previous else "B-") + spans[hit][2])
        previous = hit
    return tags


def encode(
    tokenizer, rows: LabelledRows, labels: list[str], kind: str, max_length: int
) -> dict[str, np.ndarray]:
    """Tokenise once into right-padded arrays: input_ids, attention_mask, labels ([N] or [N, L] for NER)."""
    is_ner = KINDS[kind].token_level
    enc = tokenizer(
        rows.texts,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        padding_side="right",
        return_attention_mask=True,
        return_token_type_ids=False,
        return_offsets_mapping=is_ner,
        return_tensors="np",
    )
    label2id = {label: i for i, label in enumerate(labels)}
    if is_ner:
        targets = np.full(enc["input_ids"].shape, IGNORE_INDEX, dtype=np.int64)
        for i, (offsets, spans) in enumerate(zip(enc["offset_mapping"].tolist(), rows.targets, strict=True)):
            for j, tag in enumerate(spans_to_bio(offsets, spans)):
                if tag is not None:
                    targets[i, j] = label2id[tag]
    else:
        targets = np.array([label2id[label] for label in rows.targets], dtype=np.int64)
    return {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": enc["attention_mask"].astype(np.int8),
        "labels": targets,
    }


def subset(rows: LabelledRows, index: np.ndarray) -> LabelledRows:
    return LabelledRows(
        [rows.texts[i] for i in index], [rows.targets[i] for i in index], [rows.origins[i] for i in index]
    )


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) row indices: a seeded permutation, validation at least one row."""
    if n < 2:
        raise ConfigError(f"data.paths: need at least 2 rows to hold out a validation split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
