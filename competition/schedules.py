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


def step_factor(step: int, steps_per_epoch: int, step_epochs: int, factor: float, warmup_steps: int = 0) -> float:
    """Linear warm-up over ``warmup_steps``, then ``factor`` ** (epochs done // ``step_epochs``): the step
    decay of the classic papers (e.g. x0.1 every 30 epochs)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return factor ** ((step // steps_per_epoch) // step_epochs)


def _step(config, optimizer, total: int, steps_per_epoch: int):
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step_factor(step, steps_per_epoch, config.step_epochs, config.step_factor, warmup)
    )


SCHEDULES = {"cosine": _cosine, "onecycle": _onecycle, "step": _step}


def build_scheduler(config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The scheduler ``config.schedule`` names, stepped once per optimizer step over ``config.epochs``."""
    return SCHEDULES[config.schedule](config, optimizer, config.epochs * steps_per_epoch, steps_per_epoch)


def steps_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of ``batches``: the last micro-batches that do not fill ``accum_steps`` make a
    step too. The schedule, the step counter and TensorBoard's step numbers all count by it."""
    return math.ceil(batches / accum_steps)
