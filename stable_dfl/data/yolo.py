"""YOLO-format datasets on disk: a reader, a writer, and the rules both follow.

Layout (as ultralytics): ``ROOT/images/SPLIT/NAME.EXT`` and ``ROOT/labels/SPLIT/NAME.txt``
(or ``ROOT/images`` and ``ROOT/labels`` with no split), one ``class cx cy w h`` line per
box, coordinates normalised to [0, 1]. An image without a label file has no objects.
Class names come from the ``class_names`` argument, else ``ROOT/classes.txt`` (one per
line; line ``i + 1`` names class ``i``), else the ``names`` of ``ROOT/data.yaml`` (a list,
or a mapping of ids ``0..N-1`` to names; needs PyYAML). Names are stripped of
whitespace; an empty or repeated name is refused. Text files are UTF-8, with or without
a byte-order mark; any other encoding is refused, naming the file.

Images: ``.npy`` (``H x W``, ``H x W x 1..4``; uint8, uint16, or float in [0, 1]) are
read with numpy alone, never unpickled; ``.png``/``.jpg``/``.jpeg`` through matplotlib
(lazily imported: only those files need it). Every way an image can be unreadable or
mis-scaled raises :class:`YoloFormatError` naming the file, rather than an error from the
decoder or silently wrong pixels. The writer uses ``.png`` when matplotlib is installed
and ``.npy`` otherwise, unless told. Images are resized (stretched) to ``image_size``
squares; normalised boxes stay valid under that.

:mod:`stable_dfl.data.check` checks a whole dataset up front with these same rules.
"""

from __future__ import annotations

import codecs
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import DetectionSample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
#: Tolerance on normalised coordinates (labelling tools round boxes at the image edge).
COORD_TOLERANCE = 1e-3
_NPY_MAGIC = b"\x93NUMPY"
_SAVE_AS = "save uint8 (0-255), uint16 (0-65535) or float in [0, 1]"


class YoloFormatError(ValueError):
    """A malformed or inconsistent YOLO dataset; the message names the file (and line).

    ``path`` and ``line`` (when given) are the file and 1-based line at fault, ``reason``
    the message without them.
    """

    def __init__(self, reason: str, path: Path | None = None, line: int | None = None) -> None:
        self.reason, self.path, self.line = reason, path, line
        where = "" if path is None else f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{reason}")


class CheckedSplit(Protocol):
    """What :meth:`YoloDataset.from_check` needs of a
    :class:`~stable_dfl.data.check.SplitCheck`."""

    split: str | None
    image_dir: Path
    image_paths: list[Path]
    annotations: list[torch.Tensor]
    skipped_lines: int


class YoloDataset(torch.utils.data.Dataset):
    """Reads a YOLO-format split. Labels are parsed up front, images on access.

    With ``strict=True`` (default) the first bad label line raises :class:`YoloFormatError`
    naming ``file:line``; with ``strict=False`` bad lines are skipped, counted in
    ``skipped_lines`` and reported in one warning. A label file that cannot be decoded
    raises in either mode. Images are only checked when read: to check them all up front,
    use :func:`~stable_dfl.data.check.check_dataset` and :meth:`from_check`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        class_names: Sequence[str] | None = None,
        image_size: int = 96,
        strict: bool = True,
    ) -> None:
        root = Path(root)
        names = (
            clean_class_names(class_names, "class_names") if class_names else read_class_names(root)
        )
        image_dir, label_dir = split_dirs(root, split)
        if not image_dir.is_dir():
            raise YoloFormatError("image folder not found", image_dir)
        image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        stems = {p.stem for p in image_paths}
        if label_dir.is_dir():
            for label_path in sorted(label_dir.glob("*.txt")):
                if label_path.stem not in stems:
                    raise YoloFormatError(
                        f"no image {label_path.stem}{{{','.join(IMAGE_SUFFIXES)}}} in {image_dir}",
                        label_path,
                    )
        skipped_lines = 0
        annotations = []
        for image_path in image_paths:
            label_path = label_dir / f"{image_path.stem}.txt"
            rows, bad_lines = read_label_file(label_path, len(names))
            if bad_lines and strict:
                line, reason = bad_lines[0]
                raise YoloFormatError(reason, label_path, line)
            skipped_lines += len(bad_lines)
            annotations.append(label_tensor(rows))
        if skipped_lines:
            warnings.warn(f"{root}: skipped {skipped_lines} malformed label line(s)", stacklevel=2)
        self._setup(root, names, image_size, image_paths, annotations, skipped_lines)

    @classmethod
    def from_check(
        cls, split_check: CheckedSplit, class_names: Sequence[str], image_size: int = 96
    ) -> YoloDataset:
        """The split a :func:`~stable_dfl.data.check.check_dataset` result describes: its
        usable images and their parsed labels, without reading any label file again."""
        names = clean_class_names(class_names, "class_names")
        if len(split_check.image_paths) != len(split_check.annotations):
            raise YoloFormatError(
                f"{len(split_check.image_paths)} images but {len(split_check.annotations)} "
                "annotations in the check",
                split_check.image_dir,
            )
        for path, annotation in zip(split_check.image_paths, split_check.annotations, strict=True):
            if len(annotation) and int(annotation[:, 0].max()) >= len(names):
                raise YoloFormatError(
                    f"class {int(annotation[:, 0].max())} has no name: there are {len(names)} class names",
                    path,
                )
        image_dir = split_check.image_dir
        root = image_dir.parent.parent if split_check.split else image_dir.parent
        dataset = cls.__new__(cls)
        dataset._setup(
            root,
            names,
            image_size,
            list(split_check.image_paths),
            list(split_check.annotations),
            split_check.skipped_lines,
        )
        return dataset

    def _setup(
        self,
        root: Path,
        class_names: tuple[str, ...],
        image_size: int,
        image_paths: list[Path],
        annotations: list[torch.Tensor],
        skipped_lines: int,
    ) -> None:
        self.root = root
        self.class_names = class_names
        self.image_size = image_size
        self.image_paths = image_paths
        self.annotations = annotations
        self.skipped_lines = skipped_lines
        self.max_objects = max([len(a) for a in self.annotations] + [1])

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> DetectionSample:
        image = read_image(self.image_paths[index])
        image = F.interpolate(
            image[None],
            size=(self.image_size, self.image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0].clamp(0, 1)
        annotation = self.annotations[index]
        centre, size = annotation[:, 1:3], annotation[:, 3:5]
        boxes = torch.cat((centre - size / 2, centre + size / 2), 1).clamp(0, 1) * self.image_size
        return DetectionSample(image, annotation[:, 0].long(), boxes, index)

    def image_name(self, index: int) -> str:
        """How logs and reports name image ``index``: its file."""
        return str(self.image_paths[index])


def split_dirs(root: Path, split: str | None) -> tuple[Path, Path]:
    """``(images folder, labels folder)`` of ``split`` (``None``: the layout with no split)."""
    if split:
        return root / "images" / split, root / "labels" / split
    return root / "images", root / "labels"


def label_tensor(rows: list[list[float]]) -> torch.Tensor:
    """``[n, 5]`` float32 ``class cx cy w h``."""
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def read_utf8_text(path: Path) -> str:
    """The file's text: UTF-8, a leading byte-order mark dropped (as ``utf-8-sig``).

    Raises :class:`YoloFormatError` naming the file when it cannot be read or is not UTF-8.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise YoloFormatError(f"cannot read: {error.strerror or error}", path) from None
    # The BOM is dropped by hand (not by the utf-8-sig codec) so that a bad byte's offset
    # counts from the start of the file.
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data:
        raise YoloFormatError("not UTF-8 text (UTF-16, or binary?); save it as UTF-8", path)
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        raise YoloFormatError(
            f"not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}); save it as UTF-8",
            path,
        ) from None


def parse_label_line(line: str, n_classes: int) -> list[float]:
    """``[class, cx, cy, w, h]`` of one label line; raises :class:`YoloFormatError` (the
    reason only: the caller names the file and line)."""
    fields = line.split()
    if len(fields) != 5:
        hint = (
            " (a segmentation polygon? only boxes are read)"
            if len(fields) > 5 and len(fields) % 2
            else ""
        )
        raise YoloFormatError(
            f"expected 'class cx cy w h' (5 fields), got {len(fields)}: {line.strip()!r}{hint}"
        )
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise YoloFormatError(f"non-numeric field in {line.strip()!r}") from None
    label, cx, cy, w, h = values
    if not label.is_integer():  # also NaN and infinities
        raise YoloFormatError(f"class {fields[0]} is not an integer id")
    if not 0 <= label < n_classes:
        raise YoloFormatError(
            f"class {fields[0]} is not an id in [0, {n_classes - 1}]: there are {n_classes} class names"
        )
    if not all(math.isfinite(v) for v in values[1:]):
        raise YoloFormatError(f"box {' '.join(fields[1:])} has a NaN or infinite coordinate")
    if not (w > 0 and h > 0):
        raise YoloFormatError(
            f"box (cx={cx}, cy={cy}, w={w}, h={h}) is empty: width and height must be > 0"
        )
    low, high = -COORD_TOLERANCE, 1 + COORD_TOLERANCE
    if not (low <= cx - w / 2 and cx + w / 2 <= high and low <= cy - h / 2 and cy + h / 2 <= high):
        raise YoloFormatError(
            f"box (cx={cx}, cy={cy}, w={w}, h={h}) reaches outside the image [0, 1]"
        )
    return values


def read_label_file(path: Path, n_classes: int) -> tuple[list[list[float]], list[tuple[int, str]]]:
    """``(rows of the good lines, (line number, reason) of each bad line)``; a missing file
    has no rows. Raises :class:`YoloFormatError` when the file cannot be read or decoded."""
    if not path.exists():
        return [], []
    rows: list[list[float]] = []
    bad_lines: list[tuple[int, str]] = []
    for line_no, line in enumerate(read_utf8_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(parse_label_line(line, n_classes))
        except YoloFormatError as error:
            bad_lines.append((line_no, error.reason))
    return rows, bad_lines


def clean_class_names(names: Sequence[object], source: str | Path) -> tuple[str, ...]:
    """``names`` stripped of whitespace; an empty list, an empty or repeated name, or one that
    is not text (YAML reads ``yes`` and ``null`` as other things) raises
    :class:`YoloFormatError` naming ``source``."""
    where = Path(source) if isinstance(source, Path) else None
    prefix = "" if where else f"{source}: "
    cleaned: list[str] = []
    for index, name in enumerate(names):
        if isinstance(name, bool) or not isinstance(name, (str, int, float)):
            raise YoloFormatError(
                f"{prefix}class {index}: name {name!r} is not text (quote it)", where
            )
        text = str(name).strip()
        if not text:
            raise YoloFormatError(f"{prefix}class {index} has an empty name", where)
        if text in cleaned:
            raise YoloFormatError(
                f"{prefix}class name {text!r} is given twice (classes {cleaned.index(text)} and {index})",
                where,
            )
        cleaned.append(text)
    if not cleaned:
        raise YoloFormatError(f"{prefix}no class names", where)
    return tuple(cleaned)


def read_class_names(root: Path) -> tuple[str, ...]:
    """Class names of the dataset at ``root``: ``classes.txt``, else ``data.yaml``."""
    classes_txt, data_yaml = root / "classes.txt", root / "data.yaml"
    if classes_txt.exists():
        lines = read_utf8_text(classes_txt).splitlines()
        while lines and not lines[-1].strip():  # trailing blank lines name nothing
            lines.pop()
        return clean_class_names(lines, classes_txt)
    if data_yaml.exists():
        return _yaml_class_names(data_yaml, classes_txt)
    raise YoloFormatError(f"{root}: no class names: pass them, or add classes.txt or data.yaml")


def _yaml_class_names(data_yaml: Path, classes_txt: Path) -> tuple[str, ...]:
    try:
        import yaml
    except ImportError:
        raise YoloFormatError(
            f"reading it needs PyYAML; install it, add {classes_txt} or pass the class names",
            data_yaml,
        ) from None
    try:
        content = yaml.safe_load(read_utf8_text(data_yaml))
    except yaml.YAMLError as error:
        raise YoloFormatError(
            f"not valid YAML: {' '.join(str(error).split())}", data_yaml
        ) from None
    if content is None:
        raise YoloFormatError("empty file: expected a mapping with 'names'", data_yaml)
    if not isinstance(content, dict):
        raise YoloFormatError(
            f"expected a mapping with 'names', got a {type(content).__name__}", data_yaml
        )
    names = content.get("names")
    if isinstance(names, dict):
        names = _names_by_id(names, data_yaml)
    elif not isinstance(names, list):
        raise YoloFormatError("'names' must be a list or a mapping of id to name", data_yaml)
    cleaned = clean_class_names(names, data_yaml)
    count = content.get("nc")
    if count is not None and count != len(cleaned):
        raise YoloFormatError(f"nc is {count!r} but 'names' has {len(cleaned)} names", data_yaml)
    return cleaned


def _names_by_id(names: dict, data_yaml: Path) -> list[object]:
    """The names of an ``id: name`` mapping in id order; the ids must be exactly 0..N-1
    (a gap would renumber every class after it)."""
    by_id: dict[int, object] = {}
    for key, name in names.items():
        if isinstance(key, int) and not isinstance(key, bool):
            index = key
        elif isinstance(key, str) and key.strip().isascii() and key.strip().isdigit():
            index = int(key)
        else:
            raise YoloFormatError(f"names: id {key!r} is not a class id 0, 1, ...", data_yaml)
        if index in by_id:
            raise YoloFormatError(f"names: id {index} is given twice", data_yaml)
        by_id[index] = name
    if not by_id:
        raise YoloFormatError("names: no class names", data_yaml)
    if min(by_id) < 0:
        raise YoloFormatError(f"names: id {min(by_id)} is negative", data_yaml)
    missing = sorted(set(range(max(by_id) + 1)) - set(by_id))
    if missing:
        raise YoloFormatError(
            f"names: no name for id {', '.join(map(str, missing))} (ids must run 0..{len(by_id) - 1} "
            f"with no gap; given: {', '.join(map(str, sorted(by_id)))})",
            data_yaml,
        )
    return [by_id[i] for i in range(len(by_id))]


def read_image(path: str | Path) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1] (grey is repeated, alpha dropped).

    Raises :class:`YoloFormatError` naming the file when it cannot be decoded or its pixels
    are not an image: a pickled array, ``C x H x W`` layout, bool or unsupported dtype,
    float pixels outside [0, 1] (e.g. 0-255), NaN or infinite pixels.
    """
    path = Path(path)
    array = _pixels_to_float(_decode_image(path), path)
    return torch.from_numpy(array).permute(2, 0, 1)


def _decode_image(path: Path) -> np.ndarray:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise YoloFormatError(f"cannot read image: {error.strerror or error}", path) from None
    if size == 0:
        raise YoloFormatError("cannot read image: empty file (0 bytes)", path)
    if path.suffix.lower() == ".npy":
        return _load_npy(path)
    try:
        from matplotlib import image as mpl_image
    except ImportError:
        raise ImportError(
            f"{path}: reading {path.suffix} images needs matplotlib (or use .npy)"
        ) from None
    try:
        return mpl_image.imread(path)
    # Pillow reports a damaged file in many ways (SyntaxError, OSError and its
    # UnidentifiedImageError, ValueError, struct.error, ...): each is this file's fault.
    except Exception as error:
        raise YoloFormatError(
            f"cannot read image: {type(error).__name__}: {' '.join(str(error).split())}", path
        ) from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        with path.open("rb") as file:
            is_npy = file.read(len(_NPY_MAGIC)) == _NPY_MAGIC
        if not is_npy:
            raise YoloFormatError("cannot read image: not a .npy file", path)
        array = np.load(path, allow_pickle=False)  # never run a file's pickled code
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise YoloFormatError(
                "holds an object array (pickled), not pixels; save a numeric H x W x 3 array",
                path,
            ) from None
        raise YoloFormatError(f"cannot read image: {error}", path) from None
    except (OSError, EOFError) as error:
        raise YoloFormatError(f"cannot read image: {error}", path) from None
    return array


def _pixels_to_float(array: np.ndarray, path: Path) -> np.ndarray:
    """``H x W x 3`` float32 in [0, 1] from any supported layout and dtype."""
    shape = array.shape
    if array.ndim == 3 and shape[0] in (1, 3, 4) and shape[1] > 4 and shape[2] > 4:
        raise YoloFormatError(
            f"shape {shape} looks like channels first (C x H x W); save H x W x C "
            "(array.transpose(1, 2, 0))",
            path,
        )
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise YoloFormatError(
            f"expected H x W, H x W x 3 or H x W x 4 pixels, got shape {shape}", path
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise YoloFormatError(f"no pixels (shape {shape})", path)
    # Grey (and grey + alpha) is repeated to RGB; alpha is dropped.
    array = array[..., :1].repeat(3, axis=2) if array.shape[2] < 3 else array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype.kind != "f":
        raise YoloFormatError(f"pixels of type {array.dtype} are not supported; {_SAVE_AS}", path)
    if not np.isfinite(array).all():
        raise YoloFormatError("NaN or infinite pixels", path)
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        hint = " (0-255? divide by 255 or save uint8)" if low >= 0 and high <= 255 else ""
        raise YoloFormatError(f"float pixels span [{low:g}, {high:g}], expected [0, 1]{hint}", path)
    return np.ascontiguousarray(array, dtype=np.float32)


def write_yolo_dataset(
    dataset: torch.utils.data.Dataset,
    root: str | Path,
    split: str,
    class_names: tuple[str, ...],
    image_format: str | None = None,
) -> Path:
    """Writes ``dataset`` (items: :class:`DetectionSample`) as ``ROOT/{images,labels}/SPLIT``
    with ``classes.txt`` and ``data.yaml`` (UTF-8); returns ``root``."""
    if image_format is None:
        try:
            import matplotlib  # noqa: F401

            image_format = "png"
        except ImportError:
            image_format = "npy"
    if image_format not in ("png", "npy"):
        raise ValueError(f"image_format must be 'png' or 'npy', got {image_format!r}")
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        sample = dataset[index]
        height, width = sample.image.shape[-2:]
        pixels = (sample.image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        name = f"{index:06d}"
        if image_format == "npy":
            np.save(image_dir / f"{name}.npy", pixels)
        else:
            from matplotlib import pyplot

            pyplot.imsave(image_dir / f"{name}.png", pixels)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = sample.boxes / scale
        lines = [
            f"{int(label)} {(b[0] + b[2]) / 2:.6f} {(b[1] + b[3]) / 2:.6f} {b[2] - b[0]:.6f} {b[3] - b[1]:.6f}"
            for label, b in zip(sample.labels.tolist(), boxes.tolist(), strict=True)
        ]
        (label_dir / f"{name}.txt").write_text(
            "".join(line + "\n" for line in lines), encoding="utf-8"
        )
    (root / "classes.txt").write_text(
        "".join(name + "\n" for name in class_names), encoding="utf-8"
    )
    splits = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    yaml_lines = ["path: .", *(f"{s}: images/{s}" for s in splits), "names:"]
    # JSON strings are YAML scalars: a name such as "yes" or "a: b" stays a string.
    yaml_lines += [
        f"  {i}: {json.dumps(name, ensure_ascii=False)}" for i, name in enumerate(class_names)
    ]
    (root / "data.yaml").write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    return root
