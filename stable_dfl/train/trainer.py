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
import math
import random
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..models import DetectionLoss, DetectionTargets, DualHeadDetector
from .build import build_data, build_optimization
from .checkpoint import (
    checkpoint_state,
    first_non_finite,
    init_weights_from,
    restore_checkpoint,
    save_checkpoint,
    write_checkpoints,
)
from .config import TrainConfig
from .distributed import DistContext, all_reduce_mean, broadcast_from_main
from .ema import ModelEMA
from .evaluate import evaluate
from .forensics import SkippedStepForensics, StepForensics
from .precision import resolve_precision
from .records import ResumeRecord
from .reporting import (
    Reporter,
    attach_external_loggers,
    loss_scale,
    module_grad_norms,
    report_epoch,
    report_step,
    report_untrained,
)
from .run_folder import RunFolderLock
from .step import StepOutcome
from .stop import StopRequest, TrainingStopped


class TrainingDivergedError(RuntimeError):
    """Training cannot usefully go on: every recent step was skipped, or the weights are
    not finite. The last checkpoint written is left as it was."""


class Trainer:
    def __init__(self, config: TrainConfig, context: DistContext, console=None) -> None:
        """Takes the run folder's lock (RunFolderBusyError when another run holds it), checks
        the data and builds everything; :meth:`fit` trains, :meth:`close` gives up."""
        self.config = config
        self.context = context
        self.device = context.device
        self.save_dir = Path(config.save_dir)
        # Before anything is written there: a second run in the folder is refused untouched.
        self.run_folder = RunFolderLock(self.save_dir)
        if context.is_main:
            self.run_folder.acquire()
        self.run_id = uuid.uuid4().hex[:12]
        # A refused dataset or checkpoint leaves the folder free and the logs closed.
        with contextlib.ExitStack() as on_failure:
            on_failure.callback(self.run_folder.release)
            self.report = Reporter(
                self.save_dir, enabled=context.is_main, run_id=self.run_id, console=console
            )
            on_failure.callback(self.report.close)
            self._build(config, context)
            on_failure.pop_all()

    def _build(self, config: TrainConfig, context: DistContext) -> None:
        for path in self.run_folder.removed_temporary_files:
            self.report.info(f"Removed {path}, left by a process killed while saving")
        self.precision = resolve_precision(config.amp, self.device)
        self.amp_dtype = self.precision.dtype
        # The first line: the dtype sets the speed (up to ~50x on a CPU) and the numerics.
        self.report.info(self.precision.reason)
        random.seed(config.seed)
        torch.manual_seed(config.seed)  # same initial weights on every rank

        data = build_data(config, context, progress=self.report.status)
        self.sampler, self.train_loader, self.val_loader, self.class_names = data[:4]
        for line in data.summary:
            self.report.info(line)
        self.batches_per_epoch = len(self.train_loader)
        self.model = DualHeadDetector(
            len(self.class_names),
            config.n_bins,
            config.width,
            config.fpn_channels,
            config.embed_dim,
            head_init=config.head_init,
        ).to(self.device)
        if config.init_from:
            loaded = init_weights_from(self.model, config.init_from)
            self.report.info(
                f"Initialised from {config.init_from}: {loaded.loaded} tensors loaded, "
                f"{loaded.missing} missing, {loaded.unexpected} unexpected"
            )
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
        self.optimizer, self.scheduler, self.scaler, self.guard = build_optimization(
            self.model, config, self.device, self.amp_dtype, config.epochs * self.batches_per_epoch
        )
        self.forensics = SkippedStepForensics(
            config.forensics_steps,
            self.save_dir,
            context,
            self.model,
            self.criterion,
            self.amp_dtype,
            self.train_loader.dataset.image_name,
        )

        self.epoch = 0  # epochs completed
        self.step = 0  # batches seen (optimizer steps taken or skipped)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.best_fitness = -1.0
        # Of the epoch in progress: batches trained and their loss sums (a run stopped by a
        # signal saves them, so that its resume finishes the epoch it was in).
        self.epoch_batches_done = 0
        self.epoch_steps_taken = 0  # of those batches, the optimizer steps not skipped
        self.epoch_loss_sums: dict[str, float] = {}
        self.stop = StopRequest()
        if config.resume is not None:
            self._resume(Path(config.resume) if config.resume else self.save_dir / "last.pt")
        attach_external_loggers(
            self.report, self.save_dir, config.to_dict(), config.tensorboard, config.wandb
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint of this trainer holds now."""
        return checkpoint_state(self)

    def _resume(self, path: Path) -> None:
        restore_checkpoint(self, path, self.batches_per_epoch)
        self.report.run_id = self.run_id
        self.report.info(f"Resumed from {path}: epoch {self.epoch}, batch {self.step}")
        # Records after this one replace any of a killed run with the same or later steps.
        self.report.metrics(ResumeRecord(epoch=self.epoch, step=self.step))

    # ------------------------------------------------------------------------------ fit

    def fit(self) -> dict[str, Any]:
        """Trains the remaining epochs; returns the last validation results. Raises
        TrainingStopped after saving ``last.pt`` when SIGTERM or SIGINT asked it to stop.
        The run folder is released when it returns or raises."""
        self.stop.install()
        try:
            return self._fit()
        finally:
            self.stop.uninstall()
            self.close()

    def close(self) -> None:
        """Releases the run folder and closes the logs (of a trainer that will not fit, or
        has finished)."""
        self.report.close()
        self.run_folder.release()

    def _fit(self) -> dict[str, Any]:
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
            report_untrained(self.report, results)
        for epoch in range(self.epoch, config.epochs):
            self._stop_if_requested("before", epoch)
            started = time.perf_counter()
            losses = self._train_epoch(epoch)
            self.epoch = epoch + 1
            results = self._validate()
            fitness = results["standard/map"]
            is_best = fitness > self.best_fitness
            self.best_fitness = max(fitness, self.best_fitness)
            # The record before the checkpoint: a run killed between the two repeats the
            # epoch from the previous checkpoint and writes the record again, whereas a
            # checkpoint written first would leave its epoch without a record for good.
            report_epoch(
                self.report,
                config,
                epoch=self.epoch,
                step=self.step,
                losses=losses,
                results=results,
                skipped_total=self.skipped_steps,
                seconds=time.perf_counter() - started,
            )
            self._save(is_best)
        return results

    def _validate(self) -> dict[str, float]:
        """Rank 0 evaluates the EMA weights; every rank gets its results."""
        results = (
            evaluate(self.ema.module, self.val_loader, self.device)
            if self.context.is_main
            else None
        )
        return broadcast_from_main(results, self.context)

    def _save(self, is_best: bool) -> None:
        if not self.context.is_main:
            return
        self._stop_if_weights_diverged()
        write_checkpoints(
            self.state_dict(), self.save_dir, self.epoch, is_best, self.config.save_period
        )

    # ---------------------------------------------------------------------------- epoch

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """The epoch's batches not trained yet; returns its mean losses."""
        self.ddp_model.train()
        done = self.epoch_batches_done
        self.sampler.set_epoch(epoch, start_batch=done)
        batches = self.batches_per_epoch
        for index, batch in enumerate(self.train_loader, start=done + 1):
            started = time.perf_counter()
            self.step += 1
            components, result, module_norms, forensics = self._train_step(batch)
            seconds = time.perf_counter() - started
            self.epoch_batches_done = index
            # Epoch means are over the steps taken: a skipped step's (NaN) losses are reported
            # with that step and counted in skipped steps, not averaged into the epoch.
            if not result.skipped:
                self.epoch_steps_taken += 1
            for name, value in components.items():
                taken = 0.0 if result.skipped else value
                self.epoch_loss_sums[name] = self.epoch_loss_sums.get(name, 0.0) + taken
            report_step(
                self.report,
                self.config,
                epoch=epoch + 1,
                batch=index,
                batches=batches,
                step=self.step,
                losses=components,
                outcome=result,
                module_norms=module_norms,
                forensics=forensics,
                lr=self.optimizer.param_groups[0]["lr"],
                scale=loss_scale(self.scaler),
                skipped_total=self.skipped_steps,
                images_per_second=len(batch.images) * self.context.world_size / max(seconds, 1e-9),
            )
            self.consecutive_skips = self.consecutive_skips + 1 if result.skipped else 0
            limit = self.config.max_consecutive_skips
            if limit and self.consecutive_skips >= limit:
                self._stop_after_skips(result)
            self._stop_if_requested("in", epoch)
        taken = self.epoch_steps_taken
        means = {
            name: total / taken if taken else math.nan
            for name, total in self.epoch_loss_sums.items()
        }
        self.epoch_batches_done, self.epoch_steps_taken, self.epoch_loss_sums = 0, 0, {}
        return means

    def _stop_if_requested(self, where: str, epoch: int) -> None:
        """After a step (``where="in"``) or before an epoch: when a stop signal came (to any
        rank: they all stop at the same step), saves ``last.pt`` and raises TrainingStopped."""
        if not self._stop_agreed():
            return
        position = (
            f"at batch {self.step} (epoch {epoch + 1}, batch {self.epoch_batches_done}/"
            f"{self.batches_per_epoch})"
            if where == "in"
            else f"before epoch {epoch + 1}"
        )
        if self.context.is_main:
            # Mid-epoch, the checkpoint keeps the epoch's progress (not validated yet).
            self._stop_if_weights_diverged()
            save_checkpoint(self.state_dict(), self.save_dir / "last.pt")
        message = (
            f"Stopped by {self.stop.name or 'a signal to another rank'} {position}; "
            f"{self.save_dir / 'last.pt'} holds it: continue with --resume"
        )
        self.report.info(message)
        # A rank that got no signal stops as if it got SIGTERM (torchrun forwards that one).
        raise TrainingStopped(self.stop.signum or signal.SIGTERM, message)

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer)."""
        if not self.context.distributed:
            return self.stop.requested
        flag = torch.tensor([float(self.stop.requested)], device=self.device)
        return bool(all_reduce_mean(flag, self.context).item())

    # ----------------------------------------------------------------------------- step

    def _train_step(
        self, batch
    ) -> tuple[dict[str, float], StepOutcome, dict[str, float] | None, StepForensics | None]:
        """One batch; returns its losses (averaged over ranks), the step's outcome, the
        per-module gradient norms (every ``--debug_interval`` steps) and the step's
        explanation (when it was skipped)."""
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
            module_grad_norms(self.model, loss_scale(self.scaler))
            if self.step % self.config.debug_interval == 0
            else None
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
        # Replayed from the state before the step: a skipped step changed no parameter, and
        # the buffers are back. A step that was taken costs one attribute write here.
        forensics = None
        if result.skipped:
            forensics = self.forensics.after_skip(
                self.step,
                math.isfinite(reduced["total_loss"]),
                images,
                targets,
                batch.indices,
                self._scale_of_skipped_step(),
            )
        else:
            self.forensics.step_taken()
        return reduced, result, module_norms, forensics

    def _scale_of_skipped_step(self) -> float:
        """The loss scale a skipped step ran with: ``update()`` backed it off since (read
        after the step, so that no step waits on the device for it before its backward)."""
        if not self.scaler.is_enabled():
            return 1.0
        return loss_scale(self.scaler) / self.scaler.get_backoff_factor()

    # ---------------------------------------------------------------- divergence stop

    def _stop_after_skips(self, result: StepOutcome) -> None:
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

    def _stop_if_weights_diverged(self) -> None:
        """Before a checkpoint overwrites the last good one."""
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
