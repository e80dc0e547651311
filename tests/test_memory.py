"""The training-memory count: exact against real tensors, linear in the batch, half the bytes in 16 bits."""

import pytest
import torch

from competition import memory
from competition.config import TrainConfig
from competition.losses import build_loss
from competition.models import build_model

SIZE = (64, 96)


def real_saved_bytes(model, batch_size: int, precision: str) -> int:
    """What autograd saves in a real forward pass and loss on the CPU, each storage once, weights excluded."""
    weights = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    saved = {}

    def keep(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    images = torch.randint(0, 256, (batch_size, 3, *SIZE), dtype=torch.uint8)
    images = images.contiguous(memory_format=torch.channels_last)
    masks = (torch.rand(batch_size, 1, *SIZE) > 0.5).float()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        with torch.autocast("cpu", dtype=dtype, enabled=precision != "fp32"):
            logits = model(images)
        build_loss("bce_dice")(logits, masks)  # the graph, and so every saved storage, lives until here
    return sum(saved.values())


@pytest.mark.parametrize("precision, tolerance", [("fp32", 0), ("bf16", 1e-3)])
def test_fake_count_equals_what_a_real_forward_saves(precision, tolerance):
    # In bf16, fake batch norm keeps its per-channel statistics in bf16 where the CPU kernel keeps
    # float32: 23 KB of 37 MB here.
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18").train().to(memory_format=torch.channels_last)
    counted = memory.saved_activation_bytes(model, build_loss("bce_dice"), 2, SIZE, precision, channels_last=True)
    assert all(parameter.grad is None for parameter in model.parameters())  # counting ran no backward
    assert counted == pytest.approx(real_saved_bytes(model, 2, precision), rel=tolerance, abs=0)


@pytest.mark.slow
def test_activations_grow_linearly_and_take_half_the_bytes_in_16_bits():
    config = TrainConfig(encoder="resnet18", size="64x96", encoder_weights="none")
    sixteen, full = memory.estimate_training_memory(config, "bf16"), memory.estimate_training_memory(config, "fp32")
    model = build_model(config.arch, config.encoder).train().to(memory_format=torch.channels_last)
    three = memory.saved_activation_bytes(model, build_loss("bce_dice"), 3, SIZE, "bf16", channels_last=True)
    assert sixteen.total_bytes(3) - sixteen.state_bytes == three
    assert 0.45 < sixteen.per_image_bytes / full.per_image_bytes < 0.55
    assert memory.estimate_training_memory(config, "fp16") == sixteen
    # Once per step whatever the batch: batch-norm statistics, and under autocast 16-bit copies of the
    # convolution weights.
    convolutions = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert sixteen.step_bytes - full.step_bytes == pytest.approx(2 * convolutions, rel=0.01)
    larger = memory.estimate_training_memory(TrainConfig(encoder="resnet18", size="128x192"), "bf16")
    assert larger.per_image_bytes == pytest.approx(4 * sixteen.per_image_bytes, rel=0.05)


def test_state_is_four_float32_copies_of_the_weights_and_five_with_ema():
    model = build_model("Unet", "resnet18")
    weights = sum(parameter.numel() for parameter in model.parameters()) * 4
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    assert memory.state_bytes(model, ema=False) == 4 * weights + buffers
    assert memory.state_bytes(model, ema=True) == 5 * weights + 2 * buffers


@pytest.mark.slow
def test_cli_prints_a_row_per_batch_size_growing_with_it(capsys):
    memory.main(["--encoder", "resnet18", "--size", "256x384", "--batch-sizes", "1,4,16"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["1", "4", "16"]
    sixteen_bit, full = ([float(row[column]) for row in rows] for column in (1, 2))
    assert sixteen_bit == sorted(sixteen_bit) and full == sorted(full)
    assert all(low < high for low, high in zip(sixteen_bit, full))
    with pytest.raises(SystemExit):
        memory.main(["--size", "100x100"])


def test_storage_key_identifies_storages():
    from competition.memory import fake_tensor_mode, storage_key

    base = torch.zeros(4, 4)
    assert storage_key(base) == storage_key(base[1:]) == storage_key(base.t())
    assert storage_key(base) != storage_key(base.clone())
    with fake_tensor_mode():
        fake = torch.zeros(8, 8)
        assert storage_key(fake) == storage_key(fake.view(64)) != storage_key(torch.zeros(8, 8))
        assert fake.untyped_storage().nbytes() == 8 * 8 * 4
