"""Where things live inside a cache directory, and the cache.json manifest.

    CACHE/cache.json                               schema version, splits, feature specs
    CACHE/<source>/<split>/split.json              the shard plan: sample count, shard size, keys digest
    CACHE/<source>/<split>/samples.jsonl           keys in shard order + annotations
    CACHE/<source>/<split>/<feature>/              Zarr v3 group: one array per expert output + `valid`
    CACHE/<source>/<split>/_commits/<feature>/<shard>.json   commit record, written last
    CACHE/<source>/<split>/_failures/<feature>/<shard>.json  last error of a shard that gave up

CACHE is a local directory or an fsspec URL (`s3://bucket/cache` with s3fs installed, `gs://`,
`file://`, `memory://`): paths are `UPath`s, so the same code writes and reads both. What a local
rename makes atomic (commit records, tables, tar shards), an object store gets from a single PUT:
an object is either whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zarr
from upath import UPath
from zarr.storage import FsspecStore

SCHEMA_VERSION = 1


class CacheError(Exception):
    """The cache is missing, malformed, or does not hold what was asked for."""


def cache_path(location: str | Path) -> Path:
    """A cache location as a path: local ones absolute (a plain `Path`), URLs as `UPath`s.

    `file://` URLs stay URLs, so they go through fsspec exactly as `s3://` would.
    """
    if isinstance(location, UPath) or "://" in str(location):
        try:
            path = UPath(location)
            if path.protocol == "file":
                path = UPath(str(location), auto_mkdir=True)
            _ = path.fs  # the filesystem's package (s3fs, gcsfs) is needed now, not halfway through a run
        except (ImportError, ValueError) as e:
            raise CacheError(f"cache {location}: {e}") from e
        return path
    return Path(location).expanduser().absolute()


def is_local(path: Path) -> bool:
    return not isinstance(path, UPath) or not path.protocol


def remove_tree(path: Path) -> None:
    """Delete a directory (or prefix, on object stores) and everything under it, if it is there."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def publish(tmp: Path, target: Path) -> None:
    """Move a finished temporary file or directory into place (atomic where the storage allows)."""
    if is_local(tmp):
        os.replace(tmp, target)
    else:
        tmp.fs.mv(tmp.path, target.path, recursive=True)


def open_group(path: Path, mode: str) -> zarr.Group:
    """The Zarr group at `path`, local or through fsspec (with the URL's storage options)."""
    if is_local(path):
        return zarr.open_group(str(path), mode=mode)
    store = FsspecStore.from_url(str(path), storage_options=dict(path.storage_options), read_only=mode == "r")
    return zarr.open_group(store, mode=mode)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (`os.umask` can only be
    read by setting it, which races with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`.

    A reader sees either the old file or the complete new one, never a torn write; this is what
    makes a commit record trustworthy after a kill at any instant. On object stores one PUT of
    the whole object gives the same guarantee. The file gets the mode any other file would
    (0666 less the umask), not mkstemp's 0600: a cache shared on a cluster must stay readable
    to the users the umask lets in.
    """
    if not is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, sort_keys=True))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` (a full disk, a file size limit, a read-only or
    vanished directory) into a CacheError naming the path, so the command line reports one line."""
    try:
        yield
    except OSError as e:
        raise CacheError(f"{path}: cannot write: {e.strerror or e}") from e


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
        self.root = cache_path(root)

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
        if is_local(self.root) and self.root.exists() and not self.root.is_dir():
            raise CacheError(f"{self.root}: not a feature cache (a file, not a directory)")
        if not self.manifest_path.exists():
            raise CacheError(f"{self.root}: not a feature cache (no cache.json)")

    def require_writable(self) -> None:
        """Refuse, before any work, a local location that cannot hold a cache: a file, or a place
        this process may not write (a read-only mount, a directory without write permission).

        Object stores are not probed: their permissions show at the first write.
        """
        if not is_local(self.root):
            return
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            what = "is a file" if existing == self.root else f"is under {existing}, a file"
            raise CacheError(f"cache {self.root} {what}, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            where = "" if existing == self.root else f" (cannot create it in {existing})"
            raise CacheError(f"cache {self.root}: not writable{where}")
