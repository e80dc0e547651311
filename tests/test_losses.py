"""Losses beyond Carvana's: multi-class (softmax) and binary with an ignore index, class weights; hand-worked values."""

import math

import numpy as np
import pytest
import torch

from competition.losses import CLASS_WEIGHTINGS, LOSSES, BCEDiceLoss, build_loss, class_weights

IGNORE = 255


def multiclass_batch(seed: int = 0, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (2, 16, 24), generator=generator)
    targets[:, :2] = IGNORE  # a border of ignored pixels
    logits = torch.randn(2, classes, 16, 24, generator=generator)
    return logits, targets


def test_cross_entropy_by_hand():
    """Two pixels, three classes; logits (0, 0, 0) -> ln 3 whatever the class; logits (ln 2, 0, 0) with target 0:
    -ln(2 / (2 + 1 + 1)) = ln 2. Mean over the two pixels: (ln 3 + ln 2) / 2."""
    logits = torch.tensor([[[[0.0, math.log(2)]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # (1, 3, 1, 2)
    targets = torch.tensor([[[2, 0]]])
    expected = (math.log(3) + math.log(2)) / 2
    assert build_loss("ce", num_classes=3, ignore_index=IGNORE)(logits, targets).item() == pytest.approx(expected)


def test_class_weighted_cross_entropy_by_hand():
    """The same pixels with weights (1, 1, 3): (3 ln 3 + 1 ln 2) / (3 + 1), PyTorch's weighted mean."""
    logits = torch.tensor([[[[0.0, math.log(2)]], [[0.0, 0.0]], [[0.0, 0.0]]]])
    targets = torch.tensor([[[2, 0]]])
    loss = build_loss("ce", num_classes=3, ignore_index=IGNORE, class_weights=[1.0, 1.0, 3.0])(logits, targets)
    assert loss.item() == pytest.approx((3 * math.log(3) + math.log(2)) / 4)


def test_multiclass_dice_by_hand():
    """Uniform logits over 2 classes... with K = 3: probabilities 1/3 on 2 pixels, targets (0, 1).
    Class 0: intersection 1/3, total 2/3 + 1 -> 1 - (2/3 + 1) / (5/3 + 1) = 1 - 5/8; class 1 the same;
    class 2: intersection 0, total 2/3 -> 1 - 1 / (5/3) = 2/5. Mean: (3/8 + 3/8 + 2/5) / 3."""
    logits = torch.zeros(1, 3, 1, 2)
    targets = torch.tensor([[[0, 1]]])
    expected = (3 / 8 + 3 / 8 + 2 / 5) / 3
    assert build_loss("dice", num_classes=3, ignore_index=IGNORE)(logits, targets).item() == pytest.approx(expected)


@pytest.mark.parametrize("name", list(LOSSES))
def test_ignored_pixels_change_neither_loss_nor_gradient(name):
    logits, targets = multiclass_batch()
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, 4, 2, 24) * 5  # only where the truth is ignored
    loss_fn = build_loss(name, num_classes=4, ignore_index=IGNORE)
    gradients = []
    for values in (logits, changed):
        values = values.clone().requires_grad_()
        loss = loss_fn(values, targets)
        loss.backward()
        gradients.append((loss.item(), values.grad[:, :, 2:].clone()))
    assert gradients[0][0] == pytest.approx(gradients[1][0], rel=1e-5)
    torch.testing.assert_close(gradients[0][1], gradients[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_multiclass_loss_is_lowest_for_agreeing_logits(name):
    _, targets = multiclass_batch()
    labelled = targets.clamp(0, 3)
    agreeing = torch.nn.functional.one_hot(labelled, 4).permute(0, 3, 1, 2).float() * 20 - 10
    loss_fn = build_loss(name, num_classes=4, ignore_index=IGNORE)
    low, zero, high = (
        loss_fn(agreeing, targets),
        loss_fn(torch.zeros_like(agreeing), targets),
        loss_fn(-agreeing, targets),
    )
    assert low.dtype == torch.float32 and low.item() < 1e-2 and low < zero < high


@pytest.mark.parametrize("name", list(LOSSES))
def test_binary_ignored_pixels_count_nowhere(name):
    generator = torch.Generator().manual_seed(3)
    targets = (torch.rand(2, 1, 16, 24, generator=generator) > 0.5).float()
    targets[..., :3] = IGNORE
    logits = torch.randn(2, 1, 16, 24, generator=generator)
    changed = logits.clone()
    changed[..., :3] = 9.0
    loss_fn = build_loss(name, num_classes=2, ignore_index=IGNORE)
    assert loss_fn(logits, targets).item() == pytest.approx(loss_fn(changed, targets).item(), rel=1e-5)


def test_carvana_losses_are_the_old_formula_to_the_bit():
    """Without an ignore index (Carvana), bce_dice is the original BCEDiceLoss object, not a masked variant."""
    generator = torch.Generator().manual_seed(4)
    targets = (torch.rand(2, 1, 32, 48, generator=generator) > 0.5).float()
    logits = torch.randn(2, 1, 32, 48, generator=generator)
    loss_fn = build_loss("bce_dice", 0.5, 2.0)
    assert type(loss_fn) is BCEDiceLoss
    assert torch.equal(loss_fn(logits, targets), BCEDiceLoss(0.5, 2.0)(logits, targets))
    # and the masked variant agrees with it when nothing is ignored
    masked = build_loss("bce_dice", 0.5, 2.0, num_classes=2, ignore_index=IGNORE)
    assert masked(logits, targets).item() == pytest.approx(loss_fn(logits, targets).item(), rel=1e-6)


def test_multiclass_losses_accumulate_exactly_over_micro_batches():
    """Per-image means: the mean of two single-image losses equals the two-image loss."""
    logits, targets = multiclass_batch(seed=5)
    for name in ("bce_dice", "ce", "dice"):
        loss_fn = build_loss(name, num_classes=4, ignore_index=IGNORE)
        halves = (loss_fn(logits[:1], targets[:1]) + loss_fn(logits[1:], targets[1:])) / 2
        assert halves.item() == pytest.approx(loss_fn(logits, targets).item(), rel=1e-6), name


def test_class_weights_by_hand():
    counts = np.array([600, 300, 100, 0])  # frequencies 0.6, 0.3, 0.1; the last class never occurs
    inverse = np.array([1 / 0.6, 1 / 0.3, 1 / 0.1])
    np.testing.assert_allclose(class_weights(counts, "inverse"), [*(inverse / inverse.mean()), 0.0])
    median = 0.3 / np.array([0.6, 0.3, 0.1])  # the median class weighs 1 before scaling
    np.testing.assert_allclose(class_weights(counts, "median"), [*(median / median.mean()), 0.0])
    beta = 0.99
    effective = (1 - beta) / (1 - beta ** np.array([600, 300, 100]))
    np.testing.assert_allclose(class_weights(counts, "effective", beta), [*(effective / effective.mean()), 0.0])
    enet = 1 / np.log(1.02 + np.array([0.6, 0.3, 0.1]))  # bounded: at most 1 / ln(1.02) ~ 50 before scaling
    np.testing.assert_allclose(class_weights(counts, "enet"), [*(enet / enet.mean()), 0.0])
    assert class_weights(counts, "none") is None
    for method in CLASS_WEIGHTINGS[1:]:
        weights = class_weights(counts, method)
        assert np.mean(weights[:3]) == pytest.approx(1.0) and weights[2] > weights[0]  # rarer weighs more
