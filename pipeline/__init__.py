"""bertpipe: batch text classification, sentiment and NER with BERT-family models on Ray Data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bertpipe")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
