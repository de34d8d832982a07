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


def get_method(config: TrainConfig) -> Method:
    if config.method not in METHODS:
        raise MethodError(f"unknown method {config.method!r}; registered: {', '.join(sorted(METHODS))}")
    module, _, attribute = METHODS[config.method].partition(":")
    return getattr(importlib.import_module(module), attribute)(config)


__all__ = ["METHODS", "MethodError", "get_method"]
