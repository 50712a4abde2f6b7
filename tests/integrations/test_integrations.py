"""Drop-in integrations: ultralytics' DFLoss (parity against the installed ultralytics, patching,
a patched detector's training step) and mmdetection's DistributionFocalLoss (against its formula
in float64, registry). Tests that need ultralytics are skipped, with the reason, without it."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import stable_dfl.integrations
from stable_dfl import DEFAULT_EPS
from stable_dfl.integrations import mmdet as stable_mmdet
from stable_dfl.integrations import ultralytics as stable_ultralytics

from ..support.network import refuse_network

REG_MAX = 16
HOPELESS_SIDE_LOSS = -math.log(DEFAULT_EPS)  # 13.8: the most one element can cost


def in_range_box_case(n_anchors: int = 40, reg_max: int = REG_MAX):
    """BboxLoss's DFL inputs: pred_dist [4M, reg_max], ltrb targets [M, 4], some beyond the
    clamp range on both sides."""
    pred_dist = (torch.randn(4 * n_anchors, reg_max, dtype=torch.float64) * 2).float()
    target = torch.rand(n_anchors, 4) * (reg_max + 1) - 0.5
    return pred_dist.requires_grad_(), target


def hopeless_rows(n_rows: int, n_bins: int) -> torch.Tensor:
    """All probability on bin 0 (ln p = -60 elsewhere), to be scored against a far target."""
    pred = torch.full((n_rows, n_bins), -30.0)
    pred[:, 0] = 30.0
    return pred.requires_grad_()


# ---------------------------------------------------------------- ultralytics, no install needed


def test_drop_in_dfloss_leaves_the_target_alone_and_returns_one_loss_per_anchor():
    pred_dist, target = in_range_box_case()
    before = target.clone()
    loss = stable_ultralytics.DFLoss(REG_MAX)(pred_dist, target)
    assert loss.shape == (40, 1) and loss.dtype == torch.float32
    torch.testing.assert_close(target, before, rtol=0, atol=0)


def test_drop_in_dfloss_takes_no_anchors():
    loss = stable_ultralytics.DFLoss()(
        torch.zeros(0, REG_MAX, requires_grad=True), torch.zeros(0, 4)
    )
    assert loss.shape == (0, 1)
    loss.sum().backward()


def test_drop_in_dfloss_names_the_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"\[40, 16\]"):
        stable_ultralytics.DFLoss(REG_MAX)(torch.zeros(40, 64), torch.zeros(10, 4))


def test_patch_says_what_to_install_when_ultralytics_is_missing(monkeypatch):
    for name in ("ultralytics", "ultralytics.utils", "ultralytics.utils.loss"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail, installed or not
    with pytest.raises(ImportError, match="pip install ultralytics"):
        stable_ultralytics.patch()


def test_importing_the_integrations_imports_no_framework():
    code = (
        "import sys\n"
        "import stable_dfl.integrations.ultralytics, stable_dfl.integrations.mmdet\n"
        "print(sorted(m for m in ('ultralytics', 'mmdet') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # mmdet would be imported on purpose (to register) if it were installed; ultralytics never.
    assert "ultralytics" not in out.stdout


# ------------------------------------------------------------------- ultralytics, installed


@pytest.fixture
def restores_ultralytics(ultralytics_loss):
    """Leaves ultralytics unpatched whatever the test did."""
    upstream = ultralytics_loss.DFLoss
    yield ultralytics_loss
    stable_ultralytics.unpatch()
    assert ultralytics_loss.DFLoss is upstream


def test_values_and_gradients_match_ultralytics(ultralytics_loss):
    pred_dist, target = in_range_box_case()
    upstream_target = target.clone()  # ultralytics clamps its argument in place
    theirs = ultralytics_loss.DFLoss(REG_MAX)(pred_dist, upstream_target)
    ours = stable_ultralytics.DFLoss(REG_MAX)(pred_dist, target)
    assert ours.shape == theirs.shape == (40, 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    upstream_grad = torch.rand_like(theirs)  # as BboxLoss weights each anchor
    (g_theirs,) = torch.autograd.grad(theirs, pred_dist, upstream_grad)
    (g_ours,) = torch.autograd.grad(ours, pred_dist, upstream_grad)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)


def test_a_hopeless_prediction_costs_at_most_the_floor_unlike_ultralytics(ultralytics_loss):
    pred_dist = hopeless_rows(8, REG_MAX)
    target = torch.full((2, 4), 14.5)
    theirs = ultralytics_loss.DFLoss(REG_MAX)(pred_dist, target.clone())
    ours = stable_ultralytics.DFLoss(REG_MAX)(pred_dist, target)
    torch.testing.assert_close(theirs, torch.full((2, 1), 60.0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours, torch.full((2, 1), HOPELESS_SIDE_LOSS), rtol=1e-5, atol=0)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), pred_dist)
    (g_ours,) = torch.autograd.grad(ours.sum(), pred_dist)
    assert torch.count_nonzero(g_theirs) > 0
    assert torch.count_nonzero(g_ours) == 0, "the floor is active: no gradient, as torch.clamp"


def test_patch_and_unpatch_round_trip(restores_ultralytics):
    loss_module = restores_ultralytics
    upstream = loss_module.DFLoss
    stable_ultralytics.patch()
    stable_ultralytics.patch()  # idempotent
    assert loss_module.DFLoss is stable_ultralytics.DFLoss
    assert type(loss_module.BboxLoss(REG_MAX).dfl_loss) is stable_ultralytics.DFLoss
    assert loss_module.BboxLoss(1).dfl_loss is None  # reg_max 1 has no DFL, patched or not
    stable_ultralytics.unpatch()
    stable_ultralytics.unpatch()  # idempotent
    assert loss_module.DFLoss is upstream
    assert type(loss_module.BboxLoss(REG_MAX).dfl_loss) is upstream


def _offline_detection_model(yaml_name: str):
    """A small ultralytics DetectionModel from a yaml that ships with it, random weights."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    model = DetectionModel(yaml_name, nc=3, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)  # the hyperparameters (box/cls/dfl gains) the trainer sets
    return model.train()


def _detection_batch():
    return {
        "batch_idx": torch.tensor([0.0, 1.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0], [2.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]),
    }


@pytest.fixture
def network_attempts(monkeypatch):
    """Every attempt to resolve or connect, each refused (as on a machine without network)."""
    attempts = []
    refuse_network(attempts, monkeypatch.setattr)
    return attempts


def test_patched_yolov8_trains_a_step_offline_like_unpatched(
    restores_ultralytics, network_attempts
):
    loss_module = restores_ultralytics
    torch.manual_seed(0)
    model = _offline_detection_model("yolov8n.yaml")
    preds = model(torch.rand(2, 3, 64, 64))
    upstream_criterion = loss_module.v8DetectionLoss(model)
    stable_ultralytics.patch()
    criterion = loss_module.v8DetectionLoss(model)
    assert type(criterion.bbox_loss.dfl_loss) is stable_ultralytics.DFLoss

    loss, items = criterion(preds, _detection_batch())
    upstream_loss, _ = upstream_criterion(preds, _detection_batch())
    assert items["dfl_loss"] > 0, "the batch must have foreground anchors"
    torch.testing.assert_close(loss, upstream_loss, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss.sum(), params, retain_graph=True)
    upstream_grads = torch.autograd.grad(upstream_loss.sum(), params)
    for grad, upstream_grad in zip(grads, upstream_grads, strict=True):
        torch.testing.assert_close(grad, upstream_grad, rtol=1e-4, atol=1e-6)
    assert network_attempts == []


def test_patch_criterion_swaps_both_branches_of_an_end_to_end_loss(
    restores_ultralytics, network_attempts
):
    model = _offline_detection_model("yolov10n.yaml")  # one-to-many and one-to-one heads
    criterion = model.init_criterion()
    branches = (criterion.one2many, criterion.one2one)
    upstream = restores_ultralytics.DFLoss
    assert stable_ultralytics.patch_criterion(criterion) == 2
    assert all(type(b.bbox_loss.dfl_loss) is stable_ultralytics.DFLoss for b in branches)
    assert stable_ultralytics.patch_criterion(criterion) == 0  # already swapped
    assert stable_ultralytics.unpatch_criterion(criterion) == 2
    assert all(type(b.bbox_loss.dfl_loss) is upstream for b in branches)
    assert network_attempts == []


# ------------------------------------------------------------------------------- mmdetection


def mmdet_dfl_oracle(pred, label, weight=None, reduction="mean", avg_factor=None, loss_weight=1.0):
    """mmdetection 3.x distribution_focal_loss + weight_reduce_loss, in float64."""
    pred, label = pred.double(), label.double()
    dis_left = label.long()
    dis_right = dis_left + 1
    weight_left = dis_right.double() - label
    weight_right = label - dis_left.double()
    loss = (
        F.cross_entropy(pred, dis_left, reduction="none") * weight_left
        + F.cross_entropy(pred, dis_right, reduction="none") * weight_right
    )
    if weight is not None:
        loss = loss * weight.double()
    if avg_factor is None:
        loss = {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    elif reduction == "mean":
        loss = loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
    return loss_weight * loss


def gfl_case(n_rows: int = 60, reg_max: int = 16):
    """GFL's DFL inputs: pred [N, reg_max + 1], targets clamped by the head to reg_max - 0.1."""
    pred = (torch.randn(n_rows, reg_max + 1, dtype=torch.float64) * 2).float().requires_grad_()
    target = (torch.rand(n_rows) * reg_max).clamp(max=reg_max - 0.1)
    return pred, target


# mmdetection rejects avg_factor with 'sum' (tested below).
REDUCTIONS_AND_AVG_FACTORS = [
    (reduction, avg_factor)
    for reduction in ("none", "mean", "sum")
    for avg_factor in (None, 4.0, "tensor")
    if reduction != "sum" or avg_factor is None
]


@pytest.mark.parametrize(("reduction", "avg_factor"), REDUCTIONS_AND_AVG_FACTORS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("via_override", [False, True])
def test_mmdet_loss_matches_mmdet_formula(reduction, avg_factor, weighted, via_override):
    pred, target = gfl_case()
    weight = torch.rand(60) if weighted else None
    factor = torch.tensor(4.0) if avg_factor == "tensor" else avg_factor
    if via_override:
        loss_fn = stable_mmdet.DistributionFocalLoss(reduction="sum", loss_weight=0.25)
        ours = loss_fn(pred, target, weight, avg_factor=factor, reduction_override=reduction)
    else:
        loss_fn = stable_mmdet.DistributionFocalLoss(reduction=reduction, loss_weight=0.25)
        ours = loss_fn(pred, target, weight, avg_factor=factor)
    x = pred.detach().double().requires_grad_()
    expected = mmdet_dfl_oracle(x, target, weight, reduction, factor, loss_weight=0.25)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    grad_out = torch.rand_like(expected)
    (g_ours,) = torch.autograd.grad(ours, pred, grad_out.float())
    (g_expected,) = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(g_ours.double(), g_expected, rtol=1e-4, atol=1e-6)


def test_mmdet_class_is_importable_by_its_registered_name():
    from stable_dfl.integrations.mmdet import StableDistributionFocalLoss

    assert StableDistributionFocalLoss is stable_mmdet.DistributionFocalLoss
    assert stable_mmdet.REGISTERED_NAME == "StableDistributionFocalLoss"


def test_mmdet_loss_with_no_positives_is_zero_like_mmdet():
    pred, target = gfl_case()
    weight = torch.zeros(60)
    ours = stable_mmdet.DistributionFocalLoss()(pred, target, weight, avg_factor=0)
    assert ours.item() == 0.0 == mmdet_dfl_oracle(pred, target, weight, avg_factor=0).item()


def test_mmdet_loss_rejects_what_mmdet_rejects():
    pred, target = gfl_case()
    loss_fn = stable_mmdet.DistributionFocalLoss()
    with pytest.raises(ValueError, match="avg_factor can not be used"):
        loss_fn(pred, target, avg_factor=4.0, reduction_override="sum")
    with pytest.raises(ValueError, match="reduction_override"):
        loss_fn(pred, target, reduction_override="average")


def test_mmdet_loss_floors_a_hopeless_prediction_unlike_mmdet():
    pred = hopeless_rows(8, 17)
    target = torch.full((8,), 15.5)
    ours = stable_mmdet.DistributionFocalLoss(reduction="none")(pred, target)
    torch.testing.assert_close(ours, torch.full((8,), HOPELESS_SIDE_LOSS), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        mmdet_dfl_oracle(pred, target, reduction="none"),
        torch.full((8,), 60.0, dtype=torch.float64),
    )


class FakeRegistry:
    """The part of mmengine's Registry used here: a name taken without force is an error."""

    def __init__(self):
        self.module_dict: dict[str, type] = {}

    def register_module(self, name=None, force=False, module=None):
        if not force and name in self.module_dict:
            raise KeyError(f"{name} is already registered")
        self.module_dict[name] = module
        return module


@pytest.fixture
def fake_mmdet(monkeypatch):
    """A stand-in mmdetection: mmdet.registry.MODELS already holding mmdet's own DFL class."""
    registry = FakeRegistry()
    mmdet_own_dfl = type("DistributionFocalLoss", (torch.nn.Module,), {})
    registry.register_module(name="DistributionFocalLoss", module=mmdet_own_dfl)
    modules = {
        name: types.ModuleType(name)
        for name in ("mmdet", "mmdet.registry", "mmdet.models", "mmdet.models.losses")
    }
    modules["mmdet.registry"].MODELS = registry
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return registry, mmdet_own_dfl


def test_register_adds_the_stable_loss_and_leaves_mmdets_own(fake_mmdet):
    registry, mmdet_own_dfl = fake_mmdet
    stable_mmdet.register()
    stable_mmdet.register()  # idempotent
    built = registry.module_dict["StableDistributionFocalLoss"](loss_weight=0.25)
    assert isinstance(built, stable_mmdet.DistributionFocalLoss) and built.loss_weight == 0.25
    assert registry.module_dict["DistributionFocalLoss"] is mmdet_own_dfl


def test_register_with_force_replaces_mmdets_own(fake_mmdet):
    registry, _ = fake_mmdet
    stable_mmdet.register(force=True)
    stable_mmdet.register(force=True)
    assert registry.module_dict["DistributionFocalLoss"] is stable_mmdet.DistributionFocalLoss
    assert registry.module_dict["StableDistributionFocalLoss"] is stable_mmdet.DistributionFocalLoss


def test_importing_registers_when_mmdet_is_importable(fake_mmdet, monkeypatch):
    registry, _ = fake_mmdet
    module_name = "stable_dfl.integrations.mmdet"
    # A fresh import of the module, undone afterwards (sys.modules and the package attribute).
    monkeypatch.delitem(sys.modules, module_name)
    monkeypatch.setattr(stable_dfl.integrations, "mmdet", stable_mmdet, raising=False)
    fresh = importlib.import_module(module_name)
    assert fresh is not stable_mmdet
    assert registry.module_dict["StableDistributionFocalLoss"] is fresh.DistributionFocalLoss


def test_register_says_what_to_install_when_mmdet_is_missing(monkeypatch):
    # As if not installed, even where it is and was imported already.
    monkeypatch.setitem(sys.modules, "mmdet", None)
    monkeypatch.setitem(sys.modules, "mmdet.registry", None)
    with pytest.raises(ImportError, match="pip install mmdet"):
        stable_mmdet.register()
