"""Input discovery with fsspec: files, folders, globs and URLs (s3://, file://, ...) -> a list of shards.

As in Spark and pyarrow datasets, a file or folder whose name starts with ``_`` or ``.`` anywhere below
an input root is not input (``_delta_log/``, ``_SUCCESS``, ``_runs/``, ``.staging``), and hive folders
(``dt=2026-11-28/``) anywhere in a file's path give it partition values, as DuckDB's
``hive_partitioning`` reads them (percent-decoded, so they round-trip with pyarrow's writer).

Also redacts credentials from anything that may be printed (URLs with user:password, secret options).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import fsspec
from fsspec.core import url_to_fs

from bertpipe.config import ConfigError

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz")
CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
FILE_FORMATS = ("parquet", "jsonl")  # what ``discover`` finds unless told otherwise
# Option names that hold credentials: s3fs key/secret, adlfs account_key/connection_string, pyiceberg
# s3.access-key-id/s3.secret-access-key, gcsfs token.
_SECRET_KEYS = re.compile(r"(secret|token|password|passwd|credential|key|session|connection_string)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


@dataclass(frozen=True)
class Shard:
    """One input file. ``path`` is the filesystem's own path (no scheme), ``url`` what the user sees."""

    path: str
    url: str
    format: str  # "parquet" | "jsonl" | "csv"
    size: int
    version: str  # modification time or etag: a changed file gets a new version
    partitions: tuple[tuple[str, str], ...] = ()  # hive ``key=value`` folders of its path, in order

    @property
    def identity(self) -> tuple[str, int, str]:
        return (self.url, self.size, self.version)


@dataclass(frozen=True)
class ShardNaming:
    """The read-time facts of a job's files (url, format, partitions) from their paths alone: one
    filesystem's url prefix, one format or each file's suffix, hive folders or none. Lets a reader hold
    this instead of a table of every file. Size and version are not read-time facts: 0 and ""."""

    url_prefix: str
    format: str | None  # None: by suffix
    hive: bool

    @classmethod
    def of(cls, shards: list[Shard]) -> ShardNaming:
        """The rule for ``shards`` (at least one, all on one filesystem)."""
        first, formats = shards[0], {s.format for s in shards}
        return cls(
            url_prefix=first.url[: len(first.url) - len(first.path)],
            format=formats.pop() if len(formats) == 1 else None,
            hive=any(s.partitions for s in shards),
        )

    def shard(self, path: str) -> Shard:
        fmt = self.format or shard_format(path, "auto", ("parquet", "jsonl", "csv")) or ""
        return Shard(path, self.url_prefix + path, fmt, 0, "", hive_partitions(path) if self.hive else ())

    def names(self, shard: Shard) -> bool:
        """Whether ``shard(path)`` gives this file's url, format and partitions."""
        named = self.shard(shard.path)
        return (named.url, named.format, named.partitions) == (shard.url, shard.format, shard.partitions)


def redact(text: str) -> str:
    """Remove user:password@ from URLs."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def redact_options(options: dict[str, Any]) -> dict[str, Any]:
    """Storage options safe to log or write into a run summary."""
    out = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out[key] = redact_options(value)
        elif _SECRET_KEYS.search(key):
            out[key] = "***"
        else:
            out[key] = redact(value) if isinstance(value, str) else value
    return out


def filesystem_for(url: str, storage_options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    fs, _ = url_to_fs(url, **storage_options)
    return fs


def shard_format(path: str, declared: str, formats: tuple[str, ...] = FILE_FORMATS) -> str | None:
    """The format of a file: the declared one, or by extension among ``formats``."""
    declared = getattr(declared, "value", declared)
    lower = path.lower()
    if declared != "auto":
        return declared if not lower.rsplit("/", 1)[-1].startswith(("_", ".")) else None
    for fmt, suffixes in (("parquet", PARQUET_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("csv", CSV_SUFFIXES)):
        if fmt in formats and lower.endswith(suffixes):
            return fmt
    return None


def hive_partitions(path: str) -> tuple[tuple[str, str], ...]:
    """The ``key=value`` folders of ``path`` (not its file name), values percent-decoded; a key that
    repeats keeps its innermost value."""
    found: dict[str, str] = {}
    for part in path.split("/")[:-1]:
        key, sep, value = part.partition("=")
        if sep and key and not key.startswith(("_", ".")):
            found.pop(key, None)
            found[key] = unquote(value)
    return tuple(found.items())


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def _root_of_glob(pattern: str) -> str:
    """The folder a glob searches below: its path up to the first folder with a wildcard."""
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def discover(
    paths: list[str],
    declared: str,
    storage_options: dict[str, Any],
    key: str = "input.paths",
    formats: tuple[str, ...] = FILE_FORMATS,
    partitioning: str = "none",
) -> list[Shard]:
    """Every input file, sorted, with size, version and (``partitioning: hive``) partition values. A
    path that matches nothing is an error naming the config ``key`` the paths came from."""
    shards: dict[str, Shard] = {}
    for url in paths:
        try:
            fs, root = url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot open {redact(url)}: {exc}") from exc
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        try:
            if any(ch in root for ch in "*?["):
                found, base = fs.glob(root, detail=True), _root_of_glob(root)
            elif fs.isdir(root):
                found, base = fs.find(root, detail=True), root
            elif fs.exists(root):
                found, base = {root: fs.info(root)}, root
            else:
                found, base = {}, root
        except (OSError, PermissionError) as exc:
            raise ConfigError(f"{key}: cannot read {redact(url)}: {exc}") from exc
        matched = 0
        for path, info in sorted(found.items()):
            if info.get("type") == "directory":
                continue
            relative = path[len(base.rstrip("/")) :] if path.startswith(base) else path.rsplit("/", 1)[-1]
            fmt = shard_format(path, declared, formats)
            if fmt is None or _is_hidden(relative) or path.rsplit("/", 1)[-1].startswith(("_", ".")):
                continue
            shard_url = path if protocol in ("file", "local") else f"{protocol}://{path}"
            parts = hive_partitions(path) if partitioning == "hive" else ()
            shards[path] = Shard(path, shard_url, fmt, int(info.get("size") or 0), _version(info), parts)
            matched += 1
        if not matched:
            kinds = " or ".join({"parquet": "Parquet", "jsonl": "JSONL", "csv": "CSV"}[f] for f in formats)
            raise ConfigError(f"{key}: no {kinds} files found at {redact(url)}")
    return [shards[p] for p in sorted(shards)]
