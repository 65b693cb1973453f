"""Ray Train glue for ``bertpipe finetune``: the driver's ``TorchTrainer`` fit and the workers' context.

``bertpipe.train.trainer`` holds the torch side (data, model, the loop body, evaluation, publish) and
never imports Ray. It hands ``fit`` its loop function, which every worker calls with a
``WorkerContext``: rank, device, DDP wrapping, the distributed sampler, the arrays, progress events and
``report``.

The driver puts the tokenised arrays into the object store once, so N workers read them zero-copy
instead of each unpickling its own copy. Ray Train keeps only the best checkpoint (``CheckpointConfig``
by score); ``fit`` yields its folder while it exists. Progress: rank 0 puts small dicts into a
``ray.util.queue.Queue``; a driver thread forwards them to the ``progress`` callback, which therefore
runs on that thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch

from bertpipe.config import ConfigError
from bertpipe.engine.cluster import connect, disconnect
from bertpipe.train.config import FinetuneRuntime

Progress = Callable[[dict[str, Any]], None]


class WorkerContext:
    """Ray Train as the training loop sees it on one worker, so that the loop needs no Ray of its own."""

    def __init__(self, arrays: dict[str, ray.ObjectRef], queue):
        self.rank: int = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()
        self.arrays: dict[str, dict[str, np.ndarray]] = {name: ray.get(ref) for name, ref in arrays.items()}
        self._queue = queue

    def prepare_model(self, model):
        """On this worker's device, wrapped in DDP when there is more than one worker."""
        return ray.train.torch.prepare_model(model)

    def prepare_data_loader(self, loader):
        """With a distributed sampler (each worker its share of the rows), batches moved to the device."""
        return ray.train.torch.prepare_data_loader(loader)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """An epoch's metrics, with a folder to keep as its checkpoint (copied before this returns)."""
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def progress(self, event: dict[str, Any]) -> None:
        """An event for the driver's ``progress`` callback; dropped when there is none."""
        if self._queue is not None:
            self._queue.put_nowait(event)


Loop = Callable[[WorkerContext, dict[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True)
class Fitted:
    """The best epoch: its checkpoint folder (valid inside ``fit``) and reported metrics; ``value`` is
    what the loop returned on rank 0, ``seconds`` the time from handing over the arrays to the end."""

    best_dir: str
    best: dict[str, Any]
    value: dict[str, Any]
    seconds: float


@contextmanager
def fit(
    loop: Loop,
    loop_config: dict[str, Any],
    arrays: dict[str, dict[str, np.ndarray]],
    *,
    runtime: FinetuneRuntime,
    score_metric: str,
    storage_path: str,
    progress: Progress | None,
) -> Iterator[Fitted]:
    """Run ``loop(context, loop_config)`` on ``runtime.num_workers`` workers and yield the best epoch.

    A running Ray is used as it is; otherwise this joins ``runtime.address`` or starts a local Ray with
    the state API Ray Train's monitor needs (``cluster.local_state_api``), and stops it afterwards.
    """
    connected = connect(runtime.address, state_api=True)
    try:
        if connected and not (runtime.address or os.environ.get("RAY_ADDRESS")):
            _check_local_resources(runtime)
        with _relay(progress) as queue:
            started = time.monotonic()
            refs = {name: ray.put(value) for name, value in arrays.items()}
            config = {"loop": loop, "loop_config": loop_config, "arrays": refs, "queue": queue}
            result = _trainer(runtime, score_metric, storage_path, config).fit()
            # Ray kept only the best checkpoint; its metrics say which epoch it is.
            checkpoint, best = max(result.best_checkpoints, key=lambda pair: pair[1][score_metric])
            seconds = round(time.monotonic() - started, 2)
            with checkpoint.as_directory() as best_dir:
                yield Fitted(best_dir, best, result.return_value, seconds)
    finally:
        if connected:
            disconnect()


def _check_local_resources(runtime: FinetuneRuntime) -> None:
    """A local Ray never grows, and Ray Train would wait forever for workers that cannot fit."""
    have = ray.cluster_resources()
    need = {
        "CPU": runtime.num_workers * runtime.cpus_per_worker,
        "GPU": runtime.num_workers * runtime.use_gpu,
    }
    for resource, amount in need.items():
        if amount > have.get(resource, 0):
            raise ConfigError(
                f"runtime: {runtime.num_workers} worker(s) need {amount:g} {resource}, this machine has "
                f"{have.get(resource, 0):g}; lower num_workers / cpus_per_worker or set runtime.address"
            )


@contextmanager
def _relay(progress: Progress | None) -> Iterator[Any]:
    """A Ray queue workers write progress into, pumped into ``progress`` by a driver thread."""
    if progress is None:
        yield None
        return
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                progress(queue.get(timeout=0.2))
            except Empty:
                if done.is_set():
                    return

    thread = threading.Thread(target=pump, name="finetune-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join()
        queue.shutdown()


def _trainer(runtime: FinetuneRuntime, score_metric: str, storage_path: str, config: dict[str, Any]):
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=runtime.num_workers,
            use_gpu=runtime.use_gpu,
            resources_per_worker={"CPU": runtime.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"finetune-{uuid.uuid4().hex[:8]}",
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=score_metric, checkpoint_score_order="max"
            ),
            # Ray Train's own warnings are transient retries on a busy machine ("Failed to send resource
            # request ... safe to ignore", with a traceback); they stay in its log files, not the console.
            logging_config=LoggingConfig(log_level="ERROR"),
        ),
    )


def _worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """What every Ray Train worker runs: the trainer's loop, handed a context instead of Ray."""
    quiet_report_lines()
    return config["loop"](WorkerContext(config["arrays"], config["queue"]), config["loop_config"])


def quiet_report_lines() -> None:
    """Ray Train's worker logs "Reporting training result ..." once per report at INFO, on a logger named
    after its file, outside the ``ray.train`` tree that ``LoggingConfig`` sets, so the lines would reach
    the console; they say nothing the progress lines do not."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
