"""The fused DFL inside ultralytics (YOLOv8 / YOLO11 style detectors, ``reg_max > 1``).

One line before training::

    from stable_dfl.integrations import ultralytics as stable_ultralytics

    stable_ultralytics.patch()  # every BboxLoss built from now on uses the fused DFLoss
    YOLO("yolov8n.yaml").train(data=...)

:func:`patch` replaces the name ``DFLoss`` in ``ultralytics.utils.loss``, which
``BboxLoss.__init__`` looks up each time it builds its ``dfl_loss``; a trainer builds its
criterion lazily on the first batch, so patching before ``train()`` is enough. A criterion
that already exists keeps its module: :func:`patch_criterion` swaps it in place. Multi-GPU
(DDP) training runs in processes that ultralytics starts from a generated script, which do
not inherit a patch made in the launching process.

Numerically, :class:`DFLoss` is ultralytics' formula with one change: probabilities are
floored at ``stable_dfl.DEFAULT_EPS`` (1e-6), so one side's loss is at most
``-ln(1e-6) = 13.8`` and its gradient is zero where the floor is active. That only touches
hopeless predictions (target bin probability below 1e-6); ultralytics' loss there grows
linearly with the logit gap, without bound, and is Inf once that gap overflows fp32. The cap on
the reduced loss (``max_loss``) does not apply: ultralytics' ``BboxLoss`` does the reduction.

:func:`explain_step` says why a step of an ultralytics detector went non-finite: it runs
:func:`stable_dfl.forensics.explain_step` on an ultralytics batch (the loss of
``model.loss``, parts of the batch by ``batch_idx``, images named by ``im_file``), e.g.
from a callback when the loss or the gradients are not finite.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .. import stable_dfl_loss
from ..forensics import StepExplanation, box_facts
from ..forensics import explain_step as explain_batch

__all__ = [
    "DFLoss",
    "explain_step",
    "label_facts",
    "patch",
    "patch_criterion",
    "select_images",
    "unpatch",
    "unpatch_criterion",
]

ULTRALYTICS_LOSS_MODULE = "ultralytics.utils.loss"

# ultralytics' own DFLoss class while patch() is in effect, so unpatch() can put it back.
_upstream_dfloss: type[nn.Module] | None = None


class DFLoss(nn.Module):
    """``ultralytics.utils.loss.DFLoss`` computed by the fused stable_dfl kernel.

    Call: ``pred_dist [4 * M, reg_max]`` logits (one row per box side, as ``BboxLoss``
    passes them) and ``target [M, 4]`` ltrb distances in bin units; returns ``[M, 1]``, the
    mean over the 4 sides of ``-(wl * log p[tl] + wr * log p[tl + 1])`` with the target
    clamped to ``[0, reg_max - 1 - 0.01]``. fp32 result for fp16/bf16/fp32 logits.

    Differences from ultralytics' class: ``target`` is not modified (ultralytics clamps it
    in place), and probabilities are floored at 1e-6 (see the module docstring).
    """

    def __init__(self, reg_max: int = 16) -> None:
        super().__init__()
        self.reg_max = reg_max  # BboxLoss reads it to reshape pred_dist and clamp targets

    def forward(self, pred_dist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred_dist.shape != (target.numel(), self.reg_max):
            raise ValueError(
                f"pred_dist of shape {tuple(pred_dist.shape)} does not fit target of shape "
                f"{tuple(target.shape)}: expected pred_dist [target.numel(), reg_max] = "
                f"[{target.numel()}, {self.reg_max}]"
            )
        per_side = stable_dfl_loss(
            pred_dist.reshape(*target.shape, self.reg_max),
            target,
            n_bins=self.reg_max,
            reduction="none",
        )
        return per_side.mean(-1, keepdim=True)

    def extra_repr(self) -> str:
        return f"reg_max={self.reg_max}"


def _ultralytics_loss_module() -> ModuleType:
    try:
        return importlib.import_module(ULTRALYTICS_LOSS_MODULE)
    except ModuleNotFoundError as error:
        # Only a missing ultralytics gets this message; a missing dependency of an installed
        # ultralytics (cv2, yaml, ...) keeps its own, which names what to install.
        if error.name not in ("ultralytics", "ultralytics.utils", ULTRALYTICS_LOSS_MODULE):
            raise
        raise ImportError(
            "stable_dfl.integrations.ultralytics needs ultralytics (a version with "
            f"{ULTRALYTICS_LOSS_MODULE}.DFLoss): pip install ultralytics"
        ) from error


def patch() -> None:
    """Make ``ultralytics.utils.loss.DFLoss`` the fused :class:`DFLoss`. Idempotent.

    Loss objects built afterwards (``BboxLoss``, hence ``v8DetectionLoss`` and the losses
    derived from it) use the fused kernel; existing ones do not (see :func:`patch_criterion`).
    Raises ImportError if ultralytics is not installed.
    """
    global _upstream_dfloss
    loss_module = _ultralytics_loss_module()
    if loss_module.DFLoss is DFLoss:
        return
    _upstream_dfloss = loss_module.DFLoss
    loss_module.DFLoss = DFLoss


def unpatch() -> None:
    """Undo :func:`patch`: ultralytics' own ``DFLoss`` again. Idempotent; a no-op if not patched."""
    global _upstream_dfloss
    if _upstream_dfloss is None:
        return
    loss_module = _ultralytics_loss_module()
    if loss_module.DFLoss is DFLoss:
        loss_module.DFLoss = _upstream_dfloss
    _upstream_dfloss = None


def _upstream_dfloss_class() -> type[nn.Module]:
    return _upstream_dfloss or _ultralytics_loss_module().DFLoss


def _modules_holding_a_dfl_loss(criterion: object) -> Iterator[nn.Module]:
    """Each module reachable from ``criterion`` that has a ``dfl_loss`` attribute.

    Criteria are plain objects: ``v8DetectionLoss`` holds ``bbox_loss`` (a module), and
    others hold criteria (``E2ELoss.one2many`` / ``.one2one``, ``TVPDetectLoss.vp_criterion``),
    so the search follows the attributes of ``criterion`` and of ultralytics objects below it.
    """
    seen: set[int] = set()
    pending = [criterion]
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            yield from (
                m for m in obj.modules() if isinstance(getattr(m, "dfl_loss", None), nn.Module)
            )
        elif obj is criterion or type(obj).__module__.startswith("ultralytics."):
            pending.extend(getattr(obj, "__dict__", {}).values())


def _swap_dfl_losses(criterion: object, old: type[nn.Module], new: type[nn.Module]) -> int:
    swapped = 0
    for holder in _modules_holding_a_dfl_loss(criterion):
        if type(holder.dfl_loss) is old:
            holder.dfl_loss = new(holder.dfl_loss.reg_max)
            swapped += 1
    return swapped


def patch_criterion(criterion: object) -> int:
    """Replace ultralytics' ``DFLoss`` modules inside a built criterion by the fused one.

    ``criterion`` is e.g. ``model.criterion`` or ``v8DetectionLoss(model)``; ``E2ELoss``
    holds two. Returns how many were replaced (0 if none, e.g. for ``reg_max == 1``).
    Subclasses of ultralytics' ``DFLoss`` are left alone: they may compute something else.
    """
    return _swap_dfl_losses(criterion, _upstream_dfloss_class(), DFLoss)


def unpatch_criterion(criterion: object) -> int:
    """Undo :func:`patch_criterion`: ultralytics' own ``DFLoss`` modules again. Returns the count."""
    return _swap_dfl_losses(criterion, DFLoss, _upstream_dfloss_class())


# ------------------------------------------------------------------------- forensics

#: The batch entries that hold one row per box, with ``batch_idx`` naming its image.
_BOX_ROWS = ("batch_idx", "cls", "bboxes")


def select_images(
    images: torch.Tensor, batch: dict[str, Any], positions: list[int]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The images at ``positions`` of an ultralytics batch and their boxes, renumbered: the
    ``select`` of :func:`stable_dfl.forensics.explain_step` for ultralytics batches."""
    keep = torch.tensor(positions, dtype=torch.long)
    rows = torch.isin(batch["batch_idx"].long().cpu(), keep)
    renumber = torch.full((len(images),), -1, dtype=torch.long)
    renumber[keep] = torch.arange(len(positions))
    part: dict[str, Any] = {}
    for key, value in batch.items():
        if key in _BOX_ROWS and isinstance(value, torch.Tensor):
            part[key] = value[rows.to(value.device)]
        elif isinstance(value, torch.Tensor) and value.ndim and len(value) == len(images):
            part[key] = value[keep.to(value.device)]
        elif isinstance(value, list | tuple) and len(value) == len(images):
            part[key] = type(value)(value[i] for i in positions)
        else:
            part[key] = value
    old_index = batch["batch_idx"][rows.to(batch["batch_idx"].device)].long().cpu()
    part["batch_idx"] = renumber[old_index].to(batch["batch_idx"])
    part_images = images[keep.to(images.device)]
    part["img"] = part_images
    return part_images, part


def label_facts(batch: dict[str, Any], num_classes: int) -> list[dict[str, Any]]:
    """Per image of an ultralytics batch: box count, smallest and largest side (pixels),
    degenerate boxes (a side not positive), out-of-range ones (a NaN/Inf coordinate, or a
    box beyond the image) and bad class ids, as :func:`stable_dfl.forensics.detection_label_facts`."""
    images = batch["img"]
    height, width = images.shape[-2:]
    owner = batch["batch_idx"].long().cpu()
    boxes = batch["bboxes"].detach().double().cpu()  # normalised cx, cy, w, h
    classes = batch["cls"].detach().reshape(-1).cpu()
    facts = []
    for image in range(len(images)):
        mine = boxes[owner == image]
        low = mine[:, :2] - mine[:, 2:4] / 2
        high = mine[:, :2] + mine[:, 2:4] / 2
        ids = classes[owner == image]
        facts.append(
            box_facts(
                mine[:, 2:4] * torch.tensor([width, height], dtype=torch.float64),
                torch.isfinite(mine).all(1),
                (low >= -1e-3).all(1) & (high <= 1 + 1e-3).all(1),
                (ids < 0) | (ids >= num_classes) | (ids != ids.round()),
            )
        )
    return facts


def _model_loss(model: nn.Module):
    def loss_fn(preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, items = model.loss(batch, preds)
        if not isinstance(items, Mapping):  # ultralytics before 8.4: a tensor [box, cls, dfl]
            items = dict(zip(("box_loss", "cls_loss", "dfl_loss"), items.reshape(-1), strict=False))
        return loss.sum(), dict(items)

    return loss_fn


def explain_step(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    autocast_dtype: torch.dtype | None = None,
    loss_scale: float = 1.0,
    max_replays: int = 8,
    step: int | None = None,
) -> StepExplanation:
    """Why this step of an ultralytics detector went non-finite.

    ``model``: the bare ``DetectionModel`` (``trainer.model``, unwrapped from DDP/EMA), in
    ``train()`` mode; ``batch``: the step's batch after ``preprocess_batch`` (``img`` float on
    the model's device). ``autocast_dtype``: ``torch.float16`` under ultralytics' AMP;
    ``loss_scale``: the GradScaler's scale the step ran with (after a skip,
    ``scaler.update()`` has halved it: twice ``scaler.get_scale()``). A callback that finds
    ``trainer.loss`` non-finite calls it with ``de_parallel(trainer.model)`` and
    ``trainer.batch``, and logs ``explanation.log_lines()``.
    """
    images = batch["img"]
    names = batch.get("im_file")
    return explain_batch(
        model,
        _model_loss(model),
        images,
        batch,
        autocast_dtype=autocast_dtype,
        loss_scale=loss_scale,
        image_names=list(names) if names is not None and len(names) == len(images) else None,
        image_facts=label_facts(batch, int(getattr(model, "nc", 0)) or 1 << 30),
        select=select_images,
        max_replays=max_replays,
        step=step,
    )
