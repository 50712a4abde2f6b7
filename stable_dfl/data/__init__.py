"""Detection data: the built-in synthetic set, a YOLO-format reader/writer, the up-front
dataset check, fixed-shape batching."""

from .check import DatasetCheck, DatasetError, Problem, SplitCheck, check_dataset
from .dataset import DetectionBatch, DetectionSample, PadToFixedBoxes
from .synthetic import SHAPE_CLASSES, SyntheticShapes
from .yolo import YoloDataset, YoloFormatError, read_image, write_yolo_dataset

__all__ = [
    "SHAPE_CLASSES",
    "DatasetCheck",
    "DatasetError",
    "DetectionBatch",
    "DetectionSample",
    "PadToFixedBoxes",
    "Problem",
    "SplitCheck",
    "SyntheticShapes",
    "YoloDataset",
    "YoloFormatError",
    "check_dataset",
    "read_image",
    "write_yolo_dataset",
]
