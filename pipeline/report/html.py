"""``bertpipe report``: the numbers of ``inspect`` as plots on one self-contained HTML page.

plotly.js is embedded in the page once, with the first figure, so that the page opens offline and can
be mailed or archived next to the output. Every figure's div has a fixed id (``labels-<task>``,
``scores-<task>``, ``entities-<task>``, ``top-<task>-<type>``, ``errors``, ``runs``).
"""

from __future__ import annotations

import html
import re
from itertools import pairwise
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 12px; text-align: left; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
"""


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(render(report), encoding="utf-8")


def render(report: dict[str, Any]) -> str:
    page = _Page(f"bertpipe report: {report['output']}")
    page.facts(
        {
            "output": report["output"],
            "format": report["format"] + (f" ({report['table']})" if report["table"] else ""),
            "complete": "yes" if report["complete"] else "no (_SUCCESS missing)",
            "rows": f"{report['rows']:,}",
            "rows ok": f"{report['rows_ok']:,}",
            "rows with errors": f"{report['rows_error']:,}",
        }
    )
    page.heading("Errors by reason")
    errors = report["errors_by_reason"]
    if errors:
        page.figure("errors", _hbar(errors, "rows"), "rows with _error, by reason")
    else:
        page.text("No row has an error.")
    for name, task in report["tasks"].items():
        page.heading(f"{name} ({task['kind']})")
        if task["kind"] == "ner":
            page.figure(f"entities-{name}", _bar(task["entities"], "entities"), "entities by type")
            source = "the row's text" if task["entity_text"] == "text" else "the word field"
            for group, top in task["top_entities"].items():
                counts = {e["text"]: e["count"] for e in top}
                title = f"top {len(top)} {group} entities (text from {source})"
                page.figure(f"top-{name}-{_slug(group)}", _hbar(counts, "mentions"), title)
        else:
            page.figure(f"labels-{name}", _bar(task["labels"], "rows"), "label distribution")
            page.figure(f"scores-{name}", _histogram(task["score_histogram"]), _quantiles(task["scores"]))
    page.heading("Runs")
    runs = [r for r in report["runs"] if r["rows_per_s"] is not None]
    if runs:
        fig = go.Figure(go.Bar(x=[r["run_id"] for r in runs], y=[r["rows_per_s"] for r in runs]))
        fig.update_layout(xaxis_type="category", yaxis_title="rows/s")
        page.figure("runs", fig, "rows/s per run")
    else:
        page.text("No run summaries (table outputs keep none in _runs/).")
    return page.html()


class _Page:
    """HTML fragments in order; the first figure carries plotly.js."""

    def __init__(self, title: str):
        self.title = title
        self.parts = [f"<h1>{html.escape(title)}</h1>"]
        self.figures = 0

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def facts(self, facts: dict[str, str]) -> None:
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts.items()
        )
        self.parts.append(f"<table>{rows}</table>")

    def figure(self, div_id: str, fig: go.Figure, title: str) -> None:
        fig.update_layout(
            title=title, template="plotly_white", height=360, margin={"l": 60, "r": 20, "t": 50, "b": 60}
        )
        self.parts.append(
            fig.to_html(
                full_html=False,
                include_plotlyjs=self.figures == 0,
                div_id=div_id,
                config={"displaylogo": False},
            )
        )
        self.figures += 1

    def html(self) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(self.parts)
            + "\n</body></html>\n"
        )


def _bar(counts: dict[str, int], unit: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(counts), y=list(counts.values())))
    fig.update_layout(xaxis_type="category", yaxis={"title": unit, **_count_ticks(counts)})
    return fig


def _hbar(counts: dict[str, int], unit: str) -> go.Figure:
    """Horizontal bars, largest on top: for long category names (error reasons, entity texts)."""
    fig = go.Figure(go.Bar(x=list(counts.values()), y=list(counts), orientation="h"))
    fig.update_layout(
        yaxis={"type": "category", "autorange": "reversed"}, xaxis={"title": unit, **_count_ticks(counts)}
    )
    return fig


def _count_ticks(counts: dict[str, int]) -> dict[str, int]:
    """Whole-number ticks where plotly would put ticks at 0.5 steps (counts up to 10)."""
    return {"dtick": 1} if max(counts.values(), default=0) <= 10 else {}


def _histogram(hist: dict[str, list]) -> go.Figure:
    """The bins ``inspect`` counted, drawn as touching bars."""
    bins = list(pairwise(hist["edges"]))
    fig = go.Figure(
        go.Bar(
            x=[(a + b) / 2 for a, b in bins],
            y=hist["counts"],
            width=[b - a for a, b in bins],
            hovertemplate="%{x:.3f}: %{y} rows<extra></extra>",
        )
    )
    fig.update_layout(bargap=0, xaxis_title="score", yaxis_title="rows")
    return fig


def _quantiles(scores: dict[str, float] | None) -> str:
    if scores is None:
        return "score histogram (no scores: every row is an error row)"
    return "score histogram: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)
