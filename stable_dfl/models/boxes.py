"""Box geometry in plain torch: IoU variants, NMS and the ltrb <-> xyxy conversions.

Boxes are ``xyxy`` in pixels unless a name says otherwise. Every function works on
arbitrary leading dimensions, so the loss and the assigner keep fixed shapes.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-7


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``boxes1 [..., N, 4]`` and ``boxes2 [..., M, 4]``: ``[..., N, M]``."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (
        boxes1[..., 3] - boxes1[..., 1]
    ).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (
        boxes2[..., 3] - boxes2[..., 1]
    ).clamp(min=0)
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter / (area1[..., :, None] + area2[..., None, :] - inter + _EPS)


def aligned_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, kind: str = "iou", eps: float = _EPS
) -> torch.Tensor:
    """IoU, GIoU or CIoU of matching boxes ``[..., 4]`` and ``[..., 4]``: ``[...]``.

    Differentiable and finite for degenerate (zero-area) boxes, which padded or
    background targets are: every division has ``eps`` in its denominator.
    """
    if kind not in ("iou", "giou", "ciou"):
        raise ValueError(f"kind must be 'iou', 'giou' or 'ciou', got {kind!r}")
    x1, y1, x2, y2 = boxes1.unbind(-1)
    u1, v1, u2, v2 = boxes2.unbind(-1)
    w1, h1 = (x2 - x1).clamp(min=0), (y2 - y1).clamp(min=0)
    w2, h2 = (u2 - u1).clamp(min=0), (v2 - v1).clamp(min=0)
    inter = (torch.minimum(x2, u2) - torch.maximum(x1, u1)).clamp(min=0) * (
        torch.minimum(y2, v2) - torch.maximum(y1, v1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    enclose_w = torch.maximum(x2, u2) - torch.minimum(x1, u1)
    enclose_h = torch.maximum(y2, v2) - torch.minimum(y1, v1)
    if kind == "giou":
        enclose_area = enclose_w * enclose_h + eps
        return iou - (enclose_area - union) / enclose_area
    # CIoU (Zheng et al. 2020): centre distance over the enclosing diagonal, plus aspect ratio.
    diagonal_sq = enclose_w**2 + enclose_h**2 + eps
    centre_dist_sq = ((u1 + u2 - x1 - x2) ** 2 + (v1 + v2 - y1 - y2) ** 2) / 4
    aspect = (4 / math.pi**2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))) ** 2
    with torch.no_grad():
        alpha = aspect / (aspect - iou + (1 + eps))
    return iou - (centre_dist_sq / diagonal_sq + aspect * alpha)


def distances_to_boxes(distances: torch.Tensor, anchor_points: torch.Tensor) -> torch.Tensor:
    """``ltrb`` distances ``[..., A, 4]`` from ``anchor_points [A, 2]`` to ``xyxy`` boxes."""
    left_top, right_bottom = distances.split(2, dim=-1)
    return torch.cat((anchor_points - left_top, anchor_points + right_bottom), dim=-1)


def boxes_to_distances(
    boxes: torch.Tensor, anchor_points: torch.Tensor, max_distance: float
) -> torch.Tensor:
    """``xyxy`` boxes ``[..., A, 4]`` to ``ltrb`` distances from ``anchor_points``, clamped to
    ``[0, max_distance]`` (the DFL target range)."""
    top_left, bottom_right = boxes.split(2, dim=-1)
    distances = torch.cat((anchor_points - top_left, bottom_right - anchor_points), dim=-1)
    return distances.clamp(0, max_distance)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    Quadratic in the number of boxes, which the caller bounds (pre-NMS top-k).
    """
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    suppressed_by = box_iou(boxes, boxes) > iou_threshold
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1 :] &= ~suppressed_by[i, i + 1 :]
    return order[keep]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each class: boxes of different classes are offset so they never overlap."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = classes.to(boxes.dtype)[:, None] * (boxes.max() + 1)
    return nms(boxes + offsets, scores, iou_threshold)
