"""Where things live inside a cache directory, and the cache.json manifest.

    CACHE/cache.json                               schema version, splits, feature specs
    CACHE/<source>/<split>/split.json              the shard plan: sample count, shard size, keys digest
    CACHE/<source>/<split>/samples.jsonl           keys in shard order + annotations
    CACHE/<source>/<split>/<feature>/              Zarr v3 group: one array per expert output + `valid`
    CACHE/<source>/<split>/_commits/<feature>/<shard>.json   commit record, written last
    CACHE/<source>/<split>/_failures/<feature>/<shard>.json  last error of a shard that gave up
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class CacheError(Exception):
    """The cache is missing, malformed, or does not hold what was asked for."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`.

    A reader sees either the old file or the complete new one, never a torn write; this is what
    makes a commit record trustworthy after a kill at any instant.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from e


class CacheLayout:
    """Paths of one cache and its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "cache.json"

    def split_dir(self, source: str, split: str) -> Path:
        return self.root / source / split

    def feature_dir(self, source: str, split: str, feature: str) -> Path:
        return self.split_dir(source, split) / feature

    def commit_path(self, source: str, split: str, feature: str, shard: int) -> Path:
        return self.split_dir(source, split) / "_commits" / feature / f"{shard:05d}.json"

    def failure_path(self, source: str, split: str, feature: str, shard: int) -> Path:
        return self.split_dir(source, split) / "_failures" / feature / f"{shard:05d}.json"

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"schema_version": SCHEMA_VERSION, "splits": {}, "features": {}}
        manifest = read_json(self.manifest_path)
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CacheError(
                f"{self.manifest_path}: schema version {version}, this code reads {SCHEMA_VERSION}"
            )
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest)

    def require_exists(self) -> None:
        if not self.manifest_path.exists():
            raise CacheError(f"{self.root}: not a feature cache (no cache.json)")
