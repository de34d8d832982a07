"""`wds`: image-text WebDataset shards exactly as img2dataset writes them (CC3M, CC12M, SBU, LAION).

    DATA_ROOT/                      a folder, or an fsspec URL: s3://bucket/cc3m, gs://…, file://…
      00000.tar                     {key}.jpg (.png/.webp with --encode_format), {key}.txt, {key}.json
      00000.parquet                 every url of the shard with its status, failed downloads included
      00000_stats.json              the shard's counts, written when the shard is finished
      00001.tar, …

The key is the tar member's name up to its first dot, as webdataset reads it; img2dataset's keys
(`{shard:05d}{index:04d}`) are unique across shards, and a key seen twice is refused. Annotations
are {"captions": [the `txt` member's text], "url": the json member's url}, the shape `coco` gives,
so the captioning methods train on a wds-fed cache unchanged. A sample without a caption gets
an empty list, as a COCO image without captions does.

Splits: img2dataset output has none. `train` is every tar; with `val_shards=N` the last N tars in
name order are `val` and `train` is the rest. Whole tars, not a fraction of samples, so a split
is a fixed list of files and adding a shard never moves a sample from one split to the other.

Options: `tars` (a glob over tar file names, default `*.tar`; e.g. `0000*.tar` for the first ten),
`caption` (the member extension holding the caption, default `txt`), `val_shards` (default 0).

Planning opens each tar once and reads its member headers and small text members; tarfile seeks
over the image bytes, which on a local disk are never read. Each sample's media is the tar's URL
with the image member's data offset and size (`URL#OFFSET+SIZE`), so an actor fetches one image
with one ranged read instead of the whole tar. A tar that tarfile cannot read is a SourceError
naming it (img2dataset leaves one behind when killed mid-shard: rerun img2dataset, or leave the
tar out with `tars=`). Shards that a parquet or `_stats.json` lists but whose tar is missing, and
the failed downloads the parquets record (status other than `success`, never in the tar), are
counted in `info()`, the cache's provenance record.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import tarfile
from pathlib import Path
from typing import Any, ClassVar

import fsspec
from fsspec.registry import known_implementations
from fsspec.spec import AbstractFileSystem
from PIL import Image

from precompute import decode
from precompute.sources.base import MediaError, Sample, Source, SourceError
from precompute.sources.images import IMAGE_EXTENSIONS

# webdataset's own split of a member name: key = folders + name up to the first dot, then the rest.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
MEDIA = re.compile(r"^(.*)#(\d+)\+(\d+)$")


class WdsSource(Source):
    name: ClassVar[str] = "wds"
    description: ClassVar[str] = (
        "image-text WebDataset shards as img2dataset writes them: DATA_ROOT/*.tar holding "
        "{key}.jpg|png|webp, {key}.txt, {key}.json (parquet and _stats.json beside them); DATA_ROOT "
        "may be an fsspec URL (s3://, gs://, file://, memory://); train = every tar, or with "
        "val_shards=N all but the last N, which are val; options tars=GLOB, caption=txt"
    )
    needs_data_root: ClassVar[bool] = True
    accepts_urls: ClassVar[bool] = True
    splits: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(
        self,
        data_root: Path | str | None,
        split: str,
        *,
        tars: str = "*.tar",
        caption: str = "txt",
        val_shards: int = 0,
        **options: Any,
    ):
        super().__init__(data_root, split, **options)
        if not isinstance(tars, str) or not tars:
            raise SourceError(f"wds: tars must be a glob of tar file names such as '0000*.tar', got {tars!r}")
        if not isinstance(caption, str) or not caption:
            raise SourceError(f"wds: caption must be a member extension such as 'txt', got {caption!r}")
        if isinstance(val_shards, bool) or not isinstance(val_shards, int) or val_shards < 0:
            raise SourceError(f"wds: val_shards must be a whole number of tars, got {val_shards!r}")
        if split == "val" and val_shards == 0:
            raise SourceError(
                "wds: img2dataset output has no val split; hold out the last N tars with val_shards=N"
            )
        self.tars_glob, self.caption_extension, self.val_shards = tars, caption, val_shards
        self.root_url = str(self.data_root)
        self.fs, self.root = open_filesystem(self.root_url)
        if not self.fs.isdir(self.root):
            raise SourceError(f"wds: data root {self.root_url} does not exist or is not a folder")
        # What planning saw, for info(); a few counts and names, so the source stays cheap to send
        # to every actor.
        self.seen: dict[str, Any] | None = None

    def samples(self) -> list[Sample]:
        tar_names, missing = self._split_tars()
        samples = sorted((s for name in tar_names for s in self._tar_samples(name)), key=lambda s: s.key)
        for before, after in zip(samples, samples[1:]):
            if before.key == after.key:  # within one tar _tar_samples refuses it; here across two
                raise SourceError(
                    f"wds: sample key '{after.key}' is in both {MEDIA.match(before.media).group(1)} and "
                    f"{MEDIA.match(after.media).group(1)}"
                )
        self.seen = {
            "tars": tar_names,
            "samples": len(samples),
            "failed_downloads": sum(self._failed_downloads(name) for name in tar_names),
            "missing_tars": missing,
        }
        return samples

    def load_image(self, sample: Sample) -> Image.Image:
        match = MEDIA.match(sample.media)
        if match is None:
            raise MediaError(f"not a wds media reference (URL#OFFSET+SIZE): {sample.media}")
        url, offset, size = match.group(1), int(match.group(2)), int(match.group(3))
        try:
            data = self.fs.cat_file(url, start=offset, end=offset + size)
        except FileNotFoundError:
            raise MediaError(f"tar not found: {url}") from None
        if len(data) != size:
            raise MediaError(f"tar member truncated: {len(data)} of {size} bytes at offset {offset} of {url}")
        return decode.decode_image(data)

    def info(self) -> dict:
        if self.seen is None:
            self.samples()
        return {
            **super().info(),
            "tars_glob": self.tars_glob,
            "caption": self.caption_extension,
            "val_shards": self.val_shards,
            **self.seen,
        }

    def _split_tars(self) -> tuple[list[str], list[str]]:
        """This split's tar file names in name order, and the shards whose tar is missing."""
        names = {posixpath.basename(path.rstrip("/")) for path in self.fs.ls(self.root, detail=False)}
        tar_names = sorted(n for n in names if n.endswith(".tar") and fnmatch.fnmatchcase(n, self.tars_glob))
        listed = {n.removesuffix(".parquet") for n in names if n.endswith(".parquet")}
        listed |= {n.removesuffix("_stats.json") for n in names if n.endswith("_stats.json")}
        missing = sorted(
            f"{shard}.tar"
            for shard in listed
            if f"{shard}.tar" not in names and fnmatch.fnmatchcase(f"{shard}.tar", self.tars_glob)
        )
        if not tar_names:
            also = f"; {len(missing)} shard(s) are listed by parquet/_stats.json but have no tar" if missing else ""
            raise SourceError(f"wds: no tar files matching '{self.tars_glob}' in {self.root_url}{also}")
        if self.val_shards >= len(tar_names):
            raise SourceError(
                f"wds: val_shards={self.val_shards} would hold out all {len(tar_names)} tars in "
                f"{self.root_url}, leaving nothing for train"
            )
        if self.val_shards == 0:
            return tar_names, missing
        cut = len(tar_names) - self.val_shards
        return (tar_names[cut:] if self.split == "val" else tar_names[:cut]), missing

    def _tar_samples(self, tar_name: str) -> list[Sample]:
        """One sample per image member of one tar, read in one pass over its headers."""
        path = posixpath.join(self.root, tar_name)
        url = self.fs.unstrip_protocol(path)
        images: dict[str, tarfile.TarInfo] = {}
        captions: dict[str, str] = {}
        urls: dict[str, str] = {}
        try:
            with self.fs.open(path, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
                for member in tar:
                    match = MEMBER_NAME.match(member.name)
                    if not member.isfile() or match is None:
                        continue
                    key, extension = match.groups()
                    if f".{extension.lower()}" in IMAGE_EXTENSIONS:
                        if key in images:
                            raise SourceError(f"wds: {url} holds two images for key '{key}'")
                        images[key] = member
                    elif extension == self.caption_extension:
                        captions[key] = member_text(tar, member, url).strip()
                    elif extension == "json" and "url" in (metadata := member_json(tar, member, url)):
                        urls[key] = metadata["url"]
        except (tarfile.TarError, OSError) as e:
            raise SourceError(
                f"wds: cannot read tar {url}: {e} (an interrupted img2dataset shard? rerun it, or leave "
                "the tar out with tars=GLOB)"
            ) from e
        samples = []
        for key, member in images.items():
            annotations: dict[str, Any] = {"captions": [captions[key]] if captions.get(key) else []}
            if key in urls:
                annotations["url"] = urls[key]
            samples.append(Sample(key, f"{url}#{member.offset_data}+{member.size}", annotations))
        return samples

    def _failed_downloads(self, tar_name: str) -> int:
        """Rows of the shard's parquet whose status is not `success`: img2dataset lists every url
        it tried there, but only the successes are in the tar. 0 when there is no parquet."""
        import pyarrow.parquet  # a fraction of a second to import; only planning needs it

        path = posixpath.join(self.root, tar_name.removesuffix(".tar") + ".parquet")
        if not self.fs.isfile(path):
            return 0
        try:
            with self.fs.open(path, "rb") as file:
                statuses = pyarrow.parquet.read_table(file, columns=["status"]).column("status").to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
            raise SourceError(f"wds: cannot read the status column of {self.fs.unstrip_protocol(path)}: {e}") from e
        return sum(status != "success" for status in statuses)


def open_filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem and path of `url`; a protocol whose package is missing says what to install."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol, _ = fsspec.core.split_protocol(url)
        implementation = known_implementations.get(protocol, {}).get("class", "")
        package = implementation.split(".")[0] or f"the fsspec implementation of {protocol}://"
        raise SourceError(f"wds: reading {url} needs `pip install {package}` ({e})") from e
    except ValueError as e:  # fsspec: "Protocol not known"
        raise SourceError(f"wds: cannot read {url}: {e}") from e


def member_text(tar: tarfile.TarFile, member: tarfile.TarInfo, url: str) -> str:
    try:
        return tar.extractfile(member).read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"wds: {member.name} in {url} is not UTF-8 text: {e}") from e


def member_json(tar: tarfile.TarFile, member: tarfile.TarInfo, url: str) -> dict:
    try:
        document = json.loads(member_text(tar, member, url))
    except json.JSONDecodeError as e:
        raise SourceError(f"wds: {member.name} in {url} is not valid JSON: {e}") from e
    if not isinstance(document, dict):
        raise SourceError(f"wds: {member.name} in {url} is not a JSON object")
    return document

