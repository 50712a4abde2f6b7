"""The mmdetection drop-in against the real library (mmdet 3.3.0, mmengine 0.10.7, mmcv-lite
2.1.0 with the compiled-op stand-in of tests/support/mmcv_ops.py): parity with mmdet's own
``DistributionFocalLoss``, the registry routes a config takes, and mmdet's own
``GFLHead.loss_by_feat`` with our loss in it."""

from __future__ import annotations

import textwrap

import pytest
import torch

pytest.importorskip("mmdet", reason="mmdetection is not installed (see scripts/ensure_env.sh)")

from ..support import mmcv_ops

mmcv_ops.install()

from mmdet.models.losses import DistributionFocalLoss as MmdetDFL  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402

from stable_dfl.integrations import mmdet as stable_mmdet  # noqa: E402

N_BINS = 17  # GFL's reg_max = 16: 17 bins per side
LOW_PRECISION = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture
def registry():
    """mmdet's MODELS registry, restored after the test (registering is global)."""
    saved = dict(MODELS._module_dict)
    yield MODELS
    MODELS._module_dict.clear()
    MODELS._module_dict.update(saved)


def _case(n: int = 200, scale: float = 1.0, dtype=torch.float32, seed: int = 0):
    """Logits in range: every probability above the 1e-6 floor, where the two losses agree."""
    generator = torch.Generator().manual_seed(seed)
    pred = (torch.randn(n, N_BINS, generator=generator) * scale).to(dtype)
    label = torch.rand(n, generator=generator) * (N_BINS - 1 - 0.01)
    label[:3] = torch.tensor([0.0, N_BINS - 1 - 0.01, 5.0])  # the edges and a bin exactly
    weight = torch.rand(n, generator=generator)
    return pred, label, weight


def _loss_and_grad(loss_fn, pred, label, *args, **kwargs):
    x = pred.clone().requires_grad_()
    loss = loss_fn(x, label, *args, **kwargs)
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("avg_factor", [None, 37.5])
@pytest.mark.parametrize("via_override", [False, True])
def test_values_and_gradients_match_mmdets_own_loss(reduction, weighted, avg_factor, via_override):
    if avg_factor is not None and reduction == "sum":
        pytest.skip("mmdet refuses avg_factor with reduction='sum'")
    pred, label, weight = _case()
    kwargs = {"weight": weight if weighted else None, "avg_factor": avg_factor}
    if via_override:
        theirs_fn, ours_fn = MmdetDFL("sum", 0.25), stable_mmdet.DistributionFocalLoss("sum", 0.25)
        kwargs["reduction_override"] = reduction
    else:
        theirs_fn = MmdetDFL(reduction, 0.25)
        ours_fn = stable_mmdet.DistributionFocalLoss(reduction, 0.25)
    theirs, their_grad = _loss_and_grad(theirs_fn, pred, label, **kwargs)
    ours, our_grad = _loss_and_grad(ours_fn, pred, label, **kwargs)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_as_close_to_float64_as_mmdets_or_closer(dtype):
    pred, label, weight = _case(dtype=dtype)
    exact = MmdetDFL("none")(pred.double(), label.double(), weight.double())
    theirs = MmdetDFL("none")(pred, label, weight)
    ours = stable_mmdet.DistributionFocalLoss("none")(pred, label, weight)
    our_error = (ours.double() - exact).abs().max().item()
    their_error = (theirs.double() - exact).abs().max().item()
    assert our_error <= 1e-5 and our_error <= their_error
    assert (ours.double() - theirs.double()).abs().max().item() <= their_error + 1e-5
    assert their_error <= 8 * LOW_PRECISION[dtype] * exact.abs().max().item()


def test_register_force_replaces_mmdets_class_before_and_after_register_all_modules(registry):
    from mmdet.utils import register_all_modules

    stable_mmdet.register(force=True)
    register_all_modules()  # mmdet's own registration must not undo ours
    assert registry.get("DistributionFocalLoss") is stable_mmdet.DistributionFocalLoss
    assert registry.get("StableDistributionFocalLoss") is stable_mmdet.DistributionFocalLoss
    registry._module_dict["DistributionFocalLoss"] = MmdetDFL
    register_all_modules()
    stable_mmdet.register(force=True)
    built = registry.build(dict(type="DistributionFocalLoss", loss_weight=0.25))
    assert type(built) is stable_mmdet.DistributionFocalLoss and built.loss_weight == 0.25


def test_custom_imports_in_a_real_config_build_our_loss(tmp_path, registry):
    from mmengine.config import Config

    config_file = tmp_path / "gfl_stable.py"
    config_file.write_text(
        textwrap.dedent(
            """
            custom_imports = dict(imports=["stable_dfl.integrations.mmdet"], allow_failed_imports=False)
            loss_dfl = dict(type="StableDistributionFocalLoss", loss_weight=0.25)
            """
        )
    )
    config = Config.fromfile(str(config_file))
    loss = registry.build(config.loss_dfl)
    assert type(loss) is stable_mmdet.DistributionFocalLoss and loss.loss_weight == 0.25


def _gfl_head(loss_dfl: dict):
    from mmdet.models.dense_heads import GFLHead
    from mmengine.config import ConfigDict

    torch.manual_seed(0)  # the same initial weights for every head
    return GFLHead(
        num_classes=3,
        in_channels=8,
        stacked_convs=1,
        feat_channels=8,
        norm_cfg=dict(type="GN", num_groups=4, requires_grad=True),
        anchor_generator=dict(
            type="AnchorGenerator",
            ratios=[1.0],
            octave_base_scale=4,
            scales_per_octave=1,
            strides=[8, 16, 32],
        ),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
        loss_dfl=loss_dfl,
        train_cfg=ConfigDict(
            assigner=dict(type="ATSSAssigner", topk=9),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
    )


def _gfl_losses(head, regression_scale: float = 1.0):
    """``loss_by_feat`` on fixed random features of 2 images of 128 px, 3 boxes each, and the
    gradient of the summed DFL loss with respect to the box regression outputs."""
    from mmengine.structures import InstanceData

    generator = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 8, size, size, generator=generator) for size in (16, 8, 4)]
    cls_scores, bbox_preds = head(feats)
    bbox_preds = [(b * regression_scale).detach().requires_grad_() for b in bbox_preds]
    metas = [dict(img_shape=(128, 128), pad_shape=(128, 128), scale_factor=(1.0, 1.0))] * 2
    gts = []
    for _ in range(2):
        gt = InstanceData()
        gt.bboxes = torch.tensor(
            [[4.0, 6.0, 40.0, 44.0], [50.0, 30.0, 110.0, 100.0], [70.0, 64.0, 90.0, 90.0]]
        )
        gt.labels = torch.tensor([0, 2, 1])
        gts.append(gt)
    losses = head.loss_by_feat(cls_scores, bbox_preds, gts, metas)
    dfl = sum(losses["loss_dfl"])
    grads = torch.autograd.grad(dfl, bbox_preds)
    return dfl.detach(), grads


@pytest.mark.parametrize("regression_scale", [1.0, 30.0])
def test_gfl_heads_loss_by_feat_with_our_loss(regression_scale, registry):
    theirs_head = _gfl_head(dict(type="DistributionFocalLoss", loss_weight=0.25))
    ours_head = _gfl_head(dict(type="StableDistributionFocalLoss", loss_weight=0.25))
    assert type(theirs_head.loss_dfl) is MmdetDFL
    assert type(ours_head.loss_dfl) is stable_mmdet.DistributionFocalLoss
    theirs, their_grads = _gfl_losses(theirs_head, regression_scale)
    ours, our_grads = _gfl_losses(ours_head, regression_scale)
    assert theirs.item() > 0, "the boxes must have positive anchors"
    if regression_scale == 1.0:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        for our_grad, their_grad in zip(our_grads, their_grads, strict=True):
            torch.testing.assert_close(our_grad, their_grad, rtol=1e-4, atol=1e-7)
    else:
        # Exploded regression logits: mmdet's loss grows without bound, ours is floored per
        # element at -log(1e-6) (times the weights mmdet applies).
        assert torch.isfinite(ours) and ours.item() < theirs.item()
        assert all(torch.isfinite(g).all() for g in our_grads)
