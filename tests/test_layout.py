"""The package's shape: imported as ``bertpipe`` only, Ray only in ``bertpipe.engine``, planning without
torch or Ray, and a wheel that installs ``bertpipe`` and nothing named ``pipeline``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import write_config

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "pipeline"
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_engine_imports_ray():
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted(SOURCE.rglob("*.py"))
        if "engine" not in path.relative_to(SOURCE).parts
        and any(name == "ray" or name.startswith("ray.") for name in _imports(path))
    ]
    assert offenders == []
    assert any(name.startswith("ray") for name in _imports(SOURCE / "engine" / "data.py"))  # the check works


def test_no_module_imports_the_source_folder_name():
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted(
            [*SOURCE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")]
        )
        if any(name == "pipeline" or name.startswith("pipeline.") for name in _imports(path))
    ]
    assert offenders == []


def test_planning_imports_neither_torch_nor_ray(models, tmp_path):
    """``bertpipe validate`` and ``plan`` on a real job: models inspected, files checked, no torch or Ray."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"id": "1", "text": "words " * 300}) + "\n")
    config = write_config(
        tmp_path / "job.yaml",
        input={"paths": [str(tmp_path / "in")]},
        output={"path": str(tmp_path / "out")},
        tasks=[
            {"name": "topic", "kind": "classification", "model": str(models["topic"]), "long_text": "chunk"},
            {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])},
            {"name": "entities", "kind": "ner", "model": str(models["ner"])},
        ],
    )
    probe = (
        "import sys, bertpipe, bertpipe.cli\n"
        "from bertpipe.plan import plan\n"
        f"p = plan(bertpipe.load_config({str(config)!r}))\n"
        "assert p.rows_in == 1 and len(p.models.groups) == 1, p\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_users_pipeline_module_neither_shadows_nor_is_shadowed(models, tmp_path):
    """From a working directory with its own ``pipeline/`` package and ``pipeline.py`` (as a notebook
    folder or a Ray Jobs working dir may have): ``bertpipe`` labels with a Ray it starts itself, leaves
    that Ray up and reuses it, and ``import pipeline`` is still the user's."""
    work = tmp_path / "work"
    (work / "pipeline").mkdir(parents=True)
    (work / "pipeline" / "__init__.py").write_text("MINE = 'package'\n")
    (work / "pipeline.py").write_text("MINE = 'module'\n")
    task = {"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])}
    probe = (
        "import json, pandas as pd, ray, bertpipe, pipeline\n"
        "df = pd.DataFrame({'text': ['good words here', None]})\n"
        f"out = bertpipe.label(df, [{task!r}], runtime={{'dtype': 'float32', 'local_cpus': 2}})\n"
        "node = ray.get_runtime_context().get_node_id()\n"
        f"again = bertpipe.label(df, [{task!r}], runtime={{'dtype': 'float32'}})\n"
        "result = {'mine': pipeline.MINE, 'bertpipe': bertpipe.__file__, 'up': ray.is_initialized()}\n"
        "result['same'] = node == ray.get_runtime_context().get_node_id()\n"
        "plain = lambda column: [None if pd.isna(v) else v for v in column]\n"
        "result['labels'] = plain(out['sentiment_label'])\n"
        "result['errors'] = plain(out['_error'])\n"
        "result['again'] = plain(again['sentiment_label'])\n"
        "print(json.dumps(result))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=work, capture_output=True, text=True, env=ENV, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mine"] == "package"
    assert result["bertpipe"] == str(SOURCE / "__init__.py") or "site-packages" in result["bertpipe"]
    assert result["up"] and result["same"]
    assert result["labels"][0] in ("positive", "negative") and result["labels"][1] is None
    assert result["errors"] == [None, "text is null"] and result["again"] == result["labels"]
    for command in (
        ["-m", "bertpipe", "--version"],
        ["-c", "import bertpipe.cli; bertpipe.cli.main()", "--version"],
    ):
        version = subprocess.run(
            [sys.executable, *command], cwd=work, capture_output=True, text=True, env=ENV
        )
        assert version.stdout.strip().startswith("bertpipe ") and version.returncode == 0, version.stderr


@pytest.mark.slow
def test_a_wheel_installs_bertpipe_and_nothing_named_pipeline(tmp_path):
    """A wheel built from the repository (a copy of what the build reads), installed into a folder."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(SOURCE), str(src / "pipeline")], check=True)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("bertpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"bertpipe", next(t for t in tops if t.endswith(".dist-info"))}
    expected = {
        "bertpipe/" + str(p.relative_to(SOURCE)) for p in SOURCE.rglob("*") if p.suffix in (".py", ".json")
    }
    assert expected <= set(names), sorted(expected - set(names))

    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert not (site / "pipeline").exists() and not (site / "pipeline.py").exists()
    probe = "import bertpipe, bertpipe.demo.vocab as v; print(bertpipe.__file__, len(v.DOMAINS) > 0)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": str(site)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(site / "bertpipe" / "__init__.py"), "True"]
