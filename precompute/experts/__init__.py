"""Registry of frozen experts, by the name `--expert` takes."""

from __future__ import annotations

from typing import Any

from precompute.experts.base import Expert, ExpertError
from precompute.experts.vit_cls import VitClsExpert

EXPERTS: dict[str, type[Expert]] = {cls.name: cls for cls in (VitClsExpert,)}


def get_expert(name: str, model: str | None = None, device: str = "cpu", **options: Any) -> Expert:
    if name not in EXPERTS:
        raise ExpertError(f"unknown expert {name!r}; registered: {', '.join(sorted(EXPERTS))}")
    return EXPERTS[name](model=model, device=device, **options)


__all__ = ["EXPERTS", "Expert", "ExpertError", "get_expert"]
