"""``kind: ner``: per-token logits of every window -> entity spans with character offsets.

The span rules (sub-word fusion, the ``simple/first/average/max`` strategies, merging the entities of
overlapping windows) are HF's ``TokenClassificationPipeline.postprocess``; ``SpanAssembler`` applies
them to a whole batch at once. Only the tokenizer and ``id2label`` are needed, so no model is loaded in
this CPU stage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from functools import lru_cache
from typing import Literal

import numpy as np
import pyarrow as pa

from bertpipe.tasks.base import Kind, Postprocessor, TaskBase, TaskBatch, value_counts

ENTITY_FIELDS = [
    ("entity_group", pa.string()),
    ("word", pa.string()),
    ("start", pa.int32()),
    ("end", pa.int32()),
    ("score", pa.float32()),
]
ENTITY_TYPE = pa.list_(pa.struct(ENTITY_FIELDS))


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


def _starts(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs that begin where ``flags`` is set (``flags[0]`` must be): first and last index of each."""
    first = np.flatnonzero(flags)
    return first, np.append(first[1:], len(flags))[: len(first)] - 1


def _mean_of_runs(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """``np.nanmean`` of each run of ``values`` (along axis 0) starting at ``first``."""
    if not len(first):
        return values[:0]
    valid = ~np.isnan(values)
    sums = np.add.reduceat(np.where(valid, values, 0), first, axis=0)
    return sums / np.add.reduceat(valid, first, axis=0).astype(values.dtype)


class SpanAssembler:
    """HF's token-classification postprocess, vectorised over a batch of windows.

    Hand-written because no library assembles spans for a batch: HF's pipeline walks every token of one
    text in Python (about 1 ms a row). Here softmax, argmax, sub-word detection, word votes and the
    grouping of B-/I- tags run in numpy over every token of the batch; Python touches only the entities
    kept (to decode their words, with the tokenizer's own ``convert_tokens_to_string``) and the
    entities of texts with several windows (HF's ``aggregate_overlapping_entities``). tests/
    test_ner_spans.py keeps it equal to ``TokenClassificationPipeline.postprocess`` for every strategy.
    """

    def __init__(self, tokenizer, id2label: dict[int, str], strategy: Aggregation):
        self.strategy = strategy
        backend = tokenizer._tokenizer
        self.vocab = np.array(
            tokenizer.convert_ids_to_tokens(list(range(backend.get_vocab_size(with_added_tokens=True)))),
            object,
        )
        self.token_len = np.array([len(t) if t is not None else -1 for t in self.vocab], np.int64)
        self.unk_id = -1 if tokenizer.unk_token_id is None else tokenizer.unk_token_id
        # HF: a tokenizer that marks continuing sub-words (WordPiece's ``##``) tells sub-words by the token
        # being longer or shorter than its text; others by the token not following a space.
        self.word_aware = bool(getattr(backend.model, "continuing_subword_prefix", None))
        labels = [id2label[i] for i in range(len(id2label))]
        tags = [label[2:] if label.startswith(("B-", "I-")) else label for label in labels]
        self.labels = np.array(labels, object)
        self.tag = np.unique(tags, return_inverse=True)[1]
        self.begins = np.array([label.startswith("B-") for label in labels])
        self.group_name = np.array([label.split("-", 1)[-1] for label in labels], object)
        self.join = lru_cache(maxsize=65536)(lambda tokens: tokenizer.convert_tokens_to_string(list(tokens)))

    def assemble(
        self,
        texts: list[str | None],
        ids: np.ndarray,
        offsets: np.ndarray,
        special: np.ndarray,
        logits: np.ndarray,
        window_tokens: np.ndarray,
        row_windows: np.ndarray,
    ) -> Spans:
        """The entities of every row, in row order and, within a row, in HF's order.

        ``ids``, ``offsets`` (tokens x 2), ``special`` and ``logits`` (tokens x labels) hold the tokens of
        every window one after another; window ``w`` is ``window_tokens[w]:window_tokens[w + 1]``, and the
        windows of row ``r`` are ``row_windows[r]:row_windows[r + 1]``."""
        n_windows = len(window_tokens) - 1
        window_row = np.repeat(np.arange(len(texts)), np.diff(row_windows))
        token_window = np.repeat(np.arange(n_windows), np.diff(window_tokens))
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = shifted / shifted.sum(axis=-1, keepdims=True)

        kept = np.flatnonzero(special == 0)  # HF's pre-entities: every non-special token
        ids, scores, window = ids[kept].astype(np.int64), scores[kept], token_window[kept]
        starts, ends = offsets[kept, 0].astype(np.int64), offsets[kept, 1].astype(np.int64)
        new_window = np.ones(len(kept), bool)
        new_window[1:] = window[1:] != window[:-1]
        unknown = ids == self.unk_id

        if self.strategy in (Aggregation.none, Aggregation.simple):
            unit_first = unit_last = np.arange(len(kept))
            label = scores.argmax(-1)
            unit_score = scores[unit_first, label]
        else:
            continues = self._subwords(texts, window_row[window], ids, starts, ends) & ~unknown
            unit_first, unit_last = _starts(new_window | ~continues)
            if self.strategy == Aggregation.first:
                label = scores[unit_first].argmax(-1)
                unit_score = scores[unit_first, label]
            elif self.strategy == Aggregation.max:
                token_max = scores.max(-1)
                word = np.cumsum(new_window | ~continues) - 1
                word_max = np.maximum.reduceat(token_max, unit_first) if len(unit_first) else token_max
                best = np.flatnonzero(token_max == word_max[word])
                best = best[np.unique(word[best], return_index=True)[1]]  # the first token that has it
                label = scores[best].argmax(-1)
                unit_score = scores[best, label]
            else:
                averaged = _mean_of_runs(scores, unit_first)
                label = averaged.argmax(-1)
                unit_score = averaged[np.arange(len(unit_first)), label]

        if self.strategy == Aggregation.none:
            group_first = group_last = np.flatnonzero(self.labels[label] != "O")
            names, group_score = self.labels[label[group_first]], unit_score[group_first]
        else:
            tag = self.tag[label]
            opens = new_window[unit_first] | self.begins[label]
            opens[1:] |= tag[1:] != tag[:-1]
            group_first, group_last = _starts(opens)
            names = self.group_name[label[group_first]]
            group_score = _mean_of_runs(unit_score, group_first)
            entity = names != "O"
            group_first, group_last, names = group_first[entity], group_last[entity], names[entity]
            group_score = group_score[entity]

        tokens = self._tokens(texts, window_row[window], ids, starts, ends, unknown)
        words = []
        for first, last in zip(unit_first[group_first].tolist(), unit_last[group_last].tolist(), strict=True):
            if self.strategy == Aggregation.none:
                words.append(tokens[first])
            elif self.strategy == Aggregation.simple:
                words.append(self.join(tuple(tokens[first : last + 1])))
            else:  # HF joins the words it joined from their tokens
                lo, hi = np.searchsorted(unit_first, [first, last + 1]).tolist()
                bounds = zip(unit_first[lo:hi].tolist(), unit_last[lo:hi].tolist(), strict=True)
                words.append(self.join(tuple(self.join(tuple(tokens[f : t + 1])) for f, t in bounds)))
        spans = Spans(
            window_row[window[unit_first[group_first]]],
            names,
            np.array(words, object),
            starts[unit_first[group_first]],
            ends[unit_last[group_last]],
            group_score.astype(np.float32),
        )
        return spans.merged(np.flatnonzero(np.diff(row_windows) > 1))

    def _subwords(self, texts, token_row, ids, starts, ends) -> np.ndarray:
        """HF's ``is_subword`` of each token (before unknown tokens are made words)."""
        row_length = np.array([len(t) if t is not None else 0 for t in texts], np.int64)
        length = row_length[token_row]
        if self.word_aware:  # ``len(word) != len(sentence[start:end])``
            return self.token_len[ids] != np.clip(
                np.minimum(ends, length) - np.minimum(starts, length), 0, None
            )
        # ``start > 0 and " " not in sentence[start - 1 : start + 1]``, on the code points of the texts
        chars = np.frombuffer("".join(t or "" for t in texts).encode("utf-32-le"), np.uint32)
        base = (np.cumsum(row_length) - row_length)[token_row]

        def space_at(at: np.ndarray) -> np.ndarray:
            inside = (at >= 0) & (at < length)
            return inside & (chars[np.where(inside, base + at, 0)] == ord(" ")) if len(chars) else inside

        return (starts > 0) & ~space_at(starts - 1) & ~space_at(starts)

    def _tokens(self, texts, token_row, ids, starts, ends, unknown) -> list[str]:
        """The word HF gives each token: its vocabulary entry, or its text where it is the unknown token."""
        tokens = self.vocab[ids].tolist()
        for t in np.flatnonzero(unknown).tolist():
            tokens[t] = texts[token_row[t]][starts[t] : ends[t]]
        return tokens


@dataclass
class Spans:
    """Entities of a batch, one array per field, in row order (``row``: the row of each entity)."""

    row: np.ndarray
    name: np.ndarray
    word: np.ndarray
    start: np.ndarray
    end: np.ndarray
    score: np.ndarray

    @classmethod
    def empty(cls) -> Spans:
        none, text = np.zeros(0, np.int64), np.zeros(0, object)
        return cls(none, text, text, none, none, np.zeros(0, np.float32))

    def take(self, index: np.ndarray) -> Spans:
        return Spans(*(getattr(self, f.name)[index] for f in fields(self)))

    def merged(self, rows: np.ndarray) -> Spans:
        """HF's ``aggregate_overlapping_entities`` on the entities of ``rows`` (those with several
        windows): of entities that overlap, the longest (then the higher score), in order of start."""
        if not len(rows) or not len(self.row):
            return self
        pieces, done = [], 0
        for lo, hi in np.searchsorted(self.row, np.stack([rows, rows + 1])).T.tolist():
            index = lo + np.argsort(self.start[lo:hi], kind="stable")
            start, end, score = (
                self.start[index].tolist(),
                self.end[index].tolist(),
                self.score[index].tolist(),
            )
            chosen, previous = [], 0
            for i in range(hi - lo):  # from the first entity itself, as HF does
                if start[previous] <= start[i] < end[previous]:
                    length, previous_length = end[i] - start[i], end[previous] - start[previous]
                    if length > previous_length or (length == previous_length and score[i] > score[previous]):
                        previous = i
                else:
                    chosen.append(previous)
                    previous = i
            if hi > lo:
                chosen.append(previous)
            pieces += [np.arange(done, lo), index[chosen]]
            done = hi
        pieces.append(np.arange(done, len(self.row)))
        return self.take(np.concatenate(pieces).astype(np.int64))

    def column(self, n_rows: int, null: np.ndarray) -> pa.ListArray:
        """One list of entities per row; ``null`` rows (no windows: bad text) are null."""
        counts = np.bincount(self.row, minlength=n_rows) if len(self.row) else np.zeros(n_rows, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        values = pa.StructArray.from_arrays(
            [
                pa.array(self.name.tolist(), pa.string()),
                pa.array(self.word.tolist(), pa.string()),
                pa.array(self.start, pa.int32()),
                pa.array(self.end, pa.int32()),
                pa.array(self.score, pa.float32()),
            ],
            fields=[pa.field(n, t) for n, t in ENTITY_FIELDS],
        )
        return pa.ListArray.from_arrays(pa.array(offsets), values, type=ENTITY_TYPE, mask=pa.array(null))


def _values(lists: pa.ListArray) -> tuple[np.ndarray, pa.Array]:
    """Offsets from 0 and the values of a list array (which may be a slice of a larger one)."""
    offsets = lists.offsets.to_numpy()
    return offsets - offsets[0], lists.flatten()


def _concat(parts: list[Spans]) -> Spans:
    return Spans(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Spans)))


class NerPostprocess(Postprocessor):
    def __init__(self, task: NerTask, info, tokenizer):
        super().__init__()
        self.task = task
        self.num_labels = info.num_labels
        self.assembler = SpanAssembler(tokenizer, info.id2label, task.aggregation)

    def __call__(self, batch: TaskBatch) -> dict[str, pa.Array]:
        """Per row: windows of token ids/offsets/special mask (prepare stage) and logits (model stage)."""
        ids, offsets, special = batch.tokens()
        row_windows, window_logits = _values(batch.logits)
        id_windows, window_ids = _values(ids)
        if not np.array_equal(row_windows, id_windows):
            raise ValueError("window lists of token ids and logits are misaligned")
        window_tokens, flat_ids = _values(window_ids)
        arrays = (
            flat_ids.to_numpy(),
            _values(_values(offsets)[1])[1].to_numpy().reshape(-1, 2),
            _values(_values(special)[1])[1].to_numpy(),
            _values(window_logits)[1].to_numpy().reshape(-1, self.num_labels),
        )
        texts = batch.texts
        self.failures = {}
        try:
            spans = self.assembler.assemble(texts, *arrays, window_tokens, row_windows)
        except Exception:  # noqa: BLE001 - isolated below, row by row
            spans = self._row_by_row(texts, arrays, window_tokens, row_windows)
        null = np.diff(row_windows) == 0
        null[list(self.failures)] = True
        return {self.task.name: spans.column(len(texts), null)}

    def _row_by_row(self, texts, arrays, window_tokens, row_windows) -> Spans:
        """Spans of one row at a time, so that a row the batch could not take marks that row only."""
        parts = [Spans.empty()]
        for row in np.flatnonzero(np.diff(row_windows)).tolist():
            first, last = row_windows[row], row_windows[row + 1]
            lo, hi = window_tokens[first], window_tokens[last]
            try:
                spans = self.assembler.assemble(
                    [texts[row]],
                    *(a[lo:hi] for a in arrays),
                    window_tokens[first : last + 1] - lo,
                    np.array([0, last - first]),
                )
            except Exception as exc:  # noqa: BLE001 - one odd row must not fail the batch
                self.failures[row] = f"{self.task.name} spans failed: {type(exc).__name__}"
                continue
            spans.row[:] = row
            parts.append(spans)
        return _concat(parts)


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
