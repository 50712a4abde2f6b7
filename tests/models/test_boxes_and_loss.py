import math

import pytest
import torch

from stable_dfl.models import (
    DetectionLoss,
    DetectionTargets,
    DetectorOutput,
    HeadOutput,
    make_anchors,
)
from stable_dfl.models.boxes import aligned_iou, batched_nms, box_iou, boxes_to_distances, nms
from stable_dfl.ops.reference import TARGET_MARGIN

N_BINS = 16


def test_iou_variants_on_known_boxes():
    a = torch.tensor([0.0, 0, 2, 2])
    b = torch.tensor([1.0, 1, 3, 3])
    assert aligned_iou(a, b).item() == pytest.approx(1 / 7, rel=1e-5)
    # Enclosing box 3x3 = 9, union 7: GIoU = 1/7 - 2/9.
    assert aligned_iou(a, b, "giou").item() == pytest.approx(1 / 7 - 2 / 9, rel=1e-5)
    # Same aspect ratio: CIoU = IoU - centre distance^2 / diagonal^2 = 1/7 - 2/18.
    assert aligned_iou(a, b, "ciou").item() == pytest.approx(1 / 7 - 2 / 18, rel=1e-4)
    for kind in ("iou", "giou", "ciou"):
        assert aligned_iou(a, a, kind).item() == pytest.approx(1.0, abs=1e-5)
    assert box_iou(a[None], b[None]).item() == pytest.approx(1 / 7, rel=1e-5)


def test_ciou_gradient_is_finite_against_degenerate_boxes():
    pred = torch.tensor([[0.0, 0, 4, 4], [1, 1, 1, 1]], requires_grad=True)
    target = torch.zeros(2, 4)  # padded / background targets
    aligned_iou(pred, target, "ciou").sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_nms_suppresses_overlaps_within_a_class_only():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert sorted(batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist()) == [0, 1, 2]


def _perfect_output(gt_box: torch.Tensor, num_classes: int = 2) -> DetectorOutput:
    """Box logits whose two-bin distributions decode exactly to ``gt_box`` at every anchor."""
    points, strides = make_anchors([(8, 8), (4, 4), (2, 2)], (8, 16, 32), "cpu", torch.float32)
    target = boxes_to_distances(
        gt_box.expand(len(points), 4) / strides, points / strides, N_BINS - 1 - TARGET_MARGIN
    )
    left = target.floor()
    weight_right = target - left
    probs = torch.zeros(len(points), 4, N_BINS)
    probs.scatter_(-1, left.long()[..., None], (1 - weight_right)[..., None])
    probs.scatter_add_(-1, left.long()[..., None] + 1, weight_right[..., None])
    box_logits = probs.clamp(min=1e-12).log().reshape(1, len(points), 4 * N_BINS)
    cls_logits = torch.full((1, len(points), num_classes), -4.0)
    return DetectorOutput({"standard": HeadOutput(box_logits, cls_logits)}, points, strides)


def _entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0


def test_loss_on_perfect_box_predictions():
    gt_box = torch.tensor([12.0, 12.0, 36.0, 30.0])
    output = _perfect_output(gt_box)
    targets = DetectionTargets(torch.tensor([[1]]), gt_box[None, None], torch.tensor([[True]]))
    _, components = DetectionLoss(2, N_BINS)(output, targets)
    assert components["iou_loss"] < 1e-4
    # DFL of a distribution exactly on the target is its own entropy, far below log(n_bins).
    assert components["dfl_loss"] < 0.7
    assert torch.isfinite(components["cls_loss"])


def test_loss_with_uniform_boxes_and_without_objects():
    points, strides = make_anchors([(8, 8), (4, 4), (2, 2)], (8, 16, 32), "cpu", torch.float32)
    heads = {
        "standard": HeadOutput(
            torch.zeros(2, len(points), 4 * N_BINS, requires_grad=True),
            torch.full((2, len(points), 3), -4.6, requires_grad=True),
        )
    }
    output = DetectorOutput(heads, points, strides)
    gt = DetectionTargets(
        torch.tensor([[0, 0], [2, 0]]),
        torch.tensor([[[8.0, 8, 40, 40], [0, 0, 0, 0]], [[30, 5, 60, 25], [0, 0, 0, 0]]]),
        torch.tensor([[True, False], [True, False]]),
    )
    loss, components = DetectionLoss(3, N_BINS)(output, gt)
    assert components["dfl_loss"] == pytest.approx(math.log(N_BINS), abs=1e-4)
    loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in heads["standard"])

    empty = DetectionTargets(
        torch.zeros(2, 2, dtype=torch.long),
        torch.zeros(2, 2, 4),
        torch.zeros(2, 2, dtype=torch.bool),
    )
    loss, components = DetectionLoss(3, N_BINS)(output, empty)
    assert components["iou_loss"] == 0 and components["dfl_loss"] == 0
    assert torch.isfinite(loss)
