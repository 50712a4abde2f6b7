"""Detection data: the built-in synthetic set, a YOLO-format reader/writer, fixed-shape batching."""

from .dataset import DetectionBatch, DetectionSample, PadToFixedBoxes
from .synthetic import SHAPE_CLASSES, SyntheticShapes
from .yolo import YoloDataset, YoloFormatError, read_image, write_yolo_dataset

__all__ = [
    "SHAPE_CLASSES",
    "DetectionBatch",
    "DetectionSample",
    "PadToFixedBoxes",
    "SyntheticShapes",
    "YoloDataset",
    "YoloFormatError",
    "read_image",
    "write_yolo_dataset",
]
