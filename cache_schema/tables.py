"""Class-name embedding tables: one row per class id of a label vocabulary.

Prismer feeds segmentation, detection and OCR labels to its model as 64-d vectors per pixel: each
class name is embedded once by a text encoder and projected to 64 dims by PCA. Computing that is
the precompute stage's job (it needs the text encoder); the trainer then needs nothing but the
cache. A table lives at `CACHE/_tables/<name>/` as a Zarr group:

    embeddings   float16 [num_classes, dim]   row i = class id i
    pca_mean     float32 [encoder_width]      the projection, so new words (OCR) land in the
    pca_components float32 [dim, encoder_width]   same space as the class names
    attrs        names, provenance (text encoder id + revision, basis vocabulary digest, dim)

It is written under a temporary name and renamed into place, so it is either whole or absent.
A table with the same name and different provenance is refused unless overwriting.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache_schema.layout import CacheError, CacheLayout, open_group, publish, remove_tree
from cache_schema.spec import config_hash

TABLES_DIR = "_tables"


@dataclass
class ClassTable:
    names: list[str]
    embeddings: np.ndarray  # float16 [len(names), dim]
    pca_mean: np.ndarray
    pca_components: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Identity of the table: what made it and what it holds."""
        return config_hash({"names": self.names, "provenance": self.provenance})


def table_dir(root: str | Path, name: str) -> Path:
    return CacheLayout(root).root / TABLES_DIR / name


def write_table(root: str | Path, name: str, table: ClassTable, overwrite: bool = False) -> None:
    """Store `table` unless an identical one is there; a different one needs `overwrite`."""
    target = table_dir(root, name)
    if target.exists():
        existing = read_table(root, name)
        if existing.digest == table.digest:
            return
        if not overwrite:
            raise CacheError(
                f"{target}: holds a different class table (made by {existing.provenance.get('text_encoder')}, "
                f"{len(existing.names)} classes) than this run ({table.provenance.get('text_encoder')}, "
                f"{len(table.names)} classes); pass --overwrite to replace it"
            )
    tmp = target.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
    group = open_group(tmp, mode="w")
    for array_name in ("embeddings", "pca_mean", "pca_components"):
        data = getattr(table, array_name)
        group.create_array(array_name, shape=data.shape, dtype=data.dtype, fill_value=0)[...] = data
    group.attrs.update({"names": table.names, "provenance": table.provenance, "digest": table.digest})
    if target.exists():
        remove_tree(target)
    publish(tmp, target)


def read_table(root: str | Path, name: str) -> ClassTable:
    path = table_dir(root, name)
    if not path.exists():
        raise CacheError(f"{CacheLayout(root).root}: no class table {name!r} (run the expert that makes it first)")
    group = open_group(path, mode="r")
    return ClassTable(
        names=list(group.attrs["names"]),
        embeddings=group["embeddings"][:],
        pca_mean=group["pca_mean"][:],
        pca_components=group["pca_components"][:],
        provenance=dict(group.attrs["provenance"]),
    )
