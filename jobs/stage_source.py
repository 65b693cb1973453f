"""Stage this checkout's source for a Ray job: ``python jobs/stage_source.py DIR`` prints a runtime env file.

The package's source folder is ``pipeline/`` but it imports as ``bertpipe``; Ray's ``working_dir`` would
put ``pipeline`` on the path, not ``bertpipe``. So the source is copied to ``DIR/bertpipe`` and named in
the runtime env's ``py_modules`` (Ray uploads it and puts it first on the path of the driver and every
worker), next to the settings of ``jobs/runtime_env.yaml``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def stage(directory: Path) -> Path:
    module = directory / "bertpipe"
    shutil.copytree(ROOT / "pipeline", module, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    env["py_modules"] = [str(module)]
    path = directory / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env, sort_keys=False))
    return path


if __name__ == "__main__":
    print(stage(Path(sys.argv[1])))
