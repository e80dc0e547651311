"""Every architecture, loss, schedule and the EMA that --help offers, exercised at tiny size."""

import math
from dataclasses import fields

import pytest
import torch

from competition.config import CHOICES, TrainConfig
from competition.losses import LOSSES, build_loss
from competition.models import ARCHITECTURES, OWN_ENCODER, build_model
from competition.schedules import SCHEDULES, build_scheduler
from competition.training import train_fold

HEIGHT, WIDTH = 64, 64


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small, busy CPU (2 cores, other tests running) OpenMP's threads wait on each
    other and tiny convolutions take ten times longer than on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fixed_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint8 images and their 0/1 masks: a bright rectangle on noise."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 100, (2, 3, HEIGHT, WIDTH), dtype=torch.uint8, generator=generator)
    masks = torch.zeros(2, 1, HEIGHT, WIDTH)
    masks[0, :, 10:40, 20:50] = 1
    masks[1, :, 30:60, 5:40] = 1
    images = torch.where(masks.bool(), images + 150, images)
    return images, masks


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.slow
def test_architecture_fits_a_fixed_batch(arch):
    torch.manual_seed(0)
    model = build_model(arch, "resnet18", "none").train()
    images, masks = fixed_batch()
    loss_fn = build_loss("bce_dice")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    # SegNet and the original U-Net start from scratch with encoders of their own, and SegNet brings detail back
    # through unpooling alone, without skip connections: 1.35 -> 1.25 in 4 steps, 1.03 in 8.
    for _ in range(8 if arch in OWN_ENCODER else 4):
        logits = model(images)
        assert logits.shape == (2, 1, HEIGHT, WIDTH) and logits.dtype == torch.float32
        loss = loss_fn(logits, masks)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_fn(model(images), masks).item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.9 * losses[0], losses  # 1.37 -> 0.81 for Unet


def random_target(shape=(2, 1, 32, 48), seed: int = 0) -> torch.Tensor:
    targets = (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5).float()
    assert 0 < targets.mean() < 1
    return targets


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_lowest_for_agreeing_logits(name):
    loss_fn = build_loss(name)
    targets = random_target()
    agreeing = loss_fn(torch.where(targets > 0, 10.0, -10.0), targets)
    disagreeing = loss_fn(torch.where(targets > 0, -10.0, 10.0), targets)
    zero = loss_fn(torch.zeros_like(targets), targets)
    assert agreeing.dtype == torch.float32 and agreeing.dim() == 0
    assert 0 <= agreeing.item() < 1e-3
    assert agreeing < zero < disagreeing


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_finite_and_float32_for_fp16_logits_at_full_resolution(name):
    """2.4 M pixels of fp16 logits: sums over them overflow float16 (max 65504)."""
    targets = torch.zeros(1, 1, 1280, 1920, dtype=torch.float16)
    targets[..., 200:1100, 300:1700] = 1
    logits = torch.where(targets > 0, 8.0, -8.0).half()
    loss = build_loss(name)(logits, targets)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and 0 <= loss.item() < 0.01


def test_bce_of_zero_logits_is_ln_2():
    targets = random_target()
    assert build_loss("bce")(torch.zeros_like(targets), targets).item() == pytest.approx(math.log(2), rel=1e-6)


def test_dice_of_zero_logits_on_a_full_mask():
    """Probabilities 0.5 on N pixels of target 1: 1 - (2 x 0.5N + 1) / (0.5N + N + 1), per image, smooth 1."""
    targets = torch.ones(3, 1, 8, 12)
    pixels = 8 * 12
    expected = 1 - (2 * 0.5 * pixels + 1) / (0.5 * pixels + pixels + 1)
    assert build_loss("dice")(torch.zeros_like(targets), targets).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1 - 97 / 145)


def test_bce_dice_weights_add_the_two_losses():
    targets = random_target()
    logits = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    bce, dice = build_loss("bce")(logits, targets), build_loss("dice")(logits, targets)
    assert build_loss("bce_dice", 0.25, 2.0)(logits, targets).item() == pytest.approx(
        0.25 * bce.item() + 2.0 * dice.item(), rel=1e-6
    )


STEPS_PER_EPOCH = 10


def schedule_lrs(name: str) -> tuple[TrainConfig, list[float]]:
    """The learning rate of each optimizer step over a whole run of 3 epochs, stepped as the trainer does."""
    config = TrainConfig(
        epochs=3, lr=1e-3, warmup_epochs=1.0, encoder_weights="none", schedule=name, step_epochs=1, step_factor=0.05
    )
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=config.lr)
    scheduler = build_scheduler(config, optimizer, STEPS_PER_EPOCH)
    lrs = []
    for _ in range(config.epochs * STEPS_PER_EPOCH):
        lrs.append(optimizer.param_groups[0]["lr"])
        parameter.grad = torch.ones(1)
        optimizer.step()
        scheduler.step()
    return config, lrs


def check_cosine(config: TrainConfig, lrs: list[float]) -> None:
    warmup = STEPS_PER_EPOCH
    assert lrs[:warmup] == pytest.approx([config.lr * (step + 1) / warmup for step in range(warmup)], rel=1e-9)
    assert lrs[warmup - 1] == pytest.approx(config.lr, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))
    # step 29 of 30: half a cosine at 19/20 of the decay
    assert lrs[-1] == pytest.approx(config.lr * 0.5 * (1 + math.cos(math.pi * 19 / 20)), rel=1e-9)


def check_onecycle(config: TrainConfig, lrs: list[float]) -> None:
    # torch's defaults: start at max_lr / 25, end at that / 1e4, peak 30% of the way in
    assert lrs[0] == pytest.approx(config.lr / 25, rel=1e-6)
    assert lrs[-1] == pytest.approx(config.lr / 25 / 1e4, rel=1e-3)
    assert lrs.index(max(lrs)) == round(0.3 * len(lrs)) - 1


def check_step(config: TrainConfig, lrs: list[float]) -> None:
    # warm-up over the first epoch, then x0.05 at each epoch's start (step_epochs 1)
    warmup = STEPS_PER_EPOCH
    assert lrs[:warmup] == pytest.approx([config.lr * (step + 1) / warmup for step in range(warmup)], rel=1e-9)
    assert lrs[warmup : 2 * warmup] == pytest.approx([config.lr * 0.05] * warmup, rel=1e-9)
    assert lrs[2 * warmup :] == pytest.approx([config.lr * 0.05**2] * warmup, rel=1e-9)


SCHEDULE_CHECKS = {"cosine": check_cosine, "onecycle": check_onecycle, "step": check_step}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_peaks_at_lr_and_decays(name):
    config, lrs = schedule_lrs(name)
    assert len(lrs) == 30
    assert max(lrs) == pytest.approx(config.lr, rel=1e-3)
    assert lrs[-1] < 0.01 * max(lrs)
    SCHEDULE_CHECKS[name](config, lrs)


@pytest.mark.slow
def test_ema_weights_are_the_ones_evaluated_and_kept_as_best(tiny_config):
    tiny_config.epochs, tiny_config.ema = 1, 0.9
    tiny_config.size, tiny_config.augment = "32x64", "none"  # the smallest run that still trains 8 steps
    train_fold(tiny_config, "cpu", progress=False)
    run_dir = tiny_config.run_dir()
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    ema = {key.removeprefix("module."): value for key, value in last["ema"].items() if key.startswith("module.")}
    assert int(last["ema"]["n_averaged"]) == 64 // tiny_config.batch_size  # one update per optimizer step
    assert set(best["model"]) == set(ema) == set(last["model"])
    for key, value in best["model"].items():
        assert torch.equal(value, ema[key]), key
    weights = [key for key, value in last["model"].items() if value.is_floating_point()]
    assert any(not torch.equal(best["model"][key], last["model"][key]) for key in weights)
    # batch-norm statistics are averaged too (use_buffers): the EMA's running mean is not the raw one
    running = [key for key in weights if key.endswith("running_mean")]
    assert running and any(not torch.equal(best["model"][key], last["model"][key]) for key in running)


def test_every_choice_in_help_is_tested():
    """A new architecture, loss or schedule fails here until it is covered above (and named in --help)."""
    assert set(ARCHITECTURES) == set(CHOICES["arch"])
    assert set(LOSSES) == set(CHOICES["loss"])
    assert set(SCHEDULES) == set(CHOICES["schedule"]) == set(SCHEDULE_CHECKS)
    help_text = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
    for name in ("arch", "loss", "schedule", "layout", "class_weights", "sampler", "monitor", "pet_border"):
        for choice in CHOICES[name]:
            assert choice == "auto" or choice in help_text[name], (name, choice)
    assert "ema" in help_text and "0 is off" in help_text["ema"]
