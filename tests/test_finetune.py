"""bertpipe finetune: config, data checks, BIO conversion, metrics, and real Ray Train runs (slow)."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from tiny_models import NER_LABELS, build_sequence_classifier, build_token_classifier, tiny_tokenizer
from transformers import BertConfig, BertForSequenceClassification, pipeline

from bertpipe.config import ConfigError
from bertpipe.tasks import KINDS
from bertpipe.train import FinetuneConfig, load_finetune_config, run_finetune
from bertpipe.train.data import LabelledRows, encode, read_labelled, resolve_labels, spans_to_bio
from bertpipe.train.metrics import bio_entities, classification_metrics, entity_metrics
from bertpipe.train.trainer import _head_labels, _load_model, _public_config, length_grouped_batches

TOPICS = {
    "sports": ["football", "goal", "match", "coach", "league", "tennis"],
    "politics": ["election", "senate", "vote", "minister", "policy", "parliament"],
    "food": ["pizza", "recipe", "cheese", "bread", "soup", "kitchen"],
}
FILLER = ["the", "a", "today", "about", "new", "story", "people", "we"]
PEOPLE = ["angela merkel", "tim cook", "john smith", "maria garcia"]
PLACES = ["paris", "berlin", "wolfsburg", "london"]
ORGS = ["apple", "volkswagen", "the united nations", "google"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def topic_rows(n: int, seed: int = 0) -> list[dict]:
    """Short texts whose topic is given away by two keywords: learnable in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = list(TOPICS)[i % len(TOPICS)]
        words = rng.sample(TOPICS[topic], 2) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": topic})
    return rows


def ner_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place, org = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(ORGS)
        parts = [(person, "PER"), (" works for ", None), (org, "ORG"), (" in ", None), (place, "LOC")]
        text, entities = "", []
        for piece, label in parts:
            if label:
                entities.append({"start": len(text), "end": len(text) + len(piece), "label": label})
            text += piece
        rows.append({"text": text, "entities": entities})
    return rows


def make_config(**fields) -> FinetuneConfig:
    return FinetuneConfig.model_validate(fields)


# ---------------------------------------------------------------- config


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "finetune.yaml"
    path.write_text(text)
    return path


GOOD_YAML = """
kind: sentiment
base_model: models/base
data: {paths: train.jsonl}
labels: [Positive, NEG]
output_dir: models/out
learning_rate: 5e-5
"""


def test_config_loads_and_normalises_sentiment_labels(tmp_path):
    cfg = load_finetune_config(write_yaml(tmp_path, GOOD_YAML), ["runtime.num_workers=4"])
    assert cfg.labels == ["positive", "negative"]
    assert cfg.learning_rate == 5e-5
    assert cfg.data.paths == ["train.jsonl"]
    assert cfg.runtime.num_workers == 4
    assert cfg.score_metric == "val_macro_f1"


def test_config_unknown_key_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_finetune_config(write_yaml(tmp_path, GOOD_YAML + "data_colour: red\n"))
    assert "data_colour: unknown key" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"runtime\.gpus: unknown key"):
        load_finetune_config(write_yaml(tmp_path, GOOD_YAML), ["runtime.gpus=2"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("epochs=0", "epochs"),
        ("validation_fraction=1.5", "validation_fraction"),
        ("labels=[happy]", "labels"),
    ],
)
def test_config_bad_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"finetune.yaml: {key}: "):
        load_finetune_config(write_yaml(tmp_path, GOOD_YAML), [override])


# ---------------------------------------------------------------- data


def test_spans_to_bio_multiword_start_end_and_subwords():
    tok = tiny_tokenizer()
    text = "Angela Merkel visited Wolfsburg"
    enc = tok(text, return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == [
        "[CLS]", "angela", "mer", "##kel", "visited", "wolf", "##sburg", "[SEP]",
    ]  # fmt: skip
    tags = spans_to_bio(enc["offset_mapping"], [(0, 13, "PER"), (22, 31, "LOC")])
    assert tags == [None, "B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC", None]


def test_spans_to_bio_adjacent_entities_and_partial_tokens():
    offsets = [(0, 0), (0, 5), (6, 12), (12, 15), (0, 0)]  # [CLS] paris london ##ers [SEP]
    assert spans_to_bio(offsets, [(0, 5, "LOC"), (6, 12, "LOC")]) == [None, "B-LOC", "B-LOC", "O", None]
    # A span boundary inside a token tags the whole token (the tokenizer cannot split it).
    assert spans_to_bio(offsets, [(7, 13, "ORG")]) == [None, "O", "B-ORG", "I-ORG", None]
    assert spans_to_bio(offsets, []) == [None, "O", "O", "O", None]


def test_encode_ner_labels_ignore_special_and_padding():
    tok = tiny_tokenizer()
    rows = in_memory(
        [{"text": "Tim Cook works for Apple", "entities": ner_spans([(0, 8, "PER"), (19, 24, "ORG")])}]
    )
    arrays = encode(tok, rows, NER_LABELS, "ner", max_length=10)
    ids = {tag: i for i, tag in enumerate(NER_LABELS)}
    expected = [-100, ids["B-PER"], ids["I-PER"], ids["O"], ids["O"], ids["B-ORG"], -100, -100, -100, -100]
    assert arrays["labels"].tolist() == [expected]
    assert arrays["attention_mask"].tolist() == [[1] * 7 + [0] * 3]


def ner_spans(spans):
    return [{"start": s, "end": e, "label": label} for s, e, label in spans]


def in_memory(rows: list[dict]) -> LabelledRows:
    """NER rows as read_labelled returns them, without a file."""
    return LabelledRows(
        texts=[r["text"] for r in rows],
        targets=[[(e["start"], e["end"], e["label"]) for e in r["entities"]] for r in rows],
        origins=[("mem", i + 1) for i in range(len(rows))],
    )


def test_read_labelled_parquet_and_sentiment_normalisation(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"body": ["good", "bad", "ok"], "y": ["POS", "Negative", "neutral"]}), path)
    cfg = make_config(
        kind="sentiment",
        base_model="x",
        output_dir="out",
        data={"paths": [str(tmp_path)], "text_column": "body", "label_column": "y"},
    )
    rows = read_labelled(cfg, cfg.data.paths, "data.paths")
    assert rows.targets == ["positive", "negative", "neutral"]
    assert resolve_labels(cfg, [rows], base_labels=None) == ["negative", "neutral", "positive"]
    # A base head whose labels cover the data keeps its order (and so its trained weights).
    assert resolve_labels(cfg, [rows], ["positive", "neutral", "negative"]) == [
        "positive",
        "neutral",
        "negative",
    ]


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        ("classification", {"text": "x", "label": "sports"}, r"train.jsonl row 2: unknown label 'sports'"),
        ("classification", {"text": None, "label": "a"}, r"train.jsonl row 2: 'text' must be a string"),
        ("ner", {"text": "abc", "entities": ner_spans([(1, 9, "PER")])}, r"train.jsonl row 2: entity span"),
        ("ner", {"text": "abcdef", "entities": ner_spans([(0, 3, "A"), (2, 5, "B")])}, r"row 2: .*overlap"),
        ("sentiment", {"text": "x", "label": "meh"}, r"train.jsonl row 2: sentiment label"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, kind, row, message):
    first = {"text": "fine", "label": "a"} if kind != "ner" else {"text": "fine", "entities": []}
    if kind == "sentiment":
        first["label"] = "positive"
    path = write_jsonl(tmp_path / "train.jsonl", [first, row])
    labels = ["a", "b"] if kind == "classification" else None
    cfg = make_config(kind=kind, base_model="x", output_dir="out", data={"paths": [str(path)]}, labels=labels)
    with pytest.raises(ConfigError, match=message):
        rows = read_labelled(cfg, cfg.data.paths, "data.paths")
        resolve_labels(cfg, [rows], None)


def test_read_labelled_jsonl_gz_by_folder_and_url(tmp_path):
    rows = topic_rows(6)
    (tmp_path / "data").mkdir()
    gz = tmp_path / "data" / "train.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    for paths in ([str(gz.parent)], [f"file://{gz}"]):
        cfg = make_config(kind="classification", base_model="x", output_dir="out", data={"paths": paths})
        got = read_labelled(cfg, cfg.data.paths, "data.paths")
        assert got.texts == [r["text"] for r in rows] and got.targets == [r["label"] for r in rows]
        assert got.where(5) == f"{gz} row 6"
    with pytest.raises(ConfigError, match="data.validation_paths: no Parquet or JSONL files found at"):
        read_labelled(cfg, [str(tmp_path / "nowhere")], "data.validation_paths")


def test_summary_config_has_no_credentials():
    cfg = make_config(
        kind="classification",
        base_model="x",
        output_dir="out",
        data={
            "paths": ["s3://me:pw@bucket/train.jsonl"],
            "storage_options": {
                "key": "AKIA1",
                "secret": "s3cr3t",
                "client_kwargs": {"endpoint_url": "http://s3"},
            },
        },
    )
    config = _public_config(cfg)
    text = json.dumps(config)
    assert "pw@" not in text and "AKIA1" not in text and "s3cr3t" not in text
    assert config["data"]["storage_options"]["client_kwargs"] == {"endpoint_url": "http://s3"}


def test_sentiment_head_with_two_classes_per_sentiment_is_not_kept():
    stars = BertConfig(
        architectures=["BertForSequenceClassification"],
        id2label={i: f"{i + 1} stars" for i in range(5)},
    )
    assert _head_labels(stars, KINDS["sentiment"]) == (True, None)
    named = BertConfig(architectures=["BertForSequenceClassification"], id2label={0: "NEG", 1: "good"})
    assert _head_labels(named, KINDS["sentiment"]) == (True, ["negative", "positive"])


def test_empty_data_and_missing_column(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), empty)
    cfg = make_config(kind="classification", base_model="x", output_dir="out", data={"paths": [str(empty)]})
    with pytest.raises(ConfigError, match="data.paths: the data files have no rows"):
        read_labelled(cfg, cfg.data.paths, "data.paths")
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "x", "label": "a"}])
    cfg = make_config(kind="classification", base_model="x", output_dir="out", data={"paths": [str(path)]})
    with pytest.raises(ConfigError, match=r"t.jsonl: missing column 'text'"):
        read_labelled(cfg, cfg.data.paths, "data.paths")


def test_pickle_only_base_model_refused_before_any_work(tmp_path):
    base = build_sequence_classifier(tmp_path / "base", ["a", "b"], pickle_only=True)
    data = write_jsonl(tmp_path / "train.jsonl", topic_rows(12))
    cfg = make_config(
        kind="classification",
        base_model=str(base),
        output_dir=str(tmp_path / "out"),
        data={"paths": [str(data)]},
    )
    ray_was_running = ray.is_initialized()
    with pytest.raises(ConfigError, match="only pickle weights.*allow_pickle"):
        run_finetune(cfg)
    assert ray.is_initialized() == ray_was_running, "refused before starting Ray"


def test_non_empty_output_dir_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    cfg = make_config(
        kind="classification", base_model="x", output_dir=str(tmp_path / "out"), data={"paths": ["x"]}
    )
    with pytest.raises(ConfigError, match="output_dir: .* not empty; set overwrite: true"):
        run_finetune(cfg)


def test_integer_labels_keep_numeric_order(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": n} for n in (10, 2, 1)])
    cfg = make_config(kind="classification", base_model="x", output_dir="out", data={"paths": [str(path)]})
    assert resolve_labels(cfg, [read_labelled(cfg, cfg.data.paths, "data.paths")], None) == ["1", "2", "10"]


def test_base_head_kept_only_for_its_own_labels(tmp_path):
    base = build_sequence_classifier(tmp_path / "base", ["neg", "pos"])
    head = BertForSequenceClassification.from_pretrained(base).classifier.weight
    cfg = make_config(kind="classification", base_model=str(base), output_dir="out", data={"paths": ["x"]})
    kept = _load_model(cfg, str(base), ["neg", "pos"], reinit_head=False)
    assert torch.equal(kept.classifier.weight, head)
    fresh = _load_model(cfg, str(base), ["spam", "ham"], reinit_head=True)
    assert fresh.config.id2label == {0: "spam", 1: "ham"}
    assert torch.equal(fresh.bert.pooler.dense.weight, kept.bert.pooler.dense.weight)
    assert not torch.equal(fresh.classifier.weight, head)
    base_range = fresh.config.initializer_range
    assert fresh.classifier.weight.std().item() == pytest.approx(base_range, rel=0.3)  # a fresh head
    assert not fresh.classifier.bias.any()


def test_length_grouped_batches_cover_every_row_once_and_cut_padding():
    rng = random.Random(3)
    lengths = np.array([rng.choice([5, 9, 14, 30, 60, 64]) for _ in range(1000)])
    batches = length_grouped_batches(lengths, 16, seed=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert all(1 <= len(b) <= 16 for b in batches) and sum(len(b) < 16 for b in batches) <= 1
    padded = sum(lengths[b].max() * len(b) for b in batches)
    shuffled = np.random.default_rng(1).permutation(1000)
    plain = sum(lengths[shuffled[i : i + 16]].max() * 16 for i in range(0, 1000, 16))
    assert padded < 0.7 * plain  # the point: batches hold rows of similar length
    assert padded > lengths.sum()  # a window of 800 rows is not one global sort
    again = length_grouped_batches(lengths, 16, seed=1)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))  # seeded
    other = length_grouped_batches(lengths, 16, seed=2)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(batches, other, strict=False))


# ---------------------------------------------------------------- metrics


def test_classification_metrics_hand_computed():
    scores = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    # F1 per class: 0 -> 2*1/(2+1+1)=0.5, 1 -> 2*2/(4+1)=0.8, 2 -> 0; macro = 1.3 / 3
    assert scores["accuracy"] == pytest.approx(0.6)
    assert scores["macro_f1"] == pytest.approx(1.3 / 3)


def test_bio_entities_decode_like_seqeval():
    assert bio_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert bio_entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]  # I after O opens an entity
    assert bio_entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]  # type change
    assert bio_entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]
    assert bio_entities(["O", "O"]) == []


def test_entity_metrics_hand_computed():
    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    guess = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG"]]  # 1 of 3 predictions exact
    scores = entity_metrics(truth, guess)
    assert scores == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    assert entity_metrics([["B-PER", "I-PER"]], [["I-PER", "I-PER"]])["f1"] == 1.0
    assert entity_metrics([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


# ---------------------------------------------------------------- Ray Train (slow)


def bare_encoder(tmp_path: Path) -> Path:
    """A tiny BertModel folder without any head, as a pretrained encoder is shipped."""
    classifier_dir = build_sequence_classifier(tmp_path / "with_head", ["x", "y"], initializer_range=0.02)
    out = tmp_path / "encoder"
    BertForSequenceClassification.from_pretrained(classifier_dir).bert.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.mark.slow
def test_finetune_classifier_from_bare_encoder(tmp_path, ray_local):
    data = write_jsonl(tmp_path / "train.jsonl", topic_rows(240))
    cfg = make_config(
        kind="classification",
        base_model=str(bare_encoder(tmp_path)),
        data={"paths": [str(data)]},
        output_dir=str(tmp_path / "model"),
        epochs=2,
        batch_size=16,
        learning_rate=1e-3,
        max_length=16,
    )
    events = []
    result = run_finetune(cfg, progress=events.append)

    losses = result["loss_history"]
    assert len(losses) == result["total_steps"] == 2 * 14
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert result["labels"] == ["food", "politics", "sports"]
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert result["best_score"] == max(e["val_macro_f1"] for e in result["epochs"])
    assert (result["train_rows"], result["validation_rows"]) == (216, 24)
    assert {e["event"] for e in events} == {"data", "start", "step", "epoch", "saved"}

    folder = Path(result["output_dir"])
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["labels"] == result["labels"] and summary["base_model"] == cfg.base_model
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or Ray folders left

    clf = pipeline("text-classification", model=str(folder))
    assert clf.model.config.id2label == {0: "food", 1: "politics", 2: "sports"}
    assert clf("the pizza recipe with cheese")[0]["label"] in TOPICS


@pytest.mark.slow
def test_finetune_ner_keeps_head_and_loads_in_pipeline(tmp_path, ray_local):
    base = build_token_classifier(tmp_path / "base", initializer_range=0.02)
    data = write_jsonl(tmp_path / "train.jsonl", ner_rows(120))
    held_out = write_jsonl(tmp_path / "dev.jsonl", ner_rows(10, seed=1))
    cfg = make_config(
        kind="ner",
        base_model=str(base),
        data={"paths": [str(data)], "validation_paths": [str(held_out)]},
        output_dir=str(tmp_path / "ner"),
        epochs=1,
        batch_size=16,
        learning_rate=1e-3,
        max_length=24,
        dtype="float32",
    )
    result = run_finetune(cfg)

    assert result["labels"] == NER_LABELS  # the base head covers PER/ORG/LOC, so its order is kept
    assert (result["train_rows"], result["validation_rows"]) == (120, 10)
    assert result["best_metric"] == "val_entity_f1" and 0.0 <= result["best_score"] <= 1.0
    assert result["dtype"] == "float32"
    assert sum(result["loss_history"][-3:]) < sum(result["loss_history"][:3])
    ner = pipeline("token-classification", model=result["output_dir"], aggregation_strategy="simple")
    assert ner.model.config.id2label == dict(enumerate(NER_LABELS))
    assert all(entity["entity_group"] in {"PER", "ORG", "LOC"} for entity in ner("tim cook works for apple"))


@pytest.mark.slow
def test_pickle_only_base_model_allowed_when_asked(tmp_path, ray_local):
    base = build_sequence_classifier(tmp_path / "base", ["food", "politics", "sports"], pickle_only=True)
    data = write_jsonl(tmp_path / "train.jsonl", topic_rows(30))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")
    cfg = make_config(
        kind="classification",
        base_model=str(base),
        data={"paths": [str(data)]},
        output_dir=str(out),
        overwrite=True,
        allow_pickle=True,
        batch_size=8,
        max_steps=2,
        max_length=16,
    )
    result = run_finetune(cfg)
    assert result["total_steps"] == 2 and len(result["epochs"]) == 1
    saved = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_summary.json",
    }
    assert {p.name for p in out.iterdir()} == saved


MONITOR_PROBE = """
import ray
from ray.train.v2._internal.state.util import is_actor_alive
from bertpipe.engine.cluster import connect

connect(None, local_cpus=1, state_api=True)

@ray.remote(num_cpus=0)
class Controller:
    def id(self):
        return ray.get_runtime_context().get_actor_id()

@ray.remote(num_cpus=0)
class Cleaner:
    def controller_alive(self, actor_id):
        return is_actor_alive(actor_id, timeout=30)

controller = Controller.remote()
cleaner = Cleaner.options(lifetime="detached").remote()
print("alive:", ray.get(cleaner.controller_alive.remote(ray.get(controller.id.remote()))))
ray.kill(cleaner)
"""


@pytest.mark.slow
def test_ray_train_monitor_reaches_the_state_api_of_its_own_cluster():
    """What Ray Train's placement-group cleaner (a detached actor) asks every second, asked the same way
    from a detached actor of the local Ray bertpipe starts, while other local Rays may be running."""
    proc = subprocess.run([sys.executable, "-c", MONITOR_PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alive: True" in proc.stdout


SECOND_JOB = """
import ray
ray.init(address="local", num_cpus=1, include_dashboard=True)  # the dashboard on Ray's default port
print("second job up", flush=True)
ray.get([ray.remote(lambda i: i * i).remote(i) for i in range(20)])
ray.shutdown()
"""


@pytest.mark.slow
def test_finetune_survives_other_local_rays_starting_and_stopping(tmp_path):
    """`bertpipe finetune` while other local Rays (with dashboards) start and stop beside it: it finishes,
    saves its model once, and prints none of Ray Train's monitor warnings."""
    data = write_jsonl(tmp_path / "train.jsonl", topic_rows(300))
    config = write_yaml(
        tmp_path,
        f"kind: classification\nbase_model: {bare_encoder(tmp_path)}\ndata: {{paths: [{data}]}}\n"
        f"output_dir: {tmp_path / 'model'}\nepochs: 1\nbatch_size: 4\nmax_length: 16\n"
        "runtime: {cpus_per_worker: 1}\n",
    )
    env = {**os.environ, "COLUMNS": "200"}
    finetune = subprocess.Popen(
        [sys.executable, "-m", "bertpipe", "finetune", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    overlapped, deadline = 0, time.monotonic() + 600
    while finetune.poll() is None and time.monotonic() < deadline:
        second = subprocess.run(
            [sys.executable, "-c", SECOND_JOB], capture_output=True, text=True, env=env, timeout=300
        )
        assert second.returncode == 0, second.stderr[-2000:]
        overlapped += finetune.poll() is None
    output = finetune.communicate(timeout=max(1, deadline - time.monotonic()))[0]

    assert finetune.returncode == 0, output[-3000:]
    assert overlapped >= 1, "no second Ray ran during the fine-tune"
    assert output.count("best val_macro_f1") == 1 and output.count("epoch 1:") == 1, output[-3000:]
    noises = ("Failed to query Ray Train Controller", "placement group", "health check", "Reporting training")
    for noise in noises:
        assert noise not in output, output[-3000:]
    summary = json.loads((tmp_path / "model" / "training_summary.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1]
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
