"""Joining or starting Ray, the same way for ``run``, ``label`` and ``finetune``."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray


def connect(
    address: str | None,
    *,
    local_cpus: int | None = None,
    local_gpus: int | None = None,
    state_api: bool = False,
) -> bool:
    """Make sure this process is connected to Ray; True when this call connected it.

    A Ray the caller (a notebook, a user's own program, a test) already initialised is used as it is
    and never shut down by bertpipe. Otherwise join ``address``, or ``RAY_ADDRESS`` (Ray Jobs set it for
    their driver), else start a fresh local Ray: a bare ``ray.init()`` would try to join a stale cluster
    that a dead ``ray start`` head left recorded in /tmp/ray. ``state_api`` starts the local Ray with
    what Ray Train needs (see ``local_state_api``).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=local_cpus,
            num_gpus=local_gpus,
            log_to_driver=True,
            **(local_state_api() if state_api else {"include_dashboard": False}),
        )
    return True


def local_state_api() -> dict[str, Any]:
    """``ray.init`` arguments for a local Ray whose workers reach its own state API.

    Ray Train's placement-group cleaner (a detached actor) asks the state API every second whether
    the trainer's controller is alive, and removes the training placement group, so killing the
    workers, when the answer is "no such actor". The state API is served by the dashboard, and the
    cleaner finds it through ``RAY_API_SERVER_ADDRESS``, else through the Ray processes it sees on the
    machine. Without a dashboard it fails every second (hundreds of warnings); and once another Ray
    with a dashboard runs on the same machine, on the port ours advertises, the cleaner asks that
    cluster, which does not know our controller, and the fine-tune dies ("placement group was
    removed", "A worker health check failed"). So the local Ray gets its dashboard on a free local
    port, and every worker the address of exactly that dashboard (the runtime env's ``env_vars``).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": port,
        "runtime_env": {
            "env_vars": {
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                # Nothing preempts this machine's own Ray; Ray Train's watcher for it only logs a
                # core-worker error line about its constructor arguments.
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            }
        },
    }


def disconnect() -> None:
    ray.shutdown()


def cluster_resources() -> dict[str, float]:
    return ray.cluster_resources()
