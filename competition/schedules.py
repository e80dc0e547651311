"""Learning-rate schedules, by name: each maps (settings, optimizer, steps per epoch) to a per-step scheduler."""

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _cosine(config, optimizer, total: int, steps_per_epoch: int):
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


def _onecycle(config, optimizer, total: int, steps_per_epoch: int):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)


def step_factor(step: int, warmup_steps: int, decay_every: int, factor: float) -> float:
    """Linear warm-up as for cosine, then ``factor`` ** (completed ``decay_every``-step periods).

    Periods are counted from step 0, not from the warm-up's end, so the drops fall on epoch
    boundaries (epoch 10, 20, ... for 10-epoch periods) whatever the warm-up; a warm-up longer than
    a period warms up to the already-decayed rate.
    """
    decayed = factor ** (step // max(1, decay_every))
    if step < warmup_steps:
        return decayed * (step + 1) / warmup_steps
    return decayed


def _step(config, optimizer, total: int, steps_per_epoch: int):
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    every = config.step_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step_factor(step, warmup, every, config.step_factor)
    )


SCHEDULES = {"cosine": _cosine, "onecycle": _onecycle, "step": _step}


def build_scheduler(config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The scheduler ``config.schedule`` names, stepped once per optimizer step over ``config.epochs``."""
    return SCHEDULES[config.schedule](config, optimizer, config.epochs * steps_per_epoch, steps_per_epoch)
