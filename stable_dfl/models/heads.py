"""Detection heads: anchor-free, decoupled, with a DFL box branch (``4 * n_bins`` logits).

Both heads are shared across FPN levels and return, for a list of feature maps,
outputs flattened over levels: box logits ``[B, A, 4 * n_bins]`` and class logits
``[B, A, num_classes]`` with ``A`` the total number of anchor points.

Initialisation (``_initialize_weights``) is what keeps the first steps calm: with
small conv weights and a zero box bias every side's distribution starts uniform, so
the first DFL loss is ``log(n_bins)`` and the first gradients are small; the class
bias starts at the prior ``log(p / (1 - p))`` (RetinaNet, Lin et al. 2017) so that the
many background anchors do not swamp the first updates.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import ConvBNAct

#: Std of the normal init of head convs: small enough that the first logits are ~0.
HEAD_INIT_STD = 0.01
#: Prior probability of a foreground class at initialisation.
PRIOR_PROB = 0.01


class HeadOutput(NamedTuple):
    box_logits: torch.Tensor
    """``[B, A, 4 * n_bins]``: per-side distribution logits (left, top, right, bottom)."""
    cls_logits: torch.Tensor
    """``[B, A, num_classes]``: per-class logits (sigmoid gives the score)."""


def prior_bias(prior_prob: float) -> float:
    """Logit bias whose sigmoid is ``prior_prob``."""
    return -math.log((1 - prior_prob) / prior_prob)


def _branch(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        ConvBNAct(channels, channels, 3),
        ConvBNAct(channels, channels, 3),
        nn.Conv2d(channels, out_channels, 1),
    )


def _flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """``[B, C, H_l, W_l]`` per level to ``[B, sum_l H_l * W_l, C]``."""
    return torch.cat([m.flatten(2) for m in maps], dim=2).transpose(1, 2)


def _init_branch(branch: nn.Sequential) -> None:
    """Hidden convs: He init (see ConvBNAct); the prediction conv: small normal weights,
    zero bias.

    The hidden convs feed BatchNorm, which normalises their scale away; a small init
    there would only inflate their gradients (which go as 1 / ||w|| under BatchNorm).
    """
    *hidden, prediction = branch
    for block in hidden:
        conv, norm = block[0], block[1]
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
    nn.init.normal_(prediction.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(prediction.bias)


class StandardDetectionHead(nn.Module):
    """Decoupled head: a box branch (DFL logits) and a class branch (per-class logits)."""

    def __init__(
        self, in_channels: int, num_classes: int, n_bins: int = 16, prior_prob: float = PRIOR_PROB
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.prior_prob = prior_prob
        self.box_branch = _branch(in_channels, 4 * n_bins)
        self.cls_branch = _branch(in_channels, num_classes)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # Zero box bias and ~zero box logits: uniform distributions, first DFL = log(n_bins).
        _init_branch(self.box_branch)
        _init_branch(self.cls_branch)
        nn.init.constant_(self.cls_branch[-1].bias, prior_bias(self.prior_prob))

    def forward(self, features: list[torch.Tensor]) -> HeadOutput:
        box = _flatten_levels([self.box_branch(f) for f in features])
        cls = _flatten_levels([self.cls_branch(f) for f in features])
        return HeadOutput(box, cls)


class PrototypeDetectionHead(nn.Module):
    """Box branch plus an embedding branch scored against class prototypes.

    Class logit = ``cos(embedding, prototype_c) / temperature + bias``: a scaled cosine
    similarity (as in cosine classifiers for few-shot detection) with one shared bias
    that starts at the prior. Prototypes are learnable, or set from support examples
    with :meth:`set_prototypes`; the temperature is learnable unless ``learn_temperature``
    is False.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        n_bins: int = 16,
        embed_dim: int = 32,
        temperature: float = 1.0,
        learn_temperature: bool = True,
        prior_prob: float = PRIOR_PROB,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.embed_dim = embed_dim
        self.prior_prob = prior_prob
        self.initial_temperature = temperature
        self.box_branch = _branch(in_channels, 4 * n_bins)
        self.embed_branch = _branch(in_channels, embed_dim)
        self.prototypes = nn.Parameter(torch.empty(num_classes, embed_dim))
        self.cls_bias = nn.Parameter(torch.empty(()))
        # log(1 / temperature), so the learned temperature stays positive.
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        _init_branch(self.box_branch)
        _init_branch(self.embed_branch)
        # The embeddings are normalised, so their scale only sets the gradient (which goes as
        # 1 / norm): a unit-variance projection, not a small one, keeps the first gradients small.
        projection = self.embed_branch[-1]
        nn.init.normal_(projection.weight, std=projection.in_channels**-0.5)
        nn.init.normal_(self.prototypes)
        with torch.no_grad():
            self.prototypes.copy_(F.normalize(self.prototypes, dim=-1))
            self.log_scale.fill_(math.log(1.0 / self.initial_temperature))
        nn.init.constant_(self.cls_bias, prior_bias(self.prior_prob))

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_scale))

    def embed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Normalised embeddings ``[B, A, embed_dim]``."""
        return F.normalize(_flatten_levels([self.embed_branch(f) for f in features]), dim=-1)

    def forward(self, features: list[torch.Tensor]) -> HeadOutput:
        box = _flatten_levels([self.box_branch(f) for f in features])
        embeddings = self.embed(features)
        prototypes = F.normalize(self.prototypes, dim=-1)
        cls = embeddings @ prototypes.to(embeddings.dtype).T * self.log_scale.exp() + self.cls_bias
        return HeadOutput(box, cls)

    @torch.no_grad()
    def set_prototypes(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Sets each class prototype to the normalised mean of its support ``embeddings``.

        ``embeddings [N, embed_dim]``, ``labels [N]``; classes without support keep theirs.
        """
        if embeddings.shape != (labels.shape[0], self.embed_dim):
            raise ValueError(
                f"embeddings must be [N, {self.embed_dim}] with labels [N], got "
                f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        one_hot = F.one_hot(labels.long(), self.num_classes).to(embeddings.dtype)  # [N, C]
        sums = one_hot.T @ F.normalize(embeddings, dim=-1)
        has_support = one_hot.sum(0) > 0
        self.prototypes[has_support] = F.normalize(sums[has_support], dim=-1).to(
            self.prototypes.dtype
        )


def reset_to_pytorch_defaults(head: nn.Module) -> None:
    """Undoes ``_initialize_weights`` for before/after experiments: every layer gets
    PyTorch's own init (Kaiming-uniform convs with a uniform bias, unit BatchNorm), the
    prototypes a unit normal (``nn.Embedding``'s default) and the class bias zero, as a
    head without an init method would start."""
    for module in head.modules():
        if module is not head and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    if isinstance(head, PrototypeDetectionHead):
        nn.init.normal_(head.prototypes)
        nn.init.zeros_(head.cls_bias)
