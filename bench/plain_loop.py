"""The plain smp loop the recipe bench compares train.py with: AdamW, one-cycle, flips, cross entropy + Dice.

It is what a tutorial writes, kept short on purpose: no validation, no checkpoints, no mixed precision.
"""

import segmentation_models_pytorch as smp
import torch

from competition.models import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


class PlainModel(torch.nn.Module):
    """smp's Unet on uint8 images, normalised as its ImageNet encoders expect."""

    def __init__(self, encoder: str, classes: int):
        super().__init__()
        self.network = smp.Unet(encoder, encoder_weights=None, classes=classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images.float() - MEAN) / STD)


def train_plain(
    train_set,
    encoder: str,
    classes: int,
    ignore_index: int,
    epochs: int,
    batch_size: int,
    lr: float = 2e-3,
    workers: int = 2,
    seed: int = 42,
) -> PlainModel:
    """The model after ``epochs`` over ``train_set`` ((uint8 image, int64 class mask) pairs)."""
    torch.manual_seed(seed)
    model = PlainModel(encoder, classes)
    loader = torch.utils.data.DataLoader(train_set, batch_size, shuffle=True, drop_last=True, num_workers=workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(loader))
    cross_entropy = torch.nn.CrossEntropyLoss(ignore_index=ignore_index)
    dice = smp.losses.DiceLoss("multiclass", ignore_index=ignore_index)
    model.train()
    for _ in range(epochs):
        for images, masks in loader:
            flip = torch.rand(len(images)) < 0.5  # horizontal flips, image and mask together
            images[flip], masks[flip] = images[flip].flip(-1), masks[flip].flip(-1)
            logits = model(images)
            loss = cross_entropy(logits, masks) + dice(logits, masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()
