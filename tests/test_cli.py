"""The command line: exit codes and one clear line for each kind of user error; nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import base_config, write_config, write_shards

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}


def bertpipe(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bertpipe", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("bertpipe: error:")]


@pytest.fixture
def job(tmp_path, corpus, models):
    input_dir, _ = corpus
    return tmp_path, base_config(input_dir, tmp_path / "out", models)


def _expect_user_error(tmp_path, cfg, *needles, command="run"):
    path = write_config(tmp_path / "job.yaml", **cfg)
    proc = bertpipe(command, str(path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0]
    assert not (tmp_path / "out").exists()
    return lines[0]


@pytest.mark.parametrize("command", ["run", "validate"])
def test_unknown_key_names_the_key(job, command):
    tmp_path, cfg = job
    cfg["runtime"]["batchsize"] = 3
    _expect_user_error(tmp_path, cfg, "runtime.batchsize", "unknown key", command=command)


def test_bad_value_names_the_key(job):
    tmp_path, cfg = job
    cfg["tasks"][1]["kind"] = "summarise"
    _expect_user_error(tmp_path, cfg, "tasks.1.kind", command="validate")


@pytest.mark.parametrize("command", ["run", "validate"])
def test_missing_input(job, command):
    tmp_path, cfg = job
    cfg["input"]["paths"] = [str(tmp_path / "nowhere")]
    _expect_user_error(tmp_path, cfg, "input.paths", "nowhere", command=command)


@pytest.mark.parametrize("command", ["run", "validate"])
def test_missing_text_column(job, command):
    tmp_path, cfg = job
    cfg["input"]["text_column"] = "body"
    _expect_user_error(tmp_path, cfg, "no text column 'body'", command=command)


@pytest.mark.parametrize("command", ["run", "validate"])
def test_unloadable_model(job, command):
    tmp_path, cfg = job
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"garbage")
    cfg["tasks"][0]["model"] = str(broken)
    _expect_user_error(tmp_path, cfg, "task 'topic'", "cannot load model", command=command)


def test_missing_model_folder(job):
    tmp_path, cfg = job
    cfg["tasks"][2]["model"] = str(tmp_path / "no-such-model")
    _expect_user_error(tmp_path, cfg, "task 'entities'", "not found")


def test_set_overrides_and_validate_ok(job):
    tmp_path, cfg = job
    path = write_config(tmp_path / "job.yaml", **cfg)
    proc = bertpipe("validate", str(path), "--set", "runtime.max_length=64", "--set", "input.format=auto")
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "320" in proc.stdout


@pytest.mark.slow
def test_cuda_device_schedules_gpu_actors_on_a_fake_gpu(tmp_path, models):
    """Ray is told one GPU exists: the model actor is scheduled with num_gpus and, finding no CUDA
    device, runs on the CPU with a warning."""
    rows = [{"id": str(i), "text": f"hello world number {i}"} for i in range(20)]
    write_shards(tmp_path / "in", rows, n_parquet=1, n_jsonl=1)
    cfg = base_config(tmp_path / "in", tmp_path / "out", models, device="cuda", local_gpus=1, local_cpus=2)
    path = write_config(tmp_path / "job.yaml", **cfg)
    proc = bertpipe("run", str(path), "-v", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sees no CUDA device; running on CPU" in proc.stderr
    assert "'GPU': 1.0" in proc.stderr, "the model actor was not given a GPU by Ray"
    assert "omp_wait=default" in proc.stderr, "a GPU actor's OpenMP settings are the user's"
    summary = json.loads(next((tmp_path / "out" / "_runs").glob("*.json")).read_text())
    assert summary["device"] == "cuda" and summary["rows_out"] == 20
    assert yaml.safe_load(path.read_text())["runtime"]["device"] == "cuda"


def test_every_command_argument_and_option_has_help_and_every_command_an_example():
    import typer.main

    from bertpipe.cli import app

    group = typer.main.get_command(app)
    assert set(group.commands) >= {"validate", "run", "schema", "finetune", "demo", "inspect", "report"}
    for name, command in group.commands.items():
        assert "Example: bertpipe " + name in (command.help or ""), name
        for param in command.params:
            assert getattr(param, "help", None), f"{name}: {param.name} has no help"
