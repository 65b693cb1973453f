"""Model stage (one actor = every task's model, loaded once): token ids in, logits out.

Rows are sorted by length and cut into batches by a token budget, each padded only to its own longest
sequence, then results are put back in order. HF pipelines and Ray's examples batch a fixed number of
rows padded to the longest, so on mixed lengths most of the compute goes to padding; no library does
this budgeted batching for us, hence it lives here.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import logging
import os
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
from transformers.utils.logging import disable_progress_bar

from bertpipe import columns as C
from bertpipe.config import RuntimeConfig
from bertpipe.logs import configure_worker_logging
from bertpipe.models.loading import load_model, resolve_device, resolve_dtype
from bertpipe.plan import ModelTask
from bertpipe.stages.compiled import ModelForward, compiled_cache_dir, load_or_compile, package_key
from bertpipe.tasks import kind_of

log = logging.getLogger(__name__)

LOGITS = pa.list_(pa.list_(pa.float32()))


def plan_batches(lengths: np.ndarray, max_tokens: int, max_rows: int, descending: bool) -> list[np.ndarray]:
    """Indices of each batch: sorted by length, a batch's rows x its longest row stays within budget.

    A single sequence longer than the budget still forms a batch of its own.
    """
    order = np.argsort(-lengths if descending else lengths, kind="stable")
    batches, current, longest = [], [], 0
    for idx in order:
        length = int(lengths[idx])
        width = max(longest, length)
        if current and (width * (len(current) + 1) > max_tokens or len(current) >= max_rows):
            batches.append(np.asarray(current))
            current, width = [], length
        current.append(idx)
        longest = width
    if current:
        batches.append(np.asarray(current))
    return batches


def _ragged_windows(column: pa.ListArray, first_only: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """The sequences to run and, per row, how many of them belong to it."""
    windows_per_row = np.diff(column.offsets.to_numpy())
    if first_only:
        windows_per_row = np.minimum(windows_per_row, 1)
    windows = column.flatten()
    starts = windows.offsets.to_numpy()
    flat = windows.flatten().to_numpy(zero_copy_only=False)
    row_first = column.offsets.to_numpy()[:-1]
    chosen = [w for r, n in enumerate(windows_per_row) for w in range(row_first[r], row_first[r] + n)]
    return [flat[starts[w] : starts[w + 1]] for w in chosen], windows_per_row


class FullPrecisionHead(torch.nn.Module):
    """Runs a classification head outside autocast, so labels that nearly tie are decided in fp32
    (measured: about a fifth fewer NER token flips against fp32, at a negligible cost)."""

    def __init__(self, head: torch.nn.Module, device: str):
        super().__init__()
        self.head = head
        self.device = device

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device, enabled=False):
            return self.head(hidden.float())


def store_linear_weights(model: torch.nn.Module, dtype: torch.dtype, head_module: str | None) -> None:
    """Keep the encoder's Linear weights in the autocast dtype, leaving embeddings, LayerNorm and the
    head in fp32. Autocast would cast the same weights the same way on every call (342 copies per
    forward of MiniLM, seen in the profiler), so the numbers are identical and the copies are saved."""
    head = getattr(model, head_module, None) if head_module else None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(dtype)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the heap pages freed by a block back to the OS.

    Activations of different shapes leave glibc's heap fragmented, and it keeps what was freed: a model
    actor grew from 1.5 to 2.2 GB RSS over three 512-row blocks of the benchmark corpus, against 0.84 to
    0.92 GB with a trim after each block, at no measurable cost. Trimming after every batch would also
    flatten the peak inside a block (1.26 GB instead of 1.8-2.2) but costs about 4% of the model time,
    paid by every run; a block is the unit Ray hands the actor, so that is where it trims.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def default_threads(runtime: RuntimeConfig) -> int:
    """Torch threads of a model actor: the machine's cores shared by the pool's actors.

    Ray counts one logical CPU per actor so that the reader, tokeniser and writer can be scheduled, but
    those stages mostly wait; a model actor limited to one thread would leave the other cores idle.
    """
    pool = runtime.actors if isinstance(runtime.actors, int) else runtime.actors[1]
    return max(1, (os.cpu_count() or 1) // pool)


GPU_BUDGET_SHARE = 0.25  # of the free memory, for one batch's activations; the rest is headroom
GPU_MAX_TOKENS = 1 << 20


def gpu_token_budget(free_bytes: int, configs: list, max_length: int, dtype_bytes: int) -> int:
    """Tokens per batch on a GPU, from its free memory: 8,192 (the CPU default) leaves an H200 mostly idle.

    Inference keeps one layer's activations alive at a time. Per token that is the attention scores
    (heads x the window, when the kernel materialises them), the feed-forward's intermediate and a few
    hidden-sized tensors, each counted twice for temporaries; the largest model decides. An estimate,
    not a measurement: a batch that still runs out of memory is split in halves and the budget lowered
    (``_run_batch``). Rounded down to a multiple of 1,024, between 8,192 and 1,048,576."""
    per_token = max(
        (c.num_attention_heads * max_length + c.intermediate_size + 8 * c.hidden_size) * dtype_bytes * 2
        for c in configs
    )
    tokens = int(free_bytes * GPU_BUDGET_SHARE) // per_token // 1024 * 1024
    return min(max(tokens, 8192), GPU_MAX_TOKENS)


WARM_UP_SHAPES = ((2, 16), (1, 24))  # rows x tokens: any batch shape, then a batch of one row


class InferStage:
    """``__call__(table) -> table``: adds ``__logits_{task}`` for every task.

    ``worker_resources`` tells what the scheduler gave this worker (logged, so GPU requests can be
    checked on any machine); the engine passes Ray's, a direct call passes nothing. ``compiled``: the
    driver's decision for ``runtime.compile: auto`` (None: compile only when it is ``on``)."""

    def __init__(
        self,
        model_tasks: list[ModelTask],
        runtime: RuntimeConfig,
        device: str,
        worker_resources: Callable[[], dict] | None = None,
        compiled: bool | None = None,
    ):
        configure_worker_logging()
        disable_progress_bar()  # a bar per weight file in every actor's log says nothing to the user
        threads = runtime.threads_per_actor or default_threads(runtime)
        torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(runtime.dtype, self.device)
        self.quantized = runtime.quantize == "int8" and self.device == "cpu"
        self.max_tokens = runtime.max_tokens_per_batch
        self.max_rows = runtime.max_rows_per_batch
        self.check_rows = runtime.precision_check_rows
        self.model_tasks = model_tasks
        self.models = {}
        self.reference_models = {}  # fp32 copies kept only until the precision check has run
        for mt in model_tasks:
            model = load_model(mt.task, mt.info.source).to(self.device)
            reduced = self.quantized or self.dtype != torch.float32
            if reduced and self.check_rows:
                self.reference_models[mt.task.name] = model if self.quantized else copy.deepcopy(model)
            head = kind_of(mt.task).head_module
            if reduced and not self.quantized:
                store_linear_weights(model, self.dtype, head)
                if head and hasattr(model, head):
                    setattr(model, head, FullPrecisionHead(getattr(model, head), self.device))
            if self.quantized:
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            self.models[mt.task.name] = model
        self.tasks = {mt.task.name: mt for mt in model_tasks}
        if self.device == "cuda":
            self._size_gpu_batches(runtime)
        self.pad_ids = {mt.task.name: self._pad_id(mt) for mt in model_tasks}
        self.unchecked = {mt.task.name for mt in model_tasks} if self.check_rows else set()
        self.compiled = {}  # name -> compiled forward; the eager models stay, the fallback of a failure
        if (runtime.compile == "on" if compiled is None else compiled) and not self.quantized:
            self._compile()
        log.info(
            "model actor pid=%s device=%s dtype=%s int8=%s compiled=%s threads=%s omp_wait=%s resources=%s",
            os.getpid(),
            self.device,
            self.dtype,
            self.quantized,
            bool(self.compiled),
            threads,
            os.environ.get("OMP_WAIT_POLICY", "default"),
            worker_resources() if worker_resources else {},
        )

    def _size_gpu_batches(self, runtime: RuntimeConfig) -> None:
        """The budgets the user left at their defaults, scaled to the GPU's free memory (the rows cap
        lets a batch of 64-token rows fill the token budget)."""
        free, _ = torch.cuda.mem_get_info()
        dtype_bytes = torch.finfo(self.dtype).bits // 8
        configs = [m.config for m in self.models.values()]
        if "max_tokens_per_batch" not in runtime.model_fields_set:
            self.max_tokens = gpu_token_budget(free, configs, runtime.max_length, dtype_bytes)
        if "max_rows_per_batch" not in runtime.model_fields_set:
            self.max_rows = max(self.max_rows, self.max_tokens // 64)
        tokens, rows, gib = self.max_tokens, self.max_rows, free / 2**30
        log.info("GPU batches: up to %d tokens and %d rows (%.1f GiB free)", tokens, rows, gib)

    def _compile(self) -> None:
        """Load every model's compiled package (compiling the missing ones) and run it on a few shapes, so
        that a broken package shows before the first block; any failure leaves every model eager, with
        one warning. Actors of a pool starting together take the models in turn: each compiles what no
        other is compiling, and waits only when every model left is being compiled elsewhere."""
        started, cached = time.perf_counter(), 0
        try:
            pending = {name: self._package(name) for name in self.models}
            while pending:
                ready = {n: got for n, args in pending.items() if (got := load_or_compile(*args, wait=False))}
                if not ready:  # all left are being compiled by other actors: wait for the first
                    name = next(iter(pending))
                    ready = {name: load_or_compile(*pending[name])}
                for name, (forward, hit) in ready.items():
                    self.compiled[name], cached = forward, cached + hit
                    del pending[name]
            for name in self.models:
                task = self.tasks[name].task
                pairs = kind_of(task).own_tokens(task)
                for rows, tokens in WARM_UP_SHAPES:
                    seqs = [np.full(tokens, self.pad_ids[name] + 1, dtype=np.int64)] * rows
                    pair = [np.zeros(tokens, dtype=np.int64)] * rows if pairs else None
                    self._forward_task(name, seqs, pair)
        except Exception as exc:  # any compiler error: the eager models still work
            self._fall_back(exc)
            return
        log.info(
            "compiled %d model(s) in %.1f s (%d from the cache in %s)",
            len(self.models),
            time.perf_counter() - started,
            cached,
            compiled_cache_dir(),
        )

    def _package(self, name: str) -> tuple:
        """``load_or_compile``'s arguments for a model: its forward pass and the package's key."""
        model, mt = self.models[name], self.tasks[name]
        pairs = kind_of(mt.task).own_tokens(mt.task)  # pair inputs come with token type ids
        identity = {
            "weights": mt.info.weights_sha256,
            "config": model.config.to_diff_dict(),
            "kind": mt.task.kind,
            "details": mt.info.details,
        }
        key = package_key(identity, self.device, self.dtype, pairs)
        forward = ModelForward(model, self._outputs(name), self.device, self.dtype)
        longest = getattr(model.config, "max_position_embeddings", None) or 512
        return forward, key, self.device, pairs, longest

    def _fall_back(self, exc: Exception) -> None:
        log.warning(
            "compiling the models failed (%s: %s); running them eager",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        self.compiled = {}

    def _pad_id(self, mt: ModelTask) -> int:
        pad = getattr(self.models[mt.task.name].config, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _autocast(self):
        if self.quantized or self.dtype == torch.float32:
            return torch.autocast(self.device, enabled=False)
        return torch.autocast(self.device, dtype=self.dtype)

    def _forward(
        self,
        model,
        pad_id: int,
        seqs: list[np.ndarray],
        exact: bool = False,
        types: list[np.ndarray] | None = None,
        outputs: Callable | None = None,
        compiled: bool = False,
    ) -> list[np.ndarray]:
        """What is kept of the model's output per sequence, padding removed: (labels,) or (tokens,
        labels). ``exact`` forces fp32; ``types`` are the token type ids of pair inputs; ``outputs(out,
        attention_mask)`` is the task kind's ``model_outputs`` (default: the logits); a ``compiled``
        model runs its own autocast and returns what is kept (``stages/compiled.py``)."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        type_ids = np.zeros((len(seqs), width), dtype=np.int64) if types is not None else None
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
            if type_ids is not None:
                type_ids[i, : len(s)] = types[i]
        inputs = {
            "input_ids": torch.from_numpy(ids).to(self.device, non_blocking=True),
            "attention_mask": torch.from_numpy(mask).to(self.device, non_blocking=True),
        }
        if type_ids is not None:
            inputs["token_type_ids"] = torch.from_numpy(type_ids).to(self.device, non_blocking=True)
        precision = torch.autocast(self.device, enabled=False) if exact else self._autocast()
        with torch.inference_mode():
            if compiled:
                kept = model(**inputs)
            else:
                with precision:
                    out = model(**inputs)
                    kept = outputs(out, inputs["attention_mask"]) if outputs else out.logits
        logits = kept.float().cpu().numpy()
        return [logits[i] if logits.ndim == 2 else logits[i, : len(s)] for i, s in enumerate(seqs)]

    def _outputs(self, name: str) -> Callable:
        mt = self.tasks[name]
        return functools.partial(kind_of(mt.task).model_outputs, mt.task, mt.info)

    def _run_batch(
        self, name: str, seqs: list[np.ndarray], types: list[np.ndarray] | None
    ) -> list[np.ndarray]:
        """Forward one batch; on a GPU out-of-memory split it in half and lower the budget that worked. A
        compiled model that fails on a new shape is replaced by the eager ones, and the batch rerun."""
        try:
            return self._guarded(lambda: self._forward_task(name, seqs, types))
        except torch.cuda.OutOfMemoryError:
            if len(seqs) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(seqs) // 2
            self.max_tokens = max(64, (max(len(s) for s in seqs) * len(seqs)) // 2)
            log.warning("CUDA out of memory; retrying in halves, token budget now %d", self.max_tokens)
            first, second = (types[:half], types[half:]) if types is not None else (None, None)
            return self._run_batch(name, seqs[:half], first) + self._run_batch(name, seqs[half:], second)

    def _forward_task(self, name: str, seqs: list[np.ndarray], types: list[np.ndarray] | None):
        if name in self.compiled:
            return self._forward(self.compiled[name], self.pad_ids[name], seqs, types=types, compiled=True)
        return self._forward(
            self.models[name], self.pad_ids[name], seqs, types=types, outputs=self._outputs(name)
        )

    def _guarded(self, call: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
        """``call()``; if a compiled model fails (a shape the compiler cannot handle), the eager models
        take over and ``call`` runs again. Out-of-memory errors are the caller's."""
        try:
            return call()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            if not self.compiled:
                raise
            self._fall_back(exc)
            return call()

    def run_sequences(
        self, name: str, seqs: list[np.ndarray], types: list[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        results: list[np.ndarray | None] = [None] * len(seqs)
        for batch in plan_batches(lengths, self.max_tokens, self.max_rows, descending=self.device == "cuda"):
            batch_types = [types[i] for i in batch] if types is not None else None
            outputs = self._run_batch(name, [seqs[i] for i in batch], batch_types)
            for idx, logits in zip(batch, outputs, strict=True):
                results[idx] = logits
        return results

    def _check_precision(self, name: str, seqs: list[np.ndarray], types: list[np.ndarray] | None) -> None:
        """Once per model: compare the chosen precision's predictions with fp32 on a few sequences
        (argmax labels, or what the task's kind compares)."""
        self.unchecked.discard(name)
        reference = self.reference_models.pop(name, self.models[name])
        sample = seqs[: self.check_rows]
        sample_types = types[: self.check_rows] if types is not None else None
        if not sample or (not self.quantized and self.dtype == torch.float32):
            return
        kind, task = kind_of(self.tasks[name].task), self.tasks[name].task
        pad, outputs = self.pad_ids[name], self._outputs(name)
        fast = self._guarded(lambda: self._forward_task(name, sample, sample_types))
        exact = self._forward(reference, pad, sample, True, sample_types, outputs)
        disagree = kind.disagreement(task, fast, exact)
        precision = "int8" if self.quantized else str(self.dtype).replace("torch.", "")
        if disagree:
            log.warning(
                "task %s: %s %s differ from fp32 on %.1f%% of predictions in a %d-sequence sample",
                name,
                precision,
                kind.compared,
                100 * disagree,
                len(sample),
            )
        else:
            log.info(
                "task %s: %s %s equal fp32 on a %d-sequence sample",
                name,
                precision,
                kind.compared,
                len(sample),
            )

    def __call__(self, table: pa.Table) -> pa.Table:
        for mt in self.model_tasks:
            name = mt.task.name
            seqs, windows_per_row = _ragged_windows(
                table.column(C.token_ids(mt.group)).combine_chunks(), mt.first_window_only
            )
            types = None
            if C.token_types(mt.group) in table.column_names:
                types, _ = _ragged_windows(
                    table.column(C.token_types(mt.group)).combine_chunks(), mt.first_window_only
                )
            if name in self.unchecked and seqs:
                self._check_precision(name, seqs, types)
            results = self.run_sequences(name, seqs, types) if seqs else []
            flat = [r.reshape(-1).astype(np.float32) for r in results]
            inner_offsets = np.concatenate([[0], np.cumsum([len(f) for f in flat])]).astype(np.int32)
            inner = pa.ListArray.from_arrays(
                pa.array(inner_offsets), pa.array(np.concatenate(flat) if flat else np.zeros(0, np.float32))
            )
            outer = np.concatenate([[0], np.cumsum(windows_per_row)]).astype(np.int32)
            table = table.append_column(C.logits(name), pa.ListArray.from_arrays(pa.array(outer), inner))
        release_freed_memory()
        return table
