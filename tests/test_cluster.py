"""A real two-node Ray cluster on this machine, with token auth, and a job submitted through the dashboard.

The head (1 CPU) and a worker node (2 CPUs, one GPU that Ray is told exists) are separate ``ray start``
processes with temp dirs of their own, as on two machines (a shared temp dir makes the nodes unpack the
job's working dir over each other). ``jobs/submit.sh`` uploads this checkout and runs ``bertpipe run``
as the job's driver; the state API then says where each actor ran. The cluster is stopped by the process
groups of its ``ray start`` commands (never ``ray stop``, which stops every Ray of the user).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest
from conftest import STRIDE, WINDOW, free_ports, make_texts, write_config, write_shards
from transformers import pipeline as hf_pipeline

from bertpipe.tasks.sentiment import normalise_sentiment_label

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
INFER_ACTOR = "MapWorker(MapBatches(InferStage))"


@dataclass(frozen=True)
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT, the Jobs and state APIs
    token: str
    env: dict[str, str]  # for every process that talks to the cluster: token auth on, our token
    temp_dir: Path

    def ray(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=True
        )

    def state(self, kind: str) -> list[dict]:
        """``ray list KIND`` through the dashboard: actors (dead ones too) or nodes."""
        out = self.ray("list", kind, "--address", self.dashboard, "--detail", "--format", "json")
        return json.loads(out.stdout)

    def get(self, path: str, token: str | None) -> tuple[int, str]:
        """GET from the dashboard with this bearer token (or none): status and body."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.dashboard + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""


def _group_processes(groups: set[int]) -> list[psutil.Process]:
    """Every process in these process groups, and their descendants: the raylet puts each worker
    into a process group of its own."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE:
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
        except (psutil.Error, ProcessLookupError):
            continue
    return list(found.values())


def _stop(groups: set[int]) -> None:
    procs = _group_processes(groups)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=15)
    left = [p for p in _group_processes(groups) if p.is_running()]
    assert not left, f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def cluster():
    # Short and our own: Ray's socket paths live under it and must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="bp-ray-"))
    gcs, dashboard, client, head_agent, worker_agent = free_ports(5)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=200000000"]
    nodes = {
        "head": [
            "--head",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={head_agent}",
            "--num-cpus=1",
            '--resources={"head": 1}',
        ],
        "worker": [
            f"--address=127.0.0.1:{gcs}",
            f"--dashboard-agent-listen-port={worker_agent}",
            "--num-cpus=2",
            "--num-gpus=1",
        ],
    }
    groups: set[int] = set()
    try:
        for name, args in nodes.items():
            log = temp_dir / f"ray-start-{name}.log"
            with log.open("wb") as fh:
                start = subprocess.Popen(
                    [RAY, "start", *args, *common, f"--temp-dir={temp_dir / name}"],
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its daemons keep this process group after it exits
                )
                groups.add(start.pid)
                assert start.wait(timeout=240) == 0, log.read_text()[-3000:]
        yield Cluster(f"http://127.0.0.1:{dashboard}", token, env, temp_dir)
    finally:
        _stop(groups)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_token_auth_is_on(cluster):
    assert cluster.get("/api/jobs/", None)[0] == 401
    assert cluster.get("/api/jobs/", secrets.token_hex(32))[0] == 403
    assert cluster.get("/api/jobs/", cluster.token)[0] == 200


def test_job_imports_the_uploaded_checkout(cluster, tmp_path):
    """The driver and its workers import ``bertpipe`` from this checkout's source, staged as Ray
    ``py_modules`` by ``jobs/stage_source.py`` (not the installed copy), and the working-dir upload
    leaves out what ``jobs/runtime_env.yaml`` excludes."""
    runtime_env = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "stage_source.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    probe = (
        "import os, ray, bertpipe; print('DRIVER', bertpipe.__file__); print('FILES', sorted(os.listdir())); "
        "f = ray.remote(lambda: __import__('bertpipe').__file__); print('WORKER', ray.get(f.remote()))"
    )
    out = cluster.ray(
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--working-dir",
        str(ROOT),
        "--runtime-env",
        runtime_env,
        "--",
        "python",
        "-c",
        probe,
        timeout=300,
    ).stdout
    for where in ("DRIVER", "WORKER"):
        module = re.search(rf"^{where} (\S+)$", out, re.M).group(1)
        assert "/py_modules_files/" in module and module.endswith("bertpipe/__init__.py"), module
    files = re.search(r"^FILES (.+)$", out, re.M).group(1)
    assert "'jobs'" in files and "'configs'" in files
    assert "'tests'" not in files and "'.git'" not in files and "'pipeline'" not in files


def test_job_runs_on_the_cluster(cluster, models, tmp_path):
    """``jobs/submit.sh`` with ``runtime.device=cuda``: the job succeeds, every id is written once with
    the reference labels, and the model actor ran on the GPU node with the GPU Ray gave it."""
    texts = make_texts(24, seed=21, max_words=150)
    rows = [{"id": f"c-{i:03d}", "text": t, "source": ["news", "forum"][i % 2]} for i, t in enumerate(texts)]
    write_shards(tmp_path / "in", rows, n_parquet=2, n_jsonl=1)
    out_dir = tmp_path / "out"
    config = write_config(
        tmp_path / "job.yaml",
        input={"paths": [str(tmp_path / "in")]},
        output={"path": str(out_dir), "partition_by": ["source"]},
        tasks=[{"name": "sentiment", "kind": "sentiment", "model": str(models["sentiment"])}],
        runtime={"dtype": "float32", "max_length": WINDOW, "stride": STRIDE},
    )
    proc = subprocess.run(
        [str(ROOT / "jobs" / "submit.sh"), str(config), "--set", "runtime.device=cuda", "-v"],
        env={**cluster.env, "RAY_API_SERVER_ADDRESS": cluster.dashboard},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    logs = proc.stdout + proc.stderr
    submission = re.search(r"Job '(raysubmit_\w+)' submitted", logs).group(1)

    code, body = cluster.get(f"/api/jobs/{submission}", cluster.token)
    job = json.loads(body)
    assert code == 200 and job["status"] == "SUCCEEDED"

    nodes = {n["node_id"]: n for n in cluster.state("nodes") if n["state"] == "ALIVE"}
    assert len(nodes) == 2
    gpu_nodes = [i for i, n in nodes.items() if n["resources_total"].get("GPU")]
    assert len(gpu_nodes) == 1 and not nodes[gpu_nodes[0]]["is_head_node"]
    # Actors that were placed: the count checks' hash-aggregation actors may end before Ray places all
    # of them (no node). Every placed actor ran on a node that has what it asked for.
    actors = [a for a in cluster.state("actors") if a["job_id"] == job["job_id"] and a["node_id"]]
    for actor in actors:
        total = nodes[actor["node_id"]]["resources_total"]
        assert all(total.get(k, 0) >= v for k, v in actor["required_resources"].items()), actor
    infer = [a for a in actors if a["class_name"] == INFER_ACTOR]
    assert infer and all(a["node_id"] == gpu_nodes[0] for a in infer)
    assert all(a["required_resources"].get("GPU") == 1 for a in infer)
    # The actor's own log line: what Ray assigned to it, from inside the process the state API named.
    assigned = dict(re.findall(r"model actor pid=(\d+) .* resources=(\{.*\})", logs))
    assert assigned and set(assigned) <= {str(a["pid"]) for a in infer}
    assert all("'GPU': 1.0" in resources for resources in assigned.values())

    summary = json.loads(next((out_dir / "_runs").glob("*.json")).read_text())
    assert summary["device"] == "cuda" and summary["rows_in"] == summary["rows_out"] == len(rows)
    assert (out_dir / "_SUCCESS").read_text().split() == [summary["run_id"]]
    table = pads.dataset(str(out_dir), partitioning="hive").to_table()
    got = {r["id"]: r for r in table.to_pylist()}
    assert table.num_rows == len(got) == len(rows)
    reference = hf_pipeline("text-classification", model=str(models["sentiment"]))
    expected = reference([r["text"] for r in rows], truncation=True, max_length=WINDOW)
    for row, exp in zip(rows, expected, strict=True):
        assert got[row["id"]]["source"] == row["source"]
        assert got[row["id"]]["sentiment_label"] == normalise_sentiment_label(exp["label"])
        assert got[row["id"]]["sentiment_score"] == pytest.approx(exp["score"], abs=1e-4)
