"""``bertpipe validate`` finds what ``run`` would refuse before any model runs (an untrained head, the
output side), each as one line naming the key, path or task; ``--set`` into lists, ``BERTPIPE_*``
variables, ``bertpipe schema`` and ``-v`` tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from conftest import base_config, make_texts, write_config, write_shards
from tiny_models import build_encoder, tiny_tokenizer
from transformers import BertModel

from bertpipe.config import ConfigError, apply_overrides, load_config
from bertpipe.io.state import OutputLock
from bertpipe.io.writer import OutputLocation
from bertpipe.models.loading import inspect_model
from bertpipe.tasks import parse_task

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("BERTPIPE_")}, "COLUMNS": "400"}


def bertpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bertpipe", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, **(env or {})},
    )


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bertpipe: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A bare ``BertModel`` (no head), as pretrained encoders ship."""
    return build_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture
def job(tmp_path, models):
    rows = [{"id": str(i), "text": t} for i, t in enumerate(make_texts(12, seed=5, max_words=20))]
    write_shards(tmp_path / "in", rows, n_parquet=1, n_jsonl=1)
    return tmp_path, base_config(tmp_path / "in", tmp_path / "out", models)


def _bare_classifier(cfg, tmp_path, encoder):
    cfg["tasks"][0]["model"] = str(encoder)


def _classifier_as_ner(cfg, tmp_path, encoder):
    cfg["tasks"][2]["model"] = cfg["tasks"][1]["model"]


def _unknown_partition(cfg, tmp_path, encoder):
    cfg["output"]["partition_by"] = ["sentiment_label", "nope"]


def _existing_output(cfg, tmp_path, encoder):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0.parquet").write_bytes(b"old")


def _output_under_a_file(cfg, tmp_path, encoder):
    (tmp_path / "a-file").write_text("")
    cfg["output"]["path"] = str(tmp_path / "a-file" / "out")


def _held_lock(cfg, tmp_path, encoder):
    OutputLock(OutputLocation.from_url(str(tmp_path / "out"), {}), "other-run").acquire()


@pytest.mark.parametrize(
    "breaks, command, needles",
    [
        (
            _bare_classifier,
            "validate",
            ["task 'topic'", "no trained ForSequenceClassification head", "architectures: [BertModel]"],
        ),
        (_bare_classifier, "run", ["task 'topic'", "no trained ForSequenceClassification head"]),
        (_classifier_as_ner, "validate", ["task 'entities'", "no trained ForTokenClassification head"]),
        (_unknown_partition, "validate", ["output.partition_by", "'nope'"]),
        (_existing_output, "validate", ["output.path", "already has data"]),
        (_held_lock, "validate", ["being written by run other-run", "output.mode: resume"]),
        (_output_under_a_file, "run", ["output.path", "a-file", "Not a directory"]),
    ],
    ids=[
        "bare-encoder",
        "bare-encoder-run",
        "classifier-as-ner",
        "partition",
        "existing-output",
        "lock",
        "output-under-a-file",
    ],
)
def test_refused_before_any_model_runs_with_one_line(job, encoder, breaks, command, needles):
    tmp_path, cfg = job
    breaks(cfg, tmp_path, encoder)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_error(bertpipe(command, str(write_config(tmp_path / "job.yaml", **cfg))))
    for needle in needles:
        assert needle in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "job.yaml"]), "nothing written"
    lock = tmp_path / ".out.lock"
    assert not lock.exists() or json.loads(lock.read_text())["run_id"] == "other-run", "the lock is not taken"


def test_the_head_check_reads_the_weights(tmp_path, models, encoder):
    """``architectures`` alone is not trusted: the head's tensors must be in the safetensors (or in a
    sharded checkpoint's index). Pickle weights are not opened, so only ``architectures`` is checked."""

    def task(model: Path, **extra):
        return parse_task(dict(name="t", kind="classification", model=str(model), **extra))

    def claim_a_head(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(
            json.dumps({**config, "architectures": ["BertForSequenceClassification"]})
        )

    lying = tmp_path / "lying"
    lying.mkdir()
    for f in encoder.iterdir():
        (lying / f.name).write_bytes(f.read_bytes())
    claim_a_head(lying)
    with pytest.raises(ConfigError, match=r"no trained ForSequenceClassification head \(its weights hold no"):
        inspect_model(task(lying))

    (lying / "model.safetensors").rename(lying / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"bert.pooler.dense.weight": "model-00001-of-00001.safetensors"}}
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="its weights hold no"):
        inspect_model(task(lying))
    index["weight_map"]["classifier.weight"] = "model-00001-of-00001.safetensors"
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    inspect_model(task(lying))  # the index names a head: trusted without opening the shards

    pickled = tmp_path / "pickled"
    model = BertModel.from_pretrained(encoder)
    model.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    tiny_tokenizer().save_pretrained(pickled)
    with pytest.raises(ConfigError, match=r"architectures: \[BertModel\]"):
        inspect_model(task(pickled, allow_pickle=True))
    claim_a_head(pickled)
    assert inspect_model(task(pickled, allow_pickle=True)).weight_files == ("pytorch_model.bin",)
    assert inspect_model(task(models["topic"])).num_labels == 4


def test_set_indexes_into_lists():
    raw = {"tasks": [{"name": "a", "model": "x"}, {"name": "b", "model": "y"}], "output": {}}
    apply_overrides(raw, ["tasks.1.model=z", "output.path=/o", "runtime.actors=[1, 2]"])
    assert raw["tasks"][1]["model"] == "z" and raw["output"]["path"] == "/o"
    assert raw["runtime"]["actors"] == [1, 2]
    with pytest.raises(ConfigError, match=r"--set tasks\.2\.model: tasks has 2 items; '2' is not an index"):
        apply_overrides(raw, ["tasks.2.model=z"])
    with pytest.raises(ConfigError, match=r"--set tasks\.first\.model: tasks has 2 items"):
        apply_overrides(raw, ["tasks.first.model=z"])
    with pytest.raises(ConfigError, match=r"--set tasks\.0\.name\.x: tasks\.0\.name is not a mapping"):
        apply_overrides(raw, ["tasks.0.name.x=1"])
    with pytest.raises(ConfigError, match=r"--set output\.path: the value is not valid YAML"):
        apply_overrides(raw, ["output.path=[a"])


def test_environment_overrides_the_file_and_set_overrides_both(tmp_path, monkeypatch):
    path = write_config(
        tmp_path / "job.yaml",
        input={"paths": ["in/"]},
        output={"path": "from-file"},
        tasks=[{"name": "t", "kind": "classification", "model": "m"}],
    )
    monkeypatch.setenv("BERTPIPE_OUTPUT__PATH", "from-env")
    monkeypatch.setenv("BERTPIPE_RUNTIME__MAX_LENGTH", "64")
    monkeypatch.setenv("BERTPIPE_TASKS__0__TOP_K", "3")
    monkeypatch.setenv("BERTPIPE_TORCH", "torch==2.13.0")  # scripts/setup's, not a config key
    cfg = load_config(path)
    assert (cfg.output.path, cfg.runtime.max_length, cfg.tasks[0].top_k) == ("from-env", 64, 3)
    assert load_config(path, ["output.path=from-set"]).output.path == "from-set"
    monkeypatch.setenv("BERTPIPE_TASKS__4__MODEL", "x")
    with pytest.raises(ConfigError, match=r"BERTPIPE_TASKS__4__MODEL: tasks has 1 items"):
        load_config(path)


def test_set_and_environment_reach_the_command_line(job, encoder):
    tmp_path, cfg = job
    cfg["tasks"][0]["model"] = str(encoder)
    cfg["input"]["text_column"] = "body"
    path = str(write_config(tmp_path / "job.yaml", **cfg))
    good = cfg["tasks"][1]["model"]
    env = {"BERTPIPE_INPUT__TEXT_COLUMN": "text", "BERTPIPE_OUTPUT__PATH": str(tmp_path / "elsewhere")}
    proc = bertpipe("validate", path, "--set", f"tasks.0.model={good}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout and "elsewhere" in proc.stdout
    line = one_error(bertpipe("validate", path, "--set", "tasks.3.model=x", env=env))
    assert "--set tasks.3.model: tasks has 3 items" in line


def test_schema_describes_the_config():
    proc = bertpipe("schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    example = yaml.safe_load((ROOT / "configs" / "example.yaml").read_text())
    jsonschema.validate(example, schema, cls=jsonschema.Draft202012Validator)
    example["input"]["paths"] = "one/file.parquet"  # a single path is accepted as a string
    jsonschema.validate(example, schema, cls=jsonschema.Draft202012Validator)
    example["runtime"]["batchsize"] = 3
    with pytest.raises(jsonschema.ValidationError, match="batchsize"):
        jsonschema.validate(example, schema, cls=jsonschema.Draft202012Validator)


def test_verbose_shows_the_traceback(tmp_path):
    path = str(write_config(tmp_path / "job.yaml", input={"paths": ["in/"]}, output={"path": "o"}, tasks=[]))
    quiet = bertpipe("validate", path)
    one_error(quiet)
    assert "Traceback" not in quiet.stderr
    loud = bertpipe("validate", path, "-v")
    assert "tasks: List should have at least 1 item" in one_error(loud)
    assert "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1].startswith("bertpipe: error:"), "the one line comes last"


def test_an_unreadable_config_names_its_path(tmp_path):
    folder = tmp_path / "a-folder.yaml"
    folder.mkdir()
    assert f"config file {folder}: cannot read it" in one_error(bertpipe("run", str(folder)))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert f"config file {binary}: not UTF-8 text" in one_error(bertpipe("validate", str(binary)))


def test_validate_imports_neither_torch_nor_ray(job):
    """The output check and the head check (safetensors headers) keep ``validate`` free of torch and Ray
    up to its cost estimate (which runs the models, so it is switched off here)."""
    tmp_path, cfg = job
    path = str(write_config(tmp_path / "job.yaml", **cfg))
    probe = (
        "import sys\n"
        "from bertpipe.cli import app\n"
        f"try:\n    app(['validate', {path!r}, '--no-estimate'])\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
