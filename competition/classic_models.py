"""The classic segmentation networks tutorials teach, built here with their own encoders: SegNet and U-Net."""

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# SegNet's VGG16 encoder: 5 blocks of 3x3 convs (2, 2, 3, 3, 3 of them), each followed by a 2x2 max-pool.
SEGNET_BLOCKS = ((1, 2), (2, 2), (4, 3), (8, 3), (8, 3))  # (width multiple, convs per block)


def _note_own_encoder(arch: str, encoder_name, encoder_weights) -> None:
    """Log, once per build, that --encoder and --encoder-weights do not apply to ``arch``."""
    log.debug("%s has its own encoder; --encoder %s is not used", arch, encoder_name)
    if encoder_weights not in (None, "none"):
        log.info(
            "%s has no pretrained encoder: --encoder-weights %s is not used, training from scratch",
            arch,
            encoder_weights,
        )


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _conv_stack(in_channels: int, out_channels: int, count: int) -> nn.Sequential:
    layers = _conv_bn_relu(in_channels, out_channels)
    for _ in range(count - 1):
        layers += _conv_bn_relu(out_channels, out_channels)
    return nn.Sequential(*layers)


class SegNet(nn.Module):
    """SegNet (Badrinarayanan, Kendall and Cipolla, 2017): the decoder unpools with the encoder's max-pool indices.

    Encoder: VGG16's 13 convs in 5 blocks (BN + ReLU), each block ending in a 2x2 max-pool that keeps
    its argmax indices; decoder: the mirror image, each block starting with ``MaxUnpool2d`` at those
    indices (so boundaries land where the encoder saw its maxima) then convs. No pretrained encoder.
    Sides must be multiples of 32 (5 poolings); ``SegmentationModel`` pads to that. ``width`` is the
    first block's channels (64 in the paper).
    """

    def __init__(
        self, encoder_name=None, encoder_weights=None, classes: int = 1, in_channels: int = 3, width: int = 64
    ):
        super().__init__()
        _note_own_encoder("SegNet", encoder_name, encoder_weights)
        widths = [width * multiple for multiple, _ in SEGNET_BLOCKS]
        counts = [count for _, count in SEGNET_BLOCKS]
        self.encoder_blocks = nn.ModuleList(
            _conv_stack(c_in, c_out, n)
            for c_in, c_out, n in zip([in_channels, *widths[:-1]], widths, counts, strict=True)
        )
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        # Decoder block i (deepest first) mirrors encoder block 4 - i; its last conv maps to the next block's width.
        decoder = []
        for level in reversed(range(5)):
            out_width = widths[level - 1] if level else widths[0]
            layers = []
            for _ in range(counts[level] - 1):
                layers += _conv_bn_relu(widths[level], widths[level])
            layers += _conv_bn_relu(widths[level], out_width)
            decoder.append(nn.Sequential(*layers))
        self.decoder_blocks = nn.ModuleList(decoder)
        self.head = nn.Conv2d(widths[0], classes, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        saved = []
        for block in self.encoder_blocks:
            x = block(x)
            size = x.shape[-2:]
            x, indices = self.pool(x)
            saved.append((indices, size))
        for block, (indices, size) in zip(self.decoder_blocks, reversed(saved), strict=True):
            x = block(self.unpool(x, indices, output_size=size))
        return self.head(x)


class _Up(nn.Module):
    """U-Net expanding step: 2x2 up-convolution halving the channels, skip concatenation, double conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.convs = _conv_stack(2 * out_channels, out_channels, 2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([skip, self.up(x)], dim=1))


class OriginalUnet(nn.Module):
    """U-Net (Ronneberger, Fischer and Brox, 2015): double 3x3 convs, 4 max-pool downsamplings, up-convolutions, skips.

    The paper used unpadded convolutions (572 -> 388) and cropped each skip to fit; here the convs are
    padded so the output has the input's size and skips need no crop: the accepted modern variant.
    BatchNorm after each conv (not in the paper) lets it train from scratch at ordinary learning rates.
    Sides must be multiples of 16 (``SegmentationModel`` pads to 32). ``width``: 64 in the paper.
    """

    def __init__(
        self, encoder_name=None, encoder_weights=None, classes: int = 1, in_channels: int = 3, width: int = 64
    ):
        super().__init__()
        _note_own_encoder("OriginalUnet", encoder_name, encoder_weights)
        widths = [width * 2**level for level in range(5)]
        self.down = nn.ModuleList(
            _conv_stack(c_in, c_out, 2) for c_in, c_out in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.ModuleList(_Up(widths[level + 1], widths[level]) for level in reversed(range(4)))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips = []
        x = images
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)


CLASSIC_ARCHITECTURES = {"SegNet": SegNet, "OriginalUnet": OriginalUnet}
