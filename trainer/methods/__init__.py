"""Training methods by the name `trainer fit --method` takes (import paths: cheap to list)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trainer.methods.errors import MethodError

if TYPE_CHECKING:  # torch: only when a method is built, not for `trainer --help`
    from trainer.config import TrainConfig
    from trainer.methods.base import Method

METHODS: dict[str, str] = {
    "epalm": "trainer.methods.epalm_task:EPALMMethod",
    "prismer": "trainer.methods.prismer_task:PrismerMethod",
    "mope": "trainer.methods.mope_task:MoPEMethod",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    module, _, attribute = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_method(config: TrainConfig) -> Method:
    return method_class(config.method)(config)


__all__ = ["METHODS", "MethodError", "get_method", "method_class"]
