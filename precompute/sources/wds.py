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
with one ranged read instead of the whole tar.

A damaged tar is not the end of the dataset, and not a silent loss either. tarfile stops at the
first header it cannot parse as if the archive had ended, so each tar is checked: the samples
read must number what img2dataset says it wrote (`successes` in `_stats.json`, else the parquet's
rows with status `success`), reading must stop at tar's end-of-archive marker (two zero blocks; a
tar that just stops at a member boundary is damage where the count differs or there is none, as
when img2dataset was killed mid-shard), and no image may run past the end of the file. A tar failing any check keeps the samples read before the damage,
and is listed in `info()` (`damaged_tars`: tar, expected, found, reason) and in its `problems`,
which `precompute run` prints, naming the tar, before exiting 1; the other tars are processed as
usual. Only when no tar can be read at all is it a SourceError (exit 2). Rerun img2dataset for the
shard (a changed sample list is a new plan: `--overwrite`), or leave the tar out with `tars=`.
Shards that a parquet or `_stats.json` lists but whose tar is missing, and the failed downloads
the parquets record (status other than `success`, never in the tar), are counted in `info()`, the
cache's provenance record.
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

from precompute.decode import MediaError
from precompute.sources.base import Sample, Source, SourceError, portable_name
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
        counts = {name: self._img2dataset_counts(name) for name in tar_names}
        damaged: list[dict[str, Any]] = []
        found: list[Sample] = []
        for name in tar_names:
            tar_samples, reason = self._tar_samples(name, counts[name]["successes"])
            found.extend(tar_samples)
            if reason is not None:
                damaged.append({"tar": name, "expected": counts[name]["successes"], "found": len(tar_samples),
                                "reason": reason})
        if len(damaged) == len(tar_names) and not found:
            raise SourceError(
                f"wds: no tar in {self.root_url} could be read: "
                + "; ".join(f"{d['tar']}: {d['reason']}" for d in damaged)
            )
        samples = sorted(found, key=lambda s: s.key)
        for before, after in zip(samples, samples[1:]):
            if before.key == after.key:  # within one tar _tar_samples refuses it; here across two
                raise SourceError(
                    f"wds: sample key '{after.key}' is in both {MEDIA.match(before.media).group(1)} and "
                    f"{MEDIA.match(after.media).group(1)}"
                )
        self.seen = {
            "tars": tar_names,
            "samples": len(samples),
            "failed_downloads": sum(c["failed"] for c in counts.values()),
            "missing_tars": missing,
            "damaged_tars": damaged,
            "problems": [
                f"damaged tar {self.fs.unstrip_protocol(posixpath.join(self.root, d['tar']))}: img2dataset wrote "
                f"{'an unknown number of' if d['expected'] is None else d['expected']} samples, {d['found']} "
                f"readable ({d['reason']}); rerun img2dataset for it"
                for d in damaged
            ],
        }
        return samples

    def image_file(self, sample: Sample) -> bytes:
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
        return data

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

    def _tar_samples(self, tar_name: str, expected: int | None) -> tuple[list[Sample], str | None]:
        """One sample per image member of one tar, read in one pass over its headers; and why the
        tar is damaged (None when it is whole). The samples before any damage are kept."""
        path = posixpath.join(self.root, tar_name)
        url = self.fs.unstrip_protocol(path)
        images: dict[str, tarfile.TarInfo] = {}
        captions: dict[str, str] = {}
        urls: dict[str, str] = {}
        reason, size, stop = None, 0, None
        try:
            size = self.fs.size(path)
            with self.fs.open(path, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
                try:
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
                except (tarfile.TarError, OSError, EOFError) as e:
                    reason = f"unreadable after byte {tar.offset}: {e}"
                else:
                    reason, unterminated = self._end_of_archive(file, tar.offset, size)
                    if unterminated:
                        stop = tar.offset
        except (tarfile.TarError, OSError, EOFError) as e:  # not a tar from its first header on
            reason = f"not readable as a tar: {e}"
        cut = [key for key, member in images.items() if member.offset_data + member.size > size]
        for key in cut:  # an image whose bytes run past the end of the file: the tar was cut inside it
            del images[key]
            reason = reason or f"cut inside the image of '{key}'"
        if reason is None and stop is not None and (expected is None or len(images) != expected):
            reason = f"ends at byte {stop}, a member boundary, with no end-of-archive blocks: cut short"
        if reason is None and expected is not None and len(images) != expected:
            reason = f"holds {len(images)} samples where img2dataset counted {expected}"
        samples = []
        for key, member in images.items():
            annotations: dict[str, Any] = {"captions": [captions[key]] if captions.get(key) else []}
            if key in urls:
                annotations["url"] = urls[key]
            # a member name that is not UTF-8 (tarfile hands it back surrogate-escaped) keys as %XX
            samples.append(Sample(portable_name(key), f"{url}#{member.offset_data}+{member.size}", annotations))
        return samples, reason

    @staticmethod
    def _end_of_archive(file: Any, offset: int, size: int) -> tuple[str | None, bool]:
        """Why reading stopped at `offset` before the tar's real end (or None), and whether the
        tar just stops there, at a member boundary, without its end blocks.

        tarfile ends its member list at the first header it cannot parse, as if the archive ended
        there. A whole tar ends with zero blocks; data there instead is a damaged header, and the
        members after it are lost. A tar that just stops, with no zero blocks, was cut short: only
        img2dataset's count can tell whether anything is missing, so the caller counts it as
        damage when the count differs or there is none (a shard killed mid-write has none).
        """
        file.seek(offset)
        tail = file.read(2 * tarfile.BLOCKSIZE)
        if tail.strip(b"\0"):
            return f"damaged member header at byte {offset} of {size}", False
        return None, len(tail) < 2 * tarfile.BLOCKSIZE

    def _img2dataset_counts(self, tar_name: str) -> dict[str, int | None]:
        """What img2dataset says it put in the tar (`successes`: from `_stats.json`, else the
        parquet's rows with status `success`; None with neither) and how many downloads failed.

        The parquet lists every url img2dataset tried, but only the successes are in the tar."""
        import pyarrow.parquet  # a fraction of a second to import; only planning needs it

        shard = tar_name.removesuffix(".tar")
        successes = failed = None
        path = posixpath.join(self.root, shard + ".parquet")
        if self.fs.isfile(path):
            try:
                with self.fs.open(path, "rb") as file:
                    statuses = pyarrow.parquet.read_table(file, columns=["status"]).column("status").to_pylist()
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
                raise SourceError(f"wds: cannot read the status column of {self.fs.unstrip_protocol(path)}: {e}") from e
            successes = sum(status == "success" for status in statuses)
            failed = len(statuses) - successes
        path = posixpath.join(self.root, shard + "_stats.json")
        if self.fs.isfile(path):
            try:
                with self.fs.open(path, "rb") as file:
                    stats = json.load(file)
            except (OSError, ValueError) as e:
                raise SourceError(f"wds: cannot read {self.fs.unstrip_protocol(path)}: {e}") from e
            if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
                successes = stats["successes"]
        return {"successes": successes, "failed": failed or 0}


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

