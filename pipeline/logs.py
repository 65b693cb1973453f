"""Logging inside Ray workers: Ray forwards worker stderr to the driver, so INFO lines must reach it."""

import logging
import sys


def configure_worker_logging() -> None:
    logger = logging.getLogger("bertpipe")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)
