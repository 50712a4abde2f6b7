"""What each image of a batch holds: its pixels' range and its boxes' statistics."""

from __future__ import annotations

import math
from typing import Any

import torch


def pixel_facts(images: torch.Tensor) -> list[dict[str, Any]]:
    """Per image of ``[B, ...]``: NaN/Inf pixel count and the finite pixels' range."""
    facts = []
    for image in images.detach():
        values = image.float()
        finite = torch.isfinite(values)
        kept = values[finite]
        facts.append(
            {
                "nonfinite_pixels": int(finite.numel() - finite.sum()),
                "pixel_min": float(kept.min()) if kept.numel() else math.nan,
                "pixel_max": float(kept.max()) if kept.numel() else math.nan,
            }
        )
    return facts


def box_facts(
    sides: torch.Tensor, finite: torch.Tensor, inside: torch.Tensor, bad_class: torch.Tensor
) -> dict[str, Any]:
    """The facts of one image's ``n`` boxes: their sides ``[n, 2]`` in pixels, and per box
    whether its coordinates are finite, whether it lies in the image and whether its class
    id is bad (``[n]`` bools each)."""
    finite_sides = sides[finite]
    return {
        "boxes": len(sides),
        "min_side": float(finite_sides.min()) if finite_sides.numel() else math.nan,
        "max_side": float(finite_sides.max()) if finite_sides.numel() else math.nan,
        "degenerate_boxes": int((finite & (sides <= 0).any(1)).sum()),
        "out_of_range_boxes": int((~(finite & inside)).sum()),
        "bad_class_ids": int(bad_class.sum()),
    }


def detection_label_facts(
    labels: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor,
    image_size: tuple[int, int],
    num_classes: int,
) -> list[dict[str, Any]]:
    """Per image: box count, smallest and largest box side (pixels), and the suspicious ones.

    ``labels`` ``[B, M]``, ``boxes`` ``[B, M, 4]`` xyxy pixels, ``valid`` ``[B, M]`` (real
    boxes), ``image_size`` ``(height, width)``. A box is *degenerate* when a side is not
    positive, *out of range* when a coordinate is NaN/Inf or outside the image (beyond a
    pixel), and its class is *bad* outside ``[0, num_classes)``.
    """
    height, width = image_size
    facts = []
    for image_labels, image_boxes, image_valid in zip(labels, boxes, valid, strict=True):
        real = image_boxes[image_valid].detach().double()
        classes = image_labels[image_valid]
        inside = (
            (real[:, [0, 2]] >= -1).all(1)
            & (real[:, [0, 2]] <= width + 1).all(1)
            & (real[:, [1, 3]] >= -1).all(1)
            & (real[:, [1, 3]] <= height + 1).all(1)
        )
        facts.append(
            box_facts(
                torch.stack((real[:, 2] - real[:, 0], real[:, 3] - real[:, 1]), 1),
                torch.isfinite(real).all(1),
                inside,
                (classes < 0) | (classes >= num_classes),
            )
        )
    return facts


#: The label facts that mark an image's labels as suspect.
SUSPECT_LABEL_FACTS = ("degenerate_boxes", "out_of_range_boxes", "bad_class_ids")


def label_problems(facts: dict[str, Any]) -> list[str]:
    """``["2 degenerate boxes", ...]`` for the suspicious counts of one image's facts."""
    return [
        f"{facts[key]} {key.replace('_', ' ')}"
        for key in SUSPECT_LABEL_FACTS
        if isinstance(facts.get(key), int) and facts[key] > 0
    ]
