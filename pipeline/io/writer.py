"""Output commit protocol: write to a staging folder, verify, then publish in one step.

Ray Data's Parquet writer writes files in place as blocks finish, so a crash leaves a partial output
that looks like data. bertpipe therefore has Ray write into ``<parent>/.<name>.staging/``, counts and
checks what was written, and only then publishes it: a rename of the folder for ``error``/``overwrite``
(the old output is renamed away first and deleted last, so a failed overwrite keeps it), or a move of
the new files for ``append``. The run summary and the ``_SUCCESS`` marker are written last. On object
stores a "rename" is a copy plus delete: publishing is then not atomic, but ``_SUCCESS`` still is the
last thing written, and readers that wait for it never see a partial output.

Copying every byte is what an object store cannot afford at scale, so there the default is a manifest
commit instead (``publish_in_place``): Ray writes the files under their final names, and the commit
writes the run's manifest and ``_SUCCESS``, whose content names the committed runs (as Spark's S3
committers and the table formats do, readers that follow it see only committed files).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.core import url_to_fs

from bertpipe.config import ConfigError
from bertpipe.io.paths import redact

SUCCESS = "_SUCCESS"
RUNS = "_runs"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk (renames are atomic there), not an object store."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pa.fs.FileSystem:
    """A pyarrow filesystem for Ray's readers and writers; the local disk gets Arrow's native one."""
    if is_local(fs):
        return pa.fs.LocalFileSystem()
    return pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs))


@dataclass(frozen=True)
class OutputLocation:
    fs: fsspec.AbstractFileSystem
    path: str  # the output folder, as the filesystem names it (no scheme)

    @classmethod
    def from_url(cls, url: str, storage_options: dict[str, Any]) -> OutputLocation:
        try:
            fs, path = url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:  # an unknown protocol, a filesystem not installed
            raise ConfigError(f"output.path: cannot open {redact(url)}: {exc}") from exc
        if getattr(fs, "dircache", None) is not None:
            # Ray's workers and cleanup tasks change these folders from other processes: a cached
            # listing here (or in the filesystem handed to Ray) would miss or resurrect files.
            fs = type(fs)(**{**fs.storage_options, "use_listings_cache": False})
        path = path.rstrip("/")
        if not is_local(fs) and "/" not in path:
            # staging, checkpoint and lock live beside the output, so it needs a parent folder
            raise ConfigError(f"output.path must be a folder inside a bucket or a directory, not {url!r}")
        return cls(fs, path)

    def _sibling(self, suffix: str) -> str:
        parent, name = posixpath.split(self.path)
        return posixpath.join(parent, f".{name}.{suffix}")

    @property
    def staging(self) -> str:
        return self._sibling("staging")

    @property
    def checkpoint(self) -> str:
        return self._sibling("checkpoint")

    @property
    def object_store(self) -> bool:
        return not is_local(self.fs)

    def has_data(self) -> bool:
        return self.fs.exists(self.path) and bool(self.fs.ls(self.path))

    def is_complete(self) -> bool:
        return self.fs.exists(posixpath.join(self.path, SUCCESS))

    def reset_staging(self) -> None:
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        self.fs.makedirs(self.staging, exist_ok=True)


def data_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    if not fs.exists(root):
        return []

    def hidden(path: str) -> bool:
        return any(part.startswith(("_", ".")) for part in path[len(root) :].split("/"))

    return sorted(p for p in fs.find(root) if p.endswith(".parquet") and not hidden(p))


@dataclass
class WriteStats:
    rows: int
    distinct_keys: int
    errors_by_reason: dict[str, int]
    files: int
    duplicate_ids: int


def publish(
    location: OutputLocation,
    mode: str,
    run_id: str,
    summary: dict[str, Any],
    before_success: Callable[[], None] | None = None,
) -> None:
    """Make the staged output the output, then write the run summary and ``_SUCCESS``.

    ``before_success`` runs after the data is in place and before the marker (the incremental ledger).
    """
    fs = location.fs
    if mode == "append" and fs.exists(location.path):
        success = posixpath.join(location.path, SUCCESS)
        if fs.exists(success):
            fs.rm(success)  # readers must not trust the output while files are being added
        for src in data_files(fs, location.staging):
            dst = posixpath.join(location.path, src[len(location.staging) + 1 :])
            fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            fs.mv(src, dst)
        if fs.exists(location.staging):  # on object stores moving the last file removed the folder
            fs.rm(location.staging, recursive=True)
    else:
        old = location._sibling(f"old-{run_id}")
        if fs.exists(location.path):
            if mode == "error" and location.has_data():
                raise ConfigError(f"output.path {location.path} appeared during the run; not overwriting it")
            _rename_dir(fs, location.path, old)
        try:
            _rename_dir(fs, location.staging, location.path)
        except Exception:
            if fs.exists(old):
                _rename_dir(fs, old, location.path)  # roll back: the previous output stays as it was
            raise
        history = _move_runs(fs, posixpath.join(old, RUNS), posixpath.join(location.path, RUNS))
        try:
            _mark_success(location, run_id, summary, before_success)
        except Exception:
            # Roll back: the previous output returns whole, the new one goes back to staging, where a
            # resume commits it; the old output is deleted only once the new one has its _SUCCESS.
            _move_runs(fs, posixpath.join(location.path, RUNS), posixpath.join(old, RUNS), history)
            _rename_dir(fs, location.path, location.staging)
            if fs.exists(old):
                _rename_dir(fs, old, location.path)
            raise
        if fs.exists(old):
            fs.rm(old, recursive=True)
        return
    _mark_success(location, run_id, summary, before_success)


def _move_runs(fs, src: str, dst: str, names: list[str] | None = None) -> list[str]:
    """Move the run summaries in ``src`` (only ``names``, if given) to ``dst``; returns their names. The
    history of runs outlives the data it described."""
    if names is None:
        names = [posixpath.basename(p) for p in fs.ls(src)] if fs.exists(src) else []
    if names:
        fs.makedirs(dst, exist_ok=True)
    for name in names:
        fs.mv(posixpath.join(src, name), posixpath.join(dst, name))
    return names


def _mark_success(
    location: OutputLocation, run_id: str, summary: dict[str, Any], before_success: Callable[[], None] | None
) -> None:
    if before_success:
        before_success()
    write_json(location.fs, posixpath.join(location.path, RUNS, f"{run_id}.json"), summary)
    write_text(location.fs, posixpath.join(location.path, SUCCESS), run_id + "\n")


def run_prefix(run_id: str) -> str:
    """How the data files a run writes in place begin: the run is known from the name alone."""
    return f"part-{run_id}_"


_RUN_FILE = re.compile(r"part-(\d{8}T\d{6}Z-[0-9a-f]{8})_")


def committed_runs(location: OutputLocation) -> list[str]:
    """The runs ``_SUCCESS`` names, oldest first (one line each; one line for a renamed output)."""
    try:
        with location.fs.open(posixpath.join(location.path, SUCCESS), "r") as fh:
            return [line.strip() for line in fh if line.strip()]
    except FileNotFoundError:
        return []


def publish_in_place(
    location: OutputLocation,
    mode: str,
    run_id: str,
    summary: dict[str, Any],
    files: list[str],
    before_success: Callable[[], None] | None = None,
) -> list[str]:
    """Commit the files a run wrote under their final names: its manifest (``_runs/<run>.json`` with the
    list of its files), then ``_SUCCESS`` naming the runs that make up the output, then the files of
    runs that no longer belong to it (the previous output of an overwrite, the leftovers of runs that
    died before their commit) are deleted in batches. ``files`` is the listing of the output's data
    files made after the run's write (the count step reads the run's files from it too), so the commit
    itself makes a constant number of object-store calls beyond the batched deletes, whatever the
    number of files or bytes; no file is copied. Until ``_SUCCESS`` is written, a reader that follows
    it sees the previous output. Returns the paths of the run's files."""
    fs = location.fs
    ours = [f for f in files if posixpath.basename(f).startswith(run_prefix(run_id))]
    others = [f for f in files if not posixpath.basename(f).startswith(run_prefix(run_id))]
    if mode == "error" and others:
        raise ConfigError(f"output.path {redact(location.path)} got data from elsewhere during the run")
    runs = [r for r in committed_runs(location) if r != run_id] if mode == "append" else []

    def stale(path: str) -> bool:
        if mode != "append":
            return True
        match = _RUN_FILE.match(posixpath.basename(path))
        return bool(match) and match.group(1) not in runs  # a file of a run that never committed

    if before_success:
        before_success()
    manifest_path = posixpath.join(location.path, RUNS, f"{run_id}.json")
    write_json(fs, manifest_path, {**summary, "files": [f[len(location.path) + 1 :] for f in ours]})
    try:
        write_text(fs, posixpath.join(location.path, SUCCESS), "".join(f"{r}\n" for r in [*runs, run_id]))
    except BaseException:
        # The history must not show a run that did not commit (unless it is a resume of one that did).
        with suppress(Exception):
            if run_id not in committed_runs(location):
                fs.rm(manifest_path)
        raise
    if doomed := [f for f in others if stale(f)]:
        fs.rm(doomed)
    return ours


def committed_files(location: OutputLocation) -> list[str]:
    """The data files of the committed output, as a reader that trusts ``_SUCCESS`` sees them: the files
    listed in the manifests of the runs it names; a listing for outputs published by rename (their
    manifests list no files, and nothing uncommitted is ever in them)."""
    files: list[str] = []
    for run in committed_runs(location):
        with location.fs.open(posixpath.join(location.path, RUNS, f"{run}.json"), "r") as fh:
            listed = json.load(fh).get("files")
        if listed is None:
            return data_files(location.fs, location.path)
        files += [posixpath.join(location.path, f) for f in listed]
    return sorted(files)


def _rename_dir(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    if is_local(fs):
        os.makedirs(posixpath.dirname(dst) or "/", exist_ok=True)
        os.replace(src, dst)  # one atomic rename on a local disk
    else:
        # Folders are only key prefixes here: fsspec's recursive mv tries to copy the folder entries too
        # and fails, so copy the files (concurrently, as lists) and delete them.
        files = fs.find(src)
        if files:
            fs.copy(files, [posixpath.join(dst, f[len(src) + 1 :]) for f in files])
            fs.rm(files)


def write_json(fs: fsspec.AbstractFileSystem, path: str, payload: dict[str, Any]) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write_text(fs, path, json.dumps(payload, indent=2, default=str) + "\n")


def write_text(fs: fsspec.AbstractFileSystem, path: str, text: str) -> None:
    """Replace ``path`` with ``text`` whole or not at all: ``_SUCCESS`` and the manifests are what readers
    trust, so a failed write (a full disk, a killed driver) must leave the previous version. An object
    store's PUT is all or nothing; a local file opened for writing is emptied at once, so the text goes
    to a hidden file beside it that is renamed over it."""
    if not is_local(fs):
        with fs.open(path, "w") as fh:  # one PUT, when the file is closed
            fh.write(text)
        return
    parent, name = posixpath.split(path)
    temporary = posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with fs.open(temporary, "w") as fh:
            fh.write(text)
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.remove(temporary)
        raise
