"""Joining or starting Ray, the same way for ``run``, ``label`` and ``finetune``."""

from __future__ import annotations

import os

import ray


def connect(address: str | None, *, local_cpus: int | None = None, local_gpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; True when this call connected it.

    A Ray the caller (a notebook, a user's own program, a test) already initialised is used as it is
    and never shut down by bertpipe. Otherwise join ``address``, or ``RAY_ADDRESS`` (Ray Jobs set it for
    their driver), else start a fresh local Ray: a bare ``ray.init()`` would try to join a stale cluster
    that a dead ``ray start`` head left recorded in /tmp/ray.
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
            include_dashboard=False,
            log_to_driver=True,
        )
    return True


def disconnect() -> None:
    ray.shutdown()


def cluster_resources() -> dict[str, float]:
    return ray.cluster_resources()
