"""The classic architectures segmentation tutorials teach, beside smp's: SegNet and the original U-Net.

Both build their own encoder (no pretrained weights exist for them here) and take the keywords smp's
architectures take, so ``models.ARCHITECTURES`` holds them beside smp's and every command builds them alike.
"""

import logging

import torch
from torch import nn

from competition.errors import ModelError

logger = logging.getLogger(__name__)


def _conv_block(in_channels: int, out_channels: int, convolutions: int = 2) -> nn.Sequential:
    """``convolutions`` x (3x3 convolution, batch norm, ReLU), size kept by padding."""
    layers = []
    for index in range(convolutions):
        layers += [
            nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _own_encoder(arch: str, encoder_name: str, encoder_weights) -> None:
    """Say once that the encoder flags do not apply; a weights file cannot fit an encoder of our own making."""
    if encoder_weights not in (None, "none", "imagenet", True):
        raise ModelError(f"--arch {arch} has an encoder of its own: --encoder-weights {encoder_weights} cannot fit it")
    if encoder_weights in ("imagenet", True):
        logger.info("%s has no pretrained encoder: it trains from scratch (--encoder %s not used)", arch, encoder_name)


class SegNet(nn.Module):
    """SegNet (Badrinarayanan et al. 2017): a VGG16-shaped encoder of five convolution blocks, each ending in
    a max pooling whose indices the decoder's unpooling reuses, putting each value back where the maximum
    was (sharp boundaries without storing the encoder's feature maps). ``width`` scales the channels
    (64 is the paper's VGG16)."""

    BLOCKS = (2, 2, 3, 3, 3)  # convolutions per block, as in VGG16

    def __init__(self, encoder_name="", encoder_weights=None, classes: int = 1, in_channels: int = 3, width: int = 16):
        super().__init__()
        _own_encoder("SegNet", encoder_name, encoder_weights)
        channels = [width, width * 2, width * 4, width * 8, width * 8]
        self.encoder = nn.ModuleList()
        previous = in_channels
        for count, out in zip(self.BLOCKS, channels):
            self.encoder.append(_conv_block(previous, out, count))
            previous = out
        self.decoder = nn.ModuleList()
        for index in reversed(range(len(channels))):
            out = channels[index - 1] if index > 0 else width
            self.decoder.append(_conv_block(channels[index], out, self.BLOCKS[index]))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.head = nn.Conv2d(width, classes, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features, pooled = images, []
        for block in self.encoder:
            features = block(features)
            size = features.shape[-2:]
            features, indices = self.pool(features)
            pooled.append((indices, size))
        for block, (indices, size) in zip(self.decoder, reversed(pooled)):
            features = block(self.unpool(features, indices, output_size=size))
        return self.head(features)


class OriginalUnet(nn.Module):
    """The U-Net of Ronneberger et al. 2015: double 3x3 convolutions, four 2x2 max-pool downsamplings
    (64 -> 1024 channels at ``width`` 64), 2x2 up-convolutions and skip connections concatenated.

    The paper's convolutions are unpadded (572 -> 388 pixels) with cropped skips, for tiling huge microscopy
    images; padded ones keep output and input the same size, which every other part of this project
    expects, and are what re-implementations use. Batch norm, which postdates the paper, is added for stable
    training from scratch."""

    def __init__(self, encoder_name="", encoder_weights=None, classes: int = 1, in_channels: int = 3, width: int = 16):
        super().__init__()
        _own_encoder("OriginalUnet", encoder_name, encoder_weights)
        channels = [width * 2**level for level in range(5)]
        self.down = nn.ModuleList([_conv_block(in_channels, channels[0])])
        self.down.extend(_conv_block(channels[level - 1], channels[level]) for level in range(1, 5))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(channels[level], channels[level - 1], 2, 2) for level in range(4, 0, -1)
        )
        self.merge = nn.ModuleList(_conv_block(channels[level] * 2, channels[level]) for level in range(3, -1, -1))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(channels[0], classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips, features = [], images
        for level, block in enumerate(self.down):
            features = block(features if level == 0 else self.pool(features))
            skips.append(features)
        features = skips.pop()
        for up, merge in zip(self.up, self.merge):
            features = merge(torch.cat([skips.pop(), up(features)], dim=1))
        return self.head(features)
