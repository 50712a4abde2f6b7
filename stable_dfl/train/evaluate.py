"""Validation: COCO-style mAP@0.5 and mAP@0.5:0.95, in numpy.

Matching follows COCO: per image and class, detections in descending score order each
take the unmatched ground truth they overlap most, if that IoU reaches the threshold.
AP is the area under the precision envelope sampled at 101 recall points; the mean
runs over classes that have ground truth.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models import HEAD_NAMES
from ..models.boxes import box_iou

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)
_RECALL_POINTS = np.linspace(0, 1, 101)


def average_precision(tp: np.ndarray, scores: np.ndarray, num_gt: int) -> float:
    """AP of detections with true-positive flags ``tp`` and ``scores``, against ``num_gt`` boxes."""
    if num_gt == 0:
        raise ValueError("AP is undefined without ground truth")
    order = np.argsort(-scores, kind="stable")
    tp_cum = np.cumsum(tp[order])
    fp_cum = np.cumsum(~tp[order])
    recall = tp_cum / num_gt
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
    # Precision envelope: the best precision at any recall at least this high.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, _RECALL_POINTS, side="left")
    sampled = np.where(index < len(envelope), envelope[np.minimum(index, len(envelope) - 1)], 0.0)
    return float(sampled.mean())


def _match(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """TP flags ``[D, T]`` for one image and class; detections in descending score order."""
    num_det, num_gt = ious.shape
    tp = np.zeros((num_det, len(thresholds)), dtype=bool)
    if num_gt == 0:
        return tp
    matched = np.zeros((len(thresholds), num_gt), dtype=bool)
    for d in range(num_det):
        candidates = (ious[d][None, :] >= thresholds[:, None]) & ~matched  # [T, G]
        best = np.where(candidates, ious[d][None, :], -1.0).argmax(1)
        hit = candidates.any(1)
        tp[d] = hit
        matched[np.nonzero(hit)[0], best[hit]] = True
    return tp


def mean_average_precision(
    detections: list[torch.Tensor],
    ground_truths: list[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    iou_thresholds: np.ndarray = IOU_THRESHOLDS,
) -> dict[str, float]:
    """``detections``: per image ``[N, 6]`` (x1, y1, x2, y2, score, class);
    ``ground_truths``: per image ``(labels [M], boxes [M, 4])``.

    Returns ``map50`` (IoU 0.5, the first threshold) and ``map`` (mean over thresholds);
    both 0.0 when there is no ground truth at all.
    """
    tp_parts: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    score_parts: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    num_gt = np.zeros(num_classes, dtype=int)
    for dets, (labels, boxes) in zip(detections, ground_truths, strict=True):
        dets, labels, boxes = dets.detach().cpu().float(), labels.cpu().long(), boxes.cpu().float()
        for c in range(num_classes):
            gt_boxes = boxes[labels == c]
            num_gt[c] += len(gt_boxes)
            class_dets = dets[dets[:, 5] == c]
            class_dets = class_dets[class_dets[:, 4].argsort(descending=True, stable=True)]
            if len(class_dets) == 0:
                continue
            ious = box_iou(class_dets[:, :4], gt_boxes).numpy()
            tp_parts[c].append(_match(ious, iou_thresholds))
            score_parts[c].append(class_dets[:, 4].numpy())
    per_class = []
    for c in range(num_classes):
        if num_gt[c] == 0:
            continue
        if not tp_parts[c]:
            per_class.append(np.zeros(len(iou_thresholds)))
            continue
        tp, scores = np.concatenate(tp_parts[c]), np.concatenate(score_parts[c])
        per_class.append(
            np.array(
                [average_precision(tp[:, t], scores, num_gt[c]) for t in range(len(iou_thresholds))]
            )
        )
    if not per_class:
        return {"map50": 0.0, "map": 0.0}
    ap = np.mean(per_class, axis=0)
    return {"map50": float(ap[0]), "map": float(ap.mean())}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device
) -> dict[str, float]:
    """mAP of every head of a :class:`DualHeadDetector` on ``loader``: keys ``<head>/map50``,
    ``<head>/map``."""
    was_training = model.training
    model.eval()
    detections: dict[str, list[torch.Tensor]] = {head: [] for head in HEAD_NAMES}
    ground_truths = []
    for batch in loader:
        output = model(batch.images.to(device))
        for head in HEAD_NAMES:
            detections[head].extend(model.postprocess(output, head))
        for labels, boxes, valid in zip(batch.labels, batch.boxes, batch.valid, strict=True):
            ground_truths.append((labels[valid], boxes[valid]))
    model.train(was_training)
    results = {}
    for head in HEAD_NAMES:
        for name, value in mean_average_precision(
            detections[head], ground_truths, model.num_classes
        ).items():
            results[f"{head}/{name}"] = value
    return results
