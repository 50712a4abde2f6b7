"""A built-in, deterministic synthetic detection set: coloured shapes on textured backgrounds.

Image ``i`` of a split depends only on ``(seed, split, i)``, never on the order it is
read in, so the set is reproducible and cheap to rebuild. Each class is a shape with
its own saturated hue (jittered per object) on a greyish textured background; size,
position and count vary. Tying hue to class keeps the task learnable in a few
minutes on a CPU at the stage-2 learning rate (3e-5): shape alone takes a tiny model
far longer to pick up.
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import DetectionSample

SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "cross")
CLASS_COLOURS = np.array(
    [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (200, 50, 200)], dtype=float
)
COLOUR_JITTER = 25
_SPLIT_IDS = {"train": 0, "val": 1}
_MAX_PLACEMENT_TRIES = 20


class SyntheticShapes(torch.utils.data.Dataset):
    """``num_images`` images of ``image_size`` pixels with 1 to ``max_objects`` shapes each.

    Shapes span ``min_size`` to ``max_size`` of the image side and overlap each other by at
    most ``max_overlap`` IoU. Images are rendered once, on construction.
    """

    def __init__(
        self,
        num_images: int,
        image_size: int = 96,
        split: str = "train",
        seed: int = 0,
        max_objects: int = 4,
        min_size: float = 0.15,
        max_size: float = 0.45,
        max_overlap: float = 0.2,
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {tuple(_SPLIT_IDS)}, got {split!r}")
        self.class_names = SHAPE_CLASSES
        self.split = split
        self.image_size = image_size
        self.max_objects = max_objects
        self._min_size, self._max_size, self._max_overlap = min_size, max_size, max_overlap
        samples = [
            self._render(np.random.default_rng([seed, _SPLIT_IDS[split], i]))
            for i in range(num_images)
        ]
        self.images = (
            torch.from_numpy(np.stack([image for image, _ in samples]))
            .permute(0, 3, 1, 2)
            .contiguous()
        )
        self.annotations = [torch.from_numpy(boxes) for _, boxes in samples]

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> DetectionSample:
        annotation = self.annotations[index]
        return DetectionSample(
            self.images[index].float() / 255.0, annotation[:, 0].long(), annotation[:, 1:], index
        )

    def image_name(self, index: int) -> str:
        """How logs and reports name image ``index``."""
        return f"synthetic {self.split} image {index}"

    def _render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = self.image_size
        image = _textured_background(rng, size)
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        boxes: list[np.ndarray] = []
        rows = []
        for _ in range(rng.integers(1, self.max_objects + 1)):
            for _ in range(_MAX_PLACEMENT_TRIES):
                side = rng.uniform(self._min_size, self._max_size) * size
                x1, y1 = rng.uniform(0, size - side, 2)
                box = np.array([x1, y1, x1 + side, y1 + side])
                if all(_iou(box, other) <= self._max_overlap for other in boxes):
                    break
            else:
                continue
            label = int(rng.integers(len(SHAPE_CLASSES)))
            mask = _shape_mask(SHAPE_CLASSES[label], xs, ys, box)
            image[mask] = CLASS_COLOURS[label] + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
            tight = _mask_box(mask)
            boxes.append(box)
            rows.append([label, *tight])
        annotation = np.array(rows, dtype=np.float32).reshape(-1, 5)
        return image.clip(0, 255).astype(np.uint8), annotation


def _textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A greyish base colour with a few random plane waves and pixel noise."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(60, 190) + rng.uniform(-20, 20, 3)
    image = np.broadcast_to(base, (size, size, 3)).copy()
    for _ in range(3):
        frequency = rng.uniform(2, 10, 2) * 2 * np.pi
        wave = np.sin(frequency[0] * xs + frequency[1] * ys + rng.uniform(0, 2 * np.pi))
        image += wave[..., None] * rng.uniform(-25, 25, 3)
    return image + rng.normal(0, 6, (size, size, 3))


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, box: np.ndarray) -> np.ndarray:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = (box[2] - box[0]) / 2
    u, v = (xs - cx) / half, (ys - cy) / half  # in [-1, 1] inside the box
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)
    if shape == "triangle":  # apex up
        return (v <= 0.9) & (v >= -0.9) & (np.abs(u) <= (v + 0.9) / 1.8)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    raise ValueError(f"unknown shape {shape!r}")


def _mask_box(mask: np.ndarray) -> list[float]:
    """Tight xyxy box (pixel edges) of a boolean mask."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union
