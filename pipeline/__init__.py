"""bertpipe: batch text classification, sentiment and NER with BERT-family models on Ray Data."""

__version__ = "0.1.0"
