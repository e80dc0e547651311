"""Models: K output channels, the classic SegNet and U-Net at tiny size, through the padding wrapper."""

import logging

import pytest
import torch

from competition.classic_models import OriginalUnet, SegNet
from competition.models import ARCHITECTURES, SegmentationModel, build_model

TINY = {"SegNet": lambda **kw: SegNet(width=2, **kw), "OriginalUnet": lambda **kw: OriginalUnet(width=2, **kw)}


def test_the_classic_architectures_sit_beside_smps():
    assert {"Unet", "SegNet", "OriginalUnet"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("classes", [1, 4])
@pytest.mark.parametrize("size", [(64, 96), (50, 70)])
def test_classic_models_keep_the_size_through_the_wrapper_and_train(arch, classes, size):
    torch.manual_seed(0)
    model = SegmentationModel(TINY[arch](encoder_name="resnet34", encoder_weights=None, classes=classes))
    model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8).to(memory_format=torch.channels_last)
    logits = model(images)
    assert logits.shape == (2, classes, *size)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_segnet_unpools_at_the_encoders_max_positions():
    torch.manual_seed(0)
    net = SegNet(width=2).eval()
    seen = {}
    # hooks return None so they only record (a returned value would replace the module's output)
    net.unpool.register_forward_hook(
        lambda module, inputs, output: None if "first" in seen else seen.update(first=output)
    )
    net.pool.register_forward_hook(lambda module, inputs, output: seen.setdefault("pools", []).append(output[1]))
    net(torch.randn(1, 3, 64, 64))
    deepest_indices = seen["pools"][-1]  # the first unpool undoes the last pool
    unpooled = seen["first"]
    flat = unpooled.flatten(2)
    nonzero = flat != 0
    at_indices = torch.zeros_like(nonzero).scatter_(2, deepest_indices.flatten(2), True)
    assert nonzero.any()
    assert not (nonzero & ~at_indices).any()  # every non-zero sits at a max position of the encoder


def test_build_model_takes_the_classic_architectures_and_ignores_imagenet(caplog):
    with caplog.at_level(logging.INFO):
        model = build_model("OriginalUnet", "resnet34", "imagenet", classes=3)
    assert "no pretrained encoder" in caplog.text
    assert model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 3, 32, 32)


def test_build_model_does_not_load_a_weights_file_into_a_classic_model(tmp_path):
    model = build_model("SegNet", "resnet34", str(tmp_path / "absent.pth"))
    assert isinstance(model.network, SegNet)


def test_build_model_gives_smp_models_k_channels_and_one_by_default():
    assert build_model("Unet", "resnet18").network.segmentation_head[0].out_channels == 1
    assert build_model("Unet", "resnet18", classes=5).network.segmentation_head[0].out_channels == 5
