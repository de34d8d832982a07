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
    "timesformer-cls": "precompute.experts.video_audio:TimesformerClsExpert",
    "ast-cls": "precompute.experts.video_audio:AstClsExpert",
    "vit-avg-cls": "precompute.experts.video_audio:VitAvgClsExpert",
    "rgb": "precompute.experts.rgb:RgbExpert",
    "depth": "precompute.experts.depth:DepthExpert",
    "normal": "precompute.experts.normal:NormalExpert",
    "edge": "precompute.experts.edge:EdgeExpert",
    "seg-coco": "precompute.experts.seg:SegCocoExpert",
    "seg-ade": "precompute.experts.seg:SegAdeExpert",
    "objdet": "precompute.experts.objdet:ObjDetExpert",
    "ocrdet": "precompute.experts.ocrdet:OcrDetExpert",
    "text-cls": "precompute.experts.text:TextClsExpert",
    "text-tokens": "precompute.experts.text:TextTokensExpert",
    "image-pooled": "precompute.experts.image_pooled:ImagePooledExpert",
}


# Names that stand for several experts, in the order they run.
ALIASES: dict[str, tuple[str, ...]] = {
    "prismer": ("rgb", "depth", "normal", "edge", "seg-coco", "objdet", "ocrdet"),
}


def expand_experts(names: list[str]) -> list[str]:
    """Expert names with aliases expanded and repeats dropped; unknown names are refused."""
    expanded: list[str] = []
    for name in names:
        for member in ALIASES.get(name, (name,)):
            expert_class(member)
            if member not in expanded:
                expanded.append(member)
    return expanded


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option_value(expert: str, key: str, value: Any) -> Any:
    """`value` as the type of `expert`'s declared default for option `key`: the one place option
    types are checked. Command-line values arrive as the text typed (`levels=6`); Python callers
    may pass the typed value. A value of another type is refused naming the option, never cast
    (`int('abc')` would be a traceback, `bool('false')` is True)."""
    options = expert_class(expert).options
    if key not in options:
        raise ExpertError(f"expert {expert!r} has no option {key!r}; it takes {', '.join(sorted(options)) or 'none'}")
    default = options[key]
    kind = type(default)
    text = value.strip() if isinstance(value, str) else None
    try:
        if kind is str:
            if value is None or isinstance(value, (str, int, float)):
                return "" if value is None else str(value)
        elif kind is bool:
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in TRUE + FALSE:
                return text.lower() in TRUE
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if text is not None:
                return int(text)
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if text is not None:
                return float(text)
        else:
            return value
    except ValueError:
        pass
    raise ExpertError(f"expert {expert!r} option {key!r} takes {TYPE_NAMES.get(kind, kind.__name__)} "
                      f"(default {default!r}), got {value!r}")


def scope_options(options: dict[str, Any], experts: list[str]) -> dict[str, dict[str, Any]]:
    """Per-expert options from `KEY=VALUE` (every expert that takes KEY) and `EXPERT.KEY=VALUE`,
    each checked against the type of that expert's default (`option_value`).

    An unscoped option no requested expert takes is an error, so a typo never passes silently.
    """
    scoped: dict[str, dict[str, Any]] = {name: {} for name in experts}
    for key, value in options.items():
        target, dot, option = key.rpartition(".")
        if dot:
            if target not in scoped:
                raise ExpertError(f"option {key!r} names expert {target!r}, which this run does not include ({', '.join(experts)})")
            scoped[target][option] = option_value(target, option, value)
            continue
        takers = [name for name in experts if key in expert_class(name).options]
        if not takers:
            raise ExpertError(f"no expert in this run ({', '.join(experts)}) takes option {key!r}")
        for name in takers:
            if key not in scoped[name]:
                scoped[name][key] = option_value(name, key, value)
    return scoped


def expert_class(name: str) -> type[Expert]:
    if name not in EXPERTS:
        raise ExpertError(f"unknown expert {name!r}; registered: {', '.join(sorted(EXPERTS))} (and {', '.join(ALIASES)})")
    module, _, attribute = EXPERTS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_expert(name: str, model: str | None = None, device: str = "cpu", **options: Any) -> Expert:
    return expert_class(name)(model=model, device=device, **options)


__all__ = ["ALIASES", "EXPERTS", "ExpertError", "expand_experts", "expert_class", "get_expert", "option_value", "scope_options"]
