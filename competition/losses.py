"""Losses on logits, computed in float32 and averaged per image so that gradient accumulation is exact."""

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F


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


LOSSES = {
    "bce_dice": lambda bce_weight, dice_weight: BCEDiceLoss(bce_weight, dice_weight),
    "bce": lambda bce_weight, dice_weight: BCEDiceLoss(1.0, 0.0),
    "dice": lambda bce_weight, dice_weight: BCEDiceLoss(0.0, 1.0),
    "focal": lambda bce_weight, dice_weight: _Float32(smp.losses.FocalLoss("binary")),
    "lovasz": lambda bce_weight, dice_weight: _Float32(smp.losses.LovaszLoss("binary", per_image=True)),
}


def build_loss(name: str, bce_weight: float = 1.0, dice_weight: float = 1.0) -> torch.nn.Module:
    """The loss ``name`` (a key of LOSSES; the settings check names before a run starts)."""
    return LOSSES[name](bce_weight, dice_weight)
