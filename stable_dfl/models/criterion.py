"""Training loss of the dual-head detector: classification + IoU + DFL for each head.

Per head, with targets from :class:`TaskAlignedAssigner` (run on that head's own
predictions):

* ``cls_loss``: varifocal loss (VarifocalNet, Zhang et al. 2021; as in PP-YOLOE): BCE
  against the soft targets ``q``, weighted by ``q`` on foreground entries and by
  ``alpha * p ** gamma`` on background ones, summed and divided by the sum of the
  targets. The many easy background anchors thus barely count, and the score learns
  to rank anchors by localisation quality, which is what mAP measures.
* ``iou_loss``: ``1 - CIoU`` of the decoded boxes, averaged over foreground anchors,
  weighted by the assigner's box weights.
* ``dfl_loss``: :class:`stable_dfl.StableDFLLoss` over the four sides of foreground
  anchors, with the same weights; targets are the ltrb distances in bin units. With
  uniform distributions it equals ``log(n_bins)``.

The total is the mean over heads of ``cls_weight * cls + iou_weight * iou + dfl_weight * dfl``.
Logged components are averaged over heads, unweighted, so ``dfl_loss`` reads on the
same scale as ``log(n_bins)`` whatever ``dfl_weight`` is. All shapes are fixed: the
foreground mask goes to the losses as a mask or weight, never as a boolean index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import StableDFLLoss
from ..ops.reference import TARGET_MARGIN
from .assigner import TaskAlignedAssigner
from .boxes import aligned_iou, boxes_to_distances, distances_to_boxes
from .dual_head import DetectorOutput, expected_distances
from .naive_dfl import NaiveDFLLoss

LOSS_NAMES = ("cls_loss", "iou_loss", "dfl_loss")


@dataclass
class DetectionTargets:
    labels: torch.Tensor
    """``[B, M]`` class ids (padded slots: any value)."""
    boxes: torch.Tensor
    """``[B, M, 4]`` xyxy pixels."""
    valid: torch.Tensor
    """``[B, M]`` bool: which slots hold a real box."""


def varifocal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0
) -> torch.Tensor:
    """Summed varifocal loss of ``logits`` against soft ``targets`` in [0, 1] (same shape)."""
    probs = logits.sigmoid()
    weight = torch.where(targets > 0, targets, alpha * probs.detach().pow(gamma))
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight).sum()


class DetectionLoss(nn.Module):
    def __init__(
        self,
        num_classes: int,
        n_bins: int = 16,
        cls_weight: float = 1.0,
        iou_weight: float = 2.5,
        dfl_weight: float = 0.5,
        assigner: TaskAlignedAssigner | None = None,
        dfl_impl: str = "stable",
        naive_dfl_dtype: torch.dtype | None = None,
    ) -> None:
        """``dfl_impl='naive'`` swaps in :class:`NaiveDFLLoss` (computed in
        ``naive_dfl_dtype``, e.g. the autocast dtype) for before/after experiments."""
        super().__init__()
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.cls_weight = cls_weight
        self.iou_weight = iou_weight
        self.dfl_weight = dfl_weight
        self.assigner = assigner or TaskAlignedAssigner()
        if dfl_impl not in ("stable", "naive"):
            raise ValueError(f"dfl_impl must be 'stable' or 'naive', got {dfl_impl!r}")
        self.dfl = (
            StableDFLLoss(n_bins=n_bins, reduction="mean")
            if dfl_impl == "stable"
            else NaiveDFLLoss(n_bins, naive_dfl_dtype)
        )

    def forward(
        self, output: DetectorOutput, targets: DetectionTargets
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss (scalar) and detached components: ``LOSS_NAMES`` averaged over heads,
        and ``<name>_<head>`` per head."""
        # Losses in fp32 even under autocast: the log/exp and the IoU terms need the range.
        with torch.autocast(output.anchor_points.device.type, enabled=False):
            total = output.anchor_points.new_zeros(())
            num_heads = len(output.heads)
            components: dict[str, torch.Tensor] = {}
            for head, head_output in output.heads.items():
                losses = self._head_losses(
                    head_output.box_logits.float(), head_output.cls_logits.float(), output, targets
                )
                total = (
                    total
                    + (
                        self.cls_weight * losses["cls_loss"]
                        + self.iou_weight * losses["iou_loss"]
                        + self.dfl_weight * losses["dfl_loss"]
                    )
                    / num_heads
                )
                for name, value in losses.items():
                    components[f"{name}_{head}"] = value.detach()
            for name in LOSS_NAMES:
                components[name] = torch.stack(
                    [components[f"{name}_{h}"] for h in output.heads]
                ).mean()
        return total, components

    def _head_losses(
        self,
        box_logits: torch.Tensor,
        cls_logits: torch.Tensor,
        output: DetectorOutput,
        targets: DetectionTargets,
    ) -> dict[str, torch.Tensor]:
        anchor_points, strides = output.anchor_points, output.strides
        pred_distances = expected_distances(box_logits, self.n_bins)  # bin units
        pred_boxes = distances_to_boxes(pred_distances * strides, anchor_points)
        assignment = self.assigner(
            cls_logits.detach().sigmoid(),
            pred_boxes.detach(),
            anchor_points,
            targets.labels,
            targets.boxes,
            targets.valid,
        )
        cls_loss = varifocal_loss(cls_logits, assignment.target_scores)
        cls_loss = cls_loss / assignment.target_scores.sum().clamp(min=1)

        anchor_weight = assignment.box_weights  # [B, A], 0 on background
        weight_sum = anchor_weight.sum().clamp(min=1e-6)
        ious = aligned_iou(pred_boxes, assignment.target_boxes, kind="ciou")
        iou_loss = ((1.0 - ious) * anchor_weight).sum() / weight_sum

        dfl_targets = boxes_to_distances(
            assignment.target_boxes / strides,
            anchor_points / strides,
            self.n_bins - 1 - TARGET_MARGIN,
        )
        dfl_loss = self.dfl(
            box_logits,
            dfl_targets,
            weight=anchor_weight[..., None],
            avg_factor=4 * weight_sum,
            mask=assignment.foreground[..., None],
        )
        return {"cls_loss": cls_loss, "iou_loss": iou_loss, "dfl_loss": dfl_loss}
