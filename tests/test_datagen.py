"""Demo training-data generators and the hand-written held-out sets.

The demo models are only as good as this data, so besides determinism and shape the tests check that
the phenomena the models must learn (negation, contrast, multi-word entities, capitalised non-entities)
are actually present.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bertpipe.demo import vocab
from bertpipe.demo.datagen import (
    CORPUS_SOURCES,
    DEMO_SENTIMENT_LABELS,
    HANDWRITTEN_COPIES,
    NER_LABELS,
    SENTIMENT_LABELS,
    TOPIC_LABELS,
    handwritten,
    main,
    make_ner,
    make_neutral,
    make_sample_corpus,
    make_sentiment,
    make_topic,
    ner_training,
    sentiment_training,
)

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
CONTRAST = re.compile(r"\b(but|however|although|though|while|yet|despite)\b", re.IGNORECASE)
NEGATION = re.compile(r"\b(not|no|never|nothing|none|nobody)\b|n't\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def sentiment() -> list[dict]:
    return make_sentiment()


@pytest.fixture(scope="module")
def topic() -> list[dict]:
    return make_topic()


@pytest.fixture(scope="module")
def ner() -> list[dict]:
    return make_ner()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_spans(row: dict) -> None:
    text, previous_end = row["text"], 0
    for entity in sorted(row["entities"], key=lambda e: e["start"]):
        start, end = entity["start"], entity["end"]
        assert 0 <= start < end <= len(text), row
        surface = text[start:end]
        assert surface == surface.strip() and "\n" not in surface, row
        assert entity["label"] in NER_LABELS, row
        assert start >= previous_end, f"overlapping spans in {row}"
        previous_end = end


def _outside_spans(row: dict, word: str) -> bool:
    """Whether ``word`` occurs in the text at a position not covered by an entity span."""
    for match in re.finditer(rf"\b{re.escape(word)}\b", row["text"]):
        if not any(e["start"] <= match.start() < e["end"] for e in row["entities"]):
            return True
    return False


def _normalised(text: str) -> str:
    """Case, punctuation and spacing do not make a held-out text new."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


@pytest.mark.parametrize("make", [make_sentiment, make_topic, make_ner, make_neutral, make_sample_corpus])
def test_same_seed_same_rows_other_seed_differs(make):
    assert make(120, seed=3) == make(120, seed=3)
    assert make(120, seed=3) != make(120, seed=4)


def test_default_sizes_labels_and_balance(sentiment, topic, ner):
    assert len(sentiment) == 3000 and len(ner) == 3500 and len(topic) == 2000
    assert Counter(r["label"] for r in sentiment) == {"positive": 1500, "negative": 1500}
    assert Counter(r["label"] for r in topic) == dict.fromkeys(TOPIC_LABELS, 500)
    odd = Counter(r["label"] for r in make_sentiment(101, seed=5))
    assert set(odd) == set(SENTIMENT_LABELS) and abs(odd["positive"] - odd["negative"]) == 1


def test_texts_are_unique_and_fully_filled(sentiment, topic, ner):
    for rows in (sentiment, topic, ner):
        texts = [r["text"] for r in rows]
        assert len(set(texts)) == len(texts)
        assert not [t for t in texts if "{" in t or "}" in t or "  " in t or t != t.strip()]


def test_sentiment_is_varied(sentiment):
    words = [len(r["text"].split()) for r in sentiment]
    assert min(words) <= 3 and max(words) >= 80
    vocabulary = {w for r in sentiment for w in re.findall(r"[a-z']+", r["text"].lower())}
    assert len(vocabulary) > 1200
    assert any("stars" in r["text"].lower() or "/5" in r["text"] for r in sentiment)


def test_sentiment_has_negation_and_contrast_for_both_labels(sentiment):
    for label in SENTIMENT_LABELS:
        texts = [r["text"] for r in sentiment if r["label"] == label]
        assert sum(bool(CONTRAST.search(t)) for t in texts) > 0.25 * len(texts)
        assert sum(bool(NEGATION.search(t)) for t in texts) > 0.3 * len(texts)
    positive = " ".join(r["text"].lower() for r in sentiment if r["label"] == "positive")
    negative = " ".join(r["text"].lower() for r in sentiment if r["label"] == "negative")
    assert "not bad at all" in positive and "can't recommend it" in negative
    # Short contrasts where the clause after "but" decides ("great screen but the battery dies by noon").
    assert re.search(rf"\b({'|'.join(vocab.POS_NP_ADJ)}) [\w ]+,? but ", negative)
    assert re.search(rf"\b({'|'.join(vocab.NEG_NP_ADJ)}) [\w ]+,? but ", positive)


def test_topic_rows(topic):
    assert {r["label"] for r in topic} == set(TOPIC_LABELS)
    assert any("\n" in r["text"] for r in topic), "headline + body"
    assert any(re.match(r"[A-Z ]+ \(\w+\) - ", r["text"]) for r in topic), "dateline snippets"


def test_ner_spans_are_valid(ner):
    for row in ner:
        _check_spans(row)


def test_ner_covers_hard_cases(ner):
    surfaces = [(r["text"][e["start"] : e["end"]], e["label"]) for r in ner for e in r["entities"]]
    assert {label for _, label in surfaces} == set(NER_LABELS)
    assert sum(" " in s for s, _ in surfaces) > 0.3 * len(surfaces)
    assert any(re.search(r"[äöüßéèłńçñåø]", s) for s, _ in surfaces), "names from non-English locales"
    assert any(r["entities"] and r["entities"][0]["start"] == 0 for r in ner)
    assert any(r["entities"] and r["text"][r["entities"][-1]["end"] :] in {".", "!", "?"} for r in ner)
    assert any(len(r["entities"]) >= 4 for r in ner)
    assert 0.03 * len(ner) < sum(not r["entities"] for r in ner) < 0.15 * len(ner)
    for word in ("Monday", "January", "Chapter", "Breaking", "President", "Minister", "The", "Smartphones"):
        assert any(_outside_spans(r, word) for r in ner), f"no non-entity {word!r}"
    # Titles and articles stay outside the span: "Dr. Smith" -> "Smith", "the BBC" -> "BBC".
    assert not [s for s, _ in surfaces if s.startswith(("Dr. ", "Mr. ", "President ", "the ", "The "))]


def test_sample_corpus_mixes_sources_and_lengths(sentiment, topic, ner):
    corpus = make_sample_corpus()
    assert len(corpus) == 600 and len({r["id"] for r in corpus}) == 600
    assert {r["source"] for r in corpus} == set(CORPUS_SOURCES)
    words = [len(r["text"].split()) for r in corpus]
    assert 10 < sum(w < 15 for w in words) < 120
    assert 20 < sum(w >= 300 for w in words) < 120 and max(words) <= 700
    assert sum(15 <= w < 300 for w in words) > 0.6 * len(corpus)
    assert any("\n\n" in r["text"] for r in corpus)
    training = {r["text"] for rows in (sentiment, topic, ner) for r in rows}
    assert not [r["text"] for r in corpus if r["text"] in training]


@pytest.fixture(scope="module")
def sentiment_trained() -> set[str]:
    """Every text the demo sentiment model trains on, normalised."""
    return {_normalised(r["text"]) for r in sentiment_training()}


@pytest.mark.parametrize(
    ("name", "size", "hard_cases", "labels"),
    [
        ("heldout_sentiment.jsonl", 70, 15, SENTIMENT_LABELS),
        ("heldout_sentiment_b.jsonl", 50, 3, SENTIMENT_LABELS),
        ("heldout_sentiment_c.jsonl", 60, 3, SENTIMENT_LABELS),
        ("heldout_sentiment_d.jsonl", 100, 10, DEMO_SENTIMENT_LABELS),
        ("heldout_sentiment_e.jsonl", 100, 10, DEMO_SENTIMENT_LABELS),
        ("heldout_sentiment_f.jsonl", 120, 10, DEMO_SENTIMENT_LABELS),
        ("heldout_sentiment_g.jsonl", 150, 12, DEMO_SENTIMENT_LABELS),
    ],
)
def test_heldout_sentiment_files(sentiment_trained, name, size, hard_cases, labels):
    rows = _read_jsonl(DATA / name)
    counts = Counter(r["label"] for r in rows)
    assert len(rows) >= size and set(counts) == set(labels)
    assert abs(counts["positive"] - counts["negative"]) <= 0.1 * len(rows)
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in rows)
    assert sum(bool(CONTRAST.search(r["text"])) for r in rows) >= hard_cases
    assert sum(bool(NEGATION.search(r["text"])) for r in rows) >= hard_cases
    texts = [_normalised(r["text"]) for r in rows]
    assert len(set(texts)) == len(texts)
    assert not set(texts) & sentiment_trained


@pytest.mark.parametrize(("name", "size"), [("heldout_ner.jsonl", 35), ("heldout_ner_b.jsonl", 40)])
def test_heldout_ner_files(name, size):
    rows = _read_jsonl(DATA / name)
    assert len(rows) >= size
    for row in rows:
        _check_spans(row)
    assert {e["label"] for r in rows for e in r["entities"]} == set(NER_LABELS)
    trained = {_normalised(r["text"]) for r in ner_training()}
    assert not {_normalised(r["text"]) for r in rows} & trained


def test_handwritten_sentiment_rows():
    rows = handwritten("sentiment")
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == set(DEMO_SENTIMENT_LABELS)
    assert counts["positive"] >= 150 and counts["negative"] >= 150 and counts["neutral"] >= 120
    texts = [_normalised(r["text"]) for r in rows]
    assert len(set(texts)) == len(texts)
    reviews = [r["text"] for r in rows if r["label"] != "neutral"]
    assert sum(bool(CONTRAST.search(t)) for t in reviews) >= 30
    assert sum(bool(NEGATION.search(t)) for t in reviews) >= 60
    generated = {_normalised(r["text"]) for r in make_sentiment(1200) + make_neutral(300)}
    assert not set(texts) & generated


def test_handwritten_ner_rows():
    rows = handwritten("ner")
    assert len(rows) >= 120
    for row in rows:
        _check_spans(row)
    people = [r["text"][e["start"] : e["end"]] for r in rows for e in r["entities"] if e["label"] == "PER"]
    assert any(re.search(r" (de|van|von|da|del|dos|bin) ", p) for p in people), "names with particles"
    assert any("-" in p for p in people) and any("'" in p for p in people)
    assert any(_outside_spans(r, "hamstring") for r in rows), "lower-case nouns stay outside"
    datelines = [r for r in rows if "\n" in r["text"]]
    assert len(datelines) >= 10
    for row in datelines:  # the dateline's city is an entity of its own, right after the headline
        assert any(e["start"] == row["text"].index("\n") + 1 for e in row["entities"]), row
    # Headlines that end in a name right before the dateline ("... at Siemens\nMUNICH"), in both the
    # agency ("MUNICH (Reuters) - ") and the dash ("LONDON — ", "WOLFSBURG, Germany — ") forms.
    ending = [r for r in datelines if any(e["end"] == r["text"].index("\n") for e in r["entities"])]
    assert len(ending) >= 40 and sum(" — " in r["text"] for r in ending) >= 20


def test_training_mixes_keep_every_handwritten_row():
    for rows, task in ((sentiment_training(), "sentiment"), (ner_training(), "ner")):
        kept = Counter(json.dumps(r, sort_keys=True) for r in rows)
        for row in handwritten(task):
            assert kept[json.dumps(row, sort_keys=True)] == HANDWRITTEN_COPIES
    assert {r["label"] for r in sentiment_training()} == set(DEMO_SENTIMENT_LABELS)


def test_generated_ner_has_headline_and_dateline_starts(ner):
    starts = [r for r in ner if re.match(r"(.+\n)?[A-Z .'-]+ \(\w+\) - ", r["text"])]
    assert 0.05 * len(ner) < len(starts) < 0.2 * len(ner)
    assert any("\n" in r["text"] for r in starts)
    for row in starts:
        city_end = row["text"].index(" (", row["text"].find("\n") + 1)
        labels = {(e["start"], e["end"]): e["label"] for e in row["entities"]}
        assert labels.get((row["text"].find("\n") + 1, city_end)) == "LOC", row


def test_cli_writes_identical_files(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["--out", str(first)]) == 0
    assert "sentiment.jsonl: 3000 rows" in capsys.readouterr().out
    # A fresh interpreter with another hash seed must produce the same bytes (no set-order leaks).
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, "-m", "bertpipe.demo.datagen", "--out", str(second)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    for name in ("sentiment.jsonl", "topic.jsonl", "ner.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    rows = _read_jsonl(first / "ner.jsonl")
    assert len(rows) == 3500 and set(rows[0]) == {"text", "entities"}
