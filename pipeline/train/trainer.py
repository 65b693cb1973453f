"""Fine-tune a BERT-family classifier or BIO tagger on Ray Train and publish the best epoch.

The driver reads and checks the data, picks the labels and tokenises once into padded numpy
arrays, which it puts in the object store: every data error surfaces before a worker starts, N
workers do not repeat the tokenisation, and they read the arrays zero-copy. (Ray Data streaming
would only pay off for corpora too big for memory, which labelled fine-tune sets are not.)

A ``TorchTrainer`` runs ``_train_loop`` on ``runtime.num_workers`` workers: ``prepare_model`` wraps
the model in DDP when there is more than one, ``prepare_data_loader`` adds the distributed sampler
and moves batches to the device. After each epoch rank 0 scores the validation split (accuracy and
macro-F1, or entity-level F1 for NER) and reports the metrics with a ``save_pretrained`` checkpoint;
Ray keeps only the best one (``CheckpointConfig`` by score). The driver copies it, with the tokenizer
and ``training_summary.json``, into a temp folder beside ``output_dir`` and renames it into place, so
a crash never leaves half a model.

Progress: rank 0 puts small dicts into a ``ray.util.queue.Queue``; a driver thread forwards them to
the ``progress`` callback, which therefore runs on that thread. Events (key ``event``):
``data`` (train_rows, validation_rows, labels), ``start`` (total_steps, steps_per_epoch, epochs,
dtype), ``step`` (epoch, step, total_steps, loss, learning_rate; at most a few per second), ``epoch``
(the reported metrics) and ``saved`` (output_dir).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

from bertpipe.config import ConfigError, TaskKind
from bertpipe.train.config import FinetuneConfig, normalise_sentiment
from bertpipe.train.data import (
    IGNORE_INDEX,
    encode,
    read_labelled,
    resolve_labels,
    split_indices,
    take,
)
from bertpipe.train.metrics import classification_metrics, entity_metrics

Progress = Callable[[dict[str, Any]], None]
_STEP_EVENT_SECONDS = 0.5
_MAX_GRAD_NORM = 1.0


def run_finetune(cfg: FinetuneConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg.base_model`` and save the best epoch into ``cfg.output_dir``; returns the summary.

    The summary (also written as ``training_summary.json``) has: output_dir, kind, base_model,
    labels, train_rows, validation_rows, best_metric, best_score, best_epoch, epochs (metrics per
    epoch), loss_history (training loss per optimizer step, rank 0), total_steps, dtype,
    num_workers, train_seconds, seconds, config.
    """
    started = time.monotonic()
    emit = progress or (lambda event: None)
    output_dir = _check_output_dir(cfg)
    base = _resolve_base_model(cfg)
    if base == str(output_dir):
        raise ConfigError("output_dir: must differ from base_model (workers read it while training)")
    base_config = _load_base_config(cfg, base)
    tokenizer = _load_tokenizer(cfg, base)
    has_head, base_labels = _head_labels(base_config, cfg.kind)
    labels, train, validation = _prepare_data(cfg, tokenizer, base_labels)
    sizes = {"train_rows": len(train["labels"]), "validation_rows": len(validation["labels"])}
    emit({"event": "data", **sizes, "labels": labels})

    with _ray_session(cfg), _storage(cfg, output_dir) as storage, _relay(progress) as queue:
        fit_started = time.monotonic()
        result = _fit(
            cfg,
            storage,
            {
                "cfg": cfg,
                "base": base,
                "labels": labels,
                "reinit_head": has_head and labels != base_labels,
                "train": ray.put(train),
                "validation": ray.put(validation),
                "queue": queue,
            },
        )
        # Ray kept only the best checkpoint; its metrics say which epoch it is.
        checkpoint, best = max(result.best_checkpoints, key=lambda pair: pair[1][cfg.score_metric])
        summary = {
            "output_dir": str(output_dir),
            "kind": cfg.kind.value,
            "base_model": cfg.base_model,
            "labels": labels,
            **sizes,
            "best_metric": cfg.score_metric,
            "best_score": best[cfg.score_metric],
            "best_epoch": best["epoch"],
            **result.return_value,
            "num_workers": cfg.runtime.num_workers,
            "train_seconds": round(time.monotonic() - fit_started, 2),
            "seconds": round(time.monotonic() - started, 2),
            "config": cfg.model_dump(mode="json"),
        }
        with checkpoint.as_directory() as best_dir:
            _publish(output_dir, best_dir, tokenizer, summary)
    emit({"event": "saved", "output_dir": str(output_dir)})
    return summary


def _prepare_data(cfg: FinetuneConfig, tokenizer, base_labels: list[str] | None):
    """Labels plus tokenised train and validation arrays (``validation_paths`` or a seeded split)."""
    train_rows = read_labelled(cfg, cfg.data.paths, "data.paths")
    val_rows = None
    if cfg.data.validation_paths:
        val_rows = read_labelled(cfg, cfg.data.validation_paths, "data.validation_paths")
    labels = resolve_labels(cfg, [r for r in (train_rows, val_rows) if r is not None], base_labels)
    train = encode(tokenizer, train_rows, labels, cfg.kind, cfg.max_length)
    if val_rows is not None:
        return labels, train, encode(tokenizer, val_rows, labels, cfg.kind, cfg.max_length)
    train_index, val_index = split_indices(len(train["labels"]), cfg.validation_fraction, cfg.seed)
    return labels, take(train, train_index), take(train, val_index)


def _check_output_dir(cfg: FinetuneConfig) -> Path:
    """Fail before training, not after, when the output folder is taken."""
    out = Path(cfg.output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"output_dir: {out} is not empty; set overwrite: true to replace it")
    return out


def _resolve_base_model(cfg: FinetuneConfig) -> str:
    """Absolute path of a local base model (workers run in another directory), or the hub id as given."""
    path = Path(cfg.base_model).expanduser()
    if not path.exists():
        if cfg.base_model.startswith((".", "/", "~")):
            raise ConfigError(f"base_model: {cfg.base_model} not found")
        return cfg.base_model
    if not path.is_dir():
        raise ConfigError(f"base_model: {path} is not a model folder")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        if not any(path.glob("*.bin")) and not any(path.glob("*.bin.index.json")):
            raise ConfigError(f"base_model: {path} has no model weights")
        if not cfg.allow_pickle:
            raise ConfigError(
                f"base_model: {path} has only pickle weights (*.bin); set allow_pickle: true if you trust it"
            )
    return str(path.resolve())


def _load_base_config(cfg: FinetuneConfig, base: str):
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"base_model: cannot load the config of {base}: {str(exc).splitlines()[0]}"
        ) from exc
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:
        raise ConfigError(f"max_length: {cfg.max_length} exceeds the model's {limit} positions")
    return config


def _load_tokenizer(cfg: FinetuneConfig, base: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"base_model: cannot load the tokenizer of {base}: {str(exc).splitlines()[0]}"
        ) from exc
    if cfg.kind == TaskKind.ner and not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"base_model: NER needs a fast tokenizer (character offsets); {base} has none")
    return tokenizer


def _head_labels(config, kind: TaskKind) -> tuple[bool, list[str] | None]:
    """Whether the base model has a head of the kind to train, and its labels (None: unusable names)."""
    suffix = "ForTokenClassification" if kind == TaskKind.ner else "ForSequenceClassification"
    if not any(arch.endswith(suffix) for arch in config.architectures or []):
        return False, None
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    if kind == TaskKind.sentiment:
        normalised = [normalise_sentiment(label) for label in labels]
        return True, None if None in normalised else normalised
    return True, labels


@contextmanager
def _ray_session(cfg: FinetuneConfig) -> Iterator[None]:
    """Use the running Ray; otherwise join ``runtime.address`` or start a local one, and stop it after."""
    if ray.is_initialized():
        yield
        return
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")  # Ray Jobs set RAY_ADDRESS
    if address:
        ray.init(address=address)
    else:  # "local" never joins a stale cluster recorded in /tmp/ray
        ray.init(address="local", include_dashboard=False)
    try:
        if not address:
            _check_local_resources(cfg)
        yield
    finally:
        ray.shutdown()


def _check_local_resources(cfg: FinetuneConfig) -> None:
    """A local Ray never grows, and Ray Train would wait forever for workers that cannot fit."""
    runtime = cfg.runtime
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
def _storage(cfg: FinetuneConfig, output_dir: Path) -> Iterator[str]:
    """Ray Train's checkpoint storage: ``runtime.storage_path``, or a hidden folder removed afterwards."""
    if cfg.runtime.storage_path:
        yield cfg.runtime.storage_path
        return
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    path = output_dir.parent / f".{output_dir.name}.ray-{uuid.uuid4().hex[:8]}"
    try:
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


def _fit(cfg: FinetuneConfig, storage: str, loop_config: dict[str, Any]):
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    runtime = cfg.runtime
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=runtime.num_workers,
            use_gpu=runtime.use_gpu,
            resources_per_worker={"CPU": runtime.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"finetune-{uuid.uuid4().hex[:8]}",
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=cfg.score_metric, checkpoint_score_order="max"
            ),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


def _publish(output_dir: Path, best_dir: str, tokenizer, summary: dict[str, Any]) -> None:
    """Assemble the model folder beside ``output_dir`` and rename it into place."""
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(best_dir, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if output_dir.exists():
            output_dir.rename(old)
        try:
            tmp.rename(output_dir)
        except OSError:
            if old.exists():
                old.rename(output_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- worker side


class _Collate:
    """Turns a list of row indices into a batch, trimming padding to the batch's longest row."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __call__(self, index) -> dict[str, torch.Tensor]:
        index = np.asarray(index)
        mask = self.arrays["attention_mask"][index]
        width = int(mask.sum(axis=1).max())
        labels = self.arrays["labels"][index]
        batch = {
            "input_ids": self.arrays["input_ids"][index, :width],
            "attention_mask": mask[:, :width],
            "labels": labels[:, :width] if labels.ndim == 2 else labels,
        }
        return {name: torch.from_numpy(value.astype(np.int64)) for name, value in batch.items()}


class _Reporter:
    """Rank 0's progress events into the driver's queue; step events throttled."""

    def __init__(self, queue, enabled: bool):
        self.queue = queue if enabled else None
        self.last_step = 0.0

    def send(self, event: dict[str, Any]) -> None:
        if self.queue is not None:
            self.queue.put_nowait(event)

    def step(self, event: dict[str, Any], force: bool) -> None:
        now = time.monotonic()
        if force or now - self.last_step >= _STEP_EVENT_SECONDS:
            self.last_step = now
            self.send({"event": "step", **event})


def _use_bf16(dtype: str, device: torch.device) -> bool:
    if dtype != "auto":
        return dtype == "bfloat16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None
    return False


def _load_model(cfg: FinetuneConfig, base: str, labels: list[str], reinit_head: bool):
    """Base weights plus a head for ``labels``; a base head trained for other labels is re-initialised."""
    auto = AutoModelForTokenClassification if cfg.kind == TaskKind.ner else AutoModelForSequenceClassification
    extra = {} if cfg.kind == TaskKind.ner else {"problem_type": "single_label_classification"}
    model = auto.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
        use_safetensors=None if cfg.allow_pickle else True,
        trust_remote_code=cfg.trust_remote_code,
        dtype=torch.float32,
        **extra,
    )
    if reinit_head:
        # Same-shaped head weights were loaded; the labels differ, so start the head afresh.
        for name, child in model.named_children():
            if name == model.base_model_prefix:
                continue
            for module in child.modules():
                for tensor in (*module.parameters(recurse=False), module):
                    tensor._is_hf_initialized = False
                model._init_weights(module)
    return model


def _train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker; rank 0 evaluates, checkpoints and returns the run record."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers.utils import logging as hf_logging

    cfg: FinetuneConfig = config["cfg"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(cfg.runtime.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    bf16 = _use_bf16(cfg.dtype, device)

    labels = config["labels"]
    model = ray.train.torch.prepare_model(_load_model(cfg, config["base"], labels, config["reinit_head"]))
    module = getattr(model, "module", model)  # unwrapped from DDP for eval and saving
    train, validation = ray.get(config["train"]), ray.get(config["validation"])
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(
            range(len(train["labels"])),
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=_Collate(train),
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    )
    steps_per_epoch = len(loader)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases and norms
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    reporter = _Reporter(config["queue"], rank == 0)
    epochs = math.ceil(total_steps / steps_per_epoch)
    reporter.send(
        {
            "event": "start",
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "epochs": epochs,
            "dtype": "bfloat16" if bf16 else "float32",
        }
    )

    step, history, records = 0, [], []
    for epoch in range(1, epochs + 1):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        model.train()
        epoch_started = time.monotonic()
        epoch_losses = []
        for batch in loader:
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), _MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(round(loss.item(), 5))
            epoch_losses.append(history[-1])
            last = step == total_steps or len(epoch_losses) == steps_per_epoch
            reporter.step(
                {
                    "epoch": epoch,
                    "step": step,
                    "total_steps": total_steps,
                    "loss": history[-1],
                    "learning_rate": scheduler.get_last_lr()[0],
                },
                force=last,
            )
            if step == total_steps:
                break
        metrics = {
            "epoch": epoch,
            "step": step,
            "train_loss": round(float(np.mean(epoch_losses)), 5),
            "train_seconds": round(time.monotonic() - epoch_started, 2),
        }
        if rank == 0:
            metrics.update(_evaluate(module, validation, cfg, labels, device, autocast))
            with tempfile.TemporaryDirectory() as tmp:
                module.save_pretrained(tmp)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        records.append(metrics)
        reporter.send({"event": "epoch", **metrics})
    if rank != 0:
        return None
    return {
        "epochs": records,
        "loss_history": history,
        "total_steps": total_steps,
        "dtype": "bfloat16" if bf16 else "float32",
    }


@torch.no_grad()
def _evaluate(model, arrays: dict[str, np.ndarray], cfg: FinetuneConfig, labels, device, autocast) -> dict:
    """Validation loss and scores, prefixed ``val_``; NER is scored on tokens that carry a label."""
    model.eval()
    collate = _Collate(arrays)
    n = len(arrays["labels"])
    size = cfg.batch_size * 2
    losses, predictions = [], []
    for start in range(0, n, size):
        batch = {k: v.to(device) for k, v in collate(range(start, min(n, start + size))).items()}
        with autocast():
            out = model(**batch)
        losses.append(out.loss.item())
        predictions.append(out.logits.argmax(-1).cpu().numpy())
    metrics = {"val_loss": round(float(np.mean(losses)), 5)}
    if cfg.kind == TaskKind.ner:
        truth, guess = [], []
        for chunk_start, pred in zip(range(0, n, size), predictions, strict=True):
            gold = arrays["labels"][chunk_start : chunk_start + len(pred), : pred.shape[1]]
            for gold_row, pred_row in zip(gold, pred, strict=True):
                keep = gold_row != IGNORE_INDEX
                truth.append([labels[i] for i in gold_row[keep]])
                guess.append([labels[i] for i in pred_row[keep]])
        scores = entity_metrics(truth, guess)
        metrics.update({f"val_entity_{k}": round(v, 5) for k, v in scores.items()})
    else:
        scores = classification_metrics(arrays["labels"].tolist(), np.concatenate(predictions).tolist())
        metrics.update({f"val_{k}": round(v, 5) for k, v in scores.items()})
    return metrics
