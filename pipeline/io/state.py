"""Bookkeeping Ray does not do for us: one writer per output, resumable runs, and the incremental ledger.

- ``OutputLock``: a lock file beside the output (``.<name>.lock``) so that two runs never share a
  staging folder or publish over each other. Taken with an exclusive create where the filesystem has
  one (local disks, NFS); on object stores it is written and read back, which narrows the race to the
  moment of creation. A second run fails fast with one line naming the holder.
- ``Intent``: written into the staging folder when a run starts. ``mode: resume`` reads it to finish
  the interrupted run with the same config and the same publish mode, and takes over its lock.
- ``settle_checkpoint``: finishes checkpoint commits that an interrupted run left half done.
- ``Ledger``: the input files (url, size, mtime/etag) that an ``incremental`` output already holds, a
  table in ``_state/ledger/`` in the output that each run appends to after its data is published.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bertpipe.config import ConfigError, JobConfig
from bertpipe.io.paths import Shard, redact
from bertpipe.io.writer import OutputLocation, write_json

INTENT = "_intent.json"
LEGACY_LEDGER = posixpath.join("_state", "ledger.json")


def config_fingerprint(config: JobConfig) -> str:
    """What must not change between an interrupted run and its resume: inputs, tasks, output layout."""
    data = config.model_dump(mode="json")
    data["output"].pop("mode", None)
    data["runtime"] = {k: data["runtime"][k] for k in ("max_length", "stride")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(fs, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "r") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


@dataclass
class Intent:
    run_id: str
    mode: str
    fingerprint: str
    started: float

    @classmethod
    def load(cls, location: OutputLocation) -> Intent | None:
        data = _read_json(location.fs, posixpath.join(location.staging, INTENT))
        return cls(**data) if data else None

    def save(self, location: OutputLocation) -> None:
        write_json(location.fs, posixpath.join(location.staging, INTENT), asdict(self))

    @staticmethod
    def remove(location: OutputLocation) -> None:
        path = posixpath.join(location.staging, INTENT)
        if location.fs.exists(path):
            location.fs.rm(path)


def settle_checkpoint(location: OutputLocation) -> int:
    """Drop the ``X.pending.parquet`` files whose ``X.parquet`` twin exists; returns how many.

    Ray commits a row checkpoint by renaming ``X.pending.parquet`` to ``X.parquet`` after the data file
    is written. On object stores a rename is a copy and then a delete: a run killed in between leaves
    both, and Ray's recovery then deletes the data file (it has a pending checkpoint) while keeping the
    committed checkpoint, so a resume would skip rows that are no longer written. The committed twin
    proves the data file was complete, so the pending one is the leftover (what Ray's own retry of the
    commit does)."""
    fs = location.fs
    if not fs.exists(location.checkpoint):
        return 0
    names = {posixpath.basename(p) for p in fs.ls(location.checkpoint, detail=False)}
    suffix = ".pending.parquet"
    done = [n for n in names if n.endswith(suffix) and n[: -len(suffix)] + ".parquet" in names]
    for name in done:
        fs.rm(posixpath.join(location.checkpoint, name))
    return len(done)


def lock_path(location: OutputLocation) -> str:
    """``.<name>.lock`` beside the output."""
    path = location.path.rstrip("/") + ".lock"
    return posixpath.join(posixpath.dirname(path), "." + posixpath.basename(path))


def check_lock(location: OutputLocation, take_over_from: str | None = None) -> dict[str, Any] | None:
    """The lock's record; raises naming the run that holds it unless it is free or held by
    ``take_over_from`` (the interrupted run a resume finishes). Only reads, so that ``validate`` can
    report a holder without taking the lock."""
    held = _read_json(location.fs, lock_path(location))
    if held and held.get("run_id") != take_over_from:
        raise ConfigError(
            f"output {redact(location.path)} is being written by run {held.get('run_id')} "
            f"(host {held.get('host')}, pid {held.get('pid')}); if that run died, rerun with "
            f"output.mode: resume, or delete {redact(lock_path(location))}"
        )
    return held


class OutputLock:
    def __init__(self, location: OutputLocation, run_id: str):
        self.location = location
        self.run_id = run_id
        self.path = lock_path(location)

    def holder(self) -> dict[str, Any] | None:
        return _read_json(self.location.fs, self.path)

    def acquire(self, take_over_from: str | None = None) -> None:
        """Take the lock; ``take_over_from`` names an interrupted run whose stale lock may be replaced."""
        fs = self.location.fs
        fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        record = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
        }
        held = check_lock(self.location, take_over_from)
        if held:
            fs.rm(self.path)
        try:
            with fs.open(self.path, "xb") as fh:
                fh.write(json.dumps(record).encode())
        except FileExistsError:
            raise ConfigError(
                f"output {redact(self.location.path)} was locked by another run just now"
            ) from None
        except (ValueError, NotImplementedError):  # no exclusive create here: write, then read back
            with fs.open(self.path, "wb") as fh:
                fh.write(json.dumps(record).encode())
            time.sleep(0.2)
            if (self.holder() or {}).get("run_id") != self.run_id:
                raise ConfigError(
                    f"output {redact(self.location.path)} was locked by another run just now"
                ) from None

    def release(self) -> None:
        held = self.holder()
        if held and held.get("run_id") == self.run_id:
            self.location.fs.rm(self.path)


class Ledger:
    """Which input files (by url, size and version) an incremental output already holds.

    A table of Parquet parts in ``_state/ledger/``, one per run, named by its generation
    (``gen-00000001.parquet``): a run adds its part and never rewrites the others, so the cost of a
    commit does not grow with the files already recorded. The generation is the highest part; a run
    writes the next one only if no other run took it since this run started (an exclusive create where
    the filesystem has one, else written and read back). The latest entry of a file wins. A
    ``_state/ledger.json`` from older releases is read as generation 0's entries.
    """

    FOLDER = posixpath.join("_state", "ledger")
    SCHEMA = pa.schema(
        [("url", pa.string()), ("size", pa.int64()), ("version", pa.string()), ("run_id", pa.string())]
    )

    def __init__(self, files: dict[str, dict[str, Any]] | None = None, generation: int = 0):
        self.files = files or {}
        self.generation = generation

    @classmethod
    def load(cls, location: OutputLocation, uncommitted: str | None = None) -> Ledger:
        """``uncommitted``: a run whose part does not count. An output committed in place records its
        ledger part before its ``_SUCCESS``; a run that fails or is killed in between must not make the
        next run (or its own resume) skip its files, whose data no reader sees and the next commit
        deletes. The generation is still the highest part, counted or not."""
        fs = location.fs
        files = (_read_json(fs, posixpath.join(location.path, LEGACY_LEDGER)) or {}).get("files", {})
        parts = _ledger_parts(location)
        for _, path in parts:
            with fs.open(path, "rb") as fh:
                for row in pq.read_table(fh, schema=cls.SCHEMA).to_pylist():
                    if row["run_id"] != uncommitted:
                        files[row.pop("url")] = row
        return cls(files, parts[-1][0] if parts else 0)

    def is_new(self, shard: Shard) -> bool:
        seen = self.files.get(shard.url)
        return seen is None or (seen["size"], seen["version"]) != (shard.size, shard.version)

    def changed(self, shards: list[Shard]) -> list[Shard]:
        return [s for s in shards if self.is_new(s)]

    def append(self, location: OutputLocation, shards: list[Shard], run_id: str) -> None:
        """Record ``shards`` as the next generation; fails if another run recorded one meanwhile."""
        latest = _ledger_parts(location)
        if (latest[-1][0] if latest else 0) != self.generation:
            raise RuntimeError("the incremental ledger changed during this run (a concurrent run?)")
        generation = self.generation + 1
        path = posixpath.join(location.path, self.FOLDER, f"gen-{generation:08d}.parquet")
        part = pa.table(
            {
                "url": [s.url for s in shards],
                "size": [s.size for s in shards],
                "version": [s.version for s in shards],
                "run_id": [run_id] * len(shards),
            },
            schema=self.SCHEMA,
        )
        buffer = pa.BufferOutputStream()
        pq.write_table(part, buffer)
        location.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if not _create_once(location.fs, path, buffer.getvalue().to_pybytes(), run_id):
            raise RuntimeError("the incremental ledger changed during this run (a concurrent run?)")
        for s in shards:
            self.files[s.url] = {"size": s.size, "version": s.version, "run_id": run_id}
        self.generation = generation


def _create_once(fs, path: str, data: bytes, run_id: str) -> bool:
    """Write a ledger part unless one of that name exists; False when another run has it."""
    try:
        with fs.open(path, "xb") as fh:
            fh.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # no exclusive create here: write, then read back
        pass
    with fs.open(path, "wb") as fh:
        fh.write(data)
    with fs.open(path, "rb") as fh:
        return set(pq.read_table(fh, columns=["run_id"]).column(0).to_pylist()) <= {run_id}


def _ledger_parts(location: OutputLocation) -> list[tuple[int, str]]:
    """The ledger's parts as (generation, path), oldest first; listing only."""
    folder = posixpath.join(location.path, Ledger.FOLDER)
    if not location.fs.exists(folder):
        return []
    parts = []
    for path in location.fs.ls(folder, detail=False):
        match = re.fullmatch(r"gen-(\d+)\.parquet", posixpath.basename(path))
        if match:
            parts.append((int(match.group(1)), path))
    return sorted(parts)
