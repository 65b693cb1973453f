"""``bertpipe`` command line (typer + rich). User errors are one line on stderr and exit code 2."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bertpipe import __version__
from bertpipe.config import ConfigError, load_config
from bertpipe.summary import RunSummary

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch BERT labelling on Ray Data.")
out = Console()
err = Console(stderr=True)
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"  # what pydantic generates
_verbose = False  # -v: a failure prints its traceback before its one line

JobArgument = Annotated[str, typer.Argument(help="The job's YAML config file.", show_default=False)]
OutputArgument = Annotated[
    str, typer.Argument(help="A finished output: a Parquet folder, or a Delta/Iceberg table's folder.")
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show INFO logs and the traceback of a failure.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: --set output.path=/tmp/out (value parsed as YAML)."),
]
TableOption = Annotated[
    str | None,
    typer.Option("--table", help="Iceberg output: the table identifier (default bertpipe.enriched)."),
]


def _print_version(value: bool) -> None:
    if value:
        print(f"bertpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Batch BERT labelling on Ray Data."""


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr and the exit code; called while handling the failure, whose traceback -v shows."""
    if _verbose and sys.exc_info()[1] is not None:
        traceback.print_exc()
    err.print(f"bertpipe: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("bertpipe").setLevel(logging.INFO)


@app.command()
def validate(
    config: JobArgument,
    set_: SetOption = None,
    estimate: Annotated[
        bool, typer.Option(help="Also estimate tokens and duration (one calibration forward pass).")
    ] = True,
    verbose: VerboseOption = False,
) -> None:
    """Check a config, its output, its models and every input file; then estimate what the job will cost.

    Example: bertpipe validate configs/example.yaml --set output.path=/tmp/out
    """
    from bertpipe.io.paths import redact
    from bertpipe.plan import plan
    from bertpipe.runner import check_output

    _setup_logging(verbose)
    try:
        cfg = load_config(config, set_ or [])
        _, todo = check_output(cfg)
        p = plan(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the CLI turns any failure into one line and a code
        _fail(f"validate failed: {type(exc).__name__}: {_first_line(exc)}", code=1)
    table = Table(title=f"{config}: OK")
    table.add_column("what")
    table.add_column("value")
    if p.table is not None:
        table.add_row("input table", f"{p.table} (version {p.table.version})")
    table.add_row("input files", f"{len(p.good_shards)} ({len(p.skipped)} skipped by policy)")
    table.add_row("rows", str(p.rows_in))
    if p.schema is not None:
        columns = ", ".join(f"{f.name} {f.type}" for f in p.schema)
        table.add_row("input columns", columns if len(columns) < 300 else columns[:297] + "...")
    table.add_row("tasks", ", ".join(f"{t.name} ({t.kind})" for t in cfg.tasks))
    table.add_row("tokenisations", str(len(p.models.groups)))
    table.add_row(
        "ids", f"derived into {p.derive_id!r}" if p.derive_id else f"column {cfg.input.id_column!r}"
    )
    table.add_row(
        "output",
        f"{redact(cfg.output.path)} ({cfg.output.mode.value}{'' if todo else ': complete, nothing to do'})",
    )
    if estimate and p.rows_in:
        from bertpipe.estimate import estimate as estimate_job
        from bertpipe.progress import format_seconds

        cost = estimate_job(p, cfg.runtime.device)
        basis = "counted" if cost.exact else f"estimated from a {cost.sample_rows}-row sample"
        for task, tokens in cost.tokens.items():
            table.add_row(f"tokens: {task}", f"{tokens:,} ({basis})")
        table.add_row(
            "model time",
            f"about {format_seconds(cost.seconds)} on {cost.device} (calibrated on this machine)",
        )
    out.print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the job config, for editors (YAML language servers) and CI linting.

    Example: bertpipe schema > bertpipe.schema.json
    """
    from bertpipe.config import JobConfig

    print(json.dumps({"$schema": JSON_SCHEMA_DIALECT, **JobConfig.model_json_schema()}, indent=2))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


@app.command()
def run(
    config: JobArgument,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run a job: read, label with every task, write partitioned output and a run summary.

    Example: bertpipe run configs/example.yaml --set output.mode=overwrite --set runtime.dtype=float32
    """
    from bertpipe.api import run as run_job

    _setup_logging(verbose)
    try:
        with RunProgress() as progress:
            summary = run_job(config, set_ or [], on_progress=progress.update, quiet=not verbose)
    except ConfigError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the CLI turns any failure into one line and a code
        _fail(f"run failed: {type(exc).__name__}: {_first_line(exc)}", code=1)
    print_summary(summary)


@app.command()
def finetune(
    config: Annotated[str, typer.Argument(help="The fine-tuning YAML config file.", show_default=False)],
    set_: SetOption = None,
) -> None:
    """Fine-tune a BERT classifier or tagger on labelled data (Ray Train); saves a folder `run` can use.

    Example: bertpipe finetune configs/finetune-sentiment.yaml --set epochs=1
    """
    from bertpipe.train.config import load_finetune_config
    from bertpipe.train.trainer import run_finetune

    _setup_logging(False)
    try:
        cfg = load_finetune_config(config, set_ or [])
        with TrainingProgress() as progress:
            result = run_finetune(cfg, progress=lambda event: progress.update(cfg.kind, event))
    except ConfigError as exc:
        _fail(str(exc))
    out.print(
        f"best {result['best_metric']} = {result['best_score']:.4f} (epoch {result['best_epoch']}); "
        f"saved to {result['output_dir']}"
    )


@app.command()
def demo(
    workdir: Annotated[str, typer.Option(help="Where models, corpus and output go.")] = ".bertpipe",
    quick: Annotated[
        bool, typer.Option(help="Few training steps on sampled data and a small corpus (CI).")
    ] = False,
    rows: Annotated[int, typer.Option(help="Rows in the sample corpus.")] = 600,
) -> None:
    """Offline demo: fine-tune three demo models once (cached), then label a sample corpus with them.

    Example: bertpipe demo --workdir /tmp/demo
    """
    from bertpipe.api import run as run_job
    from bertpipe.demo.run import job_config, link_encoder, train_models, write_corpus
    from bertpipe.engine.cluster import connect

    _setup_logging(False)
    root = Path(workdir).resolve()
    out.print(f"[bold]bertpipe demo[/bold]: models and data under {root}")
    connect(None, state_api=True)  # one Ray for the three fine-tunes and the run
    try:
        with TrainingProgress() as progress:
            models = train_models(root, progress.update, quick)
        models["encoder"] = link_encoder(root)  # the embedding task's sentence encoder, as shipped
        n = write_corpus(root / "demo" / "corpus", 120 if quick else rows)
        out.print(f"sample corpus: {n} rows in {root / 'demo' / 'corpus'}")
        with RunProgress() as run_progress:  # as `bertpipe run` shows it, without Ray Data's INFO lines
            summary = run_job(job_config(root, models), on_progress=run_progress.update, quiet=True)
    except ConfigError as exc:
        _fail(str(exc))
    print_summary(summary)
    print_examples(Path(summary.config["output"]["path"]))
    print_similar(Path(summary.config["output"]["path"]))


class RunProgress:
    """The run's own progress: a rich bar (rows of the pre-flight total, rows/s, ETA, errors) on a
    terminal; elsewhere (cron, CI logs) a timestamped plain line every ``PLAIN_EVERY_S`` seconds."""

    PLAIN_EVERY_S = 10.0

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("labelling"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} rows/s, errors {task.fields[errors]}"),
            TimeRemainingColumn(),
            console=out,
        )
        self.task = None
        self.last_line, self.last_rows = 0.0, -1

    def __enter__(self) -> RunProgress:
        if out.is_terminal:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if out.is_terminal:
            self.bar.__exit__(*exc)

    def update(self, progress) -> None:
        if out.is_terminal:
            if self.task is None:
                self.task = self.bar.add_task("run", total=progress.total, rate="0.0", errors=0)
            self.bar.update(
                self.task, completed=progress.rows, rate=f"{progress.rows_per_s:.1f}", errors=progress.errors
            )
            return
        now = time.monotonic()
        finished = progress.rows == progress.total != self.last_rows
        if now - self.last_line >= self.PLAIN_EVERY_S or finished:
            self.last_line, self.last_rows = now, progress.rows
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            out.print(f"{stamp} {progress.line()}", highlight=False, markup=False, soft_wrap=True)


@app.command("inspect")
def inspect_command(
    output: OutputArgument,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout, not tables.")] = False,
    table: TableOption = None,
) -> None:
    """Summarise a finished output: rows, errors by reason, labels and scores, entities, and runs.

    Example: bertpipe inspect labelled/ --json | jq .tasks.sentiment.labels
    """
    from bertpipe.report.inspect import inspect_output

    try:
        report = inspect_output(output, table)
    except ConfigError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_inspection(report)


@app.command("report")
def report_command(
    output: OutputArgument,
    html: Annotated[Path, typer.Option("--html", help="The HTML file to write.")],
    table: TableOption = None,
) -> None:
    """Write one self-contained HTML page (opens offline) with plots of what `inspect` shows.

    Example: bertpipe report labelled/ --html labelled.html
    """
    from bertpipe.report.html import write_report
    from bertpipe.report.inspect import inspect_output

    try:
        report = inspect_output(output, table)
    except ConfigError as exc:
        _fail(str(exc))
    try:
        write_report(report, html)
    except OSError as exc:
        _fail(f"{html}: cannot write the report: {exc.strerror or exc}")
    out.print(f"wrote {escape(str(html))}", highlight=False)


class TrainingProgress:
    """A rich progress bar per model, fed by fine-tuning events (from a background thread). Where the
    output is not a terminal (a CI log, a file) bars do not render, so milestones print as lines."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=out,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> TrainingProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def update(self, name: str, event: dict) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.bars.add_task(f"fine-tune {name}", total=None, status="preparing")
        bar = self.tasks[name]
        kind = event.get("event")
        if kind == "cached":
            self.bars.update(bar, total=1, completed=1, status=f"cached in {event['output_dir']}")
        elif kind == "start":
            self.bars.update(bar, total=event["total_steps"], status="training")
        elif kind == "step":
            self.bars.update(bar, completed=event["step"], status=f"loss {event['loss']:.3f}")
        elif kind == "epoch":
            scores = {
                k: v for k, v in event.items() if k.startswith("val_") and k.endswith(("f1", "accuracy"))
            }
            text = " ".join(f"{k[4:]}={v:.3f}" for k, v in scores.items())
            self.bars.update(bar, status=f"epoch {event['epoch']}: {text}")
        elif kind == "saved":
            total = self.bars.tasks[bar].total
            self.bars.update(bar, completed=total, status=f"saved to {event['output_dir']}")
        if kind != "step" and not out.is_terminal:
            out.print(f"fine-tune {name}: {self.bars.tasks[bar].fields['status']}", highlight=False)


def print_examples(output: Path, limit: int = 5) -> None:
    """A few labelled rows, short texts first, so a person can judge the labels at a glance."""
    import pyarrow.dataset as pads

    rows = pads.dataset(str(output), partitioning="hive").to_table().to_pylist()
    rows = sorted((r for r in rows if r["_error"] is None), key=lambda r: len(r["text"]))
    table = Table(title="examples")
    for column in ("text", "topic", "sentiment", "entities"):
        table.add_column(column)
    for row in rows[:: max(1, len(rows) // limit)][:limit]:
        # The text's own characters: an uncased model's ``word`` is lower-cased WordPiece output.
        entities = ", ".join(
            f"{row['text'][e['start'] : e['end']]} ({e['entity_group']})" for e in row["entities"] or []
        )
        table.add_row(
            row["text"][:140],
            f"{row['topic_label']} {row['topic_score']:.2f}",
            f"{row['sentiment_label']} {row['sentiment_score']:.2f}",
            entities,
        )
    out.print(table)


def print_similar(output: Path) -> None:
    """A similarity search over the demo output: the texts nearest to one review, by the embedding
    task's vectors (DuckDB's ``array_cosine_similarity``)."""
    import pyarrow.dataset as pads

    from bertpipe.demo.run import similar_texts

    rows = pads.dataset(str(output), partitioning="hive").to_table(columns=["id", "text", "_error"])
    ok = sorted((r for r in rows.to_pylist() if r["_error"] is None), key=lambda r: r["id"])
    if not ok:
        return
    probe = ok[0]
    table = Table(title=escape(f"nearest to: {probe['text'][:100]}"))
    table.add_column("similar text")
    table.add_column("cosine", justify="right")
    for text, similarity in similar_texts(output, probe["id"]):
        table.add_row(escape(text[:140]), f"{similarity:.3f}")
    out.print(table)


def print_inspection(report: dict) -> None:
    """``bertpipe inspect`` as rich tables. Values from the data are escaped: a label may hold [brackets]."""
    where = report["format"] + (f" table {report['table']}" if report["table"] else "")
    table = Table(title=escape(f"{report['output']} ({where})"))
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("rows", "rows_ok", "rows_error"):
        table.add_row(key, str(report[key]))
    for reason, count in report["errors_by_reason"].items():
        table.add_row(f"  error: {escape(reason)}", str(count))
    if not report["complete"]:
        table.add_row("complete", "no (_SUCCESS missing)")
    out.print(table)
    for name, task in report["tasks"].items():
        if task["kind"] == "ner":
            source = "the row's text" if task["entity_text"] == "text" else "the word field"
            table = Table(title=f"{name} (ner)", caption=f"entity text from {source}")
            for column in ("type", "entities", "top entities (mentions)"):
                table.add_column(column)
            for group, count in task["entities"].items():
                text = ", ".join(f"{e['text']} ({e['count']})" for e in task["top_entities"][group])
                table.add_row(escape(group), str(count), escape(text))
        else:
            table = Table(title=f"{name} ({task['kind']})")
            table.add_column("label")
            table.add_column("rows", justify="right")
            table.add_column("share", justify="right")
            total = sum(task["labels"].values())
            for label, count in task["labels"].items():
                table.add_row(escape(label), str(count), f"{count / total:.1%}")
        out.print(table)
        if task.get("scores"):
            out.print(
                "score: " + "  ".join(f"{k} {v:.4f}" for k, v in task["scores"].items()), highlight=False
            )
    if report["runs"]:
        table = Table(title="runs")
        table.add_column("run_id", no_wrap=True)
        table.add_column("start (UTC)", no_wrap=True)
        for column in ("rows_out", "rows_ok", "errors", "seconds", "rows/s"):
            table.add_column(column, justify="right")
        for run in report["runs"]:
            start = (run["start"] or "")[:19].replace("T", " ")
            counts = (run[k] for k in ("rows_out", "rows_ok", "rows_error", "seconds", "rows_per_s"))
            table.add_row(run["run_id"], start, *("" if v is None else str(v) for v in counts))
        out.print(table)


def print_summary(summary: RunSummary) -> None:
    if summary.nothing_to_do:
        out.print("nothing to do: the output already holds every input file")
        return
    table = Table(title=f"run {summary.run_id}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("rows_in", "rows_out", "rows_ok", "rows_error", "duplicate_ids", "seconds", "rows_per_s"):
        table.add_row(key, str(getattr(summary, key)))
    for reason, count in sorted(summary.errors_by_reason.items()):
        table.add_row(f"  error: {reason}", str(count))
    for skipped in summary.skipped_files:
        table.add_row(f"  skipped: {skipped['file']}", skipped["reason"])
    for task, counts in summary.task_counts.items():
        shown = ", ".join(f"{name} {n}" for name, n in list(counts.items())[:8])
        table.add_row(f"  {task}", shown + (", ..." if len(counts) > 8 else ""))
    table.add_row("output", summary.config["output"]["path"])
    out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
