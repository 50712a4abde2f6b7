"""YOLO-format datasets on disk: a reader and a writer.

Layout (as ultralytics): ``ROOT/images/SPLIT/NAME.EXT`` and ``ROOT/labels/SPLIT/NAME.txt``
(or ``ROOT/images`` and ``ROOT/labels`` with no split), one ``class cx cy w h`` line per
box, coordinates normalised to [0, 1]. An image without a label file has no objects.
Class names come from the ``class_names`` argument, else ``ROOT/classes.txt`` (one per
line), else the ``names`` of ``ROOT/data.yaml`` (needs PyYAML).

Images: ``.npy`` (``H x W x 3`` uint8 or float in [0, 1]) are read with numpy alone;
``.png``/``.jpg``/``.jpeg`` through matplotlib (lazily imported: only those files need
it). The writer uses ``.png`` when matplotlib is installed and ``.npy`` otherwise,
unless told. Images are resized (stretched) to ``image_size`` squares; normalised boxes
stay valid under that.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import DetectionSample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
#: Tolerance on normalised coordinates (labelling tools round boxes at the image edge).
COORD_TOLERANCE = 1e-3


class YoloFormatError(ValueError):
    """A malformed or inconsistent YOLO dataset; the message names the file (and line)."""


class YoloDataset(torch.utils.data.Dataset):
    """Reads a YOLO-format split. Labels are parsed up front, images on access.

    With ``strict=True`` (default) the first bad label line raises :class:`YoloFormatError`
    naming ``file:line``; with ``strict=False`` bad lines are skipped, counted in
    ``skipped_lines`` and reported in one warning.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        class_names: list[str] | None = None,
        image_size: int = 96,
        strict: bool = True,
    ) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.class_names = tuple(class_names) if class_names else read_class_names(self.root)
        image_dir = self.root / "images" / split if split else self.root / "images"
        label_dir = self.root / "labels" / split if split else self.root / "labels"
        if not image_dir.is_dir():
            raise YoloFormatError(f"{image_dir}: image folder not found")
        self.image_paths = sorted(
            p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        stems = {p.stem for p in self.image_paths}
        if label_dir.is_dir():
            for label_path in sorted(label_dir.glob("*.txt")):
                if label_path.stem not in stems:
                    raise YoloFormatError(
                        f"{label_path}: no image {label_path.stem}{{{','.join(IMAGE_SUFFIXES)}}} in {image_dir}"
                    )
        self.skipped_lines = 0
        self.annotations = [
            self._parse(label_dir / f"{p.stem}.txt", strict) for p in self.image_paths
        ]
        if self.skipped_lines:
            warnings.warn(
                f"{self.root}: skipped {self.skipped_lines} malformed label line(s)", stacklevel=2
            )
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
        return DetectionSample(image, annotation[:, 0].long(), boxes)

    def _parse(self, label_path: Path, strict: bool) -> torch.Tensor:
        rows: list[list[float]] = []
        if not label_path.exists():
            return torch.zeros(0, 5)
        for line_no, line in enumerate(label_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(self._parse_line(line))
            except YoloFormatError as error:
                if strict:
                    raise YoloFormatError(f"{label_path}:{line_no}: {error}") from None
                self.skipped_lines += 1
        return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)

    def _parse_line(self, line: str) -> list[float]:
        fields = line.split()
        if len(fields) != 5:
            raise YoloFormatError(
                f"expected 'class cx cy w h' (5 fields), got {len(fields)}: {line.strip()!r}"
            )
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise YoloFormatError(f"non-numeric field in {line.strip()!r}") from None
        label, cx, cy, w, h = values
        if not label.is_integer() or not 0 <= label < len(self.class_names):
            raise YoloFormatError(
                f"class {fields[0]} is not an id in [0, {len(self.class_names) - 1}]"
            )
        low, high = -COORD_TOLERANCE, 1 + COORD_TOLERANCE
        if not (
            w > 0
            and h > 0
            and low <= cx - w / 2
            and cx + w / 2 <= high
            and low <= cy - h / 2
            and cy + h / 2 <= high
        ):
            raise YoloFormatError(
                f"box (cx={cx}, cy={cy}, w={w}, h={h}) is empty or outside the image [0, 1]"
            )
        return values


def read_class_names(root: Path) -> tuple[str, ...]:
    classes_txt, data_yaml = root / "classes.txt", root / "data.yaml"
    if classes_txt.exists():
        return tuple(line.strip() for line in classes_txt.read_text().splitlines() if line.strip())
    if data_yaml.exists():
        try:
            import yaml
        except ImportError:
            raise YoloFormatError(
                f"{data_yaml}: reading it needs PyYAML; install it, add {classes_txt} or pass the class names"
            ) from None
        names = yaml.safe_load(data_yaml.read_text()).get("names")
        if isinstance(names, dict):
            return tuple(names[i] for i in sorted(names))
        if isinstance(names, list):
            return tuple(names)
        raise YoloFormatError(f"{data_yaml}: 'names' must be a list or a mapping of id to name")
    raise YoloFormatError(f"{root}: no class names: pass them, or add classes.txt or data.yaml")


def read_image(path: Path) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1] (grey is repeated, alpha dropped)."""
    if path.suffix.lower() == ".npy":
        array = np.load(path)
    else:
        try:
            from matplotlib import image as mpl_image
        except ImportError:
            raise ImportError(
                f"{path}: reading {path.suffix} images needs matplotlib (or use .npy)"
            ) from None
        array = mpl_image.imread(path)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise YoloFormatError(f"{path}: expected an H x W x 3 image, got shape {array.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1)
    return tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()


def write_yolo_dataset(
    dataset: torch.utils.data.Dataset,
    root: str | Path,
    split: str,
    class_names: tuple[str, ...],
    image_format: str | None = None,
) -> Path:
    """Writes ``dataset`` (items: :class:`DetectionSample`) as ``ROOT/{images,labels}/SPLIT``
    with ``classes.txt`` and ``data.yaml``; returns ``root``."""
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
        (label_dir / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    (root / "classes.txt").write_text("".join(name + "\n" for name in class_names))
    splits = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    yaml_lines = ["path: .", *(f"{s}: images/{s}" for s in splits), "names:"]
    yaml_lines += [f"  {i}: {name}" for i, name in enumerate(class_names)]
    (root / "data.yaml").write_text("\n".join(yaml_lines) + "\n")
    return root
