"""Ray Jobs entrypoint: ``python jobs/entrypoint.py CONFIG [--set key=value ...]`` runs ``bertpipe run``.

A job driver runs inside the cluster it was submitted to, so ``runtime.address`` defaults to ``auto``
(attach to that cluster) instead of the config's value, which is often ``null`` (start a local Ray).
An explicit ``--set runtime.address=...`` is kept as given.
"""

from __future__ import annotations

import sys

ADDRESS_KEY = "runtime.address"


def _set_keys(argv: list[str]) -> list[str]:
    """Keys named by ``--set key=value`` and ``--set=key=value`` options."""
    keys = []
    for i, arg in enumerate(argv):
        if arg == "--set" and i + 1 < len(argv):
            keys.append(argv[i + 1].partition("=")[0].strip())
        elif arg.startswith("--set="):
            keys.append(arg.removeprefix("--set=").partition("=")[0].strip())
    return keys


def build_argv(argv: list[str]) -> list[str]:
    """The ``bertpipe`` argv for this entrypoint's arguments: ``run`` plus the address default."""
    if ADDRESS_KEY in _set_keys(argv):
        return ["run", *argv]
    return ["run", *argv, "--set", f"{ADDRESS_KEY}=auto"]


def main() -> None:
    sys.argv = ["bertpipe", *build_argv(sys.argv[1:])]
    # Imported here so build_argv stays importable (and testable) without the CLI's dependencies.
    from bertpipe.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
