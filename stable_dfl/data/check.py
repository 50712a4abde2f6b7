"""Checking a YOLO-format dataset before training: every image decoded, every label parsed.

:func:`check_dataset` reads each split once, up front, with the rules of
:mod:`stable_dfl.data.yolo`, and either returns what is usable (a :class:`DatasetCheck`,
from which :meth:`~stable_dfl.data.yolo.YoloDataset.from_check` builds the datasets) or
raises :class:`DatasetError`: one line saying why, naming the files. A broken file is
never passed over silently: without ``skip_bad`` any problem refuses the dataset; with
it, a bad image (or an image whose label file cannot be decoded) is dropped, a bad label
line is dropped, and each is counted and listed in the result.

Refused whatever ``skip_bad`` says: a split folder that is missing or holds no images, a
split with no label files or no boxes at all (every image would be background), a split
left with no images once the bad ones are dropped.

Each file's result is cached in ``ROOT/labels/SPLIT.stable_dfl-check.json`` (as
ultralytics caches ``labels/SPLIT.cache``), keyed by the size and modification time of
the image and of its label file, the number of classes and :data:`CHECK_VERSION`; an
unchanged dataset is checked again without opening any image, and a changed file is
checked again. Where that folder is not writable nothing is cached.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .yolo import (
    IMAGE_SUFFIXES,
    YoloFormatError,
    clean_class_names,
    label_tensor,
    read_class_names,
    read_image,
    read_label_file,
    split_dirs,
)

#: Bumped whenever a rule changes, so that results cached by an older checker are redone.
CHECK_VERSION = 1
CACHE_SUFFIX = ".stable_dfl-check.json"
#: Problems quoted in a refusal, and in each split's summary.
REFUSAL_PROBLEMS, SUMMARY_PROBLEMS = 3, 5
_PROGRESS_SECONDS = 1.0
_IMAGE_KINDS = "/".join(IMAGE_SUFFIXES)


class DatasetError(YoloFormatError):
    """The dataset is refused; the message is one line saying why, naming the files."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Problem:
    """One bad file (``line`` is None) or one bad line of a label file."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else f"{self.path}"
        return f"{where}: {self.message}"


@dataclass
class SplitCheck:
    """One checked split: its usable images (sorted) and their boxes, and what was wrong."""

    split: str | None
    image_dir: Path
    image_paths: list[Path] = field(default_factory=list)
    annotations: list[torch.Tensor] = field(default_factory=list)
    """``[n, 5]`` float32 ``class cx cy w h`` per usable image."""
    problems: list[Problem] = field(default_factory=list)
    skipped_images: int = 0
    skipped_lines: int = 0
    """Bad label lines dropped from usable images."""
    ignored_files: list[Path] = field(default_factory=list)
    """Files in the image folder that are not images of a supported kind."""

    @property
    def images(self) -> int:
        return len(self.image_paths)

    @property
    def boxes(self) -> int:
        return sum(len(a) for a in self.annotations)

    @property
    def empty_images(self) -> int:
        return sum(1 for a in self.annotations if len(a) == 0)

    def boxes_per_class(self, n_classes: int) -> list[int]:
        labels = [a[:, 0].long() for a in self.annotations]
        if not labels:
            return [0] * n_classes
        return torch.bincount(torch.cat(labels), minlength=n_classes)[:n_classes].tolist()


@dataclass
class DatasetCheck:
    """A usable dataset: its class names and checked splits (keyed by split name; ``""``
    for the layout with no split)."""

    root: Path
    class_names: tuple[str, ...]
    splits: dict[str, SplitCheck]
    cached: bool = False
    """Every file's result came from the cache."""

    def summary_lines(self) -> list[str]:
        how = "all results from the cache" if self.cached else "checked"
        lines = [f"{self.root}: {len(self.class_names)} classes; {how}"]
        for name, split in self.splits.items():
            lines.append(
                f"{name or 'images'}: {split.images} images, {split.boxes} boxes, "
                f"{split.empty_images} images without boxes ({split.image_dir})"
            )
            counts = split.boxes_per_class(len(self.class_names))
            lines.append(
                "  boxes per class: "
                + ", ".join(f"{c} {n}" for c, n in zip(self.class_names, counts, strict=True))
            )
            absent = [c for c, n in zip(self.class_names, counts, strict=True) if n == 0]
            if absent:
                lines.append(f"  no boxes of: {', '.join(absent)}")
            if split.problems:
                lines.append(
                    f"  {len(split.problems)} problems: skipped {split.skipped_images} images "
                    f"and {split.skipped_lines} label lines"
                )
                lines += [f"    {p}" for p in split.problems[:SUMMARY_PROBLEMS]]
                if len(split.problems) > SUMMARY_PROBLEMS:
                    lines.append(f"    ... and {len(split.problems) - SUMMARY_PROBLEMS} more")
            if split.ignored_files:
                lines.append(
                    f"  ignored {len(split.ignored_files)} files that are not {_IMAGE_KINDS} "
                    f"images, e.g. {split.ignored_files[0].name}"
                )
        return lines


def check_dataset(
    root: str | Path,
    splits: Sequence[str | None] = ("train", "val"),
    class_names: Sequence[str] | None = None,
    *,
    skip_bad: bool = False,
    cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> DatasetCheck:
    """Checks ``splits`` of the YOLO dataset at ``root`` (a split of ``None``: the layout
    with no split) with ``class_names`` (else ``classes.txt`` or ``data.yaml``).

    ``progress`` (when given) is called about once a second, and at the end of each
    split, with a line such as ``checking ROOT/images/train: 812/2048 images``. Raises
    :class:`DatasetError` when the dataset is refused (see the module docstring).
    """
    root = Path(root)
    try:
        names = (
            clean_class_names(class_names, "class names") if class_names else read_class_names(root)
        )
    except YoloFormatError as error:
        raise DatasetError(str(error)) from None
    # Every split's layout is checked before any image is read: a missing val split is
    # refused at once, not after decoding the whole train split.
    listings = [_list_split(root, split) for split in dict.fromkeys(splits)]
    results: dict[str, SplitCheck] = {}
    all_cached = cache
    try:
        for listing in listings:
            result, from_cache = _scan(listing, len(names), cache, progress)
            results[listing.split or ""] = result
            all_cached = all_cached and from_cache
    except ImportError as error:  # matplotlib missing for .png/.jpg images
        raise DatasetError(str(error)) from None
    problems = [p for result in results.values() for p in result.problems]
    if problems and not skip_bad:
        raise DatasetError(_refusal(problems))
    for listing, result in zip(listings, results.values(), strict=True):
        if not result.images:
            raise DatasetError(
                f"{_split_name(listing.split)}: all {result.skipped_images} images are bad "
                f"(first: {result.problems[0]})"
            )
        if not result.boxes:
            dropped = sum(1 for p in result.problems if p.line is not None)
            raise DatasetError(
                f"{listing.label_dir}: no boxes in {listing.label_files} label files"
                + (f" ({dropped} bad lines dropped)" if dropped else "")
                + "; every image would be background"
            )
    return DatasetCheck(root, names, results, all_cached)


@dataclass
class _Listing:
    """A split's files, before any is read."""

    split: str | None
    image_dir: Path
    label_dir: Path
    images: list[Path]
    label_files: int
    problems: list[Problem]
    """Label files with no image, images sharing a name (all of them dropped)."""
    dropped: int
    ignored: list[Path]


def _split_name(split: str | None) -> str:
    return f"{split} split" if split else "dataset"


def _list_split(root: Path, split: str | None) -> _Listing:
    image_dir, label_dir = split_dirs(root, split)
    if not image_dir.is_dir():
        flat = root / "images"
        hint = ""
        if (
            split
            and flat.is_dir()
            and any(p.suffix.lower() in IMAGE_SUFFIXES for p in flat.iterdir())
        ):
            hint = f" ({flat} holds the images itself: a layout with no split)"
        what = f"no {split} split" if split else "no images"
        raise DatasetError(f"{what}: {image_dir} not found{hint}")
    images: list[Path] = []
    ignored: list[Path] = []
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif path.is_file() and not path.name.startswith("."):
            ignored.append(path)
    if not images:
        held = f" (it holds {len(ignored)} other files, e.g. {ignored[0].name})" if ignored else ""
        raise DatasetError(
            f"empty {_split_name(split)}: no {_IMAGE_KINDS} images in {image_dir}{held}"
        )
    misplaced = (
        f" ({image_dir} holds .txt files: labels go in {label_dir})"
        if any(p.suffix.lower() == ".txt" for p in ignored)
        else ""
    )
    if not label_dir.is_dir():
        raise DatasetError(
            f"{label_dir}: no label files (folder not found){misplaced}; "
            "every image would be background"
        )
    label_paths = sorted(label_dir.glob("*.txt"))
    if not label_paths:
        raise DatasetError(
            f"{label_dir}: no label files (NAME.txt for each image NAME){misplaced}; "
            "every image would be background"
        )
    problems: list[Problem] = []
    by_stem: dict[str, list[Path]] = {}
    for path in images:
        by_stem.setdefault(path.stem, []).append(path)
    # Images sharing a name share one label file: which one it describes is unknown, so
    # none of them is used.
    unique = [paths[0] for paths in by_stem.values() if len(paths) == 1]
    for paths in by_stem.values():
        for path in paths if len(paths) > 1 else ():
            others = ", ".join(other.name for other in paths if other != path)
            problems.append(
                Problem(
                    path,
                    None,
                    f"same name as {others}: both would take the labels of {path.stem}.txt; "
                    "rename or remove one",
                )
            )
    for path in label_paths:
        if path.stem not in by_stem:
            problems.append(
                Problem(
                    path, None, f"no image {path.stem}{{{','.join(IMAGE_SUFFIXES)}}} in {image_dir}"
                )
            )
    return _Listing(
        split,
        image_dir,
        label_dir,
        unique,
        len(label_paths),
        problems,
        len(images) - len(unique),
        ignored,
    )


def _scan(
    listing: _Listing,
    n_classes: int,
    use_cache: bool,
    progress: Callable[[str], None] | None,
) -> tuple[SplitCheck, bool]:
    """The split's check and whether every file's result came from the cache."""
    cache_path = listing.label_dir.with_name(listing.label_dir.name + CACHE_SUFFIX)
    old_entries, labels_cached = _read_cache(cache_path, n_classes) if use_cache else ({}, False)
    entries: dict[str, dict[str, Any]] = {}
    result = SplitCheck(
        listing.split,
        listing.image_dir,
        problems=list(listing.problems),
        skipped_images=listing.dropped,
        ignored_files=listing.ignored,
    )
    all_cached = use_cache
    last_report = time.monotonic()
    total = len(listing.images)
    for done, image_path in enumerate(listing.images, start=1):
        label_path = listing.label_dir / f"{image_path.stem}.txt"
        entry, hit = _check_pair(
            image_path, label_path, n_classes, old_entries.get(image_path.name), labels_cached
        )
        entries[image_path.name] = entry
        all_cached = all_cached and hit
        _add(result, entry, image_path, label_path)
        if progress is not None and time.monotonic() - last_report >= _PROGRESS_SECONDS:
            progress(f"checking {listing.image_dir}: {done}/{total} images")
            last_report = time.monotonic()
    if progress is not None:
        progress(f"checking {listing.image_dir}: {total}/{total} images")
    if use_cache and (not all_cached or entries.keys() != old_entries.keys()):
        _write_cache(cache_path, n_classes, entries)
    return result, all_cached


def _stat(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _check_pair(
    image_path: Path,
    label_path: Path,
    n_classes: int,
    cached: dict[str, Any] | None,
    labels_cached: bool,
) -> tuple[dict[str, Any], bool]:
    """The JSON-ready result of one image and its label file, reusing the cached result
    of each whose size and modification time are unchanged."""
    image_stat, label_stat = _stat(image_path), _stat(label_path)
    hit = True
    if cached is not None and cached["image"] == image_stat:
        image_part = {"image": image_stat, "image_problem": cached["image_problem"]}
    else:
        hit = False
        try:
            read_image(image_path)
            image_problem = None
        except YoloFormatError as error:
            image_problem = error.reason
        image_part = {"image": image_stat, "image_problem": image_problem}
    if cached is not None and labels_cached and cached["label"] == label_stat:
        label_part = {k: cached[k] for k in ("label", "label_problem", "rows", "bad_lines")}
    else:
        hit = False
        try:
            rows, bad_lines = read_label_file(label_path, n_classes)
            label_problem = None
        except YoloFormatError as error:
            rows, bad_lines, label_problem = [], [], error.reason
        label_part = {
            "label": label_stat,
            "label_problem": label_problem,
            "rows": rows,
            "bad_lines": [list(bad) for bad in bad_lines],
        }
    return {**image_part, **label_part}, hit


def _add(result: SplitCheck, entry: dict[str, Any], image_path: Path, label_path: Path) -> None:
    unusable = []
    if entry["image_problem"] is not None:
        unusable.append(Problem(image_path, None, entry["image_problem"]))
    if entry["label_problem"] is not None:  # its lines cannot be told apart: drop the image
        unusable.append(Problem(label_path, None, entry["label_problem"]))
    bad_lines = [Problem(label_path, line, message) for line, message in entry["bad_lines"]]
    result.problems += unusable + bad_lines
    if unusable:
        result.skipped_images += 1
    else:
        result.image_paths.append(image_path)
        result.annotations.append(label_tensor(entry["rows"]))
        result.skipped_lines += len(bad_lines)


def _read_cache(path: Path, n_classes: int) -> tuple[dict[str, dict[str, Any]], bool]:
    """``(entries, whether their label results hold for n_classes)``; nothing when the
    cache is absent, unreadable, malformed or from another checker version."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if content.get("version") != CHECK_VERSION:
            return {}, False
        entries = content["entries"]
        if not all(_valid_entry(entry) for entry in entries.values()):
            return {}, False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, False
    return entries, content.get("n_classes") == n_classes


def _valid_entry(entry: Any) -> bool:
    def stat(value: Any) -> bool:
        return value is None or (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)
        )

    def text(value: Any) -> bool:
        return value is None or isinstance(value, str)

    return (
        isinstance(entry, dict)
        and stat(entry.get("image", 0))
        and stat(entry.get("label", 0))
        and text(entry.get("image_problem", 0))
        and text(entry.get("label_problem", 0))
        and isinstance(entry.get("rows"), list)
        and all(
            isinstance(row, list)
            and len(row) == 5
            and all(isinstance(v, (int, float)) for v in row)
            for row in entry["rows"]
        )
        and isinstance(entry.get("bad_lines"), list)
        and all(
            isinstance(bad, list)
            and len(bad) == 2
            and isinstance(bad[0], int)
            and isinstance(bad[1], str)
            for bad in entry["bad_lines"]
        )
    )


def _write_cache(path: Path, n_classes: int, entries: dict[str, dict[str, Any]]) -> None:
    payload = {"version": CHECK_VERSION, "n_classes": n_classes, "entries": entries}
    # Written aside and renamed: processes checking the same dataset at once (one per
    # rank) never read a half-written cache.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(payload, separators=(",", ":")), encoding="utf-8")
        os.replace(temporary, path)
    except OSError:  # a read-only dataset is checked in full each time, not refused
        with contextlib.suppress(OSError):
            temporary.unlink()


def _refusal(problems: list[Problem]) -> str:
    shown = "; ".join(str(p) for p in problems[:REFUSAL_PROBLEMS])
    more = (
        f"; and {len(problems) - REFUSAL_PROBLEMS} more" if len(problems) > REFUSAL_PROBLEMS else ""
    )
    files = len({p.path for p in problems})
    return (
        f"{len(problems)} problem(s) in {files} file(s): {shown}{more}; "
        "fix them, or pass --skip_bad_files to train without them"
    )
