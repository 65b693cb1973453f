"""Bad rows never crash a run and never disappear: each comes out once with an ``_error`` reason and null
task outputs, while the good rows of the same file get the predictions of ``transformers.pipeline``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import STRIDE, WINDOW, base_config, make_texts, write_config
from transformers import pipeline as hf_pipeline
from typer.testing import CliRunner

from bertpipe import columns as C
from bertpipe.cli import app
from bertpipe.config import JobConfig
from bertpipe.io.reader import normalise_block
from bertpipe.plan import plan_models
from bertpipe.runner import execute
from bertpipe.stages.infer import InferStage
from bertpipe.stages.postprocess import PostprocessStage
from bertpipe.stages.prepare import PrepareStage

MEGABYTE = 1_000_000
OUTPUTS = ("topic_label", "topic_score", "topic_top", "sentiment_label", "sentiment_score", "entities")

# (id, the text value as raw JSON bytes, the reason). Raw bytes, so that a line can hold a byte that is
# not UTF-8 (b"\xff") next to a lone surrogate escape, which is valid JSON but not valid Unicode.
BAD_JSON_TEXTS = [
    ("null", b"null", "text is null"),
    ("empty", b'""', "text is empty"),
    ("blank", b'"  \\n\\t  "', "text is empty"),
    ("int", b"42", "text is not a string (int)"),
    ("list", b'["a", "b"]', "text is not a string (list)"),
    ("dict", b'{"k": "v"}', "text is not a string (dict)"),
    ("control", b'"a bell \\u0007 rings"', "text contains control characters"),
    ("raw-ff", b'"a byte \xff that is not UTF-8"', "text is not valid UTF-8"),
    ("surrogate", b'"a lone \\ud800 half"', "text is not valid UTF-8"),
]


def megabyte_text(texts: list[str]) -> str:
    base = " ".join(texts) + " "
    return (base * (MEGABYTE // len(base) + 1))[: MEGABYTE + 1000]


def read_output(out: Path) -> dict[str, dict]:
    """Output rows by ``_row_key`` (ids repeat when the input repeats them)."""
    rows = pads.dataset(str(out), partitioning="hive").to_table().to_pylist()
    by_key = {r[C.ROW_KEY]: r for r in rows}
    assert len(by_key) == len(rows)
    return by_key


def run_summary_file(out: Path, summary: dict) -> dict:
    return json.loads((out / "_runs" / f"{summary['run_id']}.json").read_text())


class Hf:
    """The reference: ``transformers.pipeline`` on the same model folders, as test_oracle.py uses it."""

    def __init__(self, models: dict[str, Path]):
        self.topic = hf_pipeline("text-classification", model=str(models["topic"]), top_k=2)
        self.sentiment = hf_pipeline("text-classification", model=str(models["sentiment"]))
        self.ner = hf_pipeline(
            "token-classification", model=str(models["ner"]), aggregation_strategy="simple", stride=STRIDE
        )

    def assert_classified(self, got: list[dict], texts: list[str], sentiment: bool = True) -> None:
        expected = self.topic(texts, truncation=True, max_length=WINDOW, batch_size=16)
        for row, exp in zip(got, expected, strict=True):
            assert row["_error"] is None
            assert row["topic_label"] == exp[0]["label"]
            assert row["topic_score"] == pytest.approx(exp[0]["score"], abs=1e-4)
            assert [t["label"] for t in row["topic_top"]] == [e["label"] for e in exp]
        if sentiment:
            expected = self.sentiment(texts, truncation=True, max_length=WINDOW, batch_size=16)
            for row, exp in zip(got, expected, strict=True):
                assert row["sentiment_label"] == exp["label"].lower()
                assert row["sentiment_score"] == pytest.approx(exp["score"], abs=1e-4)

    def assert_entities(self, got: list[dict], texts: list[str]) -> None:
        for row, exp in zip(got, self.ner(texts), strict=True):
            assert [(e["entity_group"], e["start"], e["end"]) for e in row["entities"]] == [
                (e["entity_group"], e["start"], e["end"]) for e in exp
            ]
            assert [e["score"] for e in row["entities"]] == pytest.approx([e["score"] for e in exp], abs=1e-4)


@pytest.fixture(scope="module")
def hf(models) -> Hf:
    return Hf(models)


@pytest.fixture(scope="module")
def bad_rows_run(ray_session, models, tmp_path_factory):
    """One run over four files that mix good rows with every kind of bad row.

    Returns (summary, output rows by row key, expected rows: key -> (id, text or None, reason or None)).
    """
    root = tmp_path_factory.mktemp("bad-rows")
    good = make_texts(16, seed=21, max_words=150)
    big = megabyte_text(good)
    expected: dict[str, tuple[str, str | None, str | None]] = {}

    jsonl = root / "in" / "mixed.jsonl"
    jsonl.parent.mkdir()
    lines, texts = [], [(f"j{i}", t) for i, t in enumerate(good[:6])] + [("big", big)]
    for i, (row_id, text) in enumerate(texts):  # a good row, then a bad one, in turn
        lines.append(json.dumps({"id": row_id, "text": text}).encode())
        expected[f"{jsonl}#{len(lines) - 1}"] = (row_id, text, None)
        if i < len(BAD_JSON_TEXTS):
            bad_id, raw, reason = BAD_JSON_TEXTS[i]
            lines.append(b'{"id": "' + bad_id.encode() + b'", "text": ' + raw + b"}")
            expected[f"{jsonl}#{len(lines) - 1}"] = (bad_id, None, reason)
    for bad_id, raw, reason in BAD_JSON_TEXTS[len(texts) :]:
        lines.append(b'{"id": "' + bad_id.encode() + b'", "text": ' + raw + b"}")
        expected[f"{jsonl}#{len(lines) - 1}"] = (bad_id, None, reason)
    jsonl.write_bytes(b"\n".join(lines) + b"\n")

    def parquet(name: str, rows: list[tuple[str, str | None, str | None]], text: pa.Array) -> None:
        """``rows``: (id, the text expected in the output, the reason); ``text``: what the file holds."""
        path = root / "in" / name
        pq.write_table(pa.table({"id": [row_id for row_id, _, _ in rows], "text": text}), path)
        for n, row in enumerate(rows):
            expected[f"{path}#{n}"] = row

    strings = [good[6], None, "", "a \x00 inside", good[7]]
    parquet(
        "strings.parquet",
        [("j0", good[6], None), ("p-null", None, "text is null"), ("p-empty", None, "text is empty")]
        + [("p-nul", None, "text contains control characters"), ("p1", good[7], None)],
        pa.array(strings, pa.string()),
    )
    not_utf8 = pa.array([good[8].encode(), b"\xff\xfe not UTF-8", good[9].encode()], pa.binary())
    reasons = [None, "text is not valid UTF-8", None]
    texts = [good[8], None, good[9]]
    parquet("binary.parquet", list(zip(["b0", "b-bad", "b2"], texts, reasons, strict=True)), not_utf8)
    # A string column holding invalid UTF-8: Arrow's writer stores it unchecked, and so do others.
    string_rows = list(zip(["s0", "s-bad", "s2"], texts, reasons, strict=True))
    parquet("invalid-string.parquet", string_rows, not_utf8.view(pa.string()))
    parquet(
        "ints.parquet",
        [("i0", None, "text is not a string (int)"), ("i-null", None, "text is null")],
        pa.array([7, None], pa.int64()),
    )

    out = root / "out"
    summary = execute(JobConfig.model_validate(base_config(root / "in", out, models)))
    return summary, out, read_output(out), expected, big


def test_every_row_comes_out_exactly_once(bad_rows_run):
    summary, _, got, expected, _ = bad_rows_run
    assert sorted(got) == sorted(expected)
    assert [got[k]["id"] for k in sorted(got)] == [expected[k][0] for k in sorted(expected)]
    assert summary["rows_in"] == summary["rows_out"] == len(expected)
    assert summary["rows_ok"] + summary["rows_error"] == len(expected)


@pytest.mark.parametrize(
    "row_id",
    [i for i, _, _ in BAD_JSON_TEXTS] + ["p-null", "p-empty", "p-nul", "b-bad", "s-bad", "i0", "i-null"],
)
def test_bad_row_has_its_reason_and_null_outputs(bad_rows_run, row_id):
    _, _, got, expected, _ = bad_rows_run
    [(key, reason)] = [(k, e[2]) for k, e in expected.items() if e[0] == row_id]
    assert got[key]["_error"] == reason
    assert all(got[key][name] is None for name in OUTPUTS)


def test_good_rows_next_to_bad_ones_equal_hf(bad_rows_run, hf):
    _, _, got, expected, big = bad_rows_run
    keys = [k for k, (_, text, reason) in expected.items() if reason is None and text is not big]
    texts = [expected[k][1] for k in keys]
    assert len(keys) == 12 and len({expected[k][0] for k in keys}) == 11, "one id is used twice"
    assert all(got[k]["text"] == t for k, t in zip(keys, texts, strict=True))
    hf.assert_classified([got[k] for k in keys], texts)
    hf.assert_entities([got[k] for k in keys], texts)


def test_megabyte_text_is_labelled_in_windows(bad_rows_run, hf):
    """Without ``input.max_chars`` a 1 MB text is labelled: classification on its first window (as HF
    truncates), entities over windows covering all of it (HF's own run takes over a minute here, so the
    window merging is checked against HF on the short texts above)."""
    _, _, got, _, big = bad_rows_run
    [row] = [r for r in got.values() if r["id"] == "big"]
    assert len(big) > MEGABYTE and row["text"] == big
    hf.assert_classified([row], [big])
    spans = [(e["start"], e["end"]) for e in row["entities"]]
    assert spans == sorted(spans) and all(0 <= s < e <= len(big) for s, e in spans)
    assert len(spans) > 1000
    assert spans[-1][0] > 0.99 * len(big), "the last windows of the text were not labelled"


def test_summary_counts_rows_errors_and_duplicate_ids(bad_rows_run):
    summary, out, _, expected, _ = bad_rows_run
    reasons = Counter(reason for _, _, reason in expected.values() if reason)
    assert run_summary_file(out, summary) == summary
    assert summary["errors_by_reason"] == dict(reasons)
    assert summary["rows_error"] == sum(reasons.values())
    assert summary["rows_ok"] == sum(1 for _, _, reason in expected.values() if reason is None) == 13
    assert summary["duplicate_ids"] == 1  # "j0" is in mixed.jsonl and strings.parquet; both are kept
    assert summary["skipped_files"] == []


@pytest.fixture(scope="module")
def max_chars_run(ray_session, models, tmp_path_factory):
    root = tmp_path_factory.mktemp("max-chars")
    good = make_texts(6, seed=22, max_words=200)
    limit = 100_000
    edge = (good[0] + " ") * (limit // (len(good[0]) + 1))
    rows = [("g0", good[1]), ("big", megabyte_text(good)), ("edge", edge + "x" * (limit - len(edge)))]
    rows += [("g1", good[2])]
    (root / "in").mkdir()
    pq.write_table(
        pa.Table.from_pylist([{"id": i, "text": t} for i, t in rows]), root / "in" / "part.parquet"
    )
    cfg = base_config(root / "in", root / "out", models)
    cfg["input"]["max_chars"] = limit
    cfg["tasks"] = cfg["tasks"][:1]
    summary = execute(JobConfig.model_validate(cfg))
    return summary, root / "out", {r["id"]: r for r in read_output(root / "out").values()}, dict(rows)


def test_max_chars_rejects_a_megabyte_text(max_chars_run, hf):
    summary, out, got, texts = max_chars_run
    assert len(texts["edge"]) == 100_000 and len(texts["big"]) > MEGABYTE
    assert got["big"]["_error"] == "text longer than input.max_chars (100000)"
    assert got["big"]["topic_label"] is None and got["big"]["topic_score"] is None
    hf.assert_classified([got["g0"], got["edge"], got["g1"]], [texts[i] for i in ("g0", "edge", "g1")], False)
    assert summary["errors_by_reason"] == {"text longer than input.max_chars (100000)": 1}
    assert summary["rows_in"] == summary["rows_out"] == 4 and summary["rows_ok"] == 3
    assert run_summary_file(out, summary) == summary


def test_duplicate_ids_fail_by_policy(ray_session, models, tmp_path):
    """``input.on_duplicate_id: fail``: exit code 2, one line, nothing published."""
    rows = [{"id": "a", "text": "one text"}, {"id": "b", "text": "two"}, {"id": "a", "text": "three"}]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = base_config(tmp_path / "in", tmp_path / "out", models)
    cfg["input"]["on_duplicate_id"] = "fail"
    cfg["tasks"] = cfg["tasks"][:1]
    result = CliRunner().invoke(app, ["run", str(write_config(tmp_path / "job.yaml", **cfg))])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("bertpipe: error:")]
    assert len(lines) == 1 and lines[0].startswith("bertpipe: error: 1 duplicate ids in input.id_column 'id'")
    assert "input.on_duplicate_id: fail" in lines[0]
    assert not (tmp_path / "out").exists()


def test_tokenizer_failure_marks_only_that_row(models, hf, monkeypatch):
    """Stages are plain classes: a tokenizer that fails on one text of a batch marks that row only, and
    the rest of the batch still gets HF's predictions (classification and entities)."""
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)  # keep this process's threads as they are
    cfg = JobConfig.model_validate(base_config(Path("unused"), Path("unused"), models))
    planned = plan_models(cfg.tasks)
    model_tasks, groups = planned.model_tasks, planned.groups
    [group] = groups  # the three tiny models share one tokenizer
    prepare = PrepareStage("text", groups, WINDOW, STRIDE, None)
    tokenizer = prepare.tokenizers[group.key]

    def fragile(texts, **kwargs):
        if any("EXPLODE" in t for t in texts):
            raise ValueError("cannot tokenise this")
        return tokenizer(texts, **kwargs)

    prepare.tokenizers[group.key] = fragile
    good = make_texts(6, seed=23, max_words=300)
    texts = good[:3] + ["it will EXPLODE here", None] + good[3:]
    batch = pa.table({"text": texts, C.ERROR: pa.nulls(len(texts), pa.string())})
    prepared = prepare(batch)
    errors = prepared.column(C.ERROR).to_pylist()
    assert errors == [None] * 3 + ["tokenizer failed: ValueError", "text is null"] + [None] * 3
    windows = prepared.column(C.token_ids(group.key)).to_pylist()
    assert windows[3] == windows[4] == []

    infer = InferStage(model_tasks, cfg.runtime, "cpu")
    rows = PostprocessStage(model_tasks, "text")(infer(prepared)).to_pylist()
    assert all(rows[i][name] is None for i in (3, 4) for name in OUTPUTS)
    ok = [rows[i] for i in (0, 1, 2, 5, 6, 7)]
    hf.assert_classified(ok, good)
    hf.assert_entities(ok, good)


def test_batch_of_only_bad_rows(models):
    """A batch with no text to tokenise (or whose every text fails) still comes out, every row marked."""
    cfg = JobConfig.model_validate(base_config(Path("unused"), Path("unused"), models))
    groups = plan_models(cfg.tasks).groups
    prepare = PrepareStage("text", groups, WINDOW, STRIDE, None)
    batch = pa.table({"text": [None, " ", "x"], C.ERROR: [None, None, "text is not a string (int)"]})
    out = prepare(batch)
    assert out.column(C.ERROR).to_pylist() == ["text is null", "text is empty", "text is not a string (int)"]
    assert out.column(C.token_ids(groups[0].key)).to_pylist() == [[], [], []]
    prepare.tokenizers[groups[0].key] = lambda texts, **kwargs: 1 / 0
    out = prepare(pa.table({"text": ["a", "b"], C.ERROR: pa.nulls(2, pa.string())}))
    assert out.column(C.ERROR).to_pylist() == ["tokenizer failed: ZeroDivisionError"] * 2
    assert out.column(C.token_offsets(groups[0].key)).to_pylist() == [[], []]


def test_categorical_text_column_is_text():
    """A pandas categorical written to Parquet reads back dictionary-encoded: still text, not an error."""
    table = pa.table({"text": pa.array(["a text", None, "a text", "another"]).dictionary_encode()})
    out = normalise_block(table, "text", 0, "file.parquet", None)
    assert out.column("text").type == pa.string()
    assert out.column("text").to_pylist() == ["a text", None, "a text", "another"]
    assert out.column(C.ERROR).to_pylist() == [None] * 4


def test_counts_in_the_driver_equal_the_distributed_counts(ray_session, tmp_path):
    """Small outputs are counted in the driver, big ones by Ray Data aggregations: the same figures for
    staged files with repeated keys and ids, null ids and error rows (Python's Counter is the reference)."""
    from pyarrow import fs as pafs

    from bertpipe.engine.data import SMALL_OUTPUT_ROWS, staged_stats

    rows = [
        {
            C.ROW_KEY: f"k{i % 170}",
            "id": None if i % 11 == 0 else f"i{i % 130}",
            C.ERROR: [None, "x", "y"][i % 3],
        }
        for i in range(200)
    ]
    files = []
    for part in range(4):
        files.append(str(tmp_path / f"part-{part}.parquet"))
        pq.write_table(pa.Table.from_pylist(rows[part::4]), files[-1])
    ids = [r["id"] for r in rows if r["id"] is not None]
    expected = (200, 170, dict(Counter(r[C.ERROR] for r in rows if r[C.ERROR])), 4, len(ids) - len(set(ids)))
    fs = pafs.LocalFileSystem()
    for hint in (len(rows), SMALL_OUTPUT_ROWS + 1):
        stats = staged_stats(fs, files, "id", False, rows_hint=hint)
        assert (
            stats.rows,
            stats.distinct_keys,
            stats.errors_by_reason,
            stats.files,
            stats.duplicate_ids,
        ) == expected
