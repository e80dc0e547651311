"""Probabilities from a model: precision, test-time augmentation, and the way back to full resolution."""

import contextlib

import torch
import torch.nn.functional as F


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


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a GPU that has it, fp16 on an older GPU, fp32 on the CPU."""
    if requested not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def tune_for(device: torch.device) -> None:
    """On a GPU: let cuDNN pick the fastest kernels for the (fixed) input sizes, and TF32 for fp32 matmuls."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def autocast(precision: str, device: torch.device):
    """The autocast context of a precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def view_probabilities(
    model: torch.nn.Module, images: torch.Tensor, tta: tuple[str, ...] = (), precision: str = "fp32"
) -> list[torch.Tensor]:
    """float32 probabilities (N, 1, h, w) of uint8 images at the model's input size, one per view:
    the identity first, then each of ``tta``, each mapped back onto the input's pixels."""
    unknown = [name for name in tta if name not in TTA]
    if unknown:
        raise ValueError(f"unknown TTA transform(s) {unknown}; choose from {sorted(TTA)}")
    views = []
    for name in ("identity", *tta):
        forward, inverse = TTA.get(name, _IDENTITY)
        with autocast(precision, images.device):
            logits = model(forward(images))
        views.append(torch.sigmoid(inverse(logits, images.shape[-2:]).float()))
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
) -> torch.Tensor:
    """float32 probabilities (N, 1, H, W) of uint8 images, averaged over the identity and ``tta`` views,
    at ``output_size`` when given."""
    return average_views(view_probabilities(model, images, tta, precision), output_size)
