"""The benchmark corpus: English-looking documents with a long-tailed length distribution.

Text: sentences of the demo generators (``bertpipe.demo.datagen.make_sample_corpus``: reviews, news and
forum posts with person, company and city names from Faker), so the text tokenises like English and
carries entities and sentiment. A document is sentences drawn at random, a paragraph break every five,
cut to exactly its target number of words (the last sentence may be cut short).

Lengths: lognormal words per document, median 120 and sigma 1.0, clipped to [5, 2000]; about one row in
eight needs more than one 512-token window. Rows are written as contiguous shards (at least 8, at most
2,500 rows each), every fourth shard JSONL and the others Parquet. Everything depends only on (rows,
seed), and a finished corpus is reused (its ``DONE`` marker is written last).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MEDIAN_WORDS = 120
SIGMA = 1.0
MIN_WORDS, MAX_WORDS = 5, 2000
ROWS_PER_SHARD = 2500
MIN_SHARDS = 8
POOL_DOCS = 4000  # demo documents split into the sentence pool (about 20,000 distinct sentences)
SENTENCES_PER_PARAGRAPH = 5

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_pool(docs: int, seed: int) -> list[str]:
    """Distinct sentences (and headlines) of ``docs`` demo documents, in generation order."""
    from bertpipe.demo.datagen import make_sample_corpus

    sentences = (
        s.strip()
        for row in make_sample_corpus(docs, seed=seed)
        for line in row["text"].splitlines()
        for s in _SENTENCE_END.split(line)
    )
    return list(dict.fromkeys(s for s in sentences if s))


def word_counts(n: int, rng: np.random.Generator) -> np.ndarray:
    words = rng.lognormal(np.log(MEDIAN_WORDS), SIGMA, size=n)
    return np.clip(np.rint(words), MIN_WORDS, MAX_WORDS).astype(np.int64)


def make_texts(n: int, seed: int) -> list[str]:
    """``n`` documents: sentences drawn from one shared random stream until each target length."""
    rng = np.random.default_rng(seed)
    targets = word_counts(n, rng)
    pool = sentence_pool(min(POOL_DOCS, max(n, 50)), seed)
    pool_words = np.array([len(s.split()) for s in pool], dtype=np.int64)
    need = int(targets.sum() + n * pool_words.max())  # each document overshoots by < one sentence
    stream = rng.integers(0, len(pool), size=int(need / pool_words.mean()) + 64)
    cum = np.concatenate([[0], np.cumsum(pool_words[stream])])
    while cum[-1] < need:
        more = rng.integers(0, len(pool), size=len(stream))
        stream = np.concatenate([stream, more])
        cum = np.concatenate([cum, cum[-1] + np.cumsum(pool_words[more])])
    texts, start = [], 0
    for target in targets:
        # the first sentence whose end reaches the target is the last one of this document
        end = int(np.searchsorted(cum, cum[start] + target, side="left"))
        chosen = [pool[j] for j in stream[start:end]]
        overflow = int(cum[end] - cum[start] - target)
        if overflow:
            last = chosen[-1].split()
            chosen[-1] = " ".join(last[: len(last) - overflow])
        paragraphs = [
            " ".join(chosen[i : i + SENTENCES_PER_PARAGRAPH])
            for i in range(0, len(chosen), SENTENCES_PER_PARAGRAPH)
        ]
        texts.append("\n\n".join(paragraphs))
        start = end
    return texts


def write_shards(folder: Path, ids: list[str], texts: list[str]) -> list[int]:
    """Contiguous shards in name order; returns the rows of each."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = min(ROWS_PER_SHARD, -(-len(ids) // MIN_SHARDS))
    sizes = []
    for number, first in enumerate(range(0, len(ids), per_shard)):
        part = slice(first, first + per_shard)
        if number % 4 == 3:
            with (folder / f"part-{number:05d}.jsonl").open("w", encoding="utf-8") as fh:
                for i, t in zip(ids[part], texts[part], strict=True):
                    fh.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
        else:
            pq.write_table(
                pa.table({"id": ids[part], "text": texts[part]}), folder / f"part-{number:05d}.parquet"
            )
        sizes.append(len(ids[part]))
    return sizes


class Corpus:
    """A generated corpus on disk: ``shards/`` is bertpipe's input, ``DONE`` says what it holds."""

    def __init__(self, root: Path):
        self.root = root
        self.shards = root / "shards"
        meta = json.loads((root / "DONE").read_text())
        self.rows: int = meta["rows"]
        self.shard_rows: list[int] = meta["shard_rows"]

    @classmethod
    def ensure(cls, work: Path, rows: int, seed: int) -> Corpus:
        root = work / f"corpus-{rows}-s{seed}"
        if not (root / "DONE").exists():
            shutil.rmtree(root, ignore_errors=True)
            texts = make_texts(rows, seed)
            sizes = write_shards(root / "shards", [f"doc-{i:07d}" for i in range(rows)], texts)
            (root / "DONE").write_text(json.dumps({"rows": rows, "seed": seed, "shard_rows": sizes}))
        return cls(root)

    def table(self) -> pa.Table:
        """All rows in corpus order (the shards are contiguous slices, in name order)."""
        parts = []
        for path in sorted(self.shards.iterdir()):
            if path.suffix == ".parquet":
                parts.append(pq.read_table(path))
            else:
                lines = path.read_text(encoding="utf-8").splitlines()
                parts.append(
                    pa.Table.from_pylist([json.loads(line) for line in lines], schema=parts[0].schema)
                )
        return pa.concat_tables(parts)

    def write_sample(self, work: Path, table: pa.Table, index: np.ndarray) -> Path:
        """The rows ``index`` of ``table`` (this corpus) as two Parquet shards, in that order."""
        folder = work / f"sample-{self.root.name}-{len(index)}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        half = len(index) // 2
        for number, part in enumerate((index[:half], index[half:])):
            pq.write_table(
                table.take(pa.array(part)).select(["id", "text"]), folder / f"part-{number}.parquet"
            )
        return folder
