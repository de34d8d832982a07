"""What a source is: a dataset on disk, in its published layout, seen as a list of samples.

A source does two cheap things and one expensive one. Planning (`samples()`) reads only the
annotation files and returns `Sample`s: small, picklable records that the engine can shard and
ship to Ray actors. Decoding (`load_image()`, or `load_image_tensor()` for experts that take
uint8 tensors) happens later, inside the actor, one sample at a
time, so that a broken image becomes a recorded gap (`MediaError`) rather than a failed run.
A wrong data root, split or annotation file is a user error and fails planning (`SourceError`).
"""

from __future__ import annotations

import inspect
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from precompute import decode
from precompute.decode import MediaError

if TYPE_CHECKING:
    import torch


class SourceError(Exception):
    """Bad data root / malformed annotation file / unknown split: message names the path."""


@dataclass(frozen=True)
class Sample:
    """A planned sample: cheap and picklable (sent to Ray actors), no decoded pixels."""

    key: str  # unique within source+split, stable across runs
    media: str  # absolute file path; `shapes`: what the world re-renders ("train/17"); `wds`: "TAR_URL#OFFSET+SIZE"
    annotations: dict  # JSON-serialisable text side: captions / questions+answers / labels


class Source(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    needs_data_root: ClassVar[bool]
    splits: ClassVar[tuple[str, ...]]
    # Whether the data root may be an fsspec URL (s3://…, memory://…). Such a source gets the URL
    # as a string, unchecked, and checks it itself: only it knows how to reach that storage.
    accepts_urls: ClassVar[bool] = False

    def __init__(self, data_root: Path | str | None, split: str, **options: Any):
        """Check the root and split up front, so a typo fails before any work is scheduled.

        Subclasses take their options as keyword-only parameters and pass the rest here; whatever
        reaches this point is an option nobody understood.
        """
        if options:
            known = sorted(
                p.name
                for p in inspect.signature(type(self).__init__).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY
            )
            raise SourceError(
                f"source '{self.name}' has no option(s) {', '.join(sorted(options))}; "
                f"known options: {', '.join(known) or 'none'}"
            )
        if split not in self.splits:
            raise SourceError(
                f"source '{self.name}' has no split '{split}'; splits: {', '.join(self.splits)}"
            )
        self.split = split
        if not self.needs_data_root:
            if data_root is not None:
                raise SourceError(
                    f"source '{self.name}' makes its own data and takes no data root "
                    f"(got {data_root})"
                )
            self.data_root: Path | str | None = None  # a str only for a URL (accepts_urls)
            return
        if data_root is None:
            raise SourceError(f"source '{self.name}' needs a data root (--data-root DIR)")
        if self.accepts_urls and "://" in str(data_root):
            self.data_root = str(data_root)
            return
        root = Path(data_root).expanduser().absolute()
        if not root.is_dir():
            raise SourceError(f"data root {root} does not exist or is not a directory")
        self.data_root = root

    @abstractmethod
    def samples(self) -> list[Sample]:
        """Every sample of the split, sorted by key, read from the annotation files only."""

    def image_file(self, sample: Sample) -> Path | bytes | None:
        """Where the sample's encoded image is: its file, or its bytes (an archive member); None for
        a source that renders its images (it overrides `load_image`). Raises MediaError(reason)
        when the file cannot even be reached."""
        return None

    def load_image(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB; raises MediaError(reason) when it cannot be decoded."""
        encoded = self.image_file(sample)
        if encoded is None:
            raise MediaError(f"source '{self.name}' has no image files")
        return decode.decode_image(encoded)

    def load_image_tensor(self, sample: Sample) -> torch.Tensor:
        """The same image as `load_image`, as uint8 [3, H, W], decoded by the fastest decoder for its
        format (`decode.decode_image_tensor`: JPEG through libjpeg-turbo with the GIL released)."""
        encoded = self.image_file(sample)
        if encoded is None:
            from torchvision.transforms.functional import pil_to_tensor

            return pil_to_tensor(self.load_image(sample))
        return decode.decode_image_tensor(encoded)

    def find_folder(self, kind: str, given: Path | str | None, candidates: list[Path], option: str) -> Path:
        """The media folder: `given` (the source's `option`) if passed, else the first of the layouts
        the dataset is published in (`candidates`) that exists; a SourceError names what was tried."""
        if given is not None:
            path = Path(given).expanduser().absolute()
            if not path.is_dir():
                raise SourceError(f"{self.name}: {kind} folder {path} not found")
            return path
        for path in candidates:
            if path.is_dir():
                return path
        raise SourceError(
            f"{self.name}: no {kind} folder for split '{self.split}'; looked for "
            f"{', '.join(map(str, candidates))} (or pass {option}=PATH)"
        )

    def info(self) -> dict:
        """What was read, for the cache's provenance record (JSON-serialisable).

        Two keys have a meaning beyond the record, and `precompute run` prints them: `problems`,
        lines naming data the source holds but could not read (a damaged tar: which, how many
        samples expected, how many found); a run whose split has any exits 1, as for a failed
        shard. And `notes`, lines counting entries left out by design (a caption whose image is
        not in the file list, a path that leaves the image folder), so nothing is dropped silently.
        """
        return {
            "source": self.name,
            "split": self.split,
            "data_root": None if self.data_root is None else str(self.data_root),
        }


def read_json(path: Path) -> Any:
    """Parse an annotation file; a missing or malformed file is a SourceError naming it."""
    if not path.is_file():
        raise SourceError(f"annotation file {path} not found")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"annotation file {path} is not valid JSON: {e}") from e


def require_list(document: Any, field: str, path: Path) -> list:
    """`document[field]`, a list in the published format; anything else names the file."""
    if not isinstance(document, dict) or not isinstance(document.get(field), list):
        raise SourceError(f"annotation file {path} has no '{field}' list")
    return document[field]


@contextmanager
def entries_of(path: Path) -> Iterator[None]:
    """Turn a missing field or wrong type met while reading `path`'s entries into a SourceError."""
    try:
        yield
    except KeyError as e:
        raise SourceError(f"annotation file {path}: an entry has no field {e}") from e
    except (TypeError, ValueError, AttributeError) as e:
        raise SourceError(f"annotation file {path}: an entry is malformed: {e}") from e


def sorted_by_key(samples: list[Sample], path: Path) -> list[Sample]:
    """Samples in key order; a key listed twice in `path` would make two cache rows ambiguous."""
    ordered = sorted(samples, key=lambda s: s.key)
    for before, after in zip(ordered, ordered[1:]):
        if before.key == after.key:
            raise SourceError(f"annotation file {path} lists sample '{after.key}' twice")
    return ordered


def portable_name(name: str) -> str:
    """`name` as valid UTF-8 text: each byte of a file name that is not UTF-8 (os.walk hands it
    back as a lone surrogate, 'caf\\udce9') becomes %XX ('caf%E9').

    Keys, digests and JSON records must be text; a Latin-1 name copied from an old archive would
    otherwise crash planning at the first `.encode()`. Valid names are returned unchanged, so the
    keys of existing caches stay what they were; the escaped form is stable across runs and
    machines. (It could equal a real name containing '%E9'; key collisions are refused anyway.)
    """
    return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in name)


def path_inside(folder: Path | str, name: str) -> Path | None:
    """`folder / name` when it stays inside `folder`, else None (`name` may be absolute).

    Annotation files name their media by relative path; one naming `../x.jpg` or `/etc/x.jpg`
    would read from outside the dataset. Checked on the written path, not through symlinks:
    a dataset may link its image folder elsewhere, that is the user's choice, not the file's.
    """
    base = os.path.normpath(folder)
    joined = os.path.normpath(os.path.join(base, name))  # an absolute `name` replaces `folder`
    if not joined.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return Path(joined)
