"""Task kinds as plug-ins: the registry that maps ``kind:`` to the module declaring it.

Each kind is one module here with a config class and a ``KIND`` object (see ``base.py``). Add a kind by
writing its module, listing it in ``_MODULES`` and adding its oracle tests; nothing else branches on
the kind.
"""

from __future__ import annotations

from importlib import import_module
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from bertpipe.tasks.base import Kind, TaskBase

_MODULES = ("classification", "sentiment", "ner", "embedding", "zero_shot", "qa")

KINDS: dict[str, Kind] = {}
for _module in _MODULES:
    _kind = import_module(f"bertpipe.tasks.{_module}").KIND
    KINDS[_kind.name] = _kind

# One config type for a task of any kind: pydantic picks the class by its ``kind`` key.
TaskConfig = Annotated[Union[tuple(k.config for k in KINDS.values())], Field(discriminator="kind")]  # noqa: UP007
_ADAPTER = TypeAdapter(TaskConfig)


def kind_of(task: TaskBase) -> Kind:
    return KINDS[task.kind]


def parse_task(fields: dict[str, Any] | TaskBase) -> TaskBase:
    """A task config from a dict with the YAML's keys (or a task config, returned as it is)."""
    return fields if isinstance(fields, TaskBase) else _ADAPTER.validate_python(fields)


__all__ = ["KINDS", "Kind", "TaskBase", "TaskConfig", "kind_of", "parse_task"]
