"""Probabilities from a model: precision, test-time augmentation, and the way back to full resolution."""

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from competition.environment import resolve_device
from competition.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# bf16 runs natively from Ampere (compute capability 8.0) on; below, CUDA emulates it slowly, yet
# torch.cuda.is_bf16_supported() still answers True (it counts emulation), so it cannot decide.
NATIVE_BF16 = (8, 0)


def _rescaled(scale: float):
    """A view at ``scale`` times the size; its logits are resized back to the input's size."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images.float(), scale_factor=scale, mode="bilinear", align_corners=False)

    def inverse(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)

    return forward, inverse


# name -> (view of the input, inverse mapping the view's logits back onto the input's pixels)
TTA = {
    "hflip": (lambda images: images.flip(-1), lambda logits, size: logits.flip(-1)),
    "vflip": (lambda images: images.flip(-2), lambda logits, size: logits.flip(-2)),
    "scale0.875": _rescaled(0.875),
    "scale1.125": _rescaled(1.125),
}
_IDENTITY = (lambda images: images, lambda logits, size: logits)


def check_tta(tta: tuple[str, ...]) -> tuple[str, ...]:
    """``tta`` when every name is a known view; else one line listing the choices."""
    unknown = [name for name in tta if name not in TTA]
    if unknown:
        raise ConfigError(f"--tta-transforms: unknown {unknown}; choose from {', '.join(sorted(TTA))}")
    return tta


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a GPU that runs it natively (compute capability 8.0+), fp16 (with loss scaling
    in training) on an older GPU such as Kaggle's T4, fp32 on the CPU. An explicit bf16 on a GPU
    that would only emulate it is refused."""
    if requested not in PRECISIONS:
        raise ConfigError(f"--precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return "fp32" if requested == "auto" else requested
    capability = torch.cuda.get_device_capability(device)
    native_bf16 = tuple(capability) >= NATIVE_BF16
    if requested == "auto":
        return "bf16" if native_bf16 else "fp16"
    if requested == "bf16" and not native_bf16:
        raise ConfigError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} (compute capability {capability[0]}."
            f"{capability[1]}) has no native bf16 and would emulate it slowly; use --precision fp16 "
            "(trained with loss scaling) or auto"
        )
    return requested


def tune_for(device: torch.device) -> None:
    """On a GPU: let cuDNN pick the fastest kernels for the (fixed) input sizes, and TF32 for fp32 matmuls."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def setup_device(requested_device: str | None, requested_precision: str) -> tuple[torch.device, str]:
    """The device and precision a run uses, checked, with the GPU's kernels tuned: the one set-up every
    entry point and benchmark makes."""
    device = resolve_device(requested_device)
    precision = resolve_precision(requested_precision, device)
    if device.type == "cuda" and device.index is not None:
        # The current device, not only where the model lives: PyTorch puts pinned-memory threads and
        # other implicit work on it, and left at cuda:0 a process working on cuda:1 would open a
        # second CUDA context there (half a GB of cuda:0's memory, per fold or shard on another GPU).
        torch.cuda.set_device(device)
    tune_for(device)
    return device, precision


def model_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in the memory format its model was put in."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def prepare_model(
    model: torch.nn.Module, device: torch.device, channels_last: bool, compile: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model on ``device`` in its memory format, the module to call for forward passes: compiled or it)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.compile(model) if compile else model


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def view_probabilities(
    model: torch.nn.Module,
    images: torch.Tensor,
    tta: tuple[str, ...] = (),
    precision: str = "fp32",
    multilabel: bool = False,
) -> list[torch.Tensor]:
    """float32 probabilities (N, C, h, w) of uint8 images at the model's input size, one per view: the identity
    first, then each of ``tta``, each mapped back onto the input's pixels. ``multilabel``: the sigmoid of each
    channel (one per class, whatever their number); else one channel: the sigmoid (binary); several: the softmax
    over the classes."""
    check_tta(tta)
    views = []
    for name in ("identity", *tta):
        forward, inverse = TTA.get(name, _IDENTITY)
        with autocast(precision, images.device):
            logits = model(forward(images))
        logits = inverse(logits, images.shape[-2:]).float()
        sigmoid = multilabel or logits.shape[1] == 1
        views.append(torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1))
    return views


def average_views(views: list[torch.Tensor], output_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The mean of the views' probabilities, resized bilinearly to ``output_size`` (height, width) when given:
    a model trained on resized images predicts at its size and is scored at full resolution."""
    probabilities = sum(views) / len(views)
    if output_size is not None and tuple(probabilities.shape[-2:]) != tuple(output_size):
        probabilities = F.interpolate(probabilities, size=output_size, mode="bilinear", align_corners=False)
    return probabilities


def predict_probabilities(
    model: torch.nn.Module,
    images: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    tta: tuple[str, ...] = (),
    precision: str = "fp32",
    multilabel: bool = False,
) -> torch.Tensor:
    """float32 probabilities (N, C, H, W) of uint8 images, averaged over the identity and ``tta`` views (per
    channel), at ``output_size`` when given; ``multilabel``: a sigmoid per channel (see ``view_probabilities``)."""
    return average_views(view_probabilities(model, images, tta, precision, multilabel), output_size)


def most_probable_class(probabilities: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) scores -> int64 (N, H, W): the index of each pixel's highest score (the first of equals), as
    ``argmax(1)`` gives it. On the CPU the class axis is made the last first: argmax across strided channels
    there is about 4x slower than over contiguous ones (11 classes at 360x480), for the cost of one copy."""
    if probabilities.device.type != "cpu":
        return probabilities.argmax(1)
    return probabilities.permute(0, 2, 3, 1).contiguous().argmax(-1)


def label_masks(probabilities: torch.Tensor, thresholds) -> np.ndarray:
    """(N, K, H, W) multilabel probabilities -> uint8 (N, H, W) packed masks: bit k set where class k's probability
    is above its threshold (``thresholds``: one per class, or one number for every class)."""
    channels = probabilities.shape[1]
    limits = torch.as_tensor(thresholds, dtype=probabilities.dtype, device=probabilities.device).reshape(-1)
    if limits.numel() not in (1, channels):
        raise ValueError(f"{limits.numel()} thresholds for {channels} classes")
    present = probabilities > limits.reshape(1, -1, 1, 1)
    bits = (1 << torch.arange(channels, device=probabilities.device)).reshape(1, -1, 1, 1)
    return (present.to(torch.int64) * bits).sum(1).to(torch.uint8).cpu().numpy()
