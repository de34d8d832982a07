"""Registry of frozen experts, by the name `--expert` takes.

Entries are import paths, so listing experts or asking for `--help` does not pay for importing
every model library (timm alone takes seconds).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from precompute.experts.base import Expert


class ExpertError(Exception):
    """Bad expert name, option or model reference."""


EXPERTS: dict[str, str] = {
    "vit-cls": "precompute.experts.vit_cls:VitClsExpert",
}


def expert_class(name: str) -> type[Expert]:
    if name not in EXPERTS:
        raise ExpertError(f"unknown expert {name!r}; registered: {', '.join(sorted(EXPERTS))}")
    module, _, attribute = EXPERTS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_expert(name: str, model: str | None = None, device: str = "cpu", **options: Any) -> Expert:
    return expert_class(name)(model=model, device=device, **options)


__all__ = ["EXPERTS", "ExpertError", "expert_class", "get_expert"]
