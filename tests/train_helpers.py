"""A tiny training configuration shared by the trainer tests (seconds per run on a CPU)."""

from stable_dfl.train import TrainConfig


def tiny_config(save_dir, **overrides) -> TrainConfig:
    options = dict(
        save_dir=str(save_dir),
        train_images=16,
        val_images=8,
        image_size=64,
        batch_size=8,
        epochs=1,
        width=4,
        fpn_channels=16,
        embed_dim=8,
        warmup_steps=1,
        log_interval=1,
        debug_interval=2,
        device="cpu",
    )
    options.update(overrides)
    return TrainConfig(**options)
