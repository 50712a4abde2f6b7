"""Task-aligned label assignment (TOOD, Feng et al. 2021; as used by YOLOv8).

For every ground-truth box, the candidate anchors are those whose centre lies inside
it. Each candidate gets the alignment metric ``score ** alpha * iou ** beta`` (score:
the predicted probability of the box's class, iou: predicted box vs ground truth); the
``topk`` best become positives. An anchor claimed by several boxes keeps the one it
overlaps most. Soft class targets are the alignment metric rescaled, per box, so its
best anchor's target equals that anchor's best IoU with it (an IoU-aware score).
Box-regression weights are the alignment metric rescaled so that each box's best
anchor weighs 1: every object drives the box losses equally, however poorly it is
localised yet (the class targets would let badly localised small objects, whose
first IoUs are ~0.01, fall out of the box losses for good).

Shapes are fixed: padded ground-truth slots are masked out with ``gt_valid``, and the
result is dense (``[B, A, ...]``) with a foreground mask instead of indices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .boxes import aligned_iou


class Assignment(NamedTuple):
    target_boxes: torch.Tensor
    """``[B, A, 4]``: the assigned box (xyxy pixels); for background anchors a copy of an
    arbitrary ground truth (masked out of every loss)."""
    target_scores: torch.Tensor
    """``[B, A, C]``: soft class targets, zero for background anchors."""
    box_weights: torch.Tensor
    """``[B, A]`` in [0, 1]: weight of each anchor in the box losses, 1 for each box's best anchor."""
    foreground: torch.Tensor
    """``[B, A]`` bool."""


class TaskAlignedAssigner:
    def __init__(
        self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9
    ) -> None:
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def __call__(
        self,
        pred_scores: torch.Tensor,
        pred_boxes: torch.Tensor,
        anchor_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_valid: torch.Tensor,
    ) -> Assignment:
        """``pred_scores [B, A, C]`` (probabilities), ``pred_boxes [B, A, 4]``, ``anchor_points
        [A, 2]``, ``gt_labels [B, M]``, ``gt_boxes [B, M, 4]``, ``gt_valid [B, M]`` bool."""
        batch, num_anchors, num_classes = pred_scores.shape
        num_gt = gt_boxes.shape[1]
        if num_gt == 0:
            return Assignment(
                pred_boxes.new_zeros(batch, num_anchors, 4),
                pred_scores.new_zeros(batch, num_anchors, num_classes),
                pred_scores.new_zeros(batch, num_anchors),
                torch.zeros(batch, num_anchors, dtype=torch.bool, device=pred_scores.device),
            )
        gt_labels = gt_labels.long().clamp(0, num_classes - 1)
        inside = self._centres_inside(anchor_points, gt_boxes) & gt_valid[..., None]  # [B, M, A]

        ious = aligned_iou(gt_boxes[:, :, None, :], pred_boxes[:, None, :, :]).clamp(
            min=0
        )  # [B, M, A]
        class_scores = pred_scores.gather(
            2, gt_labels[:, None, :].expand(batch, num_anchors, num_gt)
        ).transpose(1, 2)  # [B, M, A]: each anchor's score for each box's class
        metric = class_scores.pow(self.alpha) * ious.pow(self.beta) * inside

        topk = min(self.topk, num_anchors)
        top_index = metric.topk(topk, dim=-1).indices
        in_topk = torch.zeros_like(inside).scatter_(-1, top_index, True)
        positive = in_topk & inside  # [B, M, A]

        # An anchor claimed by several boxes keeps the one with the highest IoU.
        claimed_by_many = positive.sum(1, keepdim=True) > 1
        best_gt = F.one_hot(ious.argmax(1), num_gt).transpose(1, 2).bool()  # [B, M, A]
        positive = torch.where(claimed_by_many, best_gt & inside, positive)

        foreground = positive.any(1)  # [B, A]
        gt_index = positive.float().argmax(1)  # [B, A]
        target_boxes = gt_boxes.gather(1, gt_index[..., None].expand(batch, num_anchors, 4))
        target_labels = gt_labels.gather(1, gt_index)
        target_scores = F.one_hot(target_labels, num_classes).to(pred_scores.dtype)

        metric = metric * positive
        best_metric = metric.amax(-1, keepdim=True)  # [B, M, 1]
        best_iou = (ious * positive).amax(-1, keepdim=True)
        relative_metric = metric / (
            best_metric + self.eps
        )  # [B, M, A], 1 at each box's best anchor
        box_weights = relative_metric.amax(1) * foreground  # [B, A]
        target_scores = (
            target_scores * ((relative_metric * best_iou).amax(1) * foreground)[..., None]
        )
        return Assignment(target_boxes, target_scores, box_weights, foreground)

    @staticmethod
    def _centres_inside(
        anchor_points: torch.Tensor, gt_boxes: torch.Tensor, margin: float = 1e-9
    ) -> torch.Tensor:
        """``[B, M, A]``: anchor centre strictly inside the box."""
        left_top = anchor_points[None, None] - gt_boxes[..., None, :2]
        right_bottom = gt_boxes[..., None, 2:] - anchor_points[None, None]
        return torch.cat((left_top, right_bottom), -1).amin(-1) > margin
