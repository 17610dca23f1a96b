"""Image data sets described by manifests, and the subsets a deletion request names.

A data set is a manifest (JSON Lines or CSV with columns id, path, label and optionally
split) under a root, a local folder or any fsspec URI; an ImageFolder tree (root/<class>/<file>)
is accepted too. Rows without a split are training data. Paths may not leave the root.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
from PIL import Image, UnidentifiedImageError

from negmerge.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")


LABELS_SHOWN = 20  # an error lists at most this many of a data set's labels


def unknown_labels(unknown: Sequence[str], labels: Sequence[str], source: str) -> str:
    """Every class of `unknown` that is not among `labels`, each with the closest labels when
    some are close ('thre': did you mean 'three'?), and the labels there are."""
    named = []
    for label in unknown:
        close = difflib.get_close_matches(label, labels, n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        named.append(f"{label!r}{hint}")
    verb = "is not a label" if len(unknown) == 1 else "are not labels"
    shown = ", ".join(repr(label) for label in labels[:LABELS_SHOWN])
    more = f", ... ({len(labels)} in all)" if len(labels) > LABELS_SHOWN else ""
    return f"{', '.join(named)} {verb} in {source}; its labels are {shown}{more}"


@dataclass(frozen=True)
class Sample:
    id: str
    path: str  # relative to the data set's root, '/'-separated
    label: str
    split: str = "train"


@dataclass(frozen=True)
class Manifest:
    """The samples of one data set and the root their paths are relative to."""

    root: str
    samples: tuple[Sample, ...]
    source: str

    @classmethod
    def load(cls, source: str | Path, root: str | Path | None = None) -> Manifest:
        """Read a manifest file, a folder holding manifest.jsonl/.csv, or an ImageFolder tree.

        `root` defaults to the manifest's folder.
        """
        source = str(source)
        fs, path = fsspec.core.url_to_fs(source)
        if fs.isdir(path):
            named = [name for name in MANIFEST_NAMES if fs.isfile(posixpath.join(path, name))]
            if not named:
                return cls(str(root or source), _image_folder(fs, path), source)
            source = posixpath.join(source.rstrip("/"), named[0])
            path = posixpath.join(path, named[0])
        elif not fs.isfile(path):
            raise DataError(f"{source}: no such manifest file or folder")
        with fs.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
        rows = _parse_csv(text, source) if path.endswith(".csv") else _parse_jsonl(text, source)
        root = str(root) if root is not None else source.rsplit("/", 1)[0] if "/" in source else "."
        return cls(root, tuple(_sample(row, source, line) for line, row in rows), source)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for sample in self.samples:
            if sample.id in seen:
                raise DataError(f"{self.source}: duplicate id {sample.id!r}")
            seen.add(sample.id)

    @property
    def labels(self) -> list[str]:
        """The distinct labels, sorted."""
        return sorted({sample.label for sample in self.samples})

    def check_labels(self, classes: Sequence[str]) -> None:
        """Raise DataError on the first sample whose label is not one of `classes`."""
        known = set(classes)
        for sample in self.samples:
            if sample.label not in known:
                raise DataError(
                    f"{self.source}: sample {sample.id!r} has label {sample.label!r}, "
                    f"which is not one of the model's {len(known)} classes"
                )

    def select(
        self,
        ids: Iterable[str] | None = None,
        classes: Iterable[str] | None = None,
        splits: Iterable[str] | None = None,
    ) -> list[Sample]:
        """The samples with the given ids, or of the given classes, or all, within `splits`."""
        samples = list(self.samples)
        if ids is not None:
            wanted = list(dict.fromkeys(ids))
            by_id = {sample.id: sample for sample in samples}
            unknown = [i for i in wanted if i not in by_id]
            if unknown:
                raise DataError(f"ids: {len(unknown)} not in {self.source}, e.g. {unknown[0]!r}")
            samples = [by_id[i] for i in wanted]
        if classes is not None:
            wanted_classes = set(classes)
            unknown = sorted(wanted_classes - set(self.labels))
            if unknown:
                raise DataError(f"classes: {unknown_labels(unknown, self.labels, self.source)}")
            samples = [s for s in samples if s.label in wanted_classes]
        if splits is not None:
            allowed = set(splits)
            samples = [s for s in samples if s.split in allowed]
        return samples

    def sha256(self, samples: Iterable[Sample] | None = None) -> str:
        """A content hash of (a subset of) the manifest: ids, paths, labels and splits."""
        digest = hashlib.sha256()
        for s in sorted(self.samples if samples is None else samples, key=lambda s: s.id):
            digest.update(json.dumps([s.id, s.path, s.label, s.split]).encode() + b"\n")
        return digest.hexdigest()

    def open(self, sample: Sample, max_pixels: int | None = None) -> Image.Image:
        """The sample's image, decoded, in RGB. With `max_pixels`, an image with more pixels
        (width x height, read from its header) is refused before it is decoded."""
        url = f"{self.root.rstrip('/')}/{sample.path}"
        fs, root_path = fsspec.core.url_to_fs(self.root)
        if _is_local(fs):  # a link inside the root may point out of it
            real_root = Path(root_path).resolve()
            if not Path(root_path, sample.path).resolve().is_relative_to(real_root):
                raise DataError(f"sample {sample.id!r}: {sample.path} leaves the data set's root")
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
            image = Image.open(io.BytesIO(data))  # lazy: reads the header, decodes nothing
            width, height = image.size
            if max_pixels is None or width * height <= max_pixels:
                return image.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"sample {sample.id!r}: {url}: no such file") from None
        # Pillow's own limit: an error above twice Image.MAX_IMAGE_PIXELS, a warning above it
        # (an error too where warnings are made errors).
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DataError(f"sample {sample.id!r}: {url}: image has too many pixels") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"sample {sample.id!r}: {url}: not a readable image ({exc})") from None
        raise DataError(
            f"sample {sample.id!r}: {url}: image is {width} x {height} pixels, more than the "
            f"limit of {max_pixels}"
        )


def safe_relative_path(path: str, where: str) -> str:
    """`path` normalised, or DataError if it is absolute or leaves the root."""
    if not isinstance(path, str) or not path:
        raise DataError(f"{where}: path is missing")
    normal = posixpath.normpath(path.replace("\\", "/"))
    if normal.startswith("/") or normal == ".." or normal.startswith("../") or ":" in normal:
        raise DataError(f"{where}: path {path!r} leaves the data set's root")
    return normal


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def _sample(row: dict, source: str, line: int) -> Sample:
    where = f"{source}:{line}"
    missing = [name for name in ("id", "path", "label") if row.get(name) in (None, "")]
    if missing:
        raise DataError(f"{where}: field {missing[0]!r} is missing")
    split = row.get("split") or "train"
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    path = safe_relative_path(str(row["path"]), where)
    return Sample(str(row["id"]), path, str(row["label"]), split)


def _parse_jsonl(text: str, source: str) -> list[tuple[int, dict]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{line}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{source}:{line}: expected a JSON object")
        rows.append((line, row))
    return rows


def _parse_csv(text: str, source: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = {"id", "path", "label"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{source}: CSV header lacks column {sorted(missing)[0]!r}")
    return [(line, row) for line, row in enumerate(reader, start=2)]


def _image_folder(fs: fsspec.AbstractFileSystem, root: str) -> tuple[Sample, ...]:
    samples = []
    for class_dir in sorted(fs.ls(root, detail=False)):
        if not fs.isdir(class_dir):
            continue
        label = posixpath.basename(class_dir.rstrip("/"))
        for file in sorted(fs.ls(class_dir, detail=False)):
            if Path(file).suffix.lower() in IMAGE_SUFFIXES:
                relative = f"{label}/{posixpath.basename(file)}"
                samples.append(Sample(relative, relative, label))
    if not samples:
        raise DataError(f"{root}: no manifest.jsonl/.csv and no <class>/<image> files")
    return tuple(samples)
