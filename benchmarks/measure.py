"""What the benchmark measures besides wall time: tokens, padding, useful FLOPs, GEMM rate, memory,
agreement. Pure functions of token lengths and predictions, plus a memory sampler thread."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from bertpipe.stages.infer import plan_batches


@dataclass
class Windows:
    """Token counts of every row as the NER task sees it (overlapping windows) and as a truncating
    classifier sees it (the first window); both include the special tokens."""

    lengths: np.ndarray  # tokens of each window, all rows, in row order
    per_row: np.ndarray  # windows of each row

    @property
    def first(self) -> np.ndarray:
        starts = np.concatenate([[0], np.cumsum(self.per_row)[:-1]])
        return self.lengths[starts]

    def rows(self, index: np.ndarray) -> Windows:
        starts = np.concatenate([[0], np.cumsum(self.per_row)])
        picked = [self.lengths[starts[i] : starts[i + 1]] for i in index]
        return Windows(np.concatenate(picked), self.per_row[index])

    def blocks(self, sizes: list[int]) -> list[Windows]:
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [self.rows(np.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def token_windows(tokenizer, texts: list[str], max_length: int, stride: int, chunk: int = 2000) -> Windows:
    """The same tokenisation as bertpipe's prepare stage and HF's ``stride`` NER pipeline."""
    lengths, per_row = [], np.zeros(len(texts), np.int64)
    for first in range(0, len(texts), chunk):
        enc = tokenizer(
            texts[first : first + chunk],
            truncation=True,
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        lengths += [len(ids) for ids in enc["input_ids"]]
        per_row[first : first + chunk] = np.bincount(
            enc["overflow_to_sample_mapping"], minlength=len(texts[first : first + chunk])
        )
    return Windows(np.asarray(lengths, np.int64), per_row)


# ------------------------------------------------------------------------------------------------- padding


def padded_fixed(lengths: np.ndarray, batch: int) -> int:
    """Tokens computed when batches of ``batch`` sequences in input order are padded to their longest."""
    return int(sum(len(c) * c.max() for c in np.split(lengths, range(batch, len(lengths), batch)) if len(c)))


def padded_budget(lengths: np.ndarray, max_tokens: int, max_rows: int) -> int:
    """Tokens computed under bertpipe's plan: sorted by length, cut by token budget, padded per batch."""
    batches = plan_batches(lengths, max_tokens, max_rows, descending=False) if len(lengths) else []
    return int(sum(len(b) * lengths[b].max() for b in batches))


def padding_waste(padded: int, real: int) -> float:
    return (padded - real) / real if real else 0.0


# --------------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int

    @classmethod
    def of(cls, config) -> Shape:
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size)

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies: Q, K, V, output projections and the two FFN matrices."""
        return self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)


FLOPS_FORMULA = (
    "per sequence of L real tokens: 2*P*L + 4*layers*hidden*L^2 (+ head), "
    "P = layers*(4*hidden^2 + 2*hidden*intermediate); head: 2*hidden*labels per token (NER), "
    "2*(hidden^2 + hidden*labels) per sequence (pooler + classifier); padding never counts"
)


def useful_flops(shape: Shape, lengths: np.ndarray, labels: int, per_token_head: bool) -> float:
    lengths = lengths.astype(np.float64)
    encoder = 2 * shape.matmul_params * lengths.sum() + 4 * shape.layers * shape.hidden * (lengths**2).sum()
    if per_token_head:
        return float(encoder + 2 * shape.hidden * labels * lengths.sum())
    return float(encoder + 2 * (shape.hidden**2 + shape.hidden * labels) * len(lengths))


class Workload:
    """Token counts and model shapes: what every way's figures are computed from."""

    def __init__(self, models: dict[str, Path], windows: Windows, max_length: int, stride: int):
        from transformers import AutoConfig

        self.windows, self.max_length, self.stride = windows, max_length, stride
        configs = {task: AutoConfig.from_pretrained(path) for task, path in models.items()}
        self.shapes = {task: Shape.of(c) for task, c in configs.items()}
        self.labels = {task: c.num_labels for task, c in configs.items()}

    def tokens(self, w: Windows) -> int:
        return int(w.first.sum() + w.lengths.sum())

    def flops(self, w: Windows) -> float:
        return useful_flops(
            self.shapes["sentiment"], w.first, self.labels["sentiment"], False
        ) + useful_flops(self.shapes["ner"], w.lengths, self.labels["ner"], True)


def gemm_flops_per_s(
    dtype_name: str, n: int = 4096, repeats: int = 10, device: str = "cpu", mkn: tuple | None = None
) -> float:
    """Best of ``repeats`` timed matmuls, n x n or (m, k) @ (k, n) (on CPU with every core)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    m, k, n = mkn or (n, n, n)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pool, kernel selection
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


# -------------------------------------------------------------------------------------------------- memory


@dataclass
class MemoryPeak:
    """Peak of the summed RSS and PSS of a process and all its descendants (Ray's raylet, GCS and workers
    included). RSS counts shared pages (Ray's object store) once per process that maps them; PSS splits
    them between those processes, so it is the better measure of what the tree really holds."""

    pid: int
    interval: float = 1.0  # reading PSS of a Ray tree costs ~30 ms of CPU: keep it under 3% of a core
    rss: int = 0
    pss: int = 0
    processes: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)  # PSS by process title at the peak sample
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = pss = 0
        by_title: dict[str, int] = {}
        for proc in tree:
            try:
                info = proc.memory_full_info()
                title = _title(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss, pss = rss + info.rss, pss + info.pss
            by_title[title] = by_title.get(title, 0) + info.pss
        if pss > self.pss:
            self.at_peak = by_title
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        self.processes = max(self.processes, len(tree))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemoryPeak:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict:
        return {
            "peak_rss_mib": self.rss / 2**20,
            "peak_pss_mib": self.pss / 2**20,
            "processes": self.processes,
            "pss_mib_by_process_at_peak": {
                title: round(size / 2**20)
                for title, size in sorted(self.at_peak.items(), key=lambda kv: -kv[1])
            },
        }


def _title(proc: psutil.Process) -> str:
    """Ray names its workers by the task or actor they run (``ray::InferStage``); others by program."""
    cmdline = proc.cmdline()
    first = cmdline[0] if cmdline else proc.name()
    if first.startswith("ray::"):
        return first.split()[0]
    program = Path(first).name
    if "python" in program:  # "python -m", "python dashboard.py"
        return " ".join(Path(c).name for c in cmdline[:2])
    return program


# ----------------------------------------------------------------------------------------------- agreement


def label_agreement(got: dict[str, str], ref: dict[str, str]) -> float:
    return sum(got[k] == ref[k] for k in ref) / len(ref) if ref else 1.0


def entity_f1(got: dict[str, list], ref: dict[str, list]) -> dict:
    """Micro F1 over exact (group, start, end) matches, counted as multisets per row."""
    tp = n_got = n_ref = 0
    for key, expected in ref.items():
        a, b = Counter(map(tuple, got[key])), Counter(map(tuple, expected))
        tp += sum((a & b).values())
        n_got, n_ref = n_got + sum(a.values()), n_ref + sum(b.values())
    precision = tp / n_got if n_got else 1.0
    recall = tp / n_ref if n_ref else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "entities_ref": n_ref, "entities_got": n_got}


def _sentiment(label: str) -> str:
    from bertpipe.tasks.sentiment import normalise_sentiment_label

    return (
        normalise_sentiment_label(label) or label
    )  # bertpipe writes positive/negative, HF the model's own names


def positive_share(predictions: dict[str, list], ids: list[str]) -> float:
    return sum(_sentiment(predictions[i][0]) == "positive" for i in ids) / len(ids)


def compare_predictions(got: dict[str, list], ref: dict[str, list], ids: list[str]) -> dict:
    """Predictions are ``{id: [sentiment label, [[group, start, end], ...]]}``."""
    labels = {i: _sentiment(got[i][0]) for i in ids}
    ref_labels = {i: _sentiment(ref[i][0]) for i in ids}
    return {
        "sentiment_agreement": label_agreement(labels, ref_labels),
        "sentiment_disagreeing_ids": [i for i in ids if labels[i] != ref_labels[i]][:20],
        "ner": entity_f1({i: got[i][1] for i in ids}, {i: ref[i][1] for i in ids}),
    }
