"""Container and job files: they parse, pin what they run, and keep the settings the docs promise."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]
YAML_FILES = sorted(
    p for d in ("docker", "jobs") for p in (ROOT / d).rglob("*") if p.suffix in {".yaml", ".yml"}
)


def load(relpath: str) -> dict:
    return yaml.safe_load((ROOT / relpath).read_text())


def load_entrypoint():
    spec = importlib.util.spec_from_file_location("jobs_entrypoint", ROOT / "jobs" / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_pinned(image: str) -> None:
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{image}: no tag"
    assert tag != "latest", f"{image}: pin a version, not :latest"


def test_yaml_files_found():
    names = {p.relative_to(ROOT).as_posix() for p in YAML_FILES}
    assert {"docker/compose.yaml", "jobs/runtime_env.yaml", "jobs/kuberay-rayjob.yaml"} <= names
    assert "jobs/cron/cronjob.yaml" in names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_and_entrypoint(path):
    text = path.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert bases
    for base in bases:
        assert_pinned(base)
    assert re.search(r'^ENTRYPOINT \["bertpipe"\]$', text, re.MULTILINE)
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.MULTILINE)
    assert '"torch==${TORCH_VERSION}"' in text
    assert re.search(r"^USER \d+(:\d+)?$", text, re.MULTILINE), "numeric non-root USER, for runAsNonRoot"


def test_cpu_image_uses_the_cpu_torch_index():
    assert "--index-url https://download.pytorch.org/whl/cpu" in DOCKERFILES[0].read_text()


def test_dockerignore_admits_every_copy_source():
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules[0] == "*", "an allow-list: everything else stays out of the build context"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for path in DOCKERFILES:
        for line in re.findall(r"^COPY\s+(.+)$", path.read_text(), re.MULTILINE):
            sources = [s for s in line.split() if not s.startswith("--")][:-1]
            assert sources
            for src in sources:
                assert src.rstrip("/") in allowed, f"{path.name}: COPY {src} is excluded by .dockerignore"


def test_compose_cluster_shares_token_auth():
    services = load("docker/compose.yaml")["services"]
    assert set(services) == {"ray-head", "ray-worker", "demo"}
    for name, service in services.items():
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
        assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "--head" in services["ray-head"]["command"]
    assert "127.0.0.1:8265:8265" in services["ray-head"]["ports"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    assert services["demo"]["command"][-2:] == ["bertpipe", "demo"]


def test_runtime_env_is_valid_and_leaves_out_local_state():
    from ray.runtime_env import RuntimeEnv

    raw = load("jobs/runtime_env.yaml")
    RuntimeEnv(**raw)
    assert "pip" not in raw, "nodes run the bertpipe image, which already has the dependencies"
    assert {".git/", ".venv/", "data/", "tests/"} <= set(raw["excludes"])


def test_rayjob_has_a_gpu_worker_group():
    job = load("jobs/kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "--set runtime.address=auto" in spec["entrypoint"]
    assert "--set runtime.device=cuda" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["authOptions"]["mode"] == "token"
    gpu_groups = [
        group
        for group in cluster["workerGroupSpecs"]
        for container in group["template"]["spec"]["containers"]
        if container["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert gpu_groups
    for group in gpu_groups:
        assert group["rayStartParams"]["num-gpus"] == "1"
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        for container in template["spec"]["containers"]:
            assert_pinned(container["image"])


def test_cronjob_is_daily_and_never_overlaps():
    cron = load("jobs/cron/cronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert_pinned(container["image"])
    script = container["args"][0]
    assert "ray job submit" in script and "--no-wait" not in script, "Forbid needs the submit to wait"
    assert "dt=${dt}" in script and "output.mode=incremental" in script
    assert '"output.partition_by=[dt]"' in script, "each day goes to its own dt partition"
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def test_crontab_escapes_percent_signs():
    lines = [
        line
        for line in (ROOT / "jobs" / "cron" / "bertpipe.crontab").read_text().splitlines()
        if line and not line.startswith("#") and not re.match(r"^[A-Z_]+=", line)
    ]
    assert len(lines) == 1
    fields = lines[0].split(maxsplit=5)
    assert len(fields) == 6
    command = fields[5]
    assert "ray job submit" in command and "output.mode=incremental" in command
    assert '"output.partition_by=[dt]"' in command, "each day goes to its own dt partition"
    assert re.search(r"(?<!\\)%", command) is None, "cron turns a bare % into a newline"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["c.yaml"], ["run", "c.yaml", "--set", "runtime.address=auto"]),
        (
            ["c.yaml", "--set", "output.path=s3://b/out"],
            ["run", "c.yaml", "--set", "output.path=s3://b/out", "--set", "runtime.address=auto"],
        ),
        (
            ["c.yaml", "--set", "runtime.address=ray://head:10001"],
            ["run", "c.yaml", "--set", "runtime.address=ray://head:10001"],
        ),
        (["c.yaml", "--set=runtime.address=null"], ["run", "c.yaml", "--set=runtime.address=null"]),
        (
            ["c.yaml", "--set", "runtime.address_pool=x"],
            ["run", "c.yaml", "--set", "runtime.address_pool=x", "--set", "runtime.address=auto"],
        ),
    ],
)
def test_entrypoint_defaults_address_to_auto(argv, expected):
    assert load_entrypoint().build_argv(argv) == expected
