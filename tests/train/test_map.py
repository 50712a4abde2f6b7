import pytest
import torch

from stable_dfl.train.evaluate import mean_average_precision

GT = [(torch.tensor([0, 1]), torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]))]


def _det(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def test_perfect_detections_score_one():
    dets = [_det([0, 0, 10, 10, 0.9, 0], [20, 20, 40, 40, 0.8, 1])]
    assert mean_average_precision(dets, GT, 2) == {
        "map50": pytest.approx(1.0),
        "map": pytest.approx(1.0),
    }


def test_no_detections_score_zero():
    assert mean_average_precision([_det()], GT, 2) == {"map50": 0.0, "map": 0.0}


def test_higher_scored_false_positive_halves_precision():
    # Class 0: a false positive ranked above the true positive -> precision 1/2 at full recall.
    dets = [_det([50, 50, 60, 60, 0.9, 0], [0, 0, 10, 10, 0.5, 0], [20, 20, 40, 40, 0.8, 1])]
    result = mean_average_precision(dets, GT, 2)
    assert result["map50"] == pytest.approx((0.5 + 1.0) / 2)


def test_loose_box_counts_only_at_low_thresholds():
    # IoU 100/144 = 0.69: a hit at thresholds 0.50..0.65 (4 of 10).
    dets = [_det([0, 0, 12, 12, 0.9, 0])]
    result = mean_average_precision(dets, [(GT[0][0][:1], GT[0][1][:1])], 2)
    assert result["map50"] == pytest.approx(1.0)
    assert result["map"] == pytest.approx(0.4)


def test_wrong_class_and_duplicates_are_false_positives():
    dets = [
        _det(
            [0, 0, 10, 10, 0.9, 1],
            [0, 0, 10, 10, 0.8, 0],
            [0, 0, 10, 10, 0.7, 0],
            [20, 20, 40, 40, 0.6, 1],
        )
    ]
    result = mean_average_precision(dets, GT, 2)
    # Class 0: TP then duplicate FP -> AP 1. Class 1: FP (0.9) then TP (0.6) -> AP 0.5.
    assert result["map50"] == pytest.approx(0.75)
