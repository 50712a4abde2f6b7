"""The training loop of the dual-head detector.

One optimizer step per batch: forward under autocast (fp16 + GradScaler on CUDA, bf16 on
a CPU that computes it natively, or off: :mod:`~stable_dfl.train.precision`), loss in
fp32, backward, then :class:`~stable_dfl.guard.GradGuard` (one fused pass that unscales,
measures the norm and finds NaN/Inf gradients by parameter name, then clip, step or skip;
the scaler backs off on a skip). The EMA weights, used for
validation and ``best.pt``, only follow steps that were taken. Under ``torchrun`` each
rank trains on its shard of every epoch (DistributedSampler); gradients are averaged
by DDP before the check, so every rank sees the same gradients and skips the same
steps. Rank 0 alone logs, validates and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..data import PadToFixedBoxes, SyntheticShapes, YoloDataset
from ..guard import GradGuard, GradGuardResult
from ..models import HEAD_NAMES, DetectionLoss, DetectionTargets, DualHeadDetector
from .checkpoint import (
    CheckpointError,
    first_non_finite,
    load_checkpoint,
    model_state,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import DistContext, all_reduce_mean, broadcast_from_main
from .ema import ModelEMA
from .evaluate import evaluate
from .plain_step import PlainClipStep
from .precision import resolve_precision
from .reporting import Reporter, attach_external_loggers
from .schedule import WarmupCosine

CHECKPOINT_VERSION = 1
#: Offending parameter names listed one per line before the rest are counted.
MAX_NAMED_OFFENDERS = 10
#: What a resume needs from a checkpoint (a bare state_dict only serves --init_from).
_RESUME_KEYS = ("model", "ema", "optimizer", "scaler", "scheduler", "epoch", "step", "rng")


class TrainingDivergedError(RuntimeError):
    """Training cannot usefully go on: every recent step was skipped, or the weights are
    not finite. The last checkpoint written is left as it was."""


def build_datasets(
    config: TrainConfig,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, tuple[str, ...]]:
    if config.data is None:
        train_set = SyntheticShapes(config.train_images, config.image_size, "train", config.seed)
        val_set = SyntheticShapes(config.val_images, config.image_size, "val", config.seed)
        return train_set, val_set, train_set.class_names
    names = config.names.split(",") if config.names else None
    train_set = YoloDataset(config.data, config.train_split, names, config.image_size)
    val_set = YoloDataset(config.data, config.val_split, train_set.class_names, config.image_size)
    return train_set, val_set, train_set.class_names


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only; not on norms, biases, prototypes or scales."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        is_weight_matrix = parameter.ndim > 1 and not name.endswith("prototypes")
        (decay if is_weight_matrix else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Trainer:
    def __init__(self, config: TrainConfig, context: DistContext, console=None) -> None:
        self.config = config
        self.context = context
        self.device = context.device
        self.save_dir = Path(config.save_dir)
        self.report = Reporter(self.save_dir, enabled=context.is_main, console=console)
        self.precision = resolve_precision(config.amp, self.device)
        self.amp_dtype = self.precision.dtype
        # The first line: the dtype sets the speed (up to ~50x on a CPU) and the numerics.
        self.report.info(self.precision.reason)
        random.seed(config.seed)
        torch.manual_seed(config.seed)  # same initial weights on every rank

        train_set, val_set, self.class_names = build_datasets(config)
        max_objects = max(train_set.max_objects, val_set.max_objects)
        self.sampler = DistributedSampler(
            train_set,
            context.world_size,
            context.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
        )
        self.train_loader = DataLoader(
            train_set,
            config.batch_size,
            sampler=self.sampler,
            collate_fn=PadToFixedBoxes(max_objects),
            num_workers=config.workers,
            drop_last=True,
        )
        if len(self.train_loader) == 0:
            raise ValueError(
                f"{len(train_set)} training images are fewer than one batch of {config.batch_size} "
                f"per process ({context.world_size} processes)"
            )
        self.val_loader = DataLoader(
            val_set, config.batch_size, collate_fn=PadToFixedBoxes(max_objects)
        )

        self.model = DualHeadDetector(
            len(self.class_names),
            config.n_bins,
            config.width,
            config.fpn_channels,
            config.embed_dim,
            head_init=config.head_init,
        ).to(self.device)
        if config.init_from:
            self._init_from(config.init_from)
        self.criterion = DetectionLoss(
            len(self.class_names),
            config.n_bins,
            config.cls_weight,
            config.iou_weight,
            config.dfl_weight,
            dfl_impl=config.dfl_impl,
            naive_dfl_dtype=self.amp_dtype,
        )
        self.ema = ModelEMA(self.model, config.ema_decay)
        self.ddp_model: nn.Module = (
            DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if context.distributed
            else self.model
        )
        self.optimizer = torch.optim.AdamW(
            _parameter_groups(self.model, config.weight_decay), lr=config.lr
        )
        self.total_steps = config.epochs * len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(self.total_steps, config.warmup_steps, config.min_lr_ratio)
        )
        # Loss scaling is for fp16 only: bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        # Every offender is reported: the log names the first ones and counts the rest.
        self.guard = (
            GradGuard(
                self.model,
                max_norm=config.gradient_clip_norm,
                max_offenders=sum(1 for _ in self.model.parameters()),
            )
            if config.nan_guard == "on"
            else PlainClipStep(self.model, max_norm=config.gradient_clip_norm)
        )

        self.epoch = 0  # epochs completed
        self.step = 0  # batches seen (optimizer steps taken or skipped)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.best_fitness = -1.0
        if config.resume is not None:
            self._resume(Path(config.resume) if config.resume else self.save_dir / "last.pt")
        attach_external_loggers(
            self.report, self.save_dir, config.to_dict(), config.tensorboard, config.wandb
        )

    # ----------------------------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        """Trains the remaining epochs; returns the last validation results."""
        config = self.config
        self.report.info(
            f"Training {sum(p.numel() for p in self.model.parameters()):,} parameters on "
            f"{self.device} x{self.context.world_size}, amp={self.precision.name}, "
            f"{len(self.train_loader.dataset)} train / {len(self.val_loader.dataset)} val images of "
            f"{config.image_size}px, {len(self.train_loader)} batches/epoch, epochs {self.epoch + 1}-{config.epochs}; "
            f"lr={config.lr:g} weight_decay={config.weight_decay:g} dfl_weight={config.dfl_weight:g} "
            f"gradient_clip_norm={config.gradient_clip_norm:g}"
        )
        results: dict[str, Any] = {}
        if self.step == 0:
            results = self._validate()
            self.report.info(f"Untrained model: {self._format_map(results)}")
            self.report.metrics({"kind": "val", "epoch": 0, "step": 0, **results})
        for epoch in range(self.epoch, config.epochs):
            started = time.perf_counter()
            losses = self._train_epoch(epoch)
            self.epoch = epoch + 1
            results = self._validate()
            fitness = results["standard/map"]
            is_best = fitness > self.best_fitness
            self.best_fitness = max(fitness, self.best_fitness)
            self._save(is_best)
            seconds = time.perf_counter() - started
            self.report.info(
                f"Epoch {self.epoch}/{config.epochs}: "
                + ", ".join(f"{k}={v:.4f}" for k, v in losses.items())
                + f", skipped steps={self.skipped_steps}, {seconds:.1f}s; val {self._format_map(results)}"
            )
            self.report.metrics(
                {
                    "kind": "epoch",
                    "epoch": self.epoch,
                    "step": self.step,
                    **losses,
                    **results,
                    "skipped_total": self.skipped_steps,
                    "epoch_seconds": round(seconds, 3),
                }
            )
        self.report.close()
        return results

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.ddp_model.train()
        self.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        batches = len(self.train_loader)
        for index, batch in enumerate(self.train_loader, start=1):
            started = time.perf_counter()
            self.step += 1
            components, result, module_norms = self._train_step(batch)
            seconds = time.perf_counter() - started
            for name, value in components.items():
                sums[name] = sums.get(name, 0.0) + value
            self._report_step(
                epoch, index, batches, components, result, module_norms, seconds, len(batch.images)
            )
            self.consecutive_skips = self.consecutive_skips + 1 if result.skipped else 0
            limit = self.config.max_consecutive_skips
            if limit and self.consecutive_skips >= limit:
                self._stop_diverged(result)
        return {name: total / batches for name, total in sums.items()}

    def _train_step(
        self, batch
    ) -> tuple[dict[str, float], GradGuardResult, dict[str, float] | None]:
        images = batch.images.to(self.device, non_blocking=True)
        targets = DetectionTargets(
            batch.labels.to(self.device), batch.boxes.to(self.device), batch.valid.to(self.device)
        )
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        # A skipped step must leave no trace: BatchNorm statistics are updated by the
        # forward pass itself, and a batch that gives NaN/Inf would poison them for good.
        buffers = list(self.model.buffers())
        buffers_before = [b.clone() for b in buffers]
        with autocast:
            output = self.ddp_model(images)
        loss, components = self.criterion(output, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        module_norms = (
            self._module_grad_norms() if self.step % self.config.debug_interval == 0 else None
        )
        result = self.guard.step(self.optimizer, self.scaler)
        if result.skipped:
            torch._foreach_copy_(buffers, buffers_before)
        else:
            self.ema.update(self.model)
        self.scheduler.step()

        names = [*components]
        values = torch.stack([components[n] for n in names] + [loss.detach().float()])
        values = all_reduce_mean(values, self.context).tolist()
        reduced = dict(zip([*names, "total_loss"], values, strict=True))
        if result.skipped:
            self.skipped_steps += 1
        return reduced, result, module_norms

    def _stop_diverged(self, result: GradGuardResult) -> None:
        last = self.save_dir / "last.pt"
        checkpoint = (
            f"{last} (epoch {self.epoch}) is left as it was"
            if last.exists()
            else "no checkpoint was written"
        )
        bad_weight = first_non_finite(self.model.state_dict())
        weights = (
            f"the weights themselves are not finite (first: {bad_weight}), so the learning rate "
            "is likely far too high"
            if bad_weight
            else "the weights are still finite"
        )
        message = (
            f"Stopping: the last {self.consecutive_skips} optimizer steps (up to batch "
            f"{self.step}) were all skipped for NaN/Inf gradients (last in: "
            f"{', '.join(result.offenders[:3]) or 'the total norm'}); {weights}. {checkpoint}. "
            "Lower --lr or check the data; --max_consecutive_skips sets this limit (0: never stop)."
        )
        self.report.info(message)
        raise TrainingDivergedError(message)

    def _module_grad_norms(self) -> dict[str, float]:
        """Gradient norm of each top-level part, unscaled (read before the guard unscales)."""
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        norms = {}
        for name, module in self.model.named_children():
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            norms[name] = float(torch.nn.utils.get_total_norm(grads)) / scale if grads else 0.0
        return norms

    # ----------------------------------------------------------------------- reporting

    def _report_step(
        self,
        epoch,
        index,
        batches,
        components,
        result: GradGuardResult,
        module_norms,
        seconds,
        batch_size,
    ):
        lr = self.optimizer.param_groups[0]["lr"]
        images_per_second = batch_size * self.context.world_size / max(seconds, 1e-9)
        if result.skipped:
            for name in result.offenders[:MAX_NAMED_OFFENDERS]:
                self.report.info(f"⚠️ NaN/Inf gradient in {name}")
            if len(result.offenders) > MAX_NAMED_OFFENDERS:
                self.report.info(
                    f"⚠️ NaN/Inf gradient in {len(result.offenders) - MAX_NAMED_OFFENDERS} more parameters"
                )
            self.report.info(
                f"Skipping optimizer step (batch {self.step}, {self.skipped_steps} skipped so far): "
                f"Grad Norm={result.total_norm}"
            )
        if self.step == 1 or self.step % self.config.log_interval == 0:
            self.report.detail(
                f"Batch {self.step}: dfl_loss={components['dfl_loss']:.2f}, Grad Norm={result.total_norm:.2f}, "
                f"cls_loss={components['cls_loss']:.3f}, iou_loss={components['iou_loss']:.3f}, lr={lr:.2e}"
            )
        if module_norms is not None:
            lines = ["Loss components:"] + [
                f"  {name}: {value:.4f}" for name, value in components.items()
            ]
            lines.append("Gradient Norms:")
            lines += [f"  {name}: {value:.4f}" for name, value in module_norms.items()]
            lines += [
                f"  Total Grad Norm: {result.total_norm:.4f}",
                f"  Clip Coef: {result.clip_coef:.4f}",
                f"  Loss Scale: {self._loss_scale():g}",
            ]
            for line in lines:
                self.report.detail(line)
        self.report.progress(
            f"epoch {epoch + 1}/{self.config.epochs} batch {index}/{batches} loss {components['total_loss']:.3f} "
            f"dfl {components['dfl_loss']:.2f} grad {result.total_norm:.2f} {images_per_second:.0f} img/s"
        )
        self.report.metrics(
            {
                "kind": "step",
                "epoch": epoch + 1,
                "step": self.step,
                **components,
                "grad_norm": result.total_norm,
                "clip_coef": result.clip_coef,
                "clip_norm": self.config.gradient_clip_norm,
                "grad_finite": result.finite,
                "nonfinite_params": result.offenders[:MAX_NAMED_OFFENDERS],
                "loss_scale": self._loss_scale(),
                "skipped": result.skipped,
                "skipped_total": self.skipped_steps,
                "lr": lr,
                "images_per_s": round(images_per_second, 2),
            }
        )

    def _loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    @staticmethod
    def _format_map(results: dict[str, float]) -> str:
        head_results = [
            f"{head} head mAP@0.5={results[f'{head}/map50']:.4f} mAP@0.5:0.95={results[f'{head}/map']:.4f}"
            for head in HEAD_NAMES
        ]
        return "; ".join(head_results)

    # ---------------------------------------------------------------- validation, state

    def _validate(self) -> dict[str, float]:
        """Rank 0 evaluates the EMA weights; every rank gets its results."""
        results = (
            evaluate(self.ema.module, self.val_loader, self.device)
            if self.context.is_main
            else None
        )
        return broadcast_from_main(results, self.context)

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "best_fitness": self.best_fitness,
            "rng": rng,
            "class_names": list(self.class_names),
            "config": self.config.to_dict(),
        }

    def _save(self, is_best: bool) -> None:
        if not self.context.is_main:
            return
        for name, weights in (("model", self.model), ("EMA", self.ema.module)):
            bad = first_non_finite(weights.state_dict())
            if bad is not None:
                message = (
                    f"Stopping after epoch {self.epoch}: the {name} weights are not finite "
                    f"(first: {bad}), so the run has diverged; checkpoints were not overwritten. "
                    "Lower --lr or check the data."
                )
                self.report.info(message)
                raise TrainingDivergedError(message)
        state = self.state_dict()
        save_checkpoint(state, self.save_dir / "last.pt")
        if is_best:
            save_checkpoint(state, self.save_dir / "best.pt")
        if self.config.save_period and self.epoch % self.config.save_period == 0:
            save_checkpoint(state, self.save_dir / f"epoch{self.epoch}.pt")

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        missing = [key for key in _RESUME_KEYS if key not in state]
        if missing:
            raise CheckpointError(
                f"{path}: not a training checkpoint of this trainer (no {', '.join(missing)}); "
                "to start from bare weights use --init_from"
            )
        self._check_shapes(path, state["model"])
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.skipped_steps, self.best_fitness = (
            int(state["skipped_steps"]),
            float(state["best_fitness"]),
        )
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.report.info(f"Resumed from {path}: epoch {self.epoch}, batch {self.step}")
        # Records after this one replace any of a killed run with the same or later steps.
        self.report.metrics({"kind": "resume", "epoch": self.epoch, "step": self.step})

    def _check_shapes(self, path: Path, weights: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        missing = sorted(own.keys() - weights.keys())
        unexpected = sorted(weights.keys() - own.keys())
        mismatched = [
            f"{k}: {tuple(weights[k].shape)} in the checkpoint, {tuple(v.shape)} here"
            for k, v in own.items()
            if k in weights and weights[k].shape != v.shape
        ]
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"{path}: written for a different model (model options such as --width, "
                f"--fpn_channels, --embed_dim, --n_bins or the classes differ?): "
                f"{len(mismatched)} shapes differ {mismatched[:3]}, {len(missing)} tensors "
                f"missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
            )

    def _init_from(self, path: str) -> None:
        state = load_checkpoint(path)
        weights = (
            state["ema"]["module"] if isinstance(state.get("ema"), dict) else model_state(state)
        )
        own = self.model.state_dict()
        mismatched = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
        if mismatched:
            raise CheckpointError(
                f"{path}: shapes differ from this model for {mismatched[:5]} (model options differ?)"
            )
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        self.report.info(
            f"Initialised from {path}: {len(own) - len(missing)} tensors loaded, "
            f"{len(missing)} missing, {len(unexpected)} unexpected"
        )
