import torch

from stable_dfl.models import TaskAlignedAssigner, make_anchors


def _anchors():
    return make_anchors([(8, 8)], (8,), "cpu", torch.float32)[0]  # centres 4, 12, ..., 60


def _assign(gt_boxes, gt_labels, gt_valid, pred_boxes=None, topk=4, num_classes=3):
    points = _anchors()
    if pred_boxes is None:  # every anchor predicts a 16x16 box around itself
        pred_boxes = torch.cat((points - 8, points + 8), -1)[None]
    scores = torch.full((1, len(points), num_classes), 0.5)
    return TaskAlignedAssigner(topk=topk)(
        scores, pred_boxes, points, gt_labels, gt_boxes, gt_valid
    ), points


def test_positives_are_inside_the_box_and_at_most_topk():
    gt = torch.tensor([[[0.0, 0, 32, 32]]])
    result, points = _assign(gt, torch.tensor([[2]]), torch.tensor([[True]]))
    fg = result.foreground[0]
    assert fg.sum() == 4
    inside = (points > 0).all(1) & (points < 32).all(1)
    assert not (fg & ~inside).any()
    assert torch.equal(result.target_boxes[0, fg], gt[0].expand(4, 4))
    assert (result.target_scores[0, fg, 2] > 0).all()
    assert result.target_scores[0, :, :2].abs().sum() == 0
    assert result.target_scores[0, ~fg].abs().sum() == 0
    # Best aligned anchor: box weight 1, soft class target = its IoU (16x16 box inside 32x32 -> 0.25).
    assert torch.isclose(result.box_weights[0].max(), torch.tensor(1.0))
    assert torch.isclose(result.target_scores[0].max(), torch.tensor(0.25))


def test_anchor_claimed_by_two_boxes_goes_to_the_higher_iou():
    points = _anchors()
    # Anchor (20, 20) predicts exactly box A; box B also contains it.
    box_a = torch.tensor([12.0, 12, 28, 28])
    box_b = torch.tensor([14.0, 14, 46, 46])
    pred = torch.cat((points - 8, points + 8), -1)[None]
    index = int(((points - 20).abs().sum(1)).argmin())
    pred[0, index] = box_a
    result, _ = _assign(
        torch.stack((box_a, box_b))[None],
        torch.tensor([[0, 1]]),
        torch.tensor([[True, True]]),
        pred,
    )
    assert result.foreground[0, index]
    assert torch.equal(result.target_boxes[0, index], box_a)
    assert result.target_scores[0, index, 0] > 0 and result.target_scores[0, index, 1] == 0


def test_padded_slots_and_empty_targets_give_no_positives():
    padded, _ = _assign(
        torch.tensor([[[0.0, 0, 32, 32]]]), torch.tensor([[0]]), torch.tensor([[False]])
    )
    assert not padded.foreground.any()
    assert padded.target_scores.abs().sum() == 0
    empty, _ = _assign(
        torch.zeros(1, 0, 4),
        torch.zeros(1, 0, dtype=torch.long),
        torch.zeros(1, 0, dtype=torch.bool),
    )
    assert not empty.foreground.any()
