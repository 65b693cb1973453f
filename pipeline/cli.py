"""``bertpipe`` command line (typer + rich). User errors are one line on stderr and exit code 2."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch BERT labelling on Ray Data.")
out = Console()
err = Console(stderr=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: --set output.path=/tmp/out (value parsed as YAML)."),
]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"bertpipe: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pipeline").setLevel(logging.INFO)


@app.command()
def validate(config: str, set_: SetOption = None) -> None:
    """Check a config, its models and every input file without running the models."""
    from pipeline.runner import inspect_locally, plan

    _setup_logging(False)
    try:
        cfg = load_config(config, set_ or [])
        p = plan(cfg, inspect_locally(cfg))
    except ConfigError as exc:
        _fail(str(exc))
    table = Table(title=f"{config}: OK")
    table.add_column("what")
    table.add_column("value")
    table.add_row("input files", f"{len(p.good_shards)} ({len(p.skipped)} skipped by policy)")
    table.add_row("rows", str(p.rows_in))
    table.add_row("tasks", ", ".join(f"{t.name} ({t.kind.value})" for t in cfg.tasks))
    table.add_row("tokenisations", str(len(p.groups)))
    table.add_row(
        "ids", f"derived into {p.derive_id!r}" if p.derive_id else f"column {cfg.input.id_column!r}"
    )
    out.print(table)


@app.command()
def run(
    config: str,
    set_: SetOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a job: read, label with every task, write partitioned output and a run summary."""
    from pipeline.runner import execute

    _setup_logging(verbose)
    try:
        cfg = load_config(config, set_ or [])
        summary = execute(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the CLI turns any failure into one line and a code
        logging.getLogger("pipeline").debug("run failed", exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"run failed: {type(exc).__name__}: {first}", code=1)
    print_summary(summary)


def print_summary(summary: dict) -> None:
    if summary.get("nothing_to_do"):
        out.print("nothing to do: the output already holds every input file")
        return
    table = Table(title=f"run {summary['run_id']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("rows_in", "rows_out", "rows_ok", "rows_error", "duplicate_ids", "seconds", "rows_per_s"):
        table.add_row(key, str(summary[key]))
    for reason, count in sorted(summary["errors_by_reason"].items()):
        table.add_row(f"  error: {reason}", str(count))
    for skipped in summary["skipped_files"]:
        table.add_row(f"  skipped: {skipped['file']}", skipped["reason"])
    table.add_row("output", summary["config"]["output"]["path"])
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
