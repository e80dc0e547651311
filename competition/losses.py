"""Losses on logits, computed in float32 and averaged per image so that gradient accumulation is exact."""

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from competition.errors import ConfigError

# Each name: (pixel term, region term); either may be None. Every name works for binary data (one sigmoid
# channel: the pixel terms are binary cross entropy and binary focal) and for multi-class data (K softmax
# channels: cross entropy and softmax focal). "ce" and "ce_dice" are the multi-class spellings of "bce" and
# "bce_dice" and mean exactly the same losses.
LOSSES: dict[str, tuple[str | None, str | None]] = {
    "bce_dice": ("ce", "dice"),
    "bce": ("ce", None),
    "ce": ("ce", None),
    "ce_dice": ("ce", "dice"),
    "dice": (None, "dice"),
    "focal": ("focal", None),
    "lovasz": (None, "lovasz"),
    "tversky": (None, "tversky"),
}
CLASS_WEIGHTINGS = ("none", "inverse", "median", "effective")

DICE_SMOOTH = 1.0
FOCAL_GAMMA = 2.0
# Tversky: false positives weigh 0.3, false negatives 0.7, so missing a (small) class costs more than
# over-painting it (Salehi et al. 2017 found alpha 0.3, beta 0.7 best for small lesions).
TVERSKY_ALPHA, TVERSKY_BETA = 0.3, 0.7


# --- Today's binary losses, kept verbatim: Carvana's values must not move by one bit. ---


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


class _Float32(torch.nn.Module):
    """Runs a loss on float32 logits and targets."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), targets.float())


def _todays_binary_loss(name: str, bce_weight: float, dice_weight: float) -> torch.nn.Module | None:
    """The module each name built before ignore pixels and multi-class existed (None for tversky, which is new)."""
    terms = LOSSES[name]
    if terms == ("ce", "dice"):
        return BCEDiceLoss(bce_weight, dice_weight)
    if terms == ("ce", None):
        return BCEDiceLoss(1.0, 0.0)
    if terms == (None, "dice"):
        return BCEDiceLoss(0.0, 1.0)
    if terms == ("focal", None):
        return _Float32(smp.losses.FocalLoss("binary"))
    if terms == (None, "lovasz"):
        return _Float32(smp.losses.LovaszLoss("binary", per_image=True))
    return None


# --- Small pure functions: per-pixel and per-image terms with a mask of the pixels that count. ---


def per_image_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over each image's valid pixels, then over images; an image with no valid pixel counts as 0.

    Per image so that the mean over micro-batches of equal size equals the loss of the big batch,
    however the ignored pixels fall between them.
    """
    values = values.flatten(1)
    if valid is None:
        return values.mean(1).mean()
    valid = valid.flatten(1)
    return (torch.where(valid, values, 0.0).sum(1) / valid.sum(1).clamp_min(1)).mean()


def focal_from_cross_entropy(cross_entropy: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of each pixel from its cross entropy -log p_t: (1 - p_t)^gamma x -log p_t."""
    return (1 - torch.exp(-cross_entropy)).pow(gamma) * cross_entropy


def dice_score(tp: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor, smooth: float = DICE_SMOOTH):
    """Soft Dice from soft true positives and the sums of predictions and truth."""
    return (2 * tp + smooth) / (predicted + truth + smooth)


def tversky_score(
    tp: torch.Tensor,
    predicted: torch.Tensor,
    truth: torch.Tensor,
    alpha: float = TVERSKY_ALPHA,
    beta: float = TVERSKY_BETA,
    smooth: float = DICE_SMOOTH,
):
    """Soft Tversky index TP / (TP + alpha FP + beta FN), smoothed; alpha weighs false positives, beta negatives."""
    return (tp + smooth) / (tp + alpha * (predicted - tp) + beta * (truth - tp) + smooth)


REGION_SCORES = {"dice": dice_score, "tversky": tversky_score}


def lovasz_gradient(sorted_truth: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at errors sorted in decreasing order
    (Berman et al. 2018, Algorithm 1); sorted_truth: the 0/1 truth in that order, at least one 1."""
    positives = sorted_truth.sum()
    intersection = positives - sorted_truth.cumsum(0)
    union = positives + (1 - sorted_truth).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat((jaccard[:1], jaccard[1:] - jaccard[:-1]))


def lovasz_softmax_loss(probabilities: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None):
    """Lovasz-softmax per image over the classes present in its valid pixels, averaged over images.

    probabilities (N, K, H, W), targets long (N, H, W); an image with no valid pixel counts as 0.
    """
    per_image = []
    for index, (image, truth) in enumerate(zip(probabilities, targets)):
        image, truth = image.flatten(1), truth.flatten()
        if valid is not None:
            keep = valid[index].flatten()
            image, truth = image[:, keep], truth[keep]
        class_losses = []
        for label in truth.unique().tolist():
            foreground = (truth == label).float()
            errors, order = (foreground - image[label]).abs().sort(descending=True)
            class_losses.append(torch.dot(errors, lovasz_gradient(foreground[order])))
        per_image.append(torch.stack(class_losses).mean() if class_losses else image.sum() * 0.0)
    return torch.stack(per_image).mean()


# --- Class weights from pixel counts. ---


def class_weights(pixel_counts: np.ndarray, method: str, beta: float = 0.9999) -> list[float] | None:
    """Per-class weights for the cross-entropy (and focal) term from the training fold's pixel counts.

    pixel_counts: (K,) pixels of each class, or (images, K) per image (ignore pixels excluded).
    - "none": None (no weights).
    - "inverse": 1 / n_c.
    - "median": median frequency balancing (Eigen & Fergus 2015), median(f) / f_c, where f_c is the pixels
      of class c over the pixels of the images that hold c; with (K,) counts f_c = n_c / all pixels, which
      after the normalisation below gives the same weights as "inverse".
    - "effective": the effective number of samples (Cui et al. 2019), (1 - beta) / (1 - beta^n_c); with
      beta 0.9999 every class above ~50 000 pixels weighs about the same.

    Normalised so that the pixel-weighted mean weight of the training fold is 1 (sum_c n_c w_c = sum_c n_c):
    the weighted loss keeps the scale of the unweighted one, so learning rates carry over. A class with no
    pixels gets the largest weight of the present classes (it is at least as rare as the rarest seen; its
    pixels can still turn up in validation); it takes no part in the normalisation.
    """
    if method not in CLASS_WEIGHTINGS:
        raise ConfigError(f"--class-weights {method!r} is unknown; choose one of {', '.join(CLASS_WEIGHTINGS)}")
    if method == "none":
        return None
    if not 0 <= beta < 1:
        raise ConfigError(f"class weight beta {beta} must be in [0, 1)")
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.ndim not in (1, 2) or counts.shape[-1] < 2 or (counts < 0).any():
        raise ValueError(f"pixel_counts must be non-negative, (K,) or (images, K) with K >= 2; got {counts.shape}")
    per_class = counts.sum(0) if counts.ndim == 2 else counts
    present = per_class > 0
    if not present.any():
        raise ConfigError(f"--class-weights {method}: the training images hold no labelled pixel; use none")
    n = per_class[present]
    if method == "inverse":
        raw = 1 / n
    elif method == "median":
        if counts.ndim == 2:
            images_pixels = counts.sum(1)
            holding = (counts[:, present] > 0) * images_pixels[:, None]
            frequency = n / holding.sum(0)
        else:
            frequency = n / n.sum()
        raw = np.median(frequency) / frequency
    else:
        raw = (1 - beta) / (1 - beta**n)
    weights = np.empty(len(per_class))
    weights[present] = raw * n.sum() / (n * raw).sum()
    weights[~present] = weights[present].max()
    return [float(weight) for weight in weights]


# --- The loss module. ---


class SegmentationLoss(torch.nn.Module):
    """``bce_weight`` x pixel term + ``dice_weight`` x region term, masked where the target is ``ignore_index``.

    Binary (num_classes 2): logits (N, 1, H, W), targets float (N, 1, H, W) of 0/1 and maybe ignore_index.
    When no target pixel is ignored and there are no class weights, this runs today's module unchanged
    (same values and gradients bit for bit); finding out costs one comparison and, on a GPU, one host sync:
    pass ignore_index=None where the data has no ignore pixels (Carvana) and not even that is spent.
    Multi-class (num_classes > 2): logits (N, K, H, W) softmax, targets long (N, H, W).
    Pixel terms are means over each image's valid pixels and region terms per image, then means over
    images, so gradient accumulation is exact. Class weights w multiply each pixel's term by w of its
    true class and the sum is still divided by the count of valid pixels.
    """

    def __init__(
        self,
        name: str,
        num_classes: int = 2,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        ignore_index: int | None = 255,
        class_weights: list[float] | None = None,
    ):
        super().__init__()
        self.pixel_term, self.region_term = LOSSES[name]
        both = self.pixel_term is not None and self.region_term is not None
        # As before: bce_weight and dice_weight weigh the two terms of a sum; a single term has weight 1.
        self.pixel_weight, self.region_weight = (bce_weight, dice_weight) if both else (1.0, 1.0)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.today = _todays_binary_loss(name, bce_weight, dice_weight) if num_classes == 2 else None
        self.binary_lovasz = smp.losses.LovaszLoss("binary", per_image=True, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 2:
            if self.today is not None and self.weights is None and not self._any_ignored(targets):
                return self.today(logits, targets)
            return self._binary(logits.float(), targets.float())
        return self._multi_class(logits.float(), targets.long())

    def _any_ignored(self, targets: torch.Tensor) -> bool:
        return self.ignore_index is not None and bool((targets == self.ignore_index).any())

    def _valid(self, targets: torch.Tensor) -> torch.Tensor | None:
        return None if self.ignore_index is None else targets != self.ignore_index

    def _binary(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = self._valid(targets)
        clean = targets if valid is None else torch.where(valid, targets, 0.0)
        loss = logits.new_zeros(())
        if self.pixel_term is not None:
            values = F.binary_cross_entropy_with_logits(logits, clean, reduction="none")
            if self.pixel_term == "focal":
                values = focal_from_cross_entropy(values)
            if self.weights is not None:
                background, foreground = self.weights.to(logits.device)
                values = values * (background + (foreground - background) * clean)
            loss = loss + self.pixel_weight * per_image_mean(values, valid)
        if self.region_term == "lovasz":
            loss = loss + self.region_weight * self.binary_lovasz(logits, targets)
        elif self.region_term is not None:
            probabilities = torch.sigmoid(logits)
            if valid is not None:
                probabilities = torch.where(valid, probabilities, 0.0)
            probabilities, clean = probabilities.flatten(1), clean.flatten(1)
            tp, predicted, truth = (probabilities * clean).sum(1), probabilities.sum(1), clean.sum(1)
            score = REGION_SCORES[self.region_term](tp, predicted, truth)
            loss = loss + self.region_weight * (1 - score).mean()
        return loss

    def _multi_class(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = self._valid(targets)
        clean = targets if valid is None else torch.where(valid, targets, 0)
        log_probabilities = F.log_softmax(logits, 1)
        loss = logits.new_zeros(())
        if self.pixel_term is not None:
            values = -log_probabilities.gather(1, clean.unsqueeze(1)).squeeze(1)
            if self.pixel_term == "focal":
                values = focal_from_cross_entropy(values)
            if self.weights is not None:
                values = values * self.weights.to(logits.device)[clean]
            loss = loss + self.pixel_weight * per_image_mean(values, valid)
        if self.region_term is None:
            return loss
        probabilities = log_probabilities.exp()
        if self.region_term == "lovasz":
            return loss + self.region_weight * lovasz_softmax_loss(probabilities, clean, valid)
        truth = F.one_hot(clean, self.num_classes).movedim(-1, 1).float()
        if valid is not None:
            truth = truth * valid.unsqueeze(1)
            probabilities = torch.where(valid.unsqueeze(1), probabilities, 0.0)
        tp = (probabilities * truth).flatten(2).sum(2)
        predicted, truth = probabilities.flatten(2).sum(2), truth.flatten(2).sum(2)
        score = REGION_SCORES[self.region_term](tp, predicted, truth)
        # Over the classes present in each image's valid pixels: an absent class has no overlap to score.
        present = truth > 0
        per_image = torch.where(present, 1 - score, 0.0).sum(1) / present.sum(1).clamp_min(1)
        return loss + self.region_weight * per_image.mean()


def build_loss(
    name: str,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    *,
    num_classes: int = 2,
    ignore_index: int | None = 255,
    class_weights: list[float] | None = None,
) -> torch.nn.Module:
    """The loss ``name`` (a key of LOSSES) for ``num_classes`` classes (2: one sigmoid channel).

    bce_weight and dice_weight keep their old positions, so ``build_loss(name, bce_weight, dice_weight)``
    still works; the rest are keyword-only. class_weights: one per class (see ``class_weights``), for the
    cross-entropy or focal term; binary data takes them too, as [background, foreground] weights of each
    pixel's term.
    """
    if name not in LOSSES:
        raise ConfigError(f"--loss {name!r} is unknown; choose one of {', '.join(LOSSES)}")
    if num_classes < 2:
        raise ConfigError(f"{num_classes} classes: a segmentation needs at least 2 (background and one more)")
    if class_weights is not None:
        if LOSSES[name][0] is None:
            raise ConfigError(
                f"--loss {name} has no cross-entropy or focal term for class weights; use --class-weights none "
                "or a loss with one (ce_dice, ce, focal)"
            )
        if len(class_weights) != num_classes or not all(np.isfinite(w) and w >= 0 for w in class_weights):
            raise ConfigError(
                f"class weights {list(class_weights)} must be {num_classes} finite non-negative numbers, one per "
                "class; leave class_weight_values empty to compute them from --class-weights"
            )
    return SegmentationLoss(name, num_classes, bce_weight, dice_weight, ignore_index, class_weights)
