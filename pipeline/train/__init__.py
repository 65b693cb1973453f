"""``bertpipe finetune``: fine-tune BERT-family classifiers, sentiment models and NER taggers on Ray Train."""

from bertpipe.train.config import FinetuneConfig, load_finetune_config
from bertpipe.train.trainer import run_finetune

__all__ = ["FinetuneConfig", "load_finetune_config", "run_finetune"]
