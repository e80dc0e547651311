"""Losses: hand-worked values, binary and multi-class, ignore pixels, class weights, exact accumulation, Carvana."""

import math

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from competition.errors import ConfigError
from competition.losses import CLASS_WEIGHTINGS, LOSSES, build_loss, class_weights

LN2, LN3 = math.log(2), math.log(3)
IGNORE = 255

# --- Today's binary losses, frozen here as they were before multi-class: the reference for Carvana. ---


def old_soft_dice_loss(logits, targets, smooth=1.0):
    probabilities = torch.sigmoid(logits.float()).flatten(1)
    targets = targets.float().flatten(1)
    intersection = (probabilities * targets).sum(1)
    total = probabilities.sum(1) + targets.sum(1)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def old_bce_loss(logits, targets):
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def old_loss(name, bce_weight, dice_weight):
    def bce_dice(b, d):
        return lambda x, y: b * old_bce_loss(x, y) + d * old_soft_dice_loss(x, y)

    focal, lovasz = smp.losses.FocalLoss("binary"), smp.losses.LovaszLoss("binary", per_image=True)
    return {
        "bce_dice": bce_dice(bce_weight, dice_weight),
        "bce": bce_dice(1.0, 0.0),
        "dice": bce_dice(0.0, 1.0),
        "focal": lambda x, y: focal(x.float(), y.float()),
        "lovasz": lambda x, y: lovasz(x.float(), y.float()),
    }[name]


def value_and_gradient(loss_fn, logits, targets):
    logits = logits.detach().clone().requires_grad_(True)
    loss = loss_fn(logits, targets)
    loss.backward()
    return loss.detach(), logits.grad


def carvana_batch(dtype):
    generator = torch.Generator().manual_seed(3)
    targets = torch.zeros(2, 1, 64, 96)
    targets[0, :, 10:50, 20:70] = 1
    targets[1, :, 30:60, 5:40] = 1
    logits = (3 * torch.randn(targets.shape, generator=generator)).to(dtype)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ignore_index", [IGNORE, None])
@pytest.mark.parametrize("name", ["bce_dice", "bce", "dice", "focal", "lovasz"])
def test_carvana_values_and_gradients_are_todays_bit_for_bit(name, ignore_index, dtype):
    logits, targets = carvana_batch(dtype)
    old_value, old_gradient = value_and_gradient(old_loss(name, 0.7, 1.3), logits, targets)
    new_value, new_gradient = value_and_gradient(build_loss(name, 0.7, 1.3, ignore_index=ignore_index), logits, targets)
    assert new_value.dtype == torch.float32
    assert torch.equal(old_value, new_value) and torch.equal(old_gradient, new_gradient)


@pytest.mark.parametrize("alias, name", [("ce", "bce"), ("ce_dice", "bce_dice")])
def test_ce_names_are_the_bce_losses(alias, name):
    logits, targets = carvana_batch(torch.float32)
    assert torch.equal(build_loss(alias, 0.4, 2.0)(logits, targets), build_loss(name, 0.4, 2.0)(logits, targets))
    multi_logits, multi_targets = multi_class_batch(ignored=0.2)
    assert torch.equal(
        build_loss(alias, 0.4, 2.0, num_classes=4)(multi_logits, multi_targets),
        build_loss(name, 0.4, 2.0, num_classes=4)(multi_logits, multi_targets),
    )


def test_old_positional_call_still_weighs_the_terms():
    """training.py calls build_loss(config.loss, config.bce_weight, config.dice_weight)."""
    logits, targets = carvana_batch(torch.float32)
    expected = 0.25 * old_bce_loss(logits, targets) + 2.0 * old_soft_dice_loss(logits, targets)
    assert torch.equal(build_loss("bce_dice", 0.25, 2.0)(logits, targets), expected)
    with pytest.raises(TypeError):
        build_loss("bce_dice", 2, 0.25, 2.0)  # num_classes is keyword-only: a positional one fails loudly


# --- Hand-worked values on 1 x 3 pixels, the third ignored. ---

# Binary: logits 0, ln 3, 5 -> p = 0.5, 0.75 (and an ignored 0.993); targets 1, 0, ignore.
BINARY_LOGITS = torch.tensor([0.0, LN3, 5.0]).reshape(1, 1, 1, 3)
BINARY_TARGETS = torch.tensor([1.0, 0.0, IGNORE]).reshape(1, 1, 1, 3)
BCE = (LN2 + 2 * LN2) / 2  # -ln 0.5 and -ln(1 - 0.75) = ln 4, over the 2 valid pixels
BINARY_DICE = 1 - (2 * 0.5 + 1) / (1.25 + 1 + 1)  # TP 0.5, sum p 1.25, sum truth 1, smooth 1: 5/13
BINARY_HAND = {
    "bce": BCE,
    "ce": BCE,
    "dice": BINARY_DICE,
    "bce_dice": BCE + BINARY_DICE,
    "ce_dice": BCE + BINARY_DICE,
    # (1 - p_t)^2 x -ln p_t: 0.25 ln 2 and 0.5625 x ln 4 = 1.125 ln 2, mean 0.6875 ln 2
    "focal": (0.25 * LN2 + 1.125 * LN2) / 2,
    # hinge errors 1 - logit x sign: 1 (truth 1) and 1 + ln 3 (truth 0); sorted: (1 + ln 3, truth 0), (1, truth 1);
    # Jaccard losses along the order 1 - (1 - 0)/(1 + 1) = 0.5, then 1 - 0/2 = 1: gradient 0.5, 0.5
    "lovasz": 0.5 * (1 + LN3) + 0.5 * 1,
    # TP 0.5, FP 0.75 (the 0.75 on a 0), FN 0.5: 1 - 1.5 / (0.5 + 0.3 x 0.75 + 0.7 x 0.5 + 1) = 1 - 60/83
    "tversky": 23 / 83,
}

# Multi-class, K = 3: softmax rows (0.5, 0.25, 0.25), (0.25, 0.5, 0.25), (0.25, 0.25, 0.5); targets 0, 2, ignore.
MULTI_PROBABILITIES = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
MULTI_LOGITS = MULTI_PROBABILITIES.log().T.reshape(1, 3, 1, 3)
MULTI_TARGETS = torch.tensor([0, 2, IGNORE]).reshape(1, 1, 3)
CE = (LN2 + 2 * LN2) / 2  # -ln 0.5 (class 0 at pixel 1) and -ln 0.25 (class 2 at pixel 2)
# Present classes 0 and 2 (class 1 is absent and skipped). Class 0: p 0.5, 0.25 on truth 1, 0: TP 0.5, sum p 0.75,
# truth 1 -> Dice (1 + 1)/(0.75 + 1 + 1) = 8/11. Class 2: p 0.25, 0.25 on truth 0, 1: TP 0.25, sum p 0.5, truth 1
# -> (0.5 + 1)/(0.5 + 1 + 1) = 0.6. Loss: mean of 3/11 and 0.4 = 37/110.
MULTI_DICE = (3 / 11 + 0.4) / 2
MULTI_HAND = {
    "bce": CE,
    "ce": CE,
    "dice": MULTI_DICE,
    "bce_dice": CE + MULTI_DICE,
    "ce_dice": CE + MULTI_DICE,
    # (1 - 0.5)^2 ln 2 and (1 - 0.25)^2 ln 4: as binary, 0.6875 ln 2
    "focal": (0.25 * LN2 + 1.125 * LN2) / 2,
    # class 0: errors |1 - 0.5| = 0.5 (truth 1), |0 - 0.25| = 0.25 (truth 0), sorted truth 1, 0 -> gradient 1, 0: 0.5;
    # class 2: errors 0.25 (truth 0), 0.75 (truth 1), sorted truth 1, 0 -> 0.75. Mean 0.625.
    "lovasz": (0.5 + 0.75) / 2,
    # class 0: TP 0.5, FP 0.25, FN 0.5 -> 1.5/1.925 = 60/77; class 2: TP 0.25, FP 0.25, FN 0.75 -> 1.25/1.85 = 25/37
    "tversky": ((1 - 60 / 77) + (1 - 25 / 37)) / 2,
}


def test_hand_worked_tables_cover_every_loss():
    assert set(BINARY_HAND) == set(LOSSES) == set(MULTI_HAND)
    assert BINARY_DICE == pytest.approx(5 / 13) and MULTI_DICE == pytest.approx(37 / 110)


@pytest.mark.parametrize("name", list(LOSSES))
def test_binary_hand_worked_values_with_an_ignored_pixel(name):
    loss = build_loss(name)(BINARY_LOGITS, BINARY_TARGETS)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(BINARY_HAND[name], rel=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_multi_class_hand_worked_values_with_an_ignored_pixel(name):
    loss = build_loss(name, num_classes=3)(MULTI_LOGITS, MULTI_TARGETS)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(MULTI_HAND[name], rel=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_bce_dice_weights_weigh_the_two_terms(binary):
    logits, targets, hand, classes = (
        (BINARY_LOGITS, BINARY_TARGETS, BINARY_HAND, 2) if binary else (MULTI_LOGITS, MULTI_TARGETS, MULTI_HAND, 3)
    )
    loss = build_loss("ce_dice", 0.25, 2.0, num_classes=classes)(logits, targets)
    assert loss.item() == pytest.approx(0.25 * hand["ce"] + 2.0 * hand["dice"], rel=1e-6)


def test_class_weights_multiply_each_pixels_term_by_its_true_class():
    # binary [background 1, foreground 3]: (3 x ln 2 + 1 x ln 4) / 2 valid pixels = 2.5 ln 2
    binary = {"class_weights": [1.0, 3.0]}
    assert build_loss("ce", **binary)(BINARY_LOGITS, BINARY_TARGETS).item() == pytest.approx(2.5 * LN2, rel=1e-6)
    # focal: (3 x 0.25 ln 2 + 1 x 1.125 ln 2) / 2 = 0.9375 ln 2
    focal = build_loss("focal", **binary)(BINARY_LOGITS, BINARY_TARGETS)
    assert focal.item() == pytest.approx(0.9375 * LN2, rel=1e-6)
    # multi [1, 3, 2]: class 0 at pixel 1 (x1), class 2 at pixel 2 (x2): (ln 2 + 2 ln 4) / 2 = 2.5 ln 2
    multi = {"num_classes": 3, "class_weights": [1.0, 3.0, 2.0]}
    assert build_loss("ce", **multi)(MULTI_LOGITS, MULTI_TARGETS).item() == pytest.approx(2.5 * LN2, rel=1e-6)
    # focal: (0.25 ln 2 + 2 x 1.125 ln 2) / 2 = 1.25 ln 2; ce_dice: the Dice term is not weighted
    assert build_loss("focal", **multi)(MULTI_LOGITS, MULTI_TARGETS).item() == pytest.approx(1.25 * LN2, rel=1e-6)
    weighted = build_loss("ce_dice", **multi)(MULTI_LOGITS, MULTI_TARGETS)
    assert weighted.item() == pytest.approx(2.5 * LN2 + MULTI_DICE, rel=1e-6)


def test_unit_class_weights_change_nothing_but_the_rounding():
    logits, targets = multi_class_batch(ignored=0.2)
    plain = build_loss("ce_dice", num_classes=4)(logits, targets)
    ones = build_loss("ce_dice", num_classes=4, class_weights=[1.0] * 4)(logits, targets)
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)
    binary_logits, binary_targets = binary_batch(ignored=0.0)
    plain = build_loss("focal")(binary_logits, binary_targets)
    ones = build_loss("focal", class_weights=[1.0, 1.0])(binary_logits, binary_targets)
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)


# --- Ignore pixels, per-image means, accumulation. ---


def binary_batch(ignored: float, images: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(images, 1, 12, 16, generator=generator) > 0.6).float()
    targets[torch.rand(targets.shape, generator=generator) < ignored] = IGNORE
    return 2 * torch.randn(targets.shape, generator=generator), targets


def multi_class_batch(ignored: float, images: int = 4, classes: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (images, 12, 16), generator=generator)
    targets[:, :4, :] = 0  # uneven classes
    targets[torch.rand(targets.shape, generator=generator) < ignored] = IGNORE
    return 2 * torch.randn(images, classes, 12, 16, generator=generator), targets


def batch(binary: bool, ignored: float, **kwargs):
    return binary_batch(ignored, **kwargs) if binary else multi_class_batch(ignored, **kwargs)


def loss_for(name: str, binary: bool, **kwargs):
    return build_loss(name, 0.6, 1.4, num_classes=2 if binary else 4, **kwargs)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "multi"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_ignored_pixels_change_neither_loss_nor_gradient(name, binary):
    logits, targets = batch(binary, ignored=0.3)
    ignored = (targets == IGNORE).unsqueeze(1) if not binary else targets == IGNORE
    ignored = ignored.expand_as(logits)
    other_logits = torch.where(ignored, 50 * torch.randn(logits.shape), logits)
    loss_fn = loss_for(name, binary)
    value, gradient = value_and_gradient(loss_fn, logits, targets)
    other_value, other_gradient = value_and_gradient(loss_fn, other_logits, targets)
    assert torch.equal(value, other_value)
    assert torch.equal(gradient, other_gradient)
    assert not gradient[ignored].any() and gradient[~ignored].any()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "multi"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_an_image_with_every_pixel_ignored_counts_as_zero(name, binary):
    logits, targets = batch(binary, ignored=0.2, images=2)
    targets[1] = IGNORE
    loss_fn = loss_for(name, binary)
    both = loss_fn(logits, targets)
    assert both.item() == pytest.approx(loss_fn(logits[:1], targets[:1]).item() / 2, rel=1e-6)


WEIGHTABLE = [(name, False) for name in LOSSES] + [(name, True) for name, terms in LOSSES.items() if terms[0]]


@pytest.mark.parametrize("ignored", [0.0, 0.25], ids=["no-ignore", "ignore"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "multi"])
@pytest.mark.parametrize("name, weighted", WEIGHTABLE)
def test_micro_batches_accumulate_to_the_big_batch(name, weighted, binary, ignored):
    """Each micro-batch's loss weighted by its share of images, as training.accumulate_gradients does."""
    weights = {"class_weights": [0.5, 2.0] if binary else [0.5, 1.0, 2.0, 4.0]} if weighted else {}
    logits, targets = batch(binary, ignored, images=6)
    loss_fn = loss_for(name, binary, **weights)
    big_value, big_gradient = value_and_gradient(loss_fn, logits, targets)
    parts = [value_and_gradient(loss_fn, logits[i : i + n], targets[i : i + n]) for i, n in ((0, 1), (1, 2), (3, 3))]
    shares = torch.tensor([1, 2, 3]) / 6
    accumulated = sum(share * value for share, (value, _) in zip(shares, parts))
    assert accumulated.item() == pytest.approx(big_value.item(), rel=1e-5)
    gradient = torch.cat([share * part_gradient for share, (_, part_gradient) in zip(shares, parts)])
    torch.testing.assert_close(gradient, big_gradient, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "multi"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_float32_for_fp16_logits_and_lowest_when_right(name, binary):
    logits, targets = batch(binary, ignored=0.1)
    if binary:
        right = torch.where(targets > 0, 10.0, -10.0)
        wrong = -right
    else:
        truth = F.one_hot(torch.where(targets == IGNORE, 0, targets), 4).movedim(-1, 1).float()
        right, wrong = 20 * truth - 10, 10 - 20 * truth
    loss_fn = loss_for(name, binary)
    values = [loss_fn(x.half(), targets) for x in (right, torch.zeros_like(logits), wrong)]
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in values)
    assert 0 <= values[0].item() < 1e-3 and values[0] < values[1] < values[2]


# --- Class weights from pixel counts, by hand. ---


def test_class_weights_by_hand():
    counts = np.array([6, 3, 1])  # 10 pixels
    # inverse: 1/6, 1/3, 1; pixel-weighted mean (6/6 + 3/3 + 1/1)/10 = 0.3 -> 5/9, 10/9, 10/3
    assert class_weights(counts, "inverse") == pytest.approx([5 / 9, 10 / 9, 10 / 3])
    # median with (K,) counts: frequencies 0.6, 0.3, 0.1, median 0.3 -> 0.5, 1, 3: the same after normalising
    assert class_weights(counts, "median") == pytest.approx([5 / 9, 10 / 9, 10 / 3])
    # effective, beta 0.5: 0.5/(1 - 1/64) = 32/63, 0.5/(1 - 1/8) = 4/7, 0.5/0.5 = 1;
    # pixel-weighted mean (192/63 + 12/7 + 1)/10 = 363/630 -> 320/363, 120/121, 210/121
    assert class_weights(counts, "effective", beta=0.5) == pytest.approx([320 / 363, 120 / 121, 210 / 121])
    assert class_weights(counts, "none") is None


def test_median_frequency_counts_only_the_images_that_hold_the_class():
    """Eigen & Fergus: f_c = pixels of c / pixels of the images holding c."""
    per_image = np.array([[4, 0, 0], [2, 3, 1]])  # image pixels 4 and 6
    # f = 6/10, 3/6, 1/6; median 0.5 -> 5/6, 1, 3; pixel-weighted mean (5 + 3 + 3)/10 = 1.1 -> 25/33, 10/11, 30/11
    assert class_weights(per_image, "median") == pytest.approx([25 / 33, 10 / 11, 30 / 11])
    # the other methods use the summed counts 6, 3, 1
    assert class_weights(per_image, "inverse") == pytest.approx([5 / 9, 10 / 9, 10 / 3])


@pytest.mark.parametrize("method", [m for m in CLASS_WEIGHTINGS if m != "none"])
def test_class_weights_have_pixel_weighted_mean_one_and_favour_rare_classes(method):
    counts = np.array([900_000, 90_000, 3_000, 0])
    weights = class_weights(counts, method)
    assert len(weights) == 4 and all(math.isfinite(w) and w > 0 for w in weights)
    assert np.dot(counts, weights) / counts.sum() == pytest.approx(1.0)
    assert weights[0] < weights[1] < weights[2]
    assert weights[3] == max(weights[:3])  # a class with no pixels: the largest weight of the others


def test_a_zero_pixel_class_gets_the_largest_weight_by_hand():
    # inverse over 6 and 4: 1/6, 1/4, mean (1 + 1)/10 = 0.2 -> 5/6, 5/4; the empty class takes 5/4
    assert class_weights(np.array([6, 0, 4]), "inverse") == pytest.approx([5 / 6, 5 / 4, 5 / 4])
    assert class_weights(np.array([6, 0, 4]), "effective", beta=0.5)[1] == max(
        class_weights(np.array([6, 0, 4]), "effective", beta=0.5)
    )


def test_class_weight_errors():
    with pytest.raises(ConfigError, match="--class-weights 'square'.*inverse"):
        class_weights(np.array([1, 2]), "square")
    with pytest.raises(ConfigError, match="no labelled pixel"):
        class_weights(np.array([0, 0, 0]), "inverse")
    with pytest.raises(ConfigError, match="beta"):
        class_weights(np.array([1, 2]), "effective", beta=1.0)


def test_build_loss_errors():
    with pytest.raises(ConfigError, match="--loss 'jaccard' is unknown; choose one of bce_dice"):
        build_loss("jaccard")
    with pytest.raises(ConfigError, match="--loss dice has no cross-entropy"):
        build_loss("dice", num_classes=3, class_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="3 finite non-negative numbers"):
        build_loss("ce", num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="at least 2"):
        build_loss("ce", num_classes=1)
