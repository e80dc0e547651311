"""Training memory: what a training step holds on the GPU, counted on fake tensors without a GPU.

    python -m competition.memory --config configs/kaggle_full.toml --batch-sizes 2,4,8,16

A training step's memory is the model's state (weights, gradients, AdamW's two moments, the EMA
copy) plus what autograd saves in the forward pass for the backward one, which grows with the batch.
The saved tensors are counted by running the trainer's forward and loss under
``FakeTensorMode`` (the shape-only tensors torch.compile traces with): shapes and dtypes
propagate exactly as on a real device, autocast included, and nothing is computed or allocated,
so 1024x1536 is counted in a second on a CPU. Not counted: the CUDA context, cuDNN workspaces,
the transient gradients of the backward pass and the allocator's slack;
``python -m bench.memory_bench`` measures them on a GPU side by side with this count.
"""

import logging
from dataclasses import dataclass

import torch

from competition.config import TrainConfig, add_config_arguments, resolve_config
from competition.logs import OneLineParser, add_logging_arguments, configure_from, exit_on_project_error
from competition.losses import build_loss
from competition.models import build_model
from competition.prediction import autocast

GIB = 2**30
logger = logging.getLogger(__name__)


def fake_tensor_mode():
    """A mode in which tensors carry shapes and dtypes but no memory, and nothing is computed.

    Why a private API: PyTorch exposes FakeTensorMode only under ``torch._subclasses`` (it is what
    torch.compile traces with), and no public call propagates shapes through autograd and autocast.
    tests/test_memory.py::test_fake_count_equals_what_a_real_forward_saves fails loudly if an upgrade
    changes what it counts.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def storage_key(tensor: torch.Tensor) -> int:
    """One key per storage, shared by every view of it, for real and fake tensors alike.

    Why a private attribute: ``untyped_storage()`` returns a new Python object on each call and fake
    storages have no data pointer, so the address of the C++ storage (``_cdata``) is the only
    identity they share. tests/test_memory.py::test_storage_key_identifies_storages pins it.
    """
    return tensor.untyped_storage()._cdata


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step: model state, what each step saves once, and activations per image."""

    state_bytes: int
    step_bytes: int
    per_image_bytes: int

    def total_bytes(self, batch_size: int) -> int:
        return self.state_bytes + self.step_bytes + batch_size * self.per_image_bytes


def state_bytes(model: torch.nn.Module, ema: bool) -> int:
    """Weights, their gradients and AdamW's two moments, all float32; an EMA adds one more copy.

    Gradients are counted alongside the saved activations: with gradient accumulation they coexist
    in the second forward pass; without it, a step peaks up to one gradient copy lower.
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return weights * (5 if ema else 4) + buffers * (2 if ema else 1)


def saved_activation_bytes(model, loss_fn, batch_size: int, size: tuple[int, int], precision: str, channels_last: bool):
    """Bytes autograd saves for backward over one forward pass and loss, the model's own weights excluded.

    Each storage counts once, however many saved tensors view it (a ReLU output saved by the
    ReLU and by the next convolution is one tensor in memory).
    """
    weights = {storage_key(tensor) for tensor in [*model.parameters(), *model.buffers()]}
    saved: dict[int, tuple[int, torch.Tensor]] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in weights:
            saved[key] = (tensor.untyped_storage().nbytes(), tensor)  # held, so that no storage id is reused
        return tensor

    with fake_tensor_mode():
        images = torch.zeros((batch_size, model.in_channels, *size), dtype=torch.uint8)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        masks = torch.zeros((batch_size, 1, *size))
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            with autocast(precision, images.device):
                logits = model(images)
            loss_fn(logits, masks)
    return sum(nbytes for nbytes, _ in saved.values())


def estimate_training_memory(config: TrainConfig, precision: str) -> MemoryEstimate:
    """Count one training step of ``config`` at ``precision`` (fp16 and bf16 count the same bytes).

    The count is made at batch 1 and 2: activations grow linearly with the batch, and the
    difference separates them from what every step holds once (batch-norm statistics, and the
    16-bit copies of the weights that autocast makes).
    """
    size = config.input_size()
    if size is None:
        side = config.crop
        size = (side, side) if side else (1280, 1920)  # full size: 1918 is padded to 1920
    model = build_model(config.arch, config.encoder, "none", in_channels=config.in_channels).train()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(config.loss, config.bce_weight, config.dice_weight)
    one, two = (
        saved_activation_bytes(model, loss_fn, batch, size, precision, config.channels_last) for batch in (1, 2)
    )
    return MemoryEstimate(state_bytes(model, config.ema > 0), step_bytes=2 * one - two, per_image_bytes=two - one)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="batch sizes to print, e.g. 2,4,8")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_from(args)
    with exit_on_project_error("competition.memory", args.debug):
        config = resolve_config(args)
    try:
        batch_sizes = [int(batch) for batch in args.batch_sizes.split(",")]
    except ValueError:
        parser.exit(2, f"competition.memory: error: --batch-sizes {args.batch_sizes!r}: e.g. 2,4,8\n")
    size = config.input_size()
    shape = f"{size[0]}x{size[1]}" if size else f"crops of {config.crop}" if config.crop else "full size"
    estimates = {precision: estimate_training_memory(config, precision) for precision in ("bf16", "fp32")}
    sixteen = estimates["bf16"]
    rows = [f"{'batch':>6}{'fp16/bf16':>11}{'fp32':>8}"]
    for batch in batch_sizes:
        sixteen_bit, full = (estimates[precision].total_bytes(batch) / GIB for precision in ("bf16", "fp32"))
        rows.append(f"{batch:6}{sixteen_bit:11.2f}{full:8.2f}")
    logger.info(
        "%s-%s at %s, AdamW%s; GiB counted per step\n%s\nstate %.2f GiB; activations per image %.2f GiB in 16 bits, "
        "%.2f in fp32",
        config.arch,
        config.encoder,
        shape,
        " + EMA" if config.ema else "",
        "\n".join(rows),
        sixteen.state_bytes / GIB,
        sixteen.per_image_bytes / GIB,
        estimates["fp32"].per_image_bytes / GIB,
    )
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        logger.info("%s: %.1f GiB, of which %.1f GiB free now", torch.cuda.get_device_name(), total / GIB, free / GIB)


if __name__ == "__main__":
    main()
