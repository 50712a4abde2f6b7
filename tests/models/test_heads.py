import math

import pytest
import torch

from stable_dfl.data import PadToFixedBoxes, SyntheticShapes
from stable_dfl.models import (
    DetectionLoss,
    DetectionTargets,
    DualHeadDetector,
    PrototypeDetectionHead,
    StandardDetectionHead,
)
from stable_dfl.models.heads import PRIOR_PROB

N_BINS = 16


def _batch(n=8, size=64):
    data = SyntheticShapes(n, size, seed=3)
    return PadToFixedBoxes(data.max_objects)([data[i] for i in range(n)])


@pytest.mark.parametrize("head_class", [StandardDetectionHead, PrototypeDetectionHead])
def test_each_head_calls_initialize_weights(monkeypatch, head_class):
    calls = []
    original = head_class._initialize_weights

    def spy(self):
        calls.append(type(self))
        original(self)

    monkeypatch.setattr(head_class, "_initialize_weights", spy)
    DualHeadDetector(num_classes=3, width=4, fpn_channels=16, embed_dim=8)
    assert calls == [head_class]


def test_initial_outputs_are_small_and_at_the_prior():
    model = DualHeadDetector(num_classes=5, n_bins=N_BINS, width=8, fpn_channels=32).train()
    with torch.no_grad():
        output = model(_batch().images)
    for name, (box_logits, cls_logits) in output.heads.items():
        assert box_logits.shape[-1] == 4 * N_BINS
        # Near-zero box logits: every side's distribution starts (almost) uniform.
        assert box_logits.abs().max() < 0.5, name
        probs = cls_logits.sigmoid()
        assert probs.max() < 0.2, name
        assert probs.mean().item() == pytest.approx(PRIOR_PROB, rel=0.5), name
    assert model.standard_head.cls_branch[-1].bias.detach() == pytest.approx(
        [math.log(PRIOR_PROB / (1 - PRIOR_PROB))] * 5
    )
    assert torch.all(model.standard_head.box_branch[-1].bias == 0)
    assert torch.all(model.prototype_head.box_branch[-1].bias == 0)


def test_first_dfl_loss_is_log_n_bins_and_first_gradients_are_small():
    model = DualHeadDetector(num_classes=5, n_bins=N_BINS, width=8, fpn_channels=32)
    batch = _batch()
    loss, components = DetectionLoss(5, N_BINS, dfl_weight=0.5)(
        model(batch.images), DetectionTargets(batch.labels, batch.boxes, batch.valid)
    )
    for head in ("standard", "prototype"):
        assert components[f"dfl_loss_{head}"] == pytest.approx(math.log(N_BINS), abs=0.05)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm(
        [p.grad for p in model.parameters() if p.grad is not None]
    )
    assert 0 < grad_norm < 1.0


def test_prototypes_from_support_embeddings():
    head = PrototypeDetectionHead(16, num_classes=3, embed_dim=4)
    before = head.prototypes.detach().clone()
    embeddings = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 5.0]])
    head.set_prototypes(embeddings, torch.tensor([0, 0, 2]))
    assert torch.allclose(head.prototypes[0], torch.tensor([1, 1, 0, 0]) / math.sqrt(2))
    assert torch.equal(head.prototypes[1], before[1])  # no support: unchanged
    assert torch.allclose(head.prototypes[2], torch.tensor([0.0, 0, 0, 1]))


def test_prototypes_from_support_images_change_only_supported_classes():
    model = DualHeadDetector(num_classes=5, width=4, fpn_channels=16, embed_dim=8).eval()
    batch = _batch(4)
    before = model.prototype_head.prototypes.detach().clone()
    model.set_prototypes_from_support(batch.images, batch.boxes, batch.labels, batch.valid)
    supported = set(batch.labels[batch.valid].tolist())
    for c in range(5):
        changed = not torch.equal(model.prototype_head.prototypes[c], before[c])
        assert changed == (c in supported)


def test_fixed_temperature_is_not_learned():
    head = PrototypeDetectionHead(16, num_classes=2, temperature=0.25, learn_temperature=False)
    assert "log_scale" not in dict(head.named_parameters())
    assert head.temperature == pytest.approx(0.25)


def test_predict_gives_each_image_its_detections_of_the_chosen_head():
    model = DualHeadDetector(num_classes=3, width=4, fpn_channels=16, embed_dim=8).eval()
    images = torch.rand(2, 3, 64, 64)
    for head in ("standard", "prototype"):
        detections = model.predict(images, head, score_threshold=0.0, max_detections=7)
        assert len(detections) == 2
        for found, expected in zip(
            detections, model.postprocess(model(images), head, 0.0, 0.6, 1000, 7), strict=True
        ):
            assert found.shape[1] == 6 and 0 < len(found) <= 7
            torch.testing.assert_close(found, expected)
            assert found[:, 5].lt(3).all() and found[:, 4].ge(0).all()
        assert not detections[0].requires_grad
