"""Fine-tune a BERT-family classifier, BIO tagger or extractive QA head on Ray Train; publish the best.

The driver reads and checks the data, picks the labels and tokenises once into padded numpy
arrays, which the engine puts in the object store: every data error surfaces before a worker starts,
N workers do not repeat the tokenisation, and they read the arrays zero-copy. (Ray Data streaming
would only pay off for corpora too big for memory, which labelled fine-tune sets are not.)

``bertpipe.engine.train.fit`` runs ``_train_loop`` on ``runtime.num_workers`` Ray Train workers and
hands it a ``WorkerContext`` (rank, device, DDP, distributed sampler, report), so this module needs no
Ray. After each epoch rank 0 scores the validation split (accuracy and macro-F1, entity-level F1 for
NER, or the kind's ``train_scores``) and reports the metrics with a ``save_pretrained`` checkpoint; Ray
keeps only the best one. The driver copies it, with the tokenizer and ``training_summary.json``, into a
temp folder beside ``output_dir`` and renames it into place, so a crash never leaves half a model.

Progress reaches the ``progress`` callback on a driver thread. Events (key ``event``):
``data`` (train_rows, validation_rows, labels), ``start`` (total_steps, steps_per_epoch, epochs,
dtype), ``step`` (epoch, step, total_steps, loss, learning_rate; at most a few per second), ``epoch``
(the reported metrics) and ``saved`` (output_dir).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

from bertpipe.config import ConfigError
from bertpipe.engine.train import Progress, WorkerContext, fit
from bertpipe.io.paths import redact, redact_options
from bertpipe.models.loading import cpu_supports_bf16, require_fast_tokenizer, weight_files
from bertpipe.tasks import Kind
from bertpipe.train.config import FinetuneConfig
from bertpipe.train.data import (
    IGNORE_INDEX,
    encode,
    read_labelled,
    resolve_labels,
    split_indices,
    subset,
)
from bertpipe.train.metrics import classification_metrics, entity_metrics

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
    has_head, base_labels = _head_labels(base_config, cfg.task_kind)
    labels, sizes, train, validation = _prepare_data(cfg, tokenizer, base_labels)
    emit({"event": "data", **sizes, "labels": labels})

    loop_config = {
        "cfg": cfg,
        "base": base,
        "labels": labels,
        "reinit_head": has_head and labels is not None and labels != base_labels,
    }
    with (
        _storage(cfg, output_dir) as storage,
        fit(
            _train_loop,
            loop_config,
            {"train": train, "validation": validation},
            runtime=cfg.runtime,
            score_metric=cfg.score_metric,
            storage_path=storage,
            progress=progress,
        ) as fitted,
    ):
        summary = {
            "output_dir": str(output_dir),
            "kind": cfg.kind,
            "base_model": cfg.base_model,
            "labels": labels,
            **sizes,
            "best_metric": cfg.score_metric,
            "best_score": fitted.best[cfg.score_metric],
            "best_epoch": fitted.best["epoch"],
            **fitted.value,
            "num_workers": cfg.runtime.num_workers,
            "train_seconds": fitted.seconds,
            "seconds": round(time.monotonic() - started, 2),
            "config": _public_config(cfg),
        }
        _publish(output_dir, fitted.best_dir, tokenizer, summary)
    emit({"event": "saved", "output_dir": str(output_dir)})
    return summary


def _prepare_data(cfg: FinetuneConfig, tokenizer, base_labels: list[str] | None):
    """Labels (None for a kind without), row counts, and tokenised train and validation arrays
    (``validation_paths`` or a seeded split of the rows, so a row's windows stay on one side)."""
    train_rows = read_labelled(cfg, cfg.data.paths, "data.paths")
    if cfg.data.validation_paths:
        val_rows = read_labelled(cfg, cfg.data.validation_paths, "data.validation_paths")
    else:
        train_index, val_index = split_indices(len(train_rows.texts), cfg.validation_fraction, cfg.seed)
        train_rows, val_rows = subset(train_rows, train_index), subset(train_rows, val_index)
    kind = cfg.task_kind
    labels = resolve_labels(cfg, [train_rows, val_rows], base_labels) if kind.labelled else None
    sizes = {"train_rows": len(train_rows.texts), "validation_rows": len(val_rows.texts)}
    arrays = [
        encode(tokenizer, rows, labels, cfg.kind, cfg.max_length)
        if kind.labelled
        else kind.train_features(tokenizer, rows.texts, rows.targets, cfg.max_length, cfg.stride)
        for rows in (train_rows, val_rows)
    ]
    return labels, sizes, *arrays


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
    weight_files(path, cfg.allow_pickle, "base_model", cfg.base_model)
    return str(path.resolve())


def _public_config(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config for ``training_summary.json``, which ships with the model: without credentials."""
    config = cfg.model_dump(mode="json")
    data = config["data"]
    data["paths"] = [redact(path) for path in data["paths"]]
    data["validation_paths"] = [redact(path) for path in data["validation_paths"]]
    data["storage_options"] = redact_options(data["storage_options"])
    return config


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
    if cfg.task_kind.token_level:  # labels come from character spans
        require_fast_tokenizer(tokenizer, "base_model", base)
    return tokenizer


def _head_labels(config, kind: Kind) -> tuple[bool, list[str] | None]:
    """Whether the base model has a head of the kind to train, and its labels (None: unusable names;
    e.g. a sentiment head whose classes share a sentiment, "1 star" and "2 stars")."""
    suffix = kind.auto_model.removeprefix("AutoModel")  # e.g. ForTokenClassification
    if not any(arch.endswith(suffix) for arch in config.architectures or []):
        return False, None
    return True, kind.train_labels([str(config.id2label[i]) for i in range(config.num_labels)])


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
    """Turns a list of row indices into a batch, trimming per-token arrays to the batch's longest row."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __call__(self, index) -> dict[str, torch.Tensor]:
        index = np.asarray(index)
        width = int(self.arrays["attention_mask"][index].sum(axis=1).max())
        batch = {
            name: array[index, :width] if array.ndim == 2 else array[index]
            for name, array in self.arrays.items()
        }
        return {name: torch.from_numpy(value.astype(np.int64)) for name, value in batch.items()}


LENGTH_GROUP_BATCHES = 50  # batches per window of rows sorted by length, as HF Trainer's group_by_length


def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """One epoch's batches (row indices): rows shuffled, sorted by length within windows of
    ``LENGTH_GROUP_BATCHES`` batches, cut into batches, and the batches shuffled.

    A batch is padded to its longest row; with shuffled rows of mixed lengths that padding was 62% of
    the tokens of the demo's sentiment set (5,348 rows, 32 a batch), about 3% once grouped. The windows
    keep each epoch's batches random while every batch holds rows of similar length."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    window = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _epoch_loader(context: WorkerContext, cfg: FinetuneConfig, train: dict[str, np.ndarray], epoch: int):
    """The epoch's DataLoader (prepared by Ray Train: a distributed sampler over several workers)."""
    from torch.utils.data import DataLoader

    if cfg.group_by_length:
        lengths = train["attention_mask"].sum(axis=1)
        batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch)
        loader = DataLoader(batches, batch_size=None, collate_fn=_Collate(train))
    else:
        loader = DataLoader(
            range(len(train["input_ids"])),
            batch_size=cfg.batch_size,
            shuffle=True,
            collate_fn=_Collate(train),
            generator=torch.Generator().manual_seed(cfg.seed + epoch),
        )
    return context.prepare_data_loader(loader)


class _Reporter:
    """Rank 0's progress events for the driver; step events throttled."""

    def __init__(self, context: WorkerContext):
        self.context = context if context.rank == 0 else None
        self.last_step = 0.0

    def send(self, event: dict[str, Any]) -> None:
        if self.context is not None:
            self.context.progress(event)

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
    return device.type == "cpu" and cpu_supports_bf16()


def _load_model(cfg: FinetuneConfig, base: str, labels: list[str], reinit_head: bool):
    """Base weights plus a head for ``labels``; a base head trained for other labels is re-initialised."""
    auto = getattr(transformers, cfg.task_kind.auto_model)
    model = auto.from_pretrained(
        base,
        **cfg.task_kind.train_model_kwargs(labels),
        ignore_mismatched_sizes=True,
        use_safetensors=None if cfg.allow_pickle else True,
        trust_remote_code=cfg.trust_remote_code,
        dtype=torch.float32,
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


def _train_loop(context: WorkerContext, config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every worker; rank 0 evaluates, checkpoints and returns the run record."""
    from transformers.utils import logging as hf_logging

    cfg: FinetuneConfig = config["cfg"]
    rank = context.rank
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # a new head's "MISSING" load report is expected, not news
    torch.set_num_threads(cfg.runtime.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    device = context.device
    bf16 = _use_bf16(cfg.dtype, device)

    labels = config["labels"]
    model = context.prepare_model(_load_model(cfg, config["base"], labels, config["reinit_head"]))
    module = getattr(model, "module", model)  # unwrapped from DDP for eval and saving
    train, validation = context.arrays["train"], context.arrays["validation"]
    loader = _epoch_loader(context, cfg, train, epoch=1)
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
    reporter = _Reporter(context)
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
        if epoch > 1:
            loader = _epoch_loader(context, cfg, train, epoch)
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
                context.report(metrics, checkpoint_dir=tmp)
        else:
            context.report(metrics)
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
    n = len(arrays["input_ids"])
    size = cfg.batch_size * 2
    losses, predictions = [], []
    for start in range(0, n, size):
        batch = {k: v.to(device) for k, v in collate(range(start, min(n, start + size))).items()}
        with autocast():
            out = model(**batch)
        losses.append(out.loss.item())
        predictions.append(cfg.task_kind.train_predict(out))
    metrics = {"val_loss": round(float(np.mean(losses)), 5)}
    if not cfg.task_kind.labelled:
        scores = cfg.task_kind.train_scores(arrays, np.concatenate(predictions))
        metrics.update({f"val_{k}": round(v, 5) for k, v in scores.items()})
    elif cfg.task_kind.token_level:
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
