"""``bertpipe validate``'s cost estimate: token counts against the HF tokenizer, a duration, the CLI."""

from __future__ import annotations

import subprocess
import sys

from conftest import STRIDE, WINDOW, make_texts, write_config, write_shards
from transformers import AutoTokenizer

from bertpipe import load_config
from bertpipe.estimate import estimate
from bertpipe.plan import plan


def _job(tmp_path, models, n_rows: int):
    rows = [{"id": f"e-{i}", "text": t} for i, t in enumerate(make_texts(n_rows, seed=41, max_words=400))]
    write_shards(tmp_path / "in", rows, n_parquet=1, n_jsonl=1)
    config = write_config(
        tmp_path / "job.yaml",
        input={"paths": [str(tmp_path / "in")]},
        output={"path": str(tmp_path / "out")},
        tasks=[
            {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
            {"name": "entities", "kind": "ner", "model": str(models["ner"])},
        ],
        runtime={"dtype": "float32", "max_length": WINDOW, "stride": STRIDE},
    )
    return config, rows


def test_token_counts_equal_the_tokenizer_when_the_sample_is_the_input(models, tmp_path):
    config, rows = _job(tmp_path, models, 30)
    p = plan(load_config(config))
    cost = estimate(p, "cpu", limit=100)
    assert cost.exact and cost.sample_rows == cost.rows == len(rows) and cost.seconds > 0
    tok = AutoTokenizer.from_pretrained(models["ner"])
    texts = sorted((r["text"] for r in rows), key=len)
    truncated = tok(texts, truncation=True, max_length=WINDOW)["input_ids"]
    windows = tok(texts, truncation=True, max_length=WINDOW, stride=STRIDE, return_overflowing_tokens=True)
    assert cost.tokens["sentiment"] == sum(len(ids) for ids in truncated)
    assert cost.tokens["entities"] == sum(len(ids) for ids in windows["input_ids"])
    assert cost.tokens["entities"] > cost.tokens["sentiment"]  # long texts: NER reads every window


def test_a_sample_is_scaled_to_the_row_count(models, tmp_path):
    config, rows = _job(tmp_path, models, 40)
    cost = estimate(plan(load_config(config)), "cpu", limit=10)
    assert not cost.exact and cost.sample_rows == 10 and cost.rows == len(rows)
    assert cost.tokens["sentiment"] > 0


def test_validate_prints_the_estimate(models, tmp_path):
    config, _ = _job(tmp_path, models, 12)
    out = subprocess.run(
        [sys.executable, "-m", "bertpipe", "validate", str(config)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokens: sentiment" in out.stdout and "tokens: entities" in out.stdout and "counted" in out.stdout
    assert "model time" in out.stdout
    quick = subprocess.run(
        [sys.executable, "-m", "bertpipe", "validate", str(config), "--no-estimate"],
        capture_output=True,
        text=True,
    )
    assert quick.returncode == 0 and "model time" not in quick.stdout
