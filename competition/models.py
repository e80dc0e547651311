"""Segmentation models: smp architectures on smp/timm encoders, taking uint8 images of any size."""

import contextlib
import socket
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from competition.classic_models import OriginalUnet, SegNet
from competition.errors import ModelError, refusal

ARCHITECTURES = {
    "Unet": smp.Unet,
    "UnetPlusPlus": smp.UnetPlusPlus,
    "FPN": smp.FPN,
    "Linknet": smp.Linknet,
    "DeepLabV3Plus": smp.DeepLabV3Plus,
    "SegNet": SegNet,
    "OriginalUnet": OriginalUnet,
}
OWN_ENCODER = ("SegNet", "OriginalUnet")  # architectures that build their own encoder, without pretrained weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A grey image (in_channels 1) is normalised like the average ImageNet channel. Why: smp builds a 1-channel
# encoder from pretrained weights by summing its first convolution over R, G and B (``patch_first_conv``;
# timm's ``adapt_input_conv`` does the same for ``tu-`` encoders), so a grey image g meets the filters an RGB
# image (g, g, g) would. Those filters were trained on (x_c - m_c) / s_c per channel; one grey channel has one
# normalisation (g - m) / s for all three, and ImageNet's means and stds averaged over R, G, B come closest.
GREY_MEAN = (sum(IMAGENET_MEAN) / 3,)
GREY_STD = (sum(IMAGENET_STD) / 3,)
STRIDE = 32


class SegmentationModel(nn.Module):
    """uint8 (N, in_channels, H, W) images -> (N, C, H, W) logits for any H, W (C: 1 for binary data, else
    the classes; in_channels 3 for RGB, 1 for grey).

    Normalisation happens here, on the device, so loaders ship uint8 (a quarter of the bytes): ImageNet's
    mean and std per channel, or their averages for grey (``GREY_MEAN``). The buffers are not persistent:
    checkpoints hold none, and old ones load unchanged. The input is padded to a multiple of 32
    (1918 -> 1920) and the logits cropped back.
    """

    def __init__(self, network: nn.Module, in_channels: int = 3):
        super().__init__()
        if in_channels not in (1, 3):
            raise ModelError(f"in_channels {in_channels}: the models take 3 (RGB) or 1 (grey) channels")
        self.network = network
        self.in_channels = in_channels
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (GREY_MEAN, GREY_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, in_channels, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, in_channels, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        images = (images.float() - self.mean) / self.std
        pad_height, pad_width = -height % STRIDE, -width % STRIDE
        if pad_height or pad_width:
            images = F.pad(images, (0, pad_width, 0, pad_height), mode="reflect")
        return self.network(images)[..., :height, :width]


def encoder_names() -> list[str]:
    """smp's own encoder names (any timm model is also taken as ``tu-NAME``)."""
    return smp.encoders.get_encoder_names()


def encoder_exists(name: str) -> bool:
    """Whether smp can build ``name``: one of its encoders, or ``tu-`` and a model in timm's registry."""
    if name.startswith("tu-"):
        import timm

        return timm.is_model(name.removeprefix("tu-"))
    return name in encoder_names()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the weights hub answers at all, tried once with a short timeout."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_hub_when_unreachable():
    """Offline mode for the hub client while the hub is unreachable.

    Why: without a network, huggingface_hub retries for half a minute before failing; in offline
    mode it fails at once (and still finds weights already in the local cache). Its only switch is
    the ``HF_HUB_OFFLINE`` environment variable, read once into this module constant at import,
    so the constant is patched: huggingface_hub has no public call for it.
    tests/test_training.py::test_the_hub_offline_switch_still_exists fails when an upgrade moves it.
    """
    import huggingface_hub.constants as hub

    offline = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = offline or not _hub_reachable()
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = offline


def _load_encoder_file(encoder: nn.Module, path: Path, encoder_name: str) -> None:
    """Encoder weights from a local file (the offline Kaggle way: weights attached as a data set)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: encoder weights file not found") from None
    except Exception as error:  # noqa: BLE001 - pickle, zip and safetensors errors all mean "unreadable"
        raise ModelError(
            f"{refusal(path, error, 'weights file')}; pass a state dict saved with torch.save or a .safetensors file"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds no state dict of tensors")
    for prefix in ("module.", "encoder.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    wanted = encoder.state_dict()
    state = {k: v for k, v in state.items() if k in wanted}  # a classifier head (fc.*) is not part of the encoder
    state = {k: _grey_first_conv(v, wanted[k]) for k, v in state.items()}
    missing = [k for k in wanted if k not in state]
    mismatched = [k for k, v in state.items() if v.shape != wanted[k].shape]
    if missing or mismatched:
        raise ModelError(
            f"{path}: does not fit encoder {encoder_name} ({len(missing)} missing, {len(mismatched)} of another "
            f"shape, e.g. {(missing + mismatched)[:3]}); pass the weights of that same encoder"
        )
    encoder.load_state_dict(state)


def _grey_first_conv(weight: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """An RGB first convolution's weights (out, 3, k, k) summed over R, G and B where the encoder takes one
    grey channel (out, 1, k, k): what smp does to its own pretrained weights for ``in_channels=1``."""
    if weight.ndim == 4 and weight.shape[1] == 3 and wanted.shape == (weight.shape[0], 1, *weight.shape[2:]):
        return weight.sum(1, keepdim=True)
    return weight


def build_model(
    arch: str, encoder: str, encoder_weights: str | None = "none", classes: int = 1, in_channels: int = 3
) -> SegmentationModel:
    """An smp ``arch`` on ``encoder`` (or one of OWN_ENCODER's) with ``classes`` output channels of logits,
    taking ``in_channels`` (3: RGB; 1: grey) uint8 channels.

    ``encoder_weights``: ``imagenet`` (downloaded, or taken from the local cache), ``none``, or
    the path of a local encoder weights file. With one input channel, pretrained weights (smp's, or a
    file's) have their first convolution summed over R, G and B.
    """
    if arch not in ARCHITECTURES:
        raise ModelError(f"--arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if in_channels not in (1, 3):
        raise ModelError(f"in_channels {in_channels}: the models take 3 (RGB) or 1 (grey) channels")
    shape = {"classes": classes, "in_channels": in_channels}
    weights = (encoder_weights or "none").strip()
    local_file = weights.lower() not in ("imagenet", "none") and arch not in OWN_ENCODER
    try:
        if arch in OWN_ENCODER:  # no hub to ask: they say themselves that there are no weights for them
            network = ARCHITECTURES[arch](encoder_name=encoder, encoder_weights=weights, **shape)
        elif weights.lower() == "imagenet":
            with _offline_hub_when_unreachable():
                hub_weights = True if encoder.startswith("tu-") else "imagenet"
                network = ARCHITECTURES[arch](encoder_name=encoder, encoder_weights=hub_weights, **shape)
        else:
            network = ARCHITECTURES[arch](encoder_name=encoder, encoder_weights=None, **shape)
    except (KeyError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "Unknown model" not in str(error):
            raise
        raise ModelError(
            f"--encoder {encoder!r}: not an smp encoder; see smp.encoders.get_encoder_names(), or any timm model "
            "as tu-NAME"
        ) from None
    except OSError as error:
        raise ModelError(
            f"could not get imagenet weights for encoder {encoder!r}: no internet and none in the local cache "
            f"({type(error).__name__}). Offline (a Kaggle notebook with internet off), attach the encoder's "
            "weights as a data set and pass --encoder-weights /kaggle/input/<dataset>/<file>.pth, "
            "or train from scratch with --encoder-weights none"
        ) from None
    if local_file:
        _load_encoder_file(network.encoder, Path(weights), encoder)
    return SegmentationModel(network, in_channels)
