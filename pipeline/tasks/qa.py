"""``kind: qa``: extractive question answering, as the HF ``question-answering`` pipeline did.

transformers removed that pipeline after 5.2, so its span selection is ported here (``_decode_spans``,
``_select_starts_ends`` and the answer loop of ``QuestionAnsweringPipeline.postprocess``, transformers
5.2.0, Apache-2.0), on arrays our stages produce: the (question, text) pair is tokenised with the
question first and the text cut into overlapping windows (``runtime.max_length``, ``runtime.stride``),
each window runs in the model stage like any other sequence, and here each window's start/end logits
give candidate spans (at most ``max_answer_len`` tokens, inside the text), aligned to whole words,
merged across windows by answer text. With ``handle_impossible_answer`` the empty answer competes with
the lowest no-answer ([CLS]) score of the windows. Offsets are characters of the text.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from bertpipe import columns as C
from bertpipe.config import ConfigError
from bertpipe.tasks.base import Kind, Postprocessor, TaskBase, TaskBatch

ANSWERS_TYPE = pa.list_(
    pa.struct([("answer", pa.string()), ("score", pa.float32()), ("start", pa.int32()), ("end", pa.int32())])
)


class QaTask(TaskBase):
    kind: Literal["qa"] = "qa"
    question: str | None = None  # the same question for every row
    question_column: str | None = None  # or one question per row
    top_k: int = Field(default=1, ge=1)
    max_answer_len: int = Field(default=15, ge=1)
    handle_impossible_answer: bool = False

    @model_validator(mode="after")
    def _one_question(self) -> QaTask:
        if (self.question is None) == (self.question_column is None):
            raise ValueError("set exactly one of question (one for every row) and question_column")
        if self.question is not None and not self.question.strip():
            raise ValueError("question is empty")
        return self


def _decode_spans(start, end, topk: int, max_answer_len: int, undesired_tokens):
    """transformers 5.2.0 ``decode_spans``, unchanged (including its ``np.isin`` over ``nonzero()``)."""
    if start.ndim == 1:
        start = start[None]
    if end.ndim == 1:
        end = end[None]
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    scores_flat = candidates.flatten()
    if topk == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) < topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    desired = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts, ends = starts[desired], ends[desired]
    return starts, ends, candidates[0, starts, ends]


def _select_starts_ends(start, end, p_mask, min_null_score, top_k, handle_impossible_answer, max_answer_len):
    """transformers 5.2.0 ``select_starts_ends`` for one unpadded window (attention mask all ones)."""
    undesired_tokens = np.abs(p_mask.astype(np.int64) - 1)[None]
    undesired_tokens_mask = undesired_tokens == 0.0
    start = np.where(undesired_tokens_mask, -10000.0, start[None])
    end = np.where(undesired_tokens_mask, -10000.0, end[None])
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0
    starts, ends, scores = _decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


def _word_chars(token: int, words: np.ndarray, offsets: np.ndarray) -> tuple[int, int] | None:
    """The characters of the text word that ``token`` belongs to within its window (as tokenizers'
    ``word_to_chars``), or None for a token outside the text's words."""
    word = words[token]
    if word < 0:
        return None
    same = np.nonzero(words == word)[0]
    return int(offsets[same[0], 0]), int(offsets[same[-1], 1])


def answers_for(task: QaTask, text: str, windows: list[tuple[np.ndarray, ...]]) -> list[dict]:
    """The best answers of one row over its windows, each (start/end logits, p_mask, offsets, words)."""
    min_null_score = 1000000
    answers: list[dict] = []
    pre_topk = task.top_k * 2 + 10  # HF's margin for candidates dropped by word alignment
    for logits, p_mask, offsets, words in windows:
        starts, ends, scores, min_null_score = _select_starts_ends(
            logits[:, 0],
            logits[:, 1],
            p_mask,
            min_null_score,
            pre_topk,
            task.handle_impossible_answer,
            task.max_answer_len,
        )
        for s, e, score in zip(starts, ends, scores, strict=True):
            first, last = _word_chars(s, words, offsets), _word_chars(e, words, offsets)
            if first is None or last is None:
                start_index, end_index = int(offsets[s, 0]), int(offsets[e, 1])
            else:
                start_index, end_index = first[0], last[1]
            target = text[start_index:end_index]
            same = next((a for a in answers if a["answer"].lower() == target.lower()), None)
            if same:
                same["score"] += score.item()
            else:
                answers.append(
                    {"score": score.item(), "start": start_index, "end": end_index, "answer": target}
                )
    if task.handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda a: a["score"], reverse=True)[: task.top_k]


class QaPostprocess(Postprocessor):
    def __init__(self, task: QaTask):
        super().__init__()
        self.task = task

    def __call__(self, batch: TaskBatch) -> dict[str, pa.Array]:
        logits = batch.logits
        if C.word_ids(batch.group) not in batch.table.column_names:  # a batch without a labelled row
            logits = pa.array([[]] * len(logits), logits.type)
        else:
            _, offsets, special = batch.tokens()
            words = batch.column(C.word_ids(batch.group))
        best, tops = [], []
        self.failures = {}
        for row in range(len(logits)):
            row_logits = logits[row].values
            if not len(row_logits):
                best.append(None)
                tops.append(None)
                continue
            windows = [
                (
                    np.asarray(row_logits[w].values, np.float32).reshape(-1, 2),
                    np.asarray(special[row].values[w].values, np.int8),
                    np.asarray(offsets[row].values[w].values, np.int64).reshape(-1, 2),
                    np.asarray(words[row].values[w].values, np.int64),
                )
                for w in range(len(row_logits))
            ]
            try:
                answers = answers_for(self.task, batch.texts[row], windows)
            except Exception as exc:  # noqa: BLE001 - one odd row must not fail the batch
                answers = None
                self.failures[row] = f"{self.task.name} answer failed: {type(exc).__name__}"
            best.append(answers[0] if answers else None)
            tops.append(answers)
        name = self.task.name
        out = {
            f"{name}_answer": pa.array([a and a["answer"] for a in best], pa.string()),
            f"{name}_score": pa.array([a and a["score"] for a in best], pa.float32()),
            f"{name}_start": pa.array([a and a["start"] for a in best], pa.int32()),
            f"{name}_end": pa.array([a and a["end"] for a in best], pa.int32()),
        }
        if self.task.top_k > 1:
            out[f"{name}_top"] = pa.array(tops, ANSWERS_TYPE)
        return out


class Qa(Kind):
    name = "qa"
    config = QaTask
    auto_model = "AutoModelForQuestionAnswering"
    labelled = False
    train_metric = "val_span_accuracy"
    head_module = "qa_outputs"
    head_tensors = ("qa_outputs.",)
    compared = "answer start/end tokens"

    def all_windows(self, task: QaTask) -> bool:
        return True

    def offsets(self, task: QaTask) -> bool:
        return True

    def own_tokens(self, task: QaTask) -> bool:
        return True

    def input_columns(self, task: QaTask) -> list[str]:
        return [task.question_column] if task.question_column else []

    def input_problem(self, task: QaTask, values: dict) -> str | None:
        if task.question_column is None:
            return None
        question = values[task.question_column]
        if question is None:
            return "question is null"
        if not isinstance(question, str):
            return f"question is not a string ({type(question).__name__})"
        if not question.strip():
            return "question is empty"
        return None

    def encode(self, task: QaTask, tokenizer, texts, inputs, max_length, stride):
        """(question, text) windows as the HF pipeline tokenises them (question first, the text cut),
        with p_mask (1: not part of the text, [CLS] kept 0) and each text token's word index."""
        questions = [task.question] * len(texts) if task.question else inputs[task.question_column]
        question_first = tokenizer.padding_side == "right"
        enc = tokenizer(
            questions if question_first else texts,
            texts if question_first else questions,
            truncation="only_second" if question_first else "only_first",
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids="token_type_ids" in tokenizer.model_input_names,
        )
        text_sequence = 1 if question_first else 0
        p_masks, words, offsets = [], [], []
        for w, ids in enumerate(enc["input_ids"]):
            sequence_ids = enc.sequence_ids(w)
            p_mask = [int(s != 1) if question_first else 0 for s in sequence_ids]
            for i, token in enumerate(ids):
                if token == tokenizer.cls_token_id:
                    p_mask[i] = 0
            p_masks.append(p_mask)
            in_text = [s == text_sequence for s in sequence_ids]
            words.append(
                [wd if t and wd is not None else -1 for wd, t in zip(enc.word_ids(w), in_text, strict=True)]
            )
            offsets.append(
                [o if t else (0, 0) for o, t in zip(enc["offset_mapping"][w], in_text, strict=True)]
            )
        encoded = {"input_ids": enc["input_ids"], "offset_mapping": offsets, "special_tokens_mask": p_masks}
        encoded["word_ids"] = words
        if "token_type_ids" in enc:
            encoded["token_type_ids"] = enc["token_type_ids"]
        return encoded, list(enc["overflow_to_sample_mapping"])

    def model_outputs(self, task: QaTask, info, out, attention_mask):
        import torch

        return torch.stack([out.start_logits, out.end_logits], dim=-1)

    def disagreement(self, task: QaTask, fast: list[np.ndarray], exact: list[np.ndarray]) -> float:
        """Start and end tokens (argmax over the window) that differ."""
        a = np.concatenate([x.argmax(0) for x in fast])
        b = np.concatenate([x.argmax(0) for x in exact])
        return float((a != b).mean())

    def output_fields(self, task: QaTask, info) -> list[pa.Field]:
        name = task.name
        fields = [
            pa.field(f"{name}_answer", pa.string()),
            pa.field(f"{name}_score", pa.float32()),
            pa.field(f"{name}_start", pa.int32()),
            pa.field(f"{name}_end", pa.int32()),
        ]
        if task.top_k > 1:
            fields.append(pa.field(f"{name}_top", ANSWERS_TYPE))
        return fields

    def postprocessor(self, task: QaTask, info, tokenizer) -> Postprocessor:
        return QaPostprocess(task)

    def tally(self, task: QaTask, outputs: dict[str, pa.Array]) -> dict[str, int]:
        answers = outputs[f"{task.name}_answer"]
        found = sum(1 for a in answers.to_pylist() if a)
        return {"answered": found, "no answer": len(answers) - answers.null_count - found}

    # ---- fine-tuning on SQuAD-style rows: {context, question, answers: {text: [...], answer_start: [...]}}
    def train_model_kwargs(self, labels) -> dict:
        return {}

    def train_columns(self, data) -> list[str]:
        return [data.context_column, data.question_column, data.answers_column]

    def train_row(self, values: dict, where: str) -> tuple[str, tuple[str, tuple[int, int] | None]]:
        """(context, (question, character span of the first answer or None: unanswerable))."""
        context, question, answers = values.values()
        if not isinstance(context, str) or not context.strip():
            raise ConfigError(f"{where}: context must be a non-empty string, got {context!r}")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: question must be a non-empty string, got {question!r}")
        if not isinstance(answers, dict) or not {"text", "answer_start"} <= answers.keys():
            raise ConfigError(
                f"{where}: answers must be {{text: [...], answer_start: [...]}}, got {answers!r}"
            )
        texts, starts = answers["text"] or [], answers["answer_start"] or []
        if len(texts) != len(starts):
            raise ConfigError(f"{where}: answers has {len(texts)} texts but {len(starts)} answer_start")
        for text, start in zip(texts, starts, strict=True):
            if not isinstance(start, int) or isinstance(start, bool) or not isinstance(text, str) or not text:
                raise ConfigError(f"{where}: answer {text!r} at {start!r}: need a non-empty text and an int")
            if context[start : start + len(text)] != text:
                raise ConfigError(f"{where}: answer {text!r} is not at character {start} of the context")
        span = (starts[0], starts[0] + len(texts[0])) if texts else None
        return context, (question, span)

    def train_features(self, tokenizer, texts, targets, max_length, stride) -> dict[str, np.ndarray]:
        """HF ``run_qa.py``'s training features: (question, context) windows as ``encode`` cuts them
        (question first), the answer's first and last token as start/end positions, and [CLS] (0) for
        an unanswerable row or a window the answer is not wholly inside."""
        if tokenizer.padding_side != "right":
            raise ConfigError("base_model: qa fine-tuning needs a tokenizer that pads on the right")
        try:
            enc = tokenizer(
                [question for question, _ in targets],
                texts,
                truncation="only_second",
                max_length=max_length,
                stride=stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
                padding="max_length",
                return_token_type_ids="token_type_ids" in tokenizer.model_input_names,
                return_tensors="np",
            )
        except Exception as exc:  # e.g. a question that leaves no room for stride tokens of context
            raise ConfigError(
                f"max_length/stride: cannot window the contexts: {str(exc).splitlines()[0]}"
            ) from exc
        starts, ends = [], []
        for w, row in enumerate(enc["overflow_to_sample_mapping"]):
            span = targets[row][1]
            context = [i for i, s in enumerate(enc.sequence_ids(w)) if s == 1]
            offsets = enc["offset_mapping"][w]
            if span is None or offsets[context[0]][0] > span[0] or offsets[context[-1]][1] < span[1]:
                starts.append(0)
                ends.append(0)
                continue
            first = context[0]
            while first <= context[-1] and offsets[first][0] <= span[0]:
                first += 1
            last = context[-1]
            while last >= context[0] and offsets[last][1] >= span[1]:
                last -= 1
            starts.append(first - 1)
            ends.append(last + 1)
        arrays = {
            "input_ids": enc["input_ids"].astype(np.int32),
            "attention_mask": enc["attention_mask"].astype(np.int8),
            "start_positions": np.array(starts, np.int64),
            "end_positions": np.array(ends, np.int64),
        }
        if "token_type_ids" in enc:
            arrays["token_type_ids"] = enc["token_type_ids"].astype(np.int8)
        return arrays

    def train_predict(self, out) -> np.ndarray:
        return np.stack(
            [out.start_logits.argmax(-1).cpu().numpy(), out.end_logits.argmax(-1).cpu().numpy()], -1
        )

    def train_scores(self, arrays, predictions) -> dict[str, float]:
        """Token-position accuracy per window: ``span_accuracy`` (start and end both the gold tokens,
        [CLS] for no answer in the window) and ``start_accuracy``. Simpler than answer-text EM/F1 and the
        same thing on one-window rows: the predicted tokens are what ``answers_for`` turns into text."""
        start = predictions[:, 0] == arrays["start_positions"]
        end = predictions[:, 1] == arrays["end_positions"]
        return {"span_accuracy": float((start & end).mean()), "start_accuracy": float(start.mean())}


KIND = Qa()
