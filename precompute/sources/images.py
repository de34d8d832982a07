"""`images`: every image under a folder, recursively, with no annotations.

For feature extraction over an arbitrary collection (web crawl, a dataset whose annotations
live elsewhere). Prismer's label scripts globbed `*.jpg`/`*.JPEG` one folder deep and silently
skipped `.png`/`.jpeg`; here every `.jpg .jpeg .png .webp` at any depth counts, in any letter case. The folder walk
here (`folder_samples`) is also what `videos` and `audio` use.

The key is the path relative to the data root, without its extension, in posix form
(`birds/0001.JPG` -> `birds/0001`), so keys match across machines and operating systems. Two
files differing only in extension would share a key; that is refused rather than guessed.
Hidden entries (names starting with '.') are skipped: they are macOS resource forks (`._x.jpg`),
thumbnail caches and version-control folders, never dataset images. A name that is not valid
UTF-8 (Latin-1 names from old archives) is kept: its key has each such byte as %XX
(the bytes `caf\\xe9.jpg` -> `caf%E9`), and the file is read by its real name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from PIL import Image

from precompute.decode import MediaError
from precompute.sources.base import Sample, Source, SourceError, portable_name

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class ImagesSource(Source):
    name: ClassVar[str] = "images"
    description: ClassVar[str] = (
        "every .jpg/.jpeg/.png/.webp under DATA_ROOT, recursively; no annotations"
    )
    needs_data_root: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("all",)

    def samples(self) -> list[Sample]:
        return folder_samples(self.data_root, IMAGE_EXTENSIONS)

    def image_file(self, sample: Sample) -> Path:
        return Path(sample.media)

    def load_image(self, sample: Sample) -> Image.Image:
        with portable_reasons():
            return super().load_image(sample)

    def load_image_tensor(self, sample: Sample) -> torch.Tensor:
        with portable_reasons():
            return super().load_image_tensor(sample)


def folder_samples(root: Path, extensions: tuple[str, ...]) -> list[Sample]:
    """One sample per file under `root` with one of `extensions`, keyed by its relative path."""
    path_by_key: dict[str, Path] = {}
    for path in find_files(root, extensions):
        key = portable_name(path.relative_to(root).with_suffix("").as_posix())
        if key in path_by_key:
            raise SourceError(
                f"{portable_name(str(path_by_key[key]))} and {portable_name(str(path))} would share the sample key '{key}'; "
                "rename one of them"
            )
        path_by_key[key] = path
    if not path_by_key:
        raise SourceError(f"no {'/'.join(extensions)} files under {root}")
    return [Sample(key, str(path_by_key[key]), {}) for key in sorted(path_by_key)]


def find_files(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files under `root` ending in one of `extensions` (any case), skipping hidden entries."""
    found = []
    visited = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found.extend(
            Path(folder) / f
            for f in files
            if not f.startswith(".") and f.lower().endswith(extensions)
        )
    return found


@contextmanager
def portable_reasons() -> Iterator[None]:
    """A MediaError whose reason names a file whose name is not UTF-8 says it with %XX escapes:
    the reason is stored in the cache as text."""
    try:
        yield
    except MediaError as e:
        raise MediaError(portable_name(str(e))) from e.__cause__
