"""Losses on logits, binary (one sigmoid channel), multi-class (softmax) and multilabel (one sigmoid channel per
class), computed in float32, with an ignore index.

Binary targets are float (N, 1, H, W) of 0/1; multi-class targets are int64 (N, H, W) class indices; multilabel
targets are float (N, K, H, W) of 0/1, an ignored pixel holding the ignore index in every channel. Pixels equal to
``ignore_index`` count in no loss. Carvana's masks have no such pixels and take ``ignore_index=None``: exactly the
losses of before, with no masking at all.
"""

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

CLASS_WEIGHTINGS = ("none", "inverse", "median", "effective", "enet")
ENET_C = 1.02  # ENet's constant: a class at frequency 0 weighs 1 / ln(1.02) ~ 50, one at 1 weighs ~ 1.4
TVERSKY_ALPHA, TVERSKY_BETA = 0.3, 0.7  # weights of false positives and false negatives: misses cost more


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of each image (N, 1, H, W), averaged over images.

    Per image, not over the whole batch, so that the mean over micro-batches equals the loss of
    the big batch; float32, since sums over 2.4 M pixels overflow float16.
    """
    probabilities = torch.sigmoid(logits.float()).flatten(1)
    targets = targets.float().flatten(1)
    intersection = (probabilities * targets).sum(1)
    total = probabilities.sum(1) + targets.sum(1)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


class BCEDiceLoss(torch.nn.Module):
    """``bce_weight`` x BCE + ``dice_weight`` x soft Dice: the winners' loss."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.bce_weight * bce_loss(logits, targets) + self.dice_weight * soft_dice_loss(logits, targets)


def _per_image_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of each image's pixel values (N, ...), then the mean over images (exact under accumulation)."""
    weights = weights.flatten(1)
    return ((values.flatten(1) * weights).sum(1) / weights.sum(1).clamp_min(1e-12)).mean()


def masked_binary_cross_entropy(logits, targets, ignore_index: int, class_weights=None) -> torch.Tensor:
    """BCE over the labelled pixels of each image (``targets`` 0, 1 or ``ignore_index``), averaged per image;
    ``class_weights`` (background, foreground) weight each pixel by its true class."""
    logits, foreground, labelled = logits.float(), (targets == 1).float(), (targets != ignore_index).float()
    weights = labelled
    if class_weights is not None:
        weights = labelled * (class_weights[0] + (class_weights[1] - class_weights[0]) * foreground)
    values = F.binary_cross_entropy_with_logits(logits, foreground, reduction="none")
    return _per_image_mean(values, weights)


def masked_soft_dice(logits, targets, ignore_index: int, smooth: float = 1.0) -> torch.Tensor:
    """``soft_dice_loss`` over the labelled pixels only."""
    labelled = (targets != ignore_index).float().flatten(1)
    probabilities = torch.sigmoid(logits.float()).flatten(1) * labelled
    foreground = (targets == 1).float().flatten(1)
    intersection = (probabilities * foreground).sum(1)
    total = probabilities.sum(1) + foreground.sum(1)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def cross_entropy(logits, targets, ignore_index: int, class_weights=None) -> torch.Tensor:
    """Softmax cross entropy of each image's labelled pixels (weighted by their true class's weight, as
    PyTorch's weighted mean does), averaged over images."""
    logits = logits.float()
    weight = (
        None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    )
    values = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")  # weighted below
    labelled = targets != ignore_index
    pixel_weights = labelled.float() if weight is None else weight[targets.clamp(0, len(weight) - 1)] * labelled
    return _per_image_mean(values, pixel_weights)


def multiclass_soft_dice(logits, targets, ignore_index: int, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per class of each image's labelled pixels, averaged over classes, then over images."""
    probabilities = torch.softmax(logits.float(), dim=1)
    classes = probabilities.shape[1]
    labelled = (targets != ignore_index).unsqueeze(1).float()
    truth = F.one_hot(targets.clamp(0, classes - 1), classes).permute(0, 3, 1, 2).float() * labelled
    probabilities = probabilities * labelled
    intersection = (probabilities * truth).flatten(2).sum(2)
    total = probabilities.flatten(2).sum(2) + truth.flatten(2).sum(2)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


class _Combined(torch.nn.Module):
    """``bce_weight`` x cross entropy + ``dice_weight`` x soft Dice, of whichever kind the task takes."""

    def __init__(self, cross_entropy_term, dice_term, bce_weight: float, dice_weight: float):
        super().__init__()
        self.cross_entropy_term, self.dice_term = cross_entropy_term, dice_term
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.bce_weight:
            loss = loss + self.bce_weight * self.cross_entropy_term(logits, targets)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice_term(logits, targets)
        return loss


class _Float32(torch.nn.Module):
    """Runs a loss on float32 logits (and float32 binary targets; multi-class targets stay indices)."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), targets if targets.dtype == torch.int64 else targets.float())


def _cross_entropy_and_dice(bce_weight, dice_weight, num_classes, ignore_index, class_weights):
    if num_classes == 2 and ignore_index is None and class_weights is None:
        return BCEDiceLoss(bce_weight, dice_weight)  # Carvana: the loss of before, to the bit
    if num_classes == 2:
        ignore = 255 if ignore_index is None else ignore_index
        return _Combined(
            lambda logits, targets: masked_binary_cross_entropy(logits, targets, ignore, class_weights),
            lambda logits, targets: masked_soft_dice(logits, targets, ignore),
            bce_weight,
            dice_weight,
        )
    ignore = -100 if ignore_index is None else ignore_index
    return _Combined(
        lambda logits, targets: cross_entropy(logits, targets, ignore, class_weights),
        lambda logits, targets: multiclass_soft_dice(logits, targets, ignore),
        bce_weight,
        dice_weight,
    )


def _mode(num_classes: int) -> str:
    return "binary" if num_classes == 2 else "multiclass"


# name -> (bce_weight, dice_weight, num_classes, ignore_index, class_weights) -> loss. Every name serves binary
# data (one sigmoid channel) and multi-class data (softmax): bce means cross entropy there.
LOSSES = {
    "bce_dice": lambda b, d, k, i, w: _cross_entropy_and_dice(b, d, k, i, w),
    "ce_dice": lambda b, d, k, i, w: _cross_entropy_and_dice(b, d, k, i, w),
    "bce": lambda b, d, k, i, w: _cross_entropy_and_dice(1.0, 0.0, k, i, w),
    "ce": lambda b, d, k, i, w: _cross_entropy_and_dice(1.0, 0.0, k, i, w),
    "dice": lambda b, d, k, i, w: _cross_entropy_and_dice(0.0, 1.0, k, i, w),
    "focal": lambda b, d, k, i, w: _Float32(
        smp.losses.FocalLoss(_mode(k), ignore_index=i, class_weights=w if k > 2 else None)
    ),
    "lovasz": lambda b, d, k, i, w: _Float32(smp.losses.LovaszLoss(_mode(k), per_image=True, ignore_index=i)),
    "tversky": lambda b, d, k, i, w: _Float32(
        smp.losses.TverskyLoss(_mode(k), ignore_index=i, alpha=TVERSKY_ALPHA, beta=TVERSKY_BETA, smooth=1.0)
    ),
}


def label_soft_dice(logits, targets, ignore_index: int, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of each (image, class) channel of (N, K, H, W) over its labelled pixels, averaged over classes
    and images."""
    return masked_soft_dice(logits.flatten(0, 1), targets.flatten(0, 1), ignore_index, smooth)


class _EachChannel(torch.nn.Module):
    """A binary loss over every (image, class) channel of (N, K, H, W) as one set of pixels: smp's multilabel focal
    loss indexes each class with the whole batch's ignore mask, and fails on any ignored pixel."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.flatten(0, 1).unsqueeze(1), targets.flatten(0, 1).unsqueeze(1))


def _labels_bce_and_dice(bce_weight, dice_weight, ignore_index: int):
    """Per-class BCE + soft Dice of K sigmoid channels. Every channel of an image shares its labelled pixels, so
    the BCE's mean over them equals the mean over classes of each class's BCE."""
    return _Combined(
        lambda logits, targets: masked_binary_cross_entropy(logits, targets, ignore_index),
        lambda logits, targets: label_soft_dice(logits, targets, ignore_index),
        bce_weight,
        dice_weight,
    )


# name -> (bce_weight, dice_weight, ignore_index) -> the loss of K sigmoid channels (--head multilabel). Lovasz has
# none here: smp's Lovasz takes binary or softmax targets alone, and check_config refuses it for multilabel runs.
LABEL_LOSSES = {
    "bce_dice": lambda b, d, i: _labels_bce_and_dice(b, d, i),
    "ce_dice": lambda b, d, i: _labels_bce_and_dice(b, d, i),
    "bce": lambda b, d, i: _labels_bce_and_dice(1.0, 0.0, i),
    "ce": lambda b, d, i: _labels_bce_and_dice(1.0, 0.0, i),
    "dice": lambda b, d, i: _labels_bce_and_dice(0.0, 1.0, i),
    "focal": lambda b, d, i: _Float32(_EachChannel(smp.losses.FocalLoss("binary", ignore_index=i))),
    "tversky": lambda b, d, i: _Float32(
        smp.losses.TverskyLoss("multilabel", ignore_index=i, alpha=TVERSKY_ALPHA, beta=TVERSKY_BETA, smooth=1.0)
    ),
}


def build_loss(
    name: str,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    *,
    num_classes: int = 2,
    ignore_index: int | None = None,
    class_weights: list[float] | None = None,
    multilabel: bool = False,
) -> torch.nn.Module:
    """The loss ``name`` (a key of LOSSES) for ``num_classes`` classes (2: one sigmoid channel), leaving out
    pixels of ``ignore_index`` (None: every pixel is labelled), cross entropy weighted by ``class_weights``;
    ``multilabel``: LABEL_LOSSES' for one sigmoid channel per class, whatever their number."""
    if multilabel:
        return LABEL_LOSSES[name](bce_weight, dice_weight, 255 if ignore_index is None else ignore_index)
    return LOSSES[name](bce_weight, dice_weight, num_classes, ignore_index, class_weights)


def class_weights(pixel_counts, method: str, beta: float = 0.9999) -> list[float] | None:
    """Cross-entropy weights of each class from its pixel count in the training fold, scaled to average 1 over
    the classes that occur (a class with no pixels gets 0: it never is a target). ``method``:

    - ``inverse``: 1 / frequency.
    - ``median``: median frequency / frequency (Eigen & Fergus 2015): the median class weighs 1.
    - ``effective``: (1 - beta) / (1 - beta^n), the inverse of the effective number of samples (Cui et al. 2019).
    - ``enet``: 1 / ln(1.02 + frequency) (Paszke et al. 2016): bounded, so frequent classes keep more weight than
      ``median`` leaves them.
    - ``none``: None.
    """
    if method == "none":
        return None
    counts = np.asarray(pixel_counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    frequency = counts[present] / counts.sum()
    if method == "inverse":
        weights[present] = 1 / frequency
    elif method == "median":
        weights[present] = np.median(frequency) / frequency
    elif method == "effective":
        weights[present] = (1 - beta) / (1 - np.power(beta, counts[present]))
    elif method == "enet":
        weights[present] = 1 / np.log(ENET_C + frequency)
    else:
        raise ValueError(f"class weighting {method!r}: choose one of {', '.join(CLASS_WEIGHTINGS)}")
    weights[present] /= weights[present].mean()
    return weights.tolist()
