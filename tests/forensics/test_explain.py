"""explain_step on the dual-head detector with planted faults of each kind, under fp32, bf16
and fp16 autocast: each is found where it was planted and blamed on the right thing, and
the model is left bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stable_dfl.data import PadToFixedBoxes, SyntheticShapes
from stable_dfl.forensics import (
    AUTOCAST_OVERFLOW,
    LOSS_SCALE_OVERFLOW,
    NONFINITE_IN_FP32,
    NONFINITE_INPUT,
    NOT_REPRODUCED,
    detection_label_facts,
    explain_step,
    select_batch,
)
from stable_dfl.models import DetectionLoss, DetectionTargets, DualHeadDetector

from ..support.runs import assert_bit_identical

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: 64 px: the deepest level is 2x2, so BatchNorm runs on a single image and the bisection
#: can single one out.
IMAGE_SIZE = 64
BATCH = 8
#: The image every planted data fault is put into.
BAD_IMAGE = 5
#: A convolution deep in the backbone, and one in a head.
BACKBONE_CONV = "backbone.stage3.1.body.0.0"
HEAD_CONV = "standard_head.box_branch.1.0"


class Setup:
    def __init__(self) -> None:
        data = SyntheticShapes(BATCH, IMAGE_SIZE)
        batch = PadToFixedBoxes(4)([data[i] for i in range(BATCH)])
        self.num_classes = len(data.class_names)
        self.model = DualHeadDetector(self.num_classes, 16, 4, 16, 8).train()
        self.loss = DetectionLoss(self.num_classes, 16)
        self.images = batch.images
        self.targets = DetectionTargets(batch.labels, batch.boxes, batch.valid)
        self.names = [data.image_name(i) for i in range(BATCH)]

    def module(self, name: str) -> nn.Module:
        return dict(self.model.named_modules())[name]

    def explain(self, images=None, targets=None, **options):
        targets = targets or self.targets
        facts = detection_label_facts(
            targets.labels, targets.boxes, targets.valid, (IMAGE_SIZE, IMAGE_SIZE), self.num_classes
        )
        return explain_step(
            self.model,
            self.loss,
            self.images if images is None else images,
            targets,
            image_names=self.names,
            image_facts=facts,
            **options,
        )


@pytest.fixture
def setup() -> Setup:
    return Setup()


def _state(model: nn.Module) -> dict:
    return copy.deepcopy(
        {
            "state": model.state_dict(),
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "training": [m.training for m in model.modules()],
        }
    )


@pytest.mark.parametrize("amp", AUTOCAST)
def test_a_nan_pixel_in_one_image_is_the_data(setup, amp):
    images = setup.images.clone()
    images[BAD_IMAGE, 1, 7, 9] = float("nan")
    explanation = setup.explain(images, autocast_dtype=AUTOCAST[amp])
    origin = explanation.origin
    assert (origin.stage, origin.cause, origin.verdict) == ("input", NONFINITE_INPUT, "data")
    assert explanation.reproduced_by == [BAD_IMAGE]
    assert explanation.images[BAD_IMAGE]["nonfinite_pixels"] == 1
    assert f"image {BAD_IMAGE} (1 pixels)" in origin.message


@pytest.mark.parametrize("amp", AUTOCAST)
@pytest.mark.parametrize("corrupt", ["nan", "huge"])
def test_a_corrupt_label_is_found_in_the_loss_and_blamed_on_its_image(setup, amp, corrupt):
    boxes = setup.targets.boxes.clone()
    boxes[BAD_IMAGE, 0] = (
        torch.tensor([float("nan"), 3.0, 20.0, 30.0])
        if corrupt == "nan"
        else torch.tensor([1e30, 1e30, 3e30, 3e30])
    )
    targets = DetectionTargets(setup.targets.labels, boxes, setup.targets.valid)
    explanation = setup.explain(targets=targets, autocast_dtype=AUTOCAST[amp])
    origin = explanation.origin
    assert origin.stage == "loss" and origin.where.endswith("_standard")
    assert explanation.reproduced_by == [BAD_IMAGE]
    assert origin.verdict == "data"
    assert explanation.images[BAD_IMAGE]["out_of_range_boxes"] == 1
    assert sum(image["out_of_range_boxes"] for image in explanation.images) == 1
    assert "1 out of range boxes" in explanation.bisection


def test_an_fp16_overflow_in_one_layer_is_named_with_its_float32_magnitude(setup):
    setup.module(BACKBONE_CONV).register_forward_hook(lambda module, args, output: output * 1e5)
    explanation = setup.explain(autocast_dtype=torch.float16, loss_scale=65536.0)
    origin = explanation.origin
    assert (origin.stage, origin.where) == ("forward", BACKBONE_CONV)
    assert (origin.cause, origin.verdict) == (AUTOCAST_OVERFLOW, "precision")
    assert origin.details["output"]["nonfinite"] > 0
    assert 65504 < origin.details["output_fp32"]["max_abs"] < float("inf")
    assert origin.message.startswith(f"forward output of {BACKBONE_CONV} (fp16 overflow, max |x| ")
    # Every image overflows: no part of the batch is to blame more than another.
    assert explanation.reproduced_by is None
    assert explanation.bisection == "every half of the batch reproduces it: not particular images"


@pytest.mark.parametrize("amp", AUTOCAST)
def test_a_nan_made_by_one_layer_is_named_and_float32_makes_it_too(setup, amp):
    def plant(module, args, output):
        output = output.clone()
        output[:, 0, 0, 0] = float("nan")
        return output

    setup.module(HEAD_CONV).register_forward_hook(plant)
    origin = setup.explain(autocast_dtype=AUTOCAST[amp]).origin
    assert (origin.stage, origin.where, origin.cause) == ("forward", HEAD_CONV, NONFINITE_IN_FP32)
    assert origin.verdict == "model" and origin.details["weights_finite"]


def test_non_finite_weights_are_named(setup):
    with torch.no_grad():
        setup.module(HEAD_CONV).weight[0, 0, 0, 0] = float("inf")
    origin = setup.explain().origin
    assert (origin.stage, origin.where) == ("forward", HEAD_CONV)
    assert not origin.details["weights_finite"]
    assert "its weights are not finite" in origin.message


def _patch_forward(module: nn.Module, wrap) -> None:
    original = module.forward
    module.forward = lambda *args: wrap(original, *args)


def test_a_nan_made_by_a_module_s_own_code_names_that_module(setup):
    """The FPN's outputs are made NaN after every submodule returned a finite one."""
    _patch_forward(
        setup.model.fpn, lambda forward, features: [f * float("nan") for f in forward(features)]
    )
    origin = setup.explain().origin
    assert (origin.stage, origin.where) == ("forward", "fpn")
    assert "made by its own code, not by a submodule" in origin.message


def test_a_nan_made_before_calling_submodules_names_the_caller(setup):
    """The head makes its (finite) input NaN before its first submodule runs on it."""
    _patch_forward(
        setup.model.standard_head,
        lambda forward, features: forward([f * float("nan") for f in features]),
    )
    origin = setup.explain().origin
    assert (origin.stage, origin.where) == ("forward", "standard_head")
    assert origin.details["module"].startswith("standard_head.box_branch.")
    assert "its own code, not a submodule's" in origin.message


class _InfInBackward(torch.autograd.Function):
    """Identity forward; its backward multiplies the gradient by Inf."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("amp", AUTOCAST)
def test_an_inf_made_in_backward_only_is_traced_to_its_module(setup, amp):
    setup.module(HEAD_CONV).register_forward_hook(
        lambda module, args, output: _InfInBackward.apply(output)
    )
    explanation = setup.explain(autocast_dtype=AUTOCAST[amp])
    origin = explanation.origin
    assert origin.stage == "backward" and origin.details["produced_by"] == HEAD_CONV
    assert (origin.cause, origin.verdict) == (NONFINITE_IN_FP32, "model")
    assert explanation.losses and all(v == v for v in explanation.losses.values())


def test_an_fp16_loss_scale_overflow_is_told_from_a_real_one(setup):
    explanation = setup.explain(autocast_dtype=torch.float16, loss_scale=2.0**40)
    origin = explanation.origin
    assert (origin.stage, origin.cause, origin.verdict) == (
        "backward",
        LOSS_SCALE_OVERFLOW,
        "loss scale",
    )
    assert origin.details["finite_at_scale_1"]
    assert "finite at scale 1" in origin.message


def test_a_clean_step_is_not_reproduced(setup):
    explanation = setup.explain(autocast_dtype=torch.float16, loss_scale=1024.0)
    assert (explanation.origin.stage, explanation.origin.cause) == ("none", NOT_REPRODUCED)
    assert explanation.reproduced_by is None


@pytest.mark.parametrize("amp", AUTOCAST)
def test_the_replay_leaves_the_model_and_the_rng_bit_identical(setup, amp):
    setup.module(HEAD_CONV).register_forward_hook(
        lambda module, args, output: _InfInBackward.apply(output)
    )
    for parameter in setup.model.parameters():
        parameter.grad = torch.randn_like(parameter)
    before = _state(setup.model)
    rng = torch.get_rng_state()
    explanation = setup.explain(autocast_dtype=AUTOCAST[amp])
    assert explanation.replays > 0
    assert_bit_identical(_state(setup.model), before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_json_holds_the_origin_and_every_image(setup):
    images = setup.images.clone()
    images[2] = float("inf")
    record = setup.explain(images, step=12).to_json()
    assert record["step"] == 12 and record["origin"]["stage"] == "input"
    assert [image["position"] for image in record["images"]] == list(range(BATCH))
    assert record["images"][2]["name"] == setup.names[2]
    assert record["images"][2]["nonfinite_pixels"] == images[2].numel()
    assert {"boxes", "min_side", "degenerate_boxes", "bad_class_ids"} <= record["images"][0].keys()


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"model": "model"}, TypeError, "model must be an nn.Module"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
        ({"inputs": [1.0]}, TypeError, "inputs must be a tensor"),
        ({"inputs": torch.zeros(0, 3, 8, 8)}, ValueError, "at least one image"),
        ({"autocast_dtype": torch.float64}, ValueError, "autocast_dtype"),
        ({"loss_scale": float("inf")}, ValueError, "loss_scale must be positive"),
        ({"loss_scale": True}, TypeError, "loss_scale must be a number"),
        ({"max_replays": -1}, ValueError, "max_replays must be >= 0"),
        ({"image_names": ["a"]}, ValueError, "image_names has 1 entries for a batch of 8"),
    ],
)
def test_bad_arguments_are_refused_by_name(setup, options, error, match):
    arguments = {
        "model": setup.model,
        "loss_fn": setup.loss,
        "inputs": setup.images,
        "targets": setup.targets,
        **options,
    }
    with pytest.raises(error, match=match):
        explain_step(
            **{k: v for k, v in arguments.items() if k != "image_names"},
            **({"image_names": options["image_names"]} if "image_names" in options else {}),
        )


def test_a_loss_fn_of_another_shape_is_refused(setup):
    with pytest.raises(TypeError, match="loss_fn must return"):
        explain_step(setup.model, lambda output, targets: "loss", setup.images, setup.targets)
    with pytest.raises(ValueError, match="one-element loss"):
        explain_step(setup.model, lambda output, targets: torch.ones(2), setup.images)


def test_select_batch_takes_the_images_positions_in_every_container():
    images = torch.arange(4.0)[:, None]
    targets = {
        "boxes": torch.arange(8).view(4, 2),
        "pair": (torch.arange(4), torch.zeros(3)),
        "targets": DetectionTargets(torch.arange(4), torch.arange(4), torch.arange(4)),
        "name": "kept",
    }
    part_images, part = select_batch(images, targets, [1, 3])
    assert part_images.flatten().tolist() == [1.0, 3.0]
    assert part["boxes"].tolist() == [[2, 3], [6, 7]]
    assert part["pair"][0].tolist() == [1, 3] and part["pair"][1].shape == (3,)
    assert part["targets"].labels.tolist() == [1, 3] and part["name"] == "kept"


def test_a_custom_select_bisects_flat_targets(setup):
    """ultralytics-style targets: one row per box, with the image it belongs to."""
    rows = torch.tensor([[i, 0.0] for i in range(BATCH)])
    rows[BAD_IMAGE, 1] = float("nan")

    def loss_fn(output, targets):
        box_logits = output.heads["standard"].box_logits
        return box_logits.float().mean() + targets[:, 1].sum() * 0

    def select(images, targets, positions):
        keep = torch.isin(targets[:, 0].long(), torch.tensor(positions))
        return images[positions], targets[keep]

    explanation = explain_step(setup.model, loss_fn, setup.images, rows, select=select)
    assert explanation.origin.stage == "loss"
    assert explanation.reproduced_by == [BAD_IMAGE]
