"""DualHeadDetector: backbone + FPN feeding a standard and a prototype detection head."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .backbone import LightFPN, TinyBackbone
from .boxes import batched_nms, distances_to_boxes
from .heads import (
    HeadOutput,
    PrototypeDetectionHead,
    StandardDetectionHead,
    reset_to_pytorch_defaults,
)

STRIDES = (8, 16, 32)
HEAD_NAMES = ("standard", "prototype")


class DetectorOutput(NamedTuple):
    heads: dict[str, HeadOutput]
    """Raw outputs of each head, keyed by ``HEAD_NAMES``."""
    anchor_points: torch.Tensor
    """``[A, 2]``: anchor (cell centre) coordinates in pixels, levels concatenated."""
    strides: torch.Tensor
    """``[A, 1]``: the stride of each anchor's level."""


def make_anchors(feature_sizes: list[tuple[int, int]], strides: tuple[int, ...], device, dtype):
    """Cell centres ``[A, 2]`` (pixels) and their strides ``[A, 1]`` for the given levels."""
    points, stride_column = [], []
    for (height, width), stride in zip(feature_sizes, strides, strict=True):
        ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * stride
        xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), -1).reshape(-1, 2))
        stride_column.append(
            torch.full((height * width, 1), float(stride), device=device, dtype=dtype)
        )
    return torch.cat(points), torch.cat(stride_column)


def expected_distances(box_logits: torch.Tensor, n_bins: int) -> torch.Tensor:
    """DFL decoding: each side's distance (bin units) is the expectation of its softmax."""
    probs = box_logits.unflatten(-1, (4, n_bins)).float().softmax(-1)
    return probs @ torch.arange(n_bins, device=box_logits.device, dtype=probs.dtype)


class DualHeadDetector(nn.Module):
    """Two anchor-free heads on shared features; both are trained, either can predict."""

    def __init__(
        self,
        num_classes: int,
        n_bins: int = 16,
        width: int = 16,
        fpn_channels: int = 64,
        embed_dim: int = 32,
        learn_temperature: bool = True,
        head_init: str = "small",
    ) -> None:
        """``head_init='default'`` leaves both heads at PyTorch's layer defaults instead of
        their small ``_initialize_weights`` init (for before/after experiments)."""
        super().__init__()
        if head_init not in ("small", "default"):
            raise ValueError(f"head_init must be 'small' or 'default', got {head_init!r}")
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.strides = STRIDES
        self.backbone = TinyBackbone(width)
        self.fpn = LightFPN(self.backbone.out_channels, fpn_channels)
        self.standard_head = StandardDetectionHead(fpn_channels, num_classes, n_bins)
        self.prototype_head = PrototypeDetectionHead(
            fpn_channels, num_classes, n_bins, embed_dim, learn_temperature=learn_temperature
        )
        if head_init == "default":
            reset_to_pytorch_defaults(self.standard_head)
            reset_to_pytorch_defaults(self.prototype_head)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.fpn(self.backbone(images))

    def forward(self, images: torch.Tensor) -> DetectorOutput:
        features = self.features(images)
        anchor_points, strides = make_anchors(
            [f.shape[-2:] for f in features], self.strides, images.device, torch.float32
        )
        heads = {
            "standard": self.standard_head(features),
            "prototype": self.prototype_head(features),
        }
        return DetectorOutput(heads, anchor_points, strides)

    def decode(
        self, output: DetectorOutput, head: str = "standard"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes ``[B, A, 4]`` (xyxy pixels) and class scores ``[B, A, C]`` of one head."""
        box_logits, cls_logits = output.heads[head]
        distances = expected_distances(box_logits, self.n_bins) * output.strides
        return distances_to_boxes(distances, output.anchor_points), cls_logits.float().sigmoid()

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, head: str = "standard", **postprocess_options
    ) -> list[torch.Tensor]:
        """Detections per image, ``[N, 6]``: x1, y1, x2, y2, score, class; see :meth:`postprocess`."""
        return self.postprocess(self(images), head, **postprocess_options)

    @torch.no_grad()
    def postprocess(
        self,
        output: DetectorOutput,
        head: str = "standard",
        score_threshold: float = 0.001,
        iou_threshold: float = 0.6,
        max_candidates: int = 1000,
        max_detections: int = 100,
    ) -> list[torch.Tensor]:
        """One head's detections per image, ``[N, 6]``: the ``max_candidates`` best
        (anchor, class) scores above ``score_threshold``, class-wise NMS, the
        ``max_detections`` best kept."""
        boxes, scores = self.decode(output, head)
        detections = []
        for image_boxes, image_scores in zip(boxes, scores, strict=True):
            flat_scores = image_scores.flatten()
            top = flat_scores.topk(min(max_candidates, flat_scores.numel())).indices
            top = top[flat_scores[top] > score_threshold]
            anchor_index, classes = top // self.num_classes, top % self.num_classes
            kept = batched_nms(image_boxes[anchor_index], flat_scores[top], classes, iou_threshold)
            kept = kept[:max_detections]
            detections.append(
                torch.cat(
                    (
                        image_boxes[anchor_index[kept]],
                        flat_scores[top[kept], None],
                        classes[kept, None].to(boxes.dtype),
                    ),
                    dim=1,
                )
            )
        return detections

    @torch.no_grad()
    def set_prototypes_from_support(
        self, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Sets the prototype head's class prototypes from annotated support images.

        Each support box's embedding is the mean embedding of the anchors whose centres
        lie inside it. ``boxes [B, M, 4]`` (xyxy pixels), ``labels [B, M]``, ``valid [B, M]``.
        """
        features = self.features(images)
        anchor_points, _ = make_anchors(
            [f.shape[-2:] for f in features], self.strides, images.device, torch.float32
        )
        embeddings = self.prototype_head.embed(features).float()  # [B, A, D]
        inside = (
            (anchor_points[None, None, :, 0] > boxes[..., 0:1])
            & (anchor_points[None, None, :, 0] < boxes[..., 2:3])
            & (anchor_points[None, None, :, 1] > boxes[..., 1:2])
            & (anchor_points[None, None, :, 1] < boxes[..., 3:4])
        ).float()  # [B, M, A]
        box_embeddings = inside @ embeddings / inside.sum(-1, keepdim=True).clamp(min=1)
        usable = valid & (inside.sum(-1) > 0)
        self.prototype_head.set_prototypes(box_embeddings[usable], labels[usable])
