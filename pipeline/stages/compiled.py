"""Models compiled ahead of time (``runtime.compile``): ``torch.export`` with dynamic rows and tokens,
then AOTInductor, cached on disk as a package that later runs load in a fraction of a second.

Not ``torch.compile``: even with inductor's cache warm it traces the model again on every start
(TorchDynamo and AOTAutograd; the latter's cache is bypassed with freezing), 36-124 s for
all-MiniLM-L6-v2 on 2 cores (benchmarks/README.md, "The compiled model stage"); a package skips all
that. What a package holds depends on the weights, the task's outputs, the precision, the device and the
torch build, so all of them are in its key. A package is compiled once, under a file lock (actors of one
pool starting together share out the models), and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bertpipe.models.loading import cpu_flags

log = logging.getLogger(__name__)

# Bump when what is exported changes (the wrapper below, the head's precision), so old packages are not used.
PACKAGE_FORMAT = 1
EXAMPLE_SHAPE = (3, 17)  # rows x tokens traced: distinct sizes, neither 0 nor 1, which export specialises


def compiled_cache_dir() -> Path:
    """Under the user's cache, so that every later run on the machine finds the packages."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bertpipe" / "compiled"


class ModelForward(torch.nn.Module):
    """One forward pass as the model stage runs it: autocast to the actor's precision (the heads opt out
    themselves), then what the task's kind keeps of the output. This is the unit exported, so the
    compiled package returns one tensor."""

    def __init__(self, model: torch.nn.Module, outputs: Callable, device: str, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.device_type = device
        self.dtype = dtype

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        enabled = self.dtype != torch.float32
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=enabled):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:  # models without token types (DistilBERT) refuse the argument
                inputs["token_type_ids"] = token_type_ids
            out = self.model(**inputs)
            return self.outputs(out, attention_mask)


def package_key(identity: dict, device: str, dtype: torch.dtype, pairs: bool) -> str:
    """What the compiled code depends on: the model (``identity``: weights digest, kind, outputs), the
    inputs, the precision, the device and its instruction set, torch's build, and on a CPU the thread
    count, which inductor writes into the kernels' parallel loops."""
    if device == "cuda":
        hardware = torch.cuda.get_device_name()
    else:  # torch's capability names AVX512 alone; kernels for AMX would not run on a CPU without it
        vector_flags = {f for f in cpu_flags() if f.startswith(("avx", "amx"))}
        hardware = [torch.backends.cpu.get_cpu_capability(), *sorted(vector_flags)]
    parts = {
        "format": PACKAGE_FORMAT,
        "model": identity,
        "pairs": pairs,
        "dtype": str(dtype),
        "device": device,
        "hardware": hardware,
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if device == "cpu" else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def export_and_compile(forward: ModelForward, example: dict[str, torch.Tensor], max_tokens: int, path: Path):
    """``torch.export`` with rows and tokens dynamic, then AOTInductor with the weights frozen in."""
    rows = torch.export.Dim("rows", min=1)
    tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
    shapes = {name: {0: rows, 1: tokens} for name in example}
    with torch.inference_mode():
        program = torch.export.export(forward, (), example, dynamic_shapes=shapes)
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs={"freezing": True}
    )


def load_or_compile(
    forward: ModelForward, key: str, device: str, pairs: bool, max_tokens: int, wait: bool = True
) -> tuple[Callable, bool] | None:
    """The compiled model of ``key`` (a callable of the model's inputs) and whether it came from the
    cache. Compiles and stores it when missing; when another process is compiling it, waits for that
    one, or returns None with ``wait`` False (the caller has other models to take meanwhile)."""
    from filelock import FileLock, Timeout

    folder = compiled_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt2"
    cached = path.exists()  # a package appears whole (renamed into place), so no lock is needed to read it
    if not cached:
        try:
            with FileLock(str(path) + ".lock", timeout=-1 if wait else 0):
                cached = path.exists()
                if not cached:
                    _compile_package(forward, path, device, pairs, max_tokens)
        except Timeout:
            return None
    return torch._inductor.aoti_load_package(str(path)), cached


def _compile_package(forward: ModelForward, path: Path, device: str, pairs: bool, max_tokens: int) -> None:
    rows, tokens = EXAMPLE_SHAPE
    example = {
        "input_ids": torch.ones(rows, tokens, dtype=torch.long, device=device),
        "attention_mask": torch.ones(rows, tokens, dtype=torch.long, device=device),
    }
    if pairs:
        example["token_type_ids"] = torch.zeros(rows, tokens, dtype=torch.long, device=device)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    started = time.perf_counter()
    try:
        export_and_compile(forward, example, max_tokens, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # a failed compile leaves nothing for the next run
    log.info("compiled package %s in %.1f s", path.name, time.perf_counter() - started)
