"""Input discovery with fsspec: files, folders, globs and URLs (s3://, file://, ...) -> a list of shards.

Also redacts credentials from anything that may be printed (URLs with user:password, secret options).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from bertpipe.config import ConfigError, InputFormat

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz")
# Option names that hold credentials: s3fs key/secret, adlfs account_key/connection_string, pyiceberg
# s3.access-key-id/s3.secret-access-key, gcsfs token.
_SECRET_KEYS = re.compile(r"(secret|token|password|passwd|credential|key|session|connection_string)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


@dataclass(frozen=True)
class Shard:
    """One input file. ``path`` is the filesystem's own path (no scheme), ``url`` what the user sees."""

    path: str
    url: str
    format: str  # "parquet" | "jsonl"
    size: int
    version: str  # modification time or etag: a changed file gets a new version

    @property
    def identity(self) -> tuple[str, int, str]:
        return (self.url, self.size, self.version)


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


def shard_format(path: str, declared: InputFormat) -> str | None:
    lower = path.lower()
    if declared != InputFormat.auto:
        return declared.value if not lower.rsplit("/", 1)[-1].startswith(("_", ".")) else None
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def discover(
    paths: list[str], declared: InputFormat, storage_options: dict[str, Any], key: str = "input.paths"
) -> list[Shard]:
    """Every input file, sorted, with size and version. A path that matches nothing is an error naming
    the config ``key`` the paths came from."""
    shards: dict[str, Shard] = {}
    for url in paths:
        try:
            fs, root = url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot open {redact(url)}: {exc}") from exc
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        try:
            if any(ch in root for ch in "*?["):
                found = fs.glob(root, detail=True)
            elif fs.isdir(root):
                found = fs.find(root, detail=True)
            elif fs.exists(root):
                found = {root: fs.info(root)}
            else:
                found = {}
        except (OSError, PermissionError) as exc:
            raise ConfigError(f"{key}: cannot read {redact(url)}: {exc}") from exc
        matched = 0
        for path, info in sorted(found.items()):
            if info.get("type") == "directory":
                continue
            name = path.rsplit("/", 1)[-1]
            fmt = shard_format(path, declared)
            if fmt is None or name.startswith(("_", ".")):
                continue
            shard_url = path if protocol in ("file", "local") else f"{protocol}://{path}"
            shards[path] = Shard(path, shard_url, fmt, int(info.get("size") or 0), _version(info))
            matched += 1
        if not matched:
            raise ConfigError(f"{key}: no Parquet or JSONL files found at {redact(url)}")
    return [shards[p] for p in sorted(shards)]
