"""Detection samples and batching to fixed shapes."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DetectionSample(NamedTuple):
    image: torch.Tensor
    """``[3, H, W]`` float in [0, 1]."""
    labels: torch.Tensor
    """``[N]`` long class ids."""
    boxes: torch.Tensor
    """``[N, 4]`` xyxy pixels."""
    index: int = -1
    """The sample's index in its dataset (-1: not from one)."""


class DetectionBatch(NamedTuple):
    images: torch.Tensor
    """``[B, 3, H, W]``."""
    labels: torch.Tensor
    """``[B, M]``; padded slots hold 0."""
    boxes: torch.Tensor
    """``[B, M, 4]``; padded slots hold zeros."""
    valid: torch.Tensor
    """``[B, M]`` bool: real boxes."""
    indices: torch.Tensor
    """``[B]`` long: each image's index in its dataset (what names its file)."""


class PadToFixedBoxes:
    """Collate function: pads every image's boxes to ``max_objects`` slots, so that every
    batch has the same shape (the loss and assigner never see a ragged tensor)."""

    def __init__(self, max_objects: int) -> None:
        self.max_objects = max_objects

    def __call__(self, samples: list[DetectionSample]) -> DetectionBatch:
        batch = len(samples)
        labels = torch.zeros(batch, self.max_objects, dtype=torch.long)
        boxes = torch.zeros(batch, self.max_objects, 4)
        valid = torch.zeros(batch, self.max_objects, dtype=torch.bool)
        for i, sample in enumerate(samples):
            count = len(sample.labels)
            if count > self.max_objects:
                raise ValueError(
                    f"an image has {count} boxes, more than max_objects={self.max_objects}"
                )
            labels[i, :count] = sample.labels
            boxes[i, :count] = sample.boxes
            valid[i, :count] = True
        indices = torch.tensor([s.index for s in samples], dtype=torch.long)
        return DetectionBatch(
            torch.stack([s.image for s in samples]), labels, boxes, valid, indices
        )
