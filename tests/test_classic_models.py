"""SegNet and the original U-Net: shapes for one and several channels at any size, training, unpooling by index."""

import logging

import numpy as np
import pytest
import torch

from competition.classic_models import SegNet
from competition.errors import ModelError
from competition.models import OWN_ENCODER, build_model
from competition.sampling import SAMPLERS, class_balanced_weights
from competition.schedules import step_factor


@pytest.mark.parametrize("arch", OWN_ENCODER)
@pytest.mark.parametrize("channels", [1, 5])
@pytest.mark.parametrize("size", [(64, 96), (50, 70)])
def test_any_size_and_channels_through_the_wrapper(arch, channels, size):
    torch.manual_seed(0)
    model = build_model(arch, "resnet34", "none", classes=channels).to(memory_format=torch.channels_last)
    images = torch.randint(0, 255, (2, 3, *size), dtype=torch.uint8)
    logits = model(images)
    assert logits.shape == (2, channels, *size)
    logits.float().pow(2).mean().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


@pytest.mark.parametrize("arch", OWN_ENCODER)
def test_imagenet_weights_are_said_to_be_absent_and_a_file_refused(arch, caplog, tmp_path):
    with caplog.at_level(logging.INFO):
        build_model(arch, "resnet34", "imagenet")
    assert "no pretrained encoder" in caplog.text
    with pytest.raises(ModelError, match="encoder of its own"):
        build_model(arch, "resnet34", str(tmp_path / "weights.pth"))


def test_segnet_unpools_to_the_positions_of_the_maxima():
    """The first block's output, pooled and unpooled with its indices, is non-zero exactly at each 2x2 window's
    maximum: what the decoder starts from."""
    torch.manual_seed(0)
    model = SegNet(classes=2).eval()
    features = model.encoder[0](torch.rand(1, 3, 32, 32))
    pooled, indices = model.pool(features)
    restored = model.unpool(pooled, indices, output_size=features.shape[-2:])
    windows = features.unfold(2, 2, 2).unfold(3, 2, 2).reshape(*pooled.shape, 4)
    maxima = windows == windows.amax(-1, keepdim=True)
    kept = (restored != 0).unfold(2, 2, 2).unfold(3, 2, 2).reshape(*pooled.shape, 4)
    assert torch.equal(kept & (pooled.unsqueeze(-1) > 0), maxima & (pooled.unsqueeze(-1) > 0))
    assert kept.sum(-1).max() == 1  # one position per window


def test_step_factor_by_hand():
    # 10 steps an epoch, decay x0.1 every 2 epochs, 5 warm-up steps
    assert [step_factor(step, 10, 2, 0.1, 5) for step in (0, 4, 5, 19, 20, 39, 40)] == pytest.approx(
        [0.2, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01]
    )


def test_class_balanced_weights_by_hand():
    """Images holding class 1: 4 of 4 (f 1.0); class 2: 2 (f 0.5); class 3: 1 (f 0.25). Threshold: the median
    f over classes 1-3, 0.5 -> factors 1, 1, sqrt(2); an image weighs its largest."""
    counts = np.array([[9, 5, 0, 0], [9, 5, 3, 0], [9, 5, 3, 2], [9, 5, 0, 0]])
    np.testing.assert_allclose(class_balanced_weights(counts), [1.0, 1.0, np.sqrt(2), 1.0])
    assert SAMPLERS == ("random", "class-balanced")


def test_the_class_balanced_sampler_draws_rare_images_more_often():
    counts = np.array([[9, 5, 0]] * 9 + [[9, 5, 1]])
    weights = class_balanced_weights(counts, threshold=0.5)
    sampler = torch.utils.data.WeightedRandomSampler(
        weights.tolist(), 10_000, generator=torch.Generator().manual_seed(0)
    )
    drawn = np.bincount(list(sampler), minlength=10)
    assert drawn[9] > 1.8 * drawn[:9].mean()  # sqrt(0.5 / 0.1) = 2.24 times as often
