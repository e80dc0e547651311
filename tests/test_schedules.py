"""The step learning-rate schedule, by hand."""

from types import SimpleNamespace

import pytest
import torch

from competition.schedules import SCHEDULES, build_scheduler, step_factor


def lrs(warmup_epochs, steps_per_epoch=2, epochs=6):
    config = SimpleNamespace(
        schedule="step", lr=1.0, epochs=epochs, warmup_epochs=warmup_epochs, step_epochs=2, step_factor=0.1
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    seen = []
    for _ in range(epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_step_is_a_schedule():
    assert "step" in SCHEDULES


def test_step_decays_tenfold_every_two_epochs_without_warmup():
    assert lrs(0) == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01])


def test_step_warms_up_over_one_epoch_then_holds_until_the_boundary():
    assert lrs(1) == pytest.approx([0.5, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01])


def test_a_warmup_past_a_boundary_warms_up_to_the_decayed_rate():
    assert step_factor(4, warmup_steps=5, decay_every=4, factor=0.5) == pytest.approx(0.5)
    assert step_factor(1, warmup_steps=5, decay_every=4, factor=0.5) == pytest.approx(0.4)
