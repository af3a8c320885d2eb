"""Optimiser and learning-rate schedule from the training config."""
from __future__ import annotations

import math

import torch


def lr_factor(schedule: dict, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    name = schedule.get("name", "cosine")
    warmup = int(schedule.get("warmup_steps", 0))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, max(0, step - warmup) / span)
    if name == "cosine":
        floor = float(schedule.get("min_lr_fraction", 0.0))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "exponential":
        gamma = float(schedule.get("gamma", 0.1))
        decay_steps = float(schedule.get("decay_steps", span))
        return gamma ** (max(0, step - warmup) / decay_steps)
    raise ValueError(f"unknown LR schedule {name!r} (cosine, exponential, constant)")


def make_optimizer(params, config):
    options = dict(config.optimizer)
    name = options.pop("name", "adam").lower()
    options.setdefault("lr", 1e-4)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r} ({sorted(classes)})")
    return classes[name](params, **options)
