"""Shared fixtures: one local Ray per test session, tiny models built once, a mixed-length corpus."""

from __future__ import annotations

import errno
import json
import logging
import posixpath
import random
import socket
import sys
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import (  # noqa: E402
    NER_LABELS,
    build_sequence_classifier,
    build_token_classifier,
    shipped_encoder_dir,
)

WINDOW = 128  # max_length used by the oracle tests, so 600-word texts need several windows
STRIDE = 32


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the in-process tests (2 CPUs, no dashboard)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for fine-tuning: with the state API Ray Train's monitor needs (see engine/cluster)."""
    import ray

    from bertpipe.engine.cluster import local_state_api

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, **local_state_api())
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "topic": build_sequence_classifier(
            root / "topic", ["business", "sports", "science", "world"], seed=1, model_max_length=WINDOW
        ),
        "sentiment": build_sequence_classifier(
            root / "sentiment", ["NEGATIVE", "POSITIVE"], seed=4, model_max_length=WINDOW
        ),
        "ner": build_token_classifier(root / "ner", NER_LABELS, seed=3, model_max_length=WINDOW),
    }


def _vocabulary() -> list[str]:
    words = (shipped_encoder_dir() / "vocab.txt").read_text().split()
    plain = [w for w in words if w.isalpha() and w.isascii() and len(w) > 2]
    rng = random.Random(7)
    return rng.sample(plain, 3000)


def make_texts(n: int, seed: int = 0, max_words: int = 600) -> list[str]:
    """Mixed lengths from 1 to ``max_words`` words, with capitalised words and punctuation."""
    rng = random.Random(seed)
    vocab = _vocabulary()
    lengths = [1, 2, 3, max_words] + [
        rng.choice(
            [
                rng.randint(1, 12),
                rng.randint(10, 60),
                rng.randint(min(40, max_words), max(40, min(200, max_words))),
                rng.randint(max_words // 4, max_words),
            ]
        )
        for _ in range(n - 4)
    ]
    lengths = lengths[:n]
    texts = []
    for length in lengths:
        words = []
        for _ in range(length):
            word = rng.choice(vocab)
            if rng.random() < 0.15:
                word = word.capitalize()
            if rng.random() < 0.05:
                word += rng.choice([",", ".", "!", "'s"])
            words.append(word)
        texts.append(" ".join(words))
    return texts


def write_shards(folder: Path, rows: list[dict], n_parquet: int = 3, n_jsonl: int = 2) -> list[Path]:
    """Spread rows over Parquet and JSONL shards (one JSONL gzip-free, one plain)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = n_parquet + n_jsonl
    paths = []
    for i in range(n):
        part = rows[i::n]
        if i < n_parquet:
            path = folder / f"part-{i}.parquet"
            pq.write_table(pa.Table.from_pylist(part), path)
        else:
            path = folder / f"part-{i}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("corpus")
    texts = make_texts(320, seed=11)
    rows = [
        {"id": f"doc-{i:04d}", "text": t, "source": ["news", "reviews", "forum"][i % 3]}
        for i, t in enumerate(texts)
    ]
    write_shards(folder, rows)
    return folder, rows


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def base_config(input_dir: Path, output_dir: Path, models: dict[str, Path], **runtime) -> dict:
    return {
        "input": {"paths": [str(input_dir)]},
        "output": {"path": str(output_dir)},
        "tasks": [
            {"name": "topic", "kind": "classification", "model": str(models["topic"]), "top_k": 2},
            {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
            {"name": "entities", "kind": "ner", "model": str(models["ner"]), "aggregation": "simple"},
        ],
        "runtime": {"dtype": "float32", "max_length": WINDOW, "stride": STRIDE, **runtime},
    }


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 for servers a test starts (moto, a Ray cluster)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@pytest.fixture
def pipeline_log(caplog):
    """caplog for the ``bertpipe`` logger, which does not propagate once a stage has configured it."""
    logger = logging.getLogger("bertpipe")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="bertpipe"):
        yield caplog
    logger.removeHandler(caplog.handler)


def break_span_assembly(monkeypatch, marker: str = "boom") -> None:
    """NER span assembly fails for any batch holding a text that starts with ``marker`` (as odd offsets
    would), so tests can check that only that row gets an ``_error``."""
    from bertpipe.tasks import ner

    real = ner.SpanAssembler.assemble

    def fragile(self, texts, *args):
        if any(t.startswith(marker) for t in texts):
            raise RuntimeError("odd offsets")
        return real(self, texts, *args)

    monkeypatch.setattr(ner.SpanAssembler, "assemble", fragile)


def counted(table: pa.Table, id_column: str) -> tuple:
    """The reference for ``WriteStats`` of the rows in ``table``, by ``Counter``: rows, distinct row
    keys, errors by reason, and ids beyond the first of each (nulls are no id)."""
    from collections import Counter

    keys = Counter(table.column("_row_key").to_pylist())
    errors = Counter(e for e in table.column("_error").to_pylist() if e is not None)
    ids = Counter(i for i in table.column(id_column).to_pylist() if i is not None)
    return table.num_rows, len(keys), dict(errors), sum(n - 1 for n in ids.values())


def refuse_writes(monkeypatch, fs_class: type, name: str) -> list[str]:
    """Every write of a file whose name contains ``name`` fails as storage fails it: a local file opened
    for writing is emptied before the write fails (a full disk), an object store's PUT stores nothing.
    Returns the paths refused."""
    from fsspec.implementations.local import LocalFileSystem

    real = fs_class.open
    refused: list[str] = []

    def open_(self, path, mode="rb", *args, **kwargs):
        if name in posixpath.basename(str(path)) and any(m in mode for m in "wax"):
            refused.append(str(path))
            if isinstance(self, LocalFileSystem):
                real(self, path, mode, *args, **kwargs).close()
            raise OSError(errno.ENOSPC, f"injected: no space left for {path}")
        return real(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(fs_class, "open", open_)
    return refused


def committed_snapshot(location) -> dict[str, bytes]:
    """What a reader that follows ``_SUCCESS`` trusts, byte for byte: ``_SUCCESS``, the manifests of the
    runs it names and the data files they list."""
    from bertpipe.io.writer import RUNS, SUCCESS, committed_files, committed_runs

    runs = [posixpath.join(location.path, RUNS, f"{r}.json") for r in committed_runs(location)]
    paths = [posixpath.join(location.path, SUCCESS), *runs, *committed_files(location)]
    return {p: location.fs.cat_file(p) for p in paths}


def committed_rows(location, filesystem=None) -> list[dict]:
    """Every column of every row of the committed output, by id: the files the manifests named, read
    with their hive partition values (by ``filesystem``, an Arrow filesystem, if given)."""
    from bertpipe.io.writer import arrow_filesystem, committed_files

    files = committed_files(location)
    assert files, "no committed output"
    dataset = pads.dataset(
        files,
        filesystem=filesystem or arrow_filesystem(location.fs),
        partitioning="hive",
        partition_base_dir=location.path,
    )
    rows = sorted(dataset.to_table().to_pylist(), key=lambda r: r["id"])
    assert len({r["id"] for r in rows}) == len(rows), "an id appears more than once"
    return rows
