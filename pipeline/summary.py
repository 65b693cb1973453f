"""The run summary: what ``bertpipe.run`` returns and ``_runs/<run_id>.json`` holds."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class RunSummary(BaseModel):
    """One run's facts. ``nothing_to_do`` runs (an incremental run with no new files, a resume of a
    complete output) carry only ``run_id`` and zero counts."""

    model_config = ConfigDict(extra="allow", frozen=True)

    run_id: str
    nothing_to_do: bool = False
    rows_in: int = 0
    rows_out: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    errors_by_reason: dict[str, int] = {}
    duplicate_ids: int = 0
    skipped_files: list[dict[str, str]] = []
    files_in: int = 0
    output_files: int = 0
    device: str | None = None
    models: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    task_counts: dict[str, dict[str, int]] = {}  # per task: labels, or entities by type, most common first
    table: dict[str, Any] | None = None  # Iceberg snapshot id or Delta version of a table output
    bertpipe_version: str | None = None
    start: str | None = None
    end: str | None = None
    seconds: float = 0.0
    rows_per_s: float = 0.0
