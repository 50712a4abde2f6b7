"""The dual-head detector, its loss and label assignment."""

from .assigner import Assignment, TaskAlignedAssigner
from .criterion import LOSS_NAMES, DetectionLoss, DetectionTargets
from .dual_head import HEAD_NAMES, DetectorOutput, DualHeadDetector, make_anchors
from .heads import HeadOutput, PrototypeDetectionHead, StandardDetectionHead

__all__ = [
    "HEAD_NAMES",
    "LOSS_NAMES",
    "Assignment",
    "DetectionLoss",
    "DetectionTargets",
    "DetectorOutput",
    "DualHeadDetector",
    "HeadOutput",
    "PrototypeDetectionHead",
    "StandardDetectionHead",
    "TaskAlignedAssigner",
    "make_anchors",
]
