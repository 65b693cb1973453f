"""bertpipe: batch text classification, sentiment and NER with BERT-family models on Ray Data.

``label`` labels a DataFrame, an Arrow table or a Ray Dataset in memory; ``run`` runs a job (the
same as ``bertpipe run``). See the README's "From Python" section.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bertpipe")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

from bertpipe.api import label, run  # noqa: E402 - after __version__, which the runner reads
from bertpipe.config import (  # noqa: E402
    ConfigError,
    InputConfig,
    JobConfig,
    OutputConfig,
    RuntimeConfig,
    load_config,
)
from bertpipe.summary import RunSummary  # noqa: E402

__all__ = [
    "ConfigError",
    "InputConfig",
    "JobConfig",
    "OutputConfig",
    "RunSummary",
    "RuntimeConfig",
    "__version__",
    "label",
    "load_config",
    "run",
]
