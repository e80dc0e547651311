"""Images as data sets ship them: every Pillow mode read to uint8 RGB or grey, and models of one grey channel."""

import io
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from competition import memory
from competition.carvana import CarvanaData
from competition.config import TrainConfig
from competition.data import (
    DRAFT_SHORTFALL,
    DataError,
    SegmentationDataset,
    decode_image,
    decode_image_and_shape,
    image_to_array,
    resize_image,
    to_chw,
)
from competition.errors import CheckpointError, ModelError
from competition.fold_data import train_transform
from competition.inference import Ensemble, Member
from competition.losses import build_loss
from competition.models import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD, build_model
from competition.prediction_stream import PredictionImages
from competition.synthetic import encode_jpeg
from competition.writers import overlay
from tests.conftest import HEIGHT, WIDTH

PALETTE = [10, 20, 30, 200, 100, 50]  # colours 0 and 1
PALETTE_GREY = [18, 124]  # their L by hand: 0.299 R + 0.587 G + 0.114 B, rounded (18.15, 124.2)


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def colour_photo(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# 16-bit grey levels and their 8-bit values by hand: round(v * 255 / 65535) = round(v / 257).
SIXTEEN = [0, 257, 65535, 32896, 128, 129]
SIXTEEN_AS_EIGHT = [0, 1, 255, 128, 0, 1]  # 128 / 257 = 0.498, 129 / 257 = 0.502


@pytest.mark.parametrize(
    "format, mode, opened",
    [("PNG", "I;16", "I;16"), ("TIFF", "I;16", "I;16"), ("TIFF", "I;16B", "I;16B"), ("TIFF", "I", "I")],
)
def test_sixteen_bit_grey_is_scaled_by_its_bit_depth(format, mode, opened):
    values = np.array([SIXTEEN], dtype=np.uint16)
    if mode == "I":
        image = Image.fromarray(values.astype(np.int32))
    else:
        image = Image.frombytes(
            mode, (values.shape[1], 1), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        )
    payload = encoded(image, format)
    with Image.open(io.BytesIO(payload)) as check:
        assert check.mode == opened  # the mode under test is the one Pillow opens the file as
        # Why the scaling is done by hand: Pillow's own conversion clips 257 and 32896 to 255.
        assert np.asarray(check.convert("L")).tolist() == [[0, 255, 255, 255, 128, 129]]
    grey = decode_image(payload, f"scan.{format.lower()}", channels=1)
    assert grey.dtype == np.uint8 and grey.shape == (1, len(SIXTEEN), 1)
    assert grey[..., 0].tolist() == [SIXTEEN_AS_EIGHT]
    rgb = decode_image(payload, f"scan.{format.lower()}")
    assert rgb.shape == (1, len(SIXTEEN), 3) and (rgb == grey).all()  # replicated into each channel


def test_32_bit_integers_beyond_16_bits_are_refused_naming_the_file():
    payload = encoded(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "TIFF")
    with pytest.raises(DataError, match=r"^deep\.tif: 32-bit integer grey levels 0\.\.70000"):
        decode_image(payload, "deep.tif")


def test_float_images_are_refused_in_one_line_naming_the_file():
    payload = encoded(Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)), "TIFF")
    with pytest.raises(DataError, match=r"^depth\.tif: a 32-bit floating-point image \(mode F\)") as caught:
        decode_image(payload, "depth.tif")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_greyscale_is_replicated_exactly(format):
    grey = colour_photo()[..., 0]
    payload = encoded(Image.fromarray(grey), format)
    with Image.open(io.BytesIO(payload)) as check:
        assert check.mode == "L"
        expected = np.asarray(check)  # JPEG's own grey levels
    rgb = decode_image(payload, "grey")
    assert rgb.shape == (*grey.shape, 3) and all((rgb[..., c] == expected).all() for c in range(3))
    one = decode_image(payload, "grey", channels=1)
    assert one.shape == (*grey.shape, 1) and (one[..., 0] == expected).all()
    if format == "PNG":
        assert (one[..., 0] == grey).all()


def test_bilevel_images_are_black_and_white():
    payload = encoded(Image.fromarray(np.array([[0, 1, 1, 0]], dtype=bool)), "PNG")
    with Image.open(io.BytesIO(payload)) as check:
        assert check.mode == "1"
    assert decode_image(payload, "ink.png", channels=1)[..., 0].tolist() == [[0, 255, 255, 0]]
    assert decode_image(payload, "ink.png")[0, :, 1].tolist() == [0, 255, 255, 0]


def palette_image(indices: list[int]) -> Image.Image:
    image = Image.frombytes("P", (len(indices), 1), bytes(indices))
    image.putpalette(PALETTE)
    return image


def test_palette_images_take_their_palette_colours():
    payload = encoded(palette_image([1, 0, 1]))
    assert decode_image(payload, "map.png").tolist() == [[[200, 100, 50], [10, 20, 30], [200, 100, 50]]]
    assert decode_image(payload, "map.png", channels=1)[..., 0].tolist() == [[124, 18, 124]]


def test_cmyk_takes_pillows_rgb_and_its_luma():
    payload = encoded(Image.new("CMYK", (2, 1), (0, 255, 0, 0)), "TIFF")  # full magenta ink
    assert decode_image(payload, "print.tif").tolist() == [[[255, 0, 255]] * 2]
    assert decode_image(payload, "print.tif", channels=1)[..., 0].tolist() == [[105, 105]]  # 76.2 + 29.1 = 105.3


def test_rgba_drops_alpha_keeping_the_colour_and_says_so_once_per_folder(tmp_path, caplog):
    pixels = np.array([[[10, 20, 30, 0], [200, 100, 50, 128], [1, 2, 3, 255]]], dtype=np.uint8)
    payload = encoded(Image.fromarray(pixels))
    caplog.set_level(logging.INFO, logger="competition.data")
    for index in range(5):
        image = decode_image(payload, str(tmp_path / "images" / f"{index}.png"))
        assert image.tolist() == pixels[..., :3].tolist()  # transparent pixels keep their colour
    notes = [record for record in caplog.records if "alpha channel: dropped" in record.getMessage()]
    assert len(notes) == 1 and str(tmp_path / "images") in notes[0].getMessage()
    decode_image(payload, str(tmp_path / "other" / "0.png"), channels=1)
    assert sum("alpha channel: dropped" in record.getMessage() for record in caplog.records) == 2


def test_grey_and_palette_alpha_are_dropped_too(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="competition.data")
    la = encoded(Image.fromarray(np.array([[[7, 0], [9, 255]]], dtype=np.uint8)))
    with Image.open(io.BytesIO(la)) as check:
        assert check.mode == "LA"
    assert decode_image(la, str(tmp_path / "la" / "a.png"), channels=1)[..., 0].tolist() == [[7, 9]]
    pa = Image.frombytes("PA", (2, 1), bytes([1, 0, 0, 255]))
    pa.putpalette(PALETTE)
    assert image_to_array(pa, str(tmp_path / "pa" / "a.png")).tolist() == [[[200, 100, 50], [10, 20, 30]]]
    assert image_to_array(pa, str(tmp_path / "pa" / "b.png"), channels=1)[..., 0].tolist() == [PALETTE_GREY[::-1]]
    transparent = palette_image([0, 1])
    transparent.info["transparency"] = 0
    payload = encoded(transparent)
    assert decode_image(payload, str(tmp_path / "p" / "a.png")).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    folders = {record.getMessage().split(":")[0] for record in caplog.records if "alpha" in record.getMessage()}
    assert folders == {str(tmp_path / name) for name in ("la", "pa", "p")}


def test_one_channel_of_a_colour_image_is_pillows_luma():
    photo = colour_photo()
    payload = encode_jpeg(photo, 90)
    with Image.open(io.BytesIO(payload)) as opened:
        expected = np.asarray(opened.convert("RGB").convert("L"))
    grey = decode_image(payload, "photo.jpg", channels=1)
    assert grey.shape == (*photo.shape[:2], 1) and (grey[..., 0] == expected).all()
    png = encoded(Image.fromarray(photo))
    assert (decode_image(png, "photo.png", channels=1)[..., 0] == np.asarray(Image.fromarray(photo).convert("L"))).all()


def old_decode(payload: bytes, reduce_to):
    """The RGB JPEG path as it was before other modes were read: draft, then Pillow's RGB."""
    with Image.open(io.BytesIO(payload)) as image:
        shape = (image.height, image.width)
        if reduce_to is not None:
            image.draft("RGB", tuple(math.floor(side * (1 - DRAFT_SHORTFALL)) for side in reduce_to[::-1]))
        return np.asarray(image.convert("RGB")), shape


@pytest.mark.parametrize("reduce_to", [None, (320, 480), (160, 240), (640, 959)])
def test_carvana_jpegs_decode_byte_for_byte_as_before_with_one_conversion(reduce_to, monkeypatch):
    rows, columns = np.mgrid[0:640, 0:960]
    photo = np.stack([rows * 255 // 639, columns * 255 // 959, (rows + columns) % 256], axis=-1).astype(np.uint8)
    payload = encode_jpeg(photo, 90)
    expected, expected_shape = old_decode(payload, reduce_to)
    conversions = []
    convert = Image.Image.convert

    def counted(image, mode=None, *args, **kwargs):
        conversions.append((image.mode, mode))
        return convert(image, mode, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", counted)
    image, shape = decode_image_and_shape(payload, "car.jpg", reduce_to)
    assert conversions == [("RGB", "RGB")]  # no extra work on the photo's path
    assert shape == expected_shape == (640, 960)
    assert image.dtype == expected.dtype and image.shape == expected.shape
    assert image.tobytes() == expected.tobytes()


def test_reduced_decode_of_one_channel_is_the_luma_of_the_reduced_rgb():
    payload = encode_jpeg(colour_photo(640, 960, seed=3), 90)
    rgb = decode_image(payload, "car.jpg", reduce_to=(320, 480))
    grey = decode_image(payload, "car.jpg", reduce_to=(320, 480), channels=1)
    assert grey.shape == (320, 480, 1)
    assert (grey[..., 0] == np.asarray(Image.fromarray(rgb).convert("L"))).all()


def test_channels_other_than_one_or_three_are_refused():
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        decode_image(encode_jpeg(colour_photo(), 90), "photo.jpg", channels=4)


def test_one_channel_arrays_keep_their_axis_through_resize_and_to_chw():
    grey = colour_photo()[..., :1]
    resized = resize_image(grey, (24, 32))
    assert resized.shape == (24, 32, 1)
    assert (resized[..., 0] == resize_image(grey[..., 0], (24, 32))).all()
    assert to_chw(resized).shape == (1, 24, 32) and to_chw(resized[..., 0]).shape == (1, 24, 32)
    assert to_chw(colour_photo()).shape == (3, 48, 64)


def test_carvana_data_reads_grey_for_one_channel(data_dir):
    data = CarvanaData(data_dir)
    image_id = data.train_ids()[0]
    rgb, rgb_mask = data.read_sample(image_id)
    data.in_channels = 1
    grey, mask = data.read_sample(image_id)
    assert grey.shape == (HEIGHT, WIDTH, 1) and (mask == rgb_mask).all()
    assert (grey[..., 0] == np.asarray(Image.fromarray(rgb).convert("L"))).all()
    assert data.read_image(data.test_ids()[0], "test").shape == (HEIGHT, WIDTH, 1)
    image, small_mask = SegmentationDataset(data, [image_id], size=(64, 96))[0]
    assert image.shape == (1, 64, 96) and image.dtype == torch.uint8 and small_mask.shape == (1, 64, 96)


def test_augmentation_keeps_one_channel_and_leaves_hue_out(data_dir):
    grey_transform = train_transform(TrainConfig(in_channels=1, augment="full"))
    names = [type(transform).__name__ for transform in grey_transform.transforms]
    assert "HueSaturationValue" not in names and "Affine" in names and "RandomBrightnessContrast" in names
    colour_names = [type(t).__name__ for t in train_transform(TrainConfig(augment="full")).transforms]
    assert colour_names == [*names, "HueSaturationValue"]
    grey = colour_photo(64, 64)[..., :1]
    mask = (grey[..., 0] > 127).astype(np.uint8)
    changed = 0
    for _ in range(20):
        out = grey_transform(image=grey, mask=mask)
        assert out["image"].shape == (64, 64, 1) and out["image"].dtype == np.uint8 and out["mask"].shape == (64, 64)
        changed += not np.array_equal(out["image"], grey)
    assert changed > 0  # the augmentations did act
    cropping = train_transform(TrainConfig(in_channels=1, augment="full", crop=48))
    assert cropping(image=grey, mask=mask)["image"].shape == (48, 48, 1)
    data = CarvanaData(data_dir)
    data.in_channels = 1
    image, _ = SegmentationDataset(data, data.train_ids()[:1], size=(64, 96), transform=grey_transform)[0]
    assert image.shape == (1, 64, 96)


def test_a_grey_model_forwards_grey_images_normalised_like_the_average_channel():
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", "none", classes=3, in_channels=1).eval()
    assert model.network.encoder.conv1.weight.shape[1] == 1
    assert GREY_MEAN == pytest.approx([np.mean(IMAGENET_MEAN)]) and GREY_STD == pytest.approx([np.mean(IMAGENET_STD)])
    assert model.mean.shape == (1, 1, 1, 1) and model.mean.item() == pytest.approx(0.449 * 255)
    assert model.std.item() == pytest.approx(0.226 * 255)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert model(images).shape == (2, 3, 64, 64)
    assert not any(key in ("mean", "std") for key in model.state_dict())  # checkpoints hold no normalisation


def test_an_rgb_model_and_its_checkpoints_are_unchanged():
    model = build_model("Unet", "resnet18", "none")
    assert model.in_channels == 3 and model.mean.flatten().tolist() == pytest.approx([v * 255 for v in IMAGENET_MEAN])
    again = build_model("Unet", "resnet18", "none")
    again.load_state_dict(model.state_dict())  # strict: the keys are those of before


def test_a_weights_file_fits_a_grey_encoder_by_summing_its_first_convolution(tmp_path):
    source = build_model("Unet", "resnet18", "none")
    path = tmp_path / "resnet18.pth"
    torch.save(source.network.encoder.state_dict(), path)
    grey = build_model("Unet", "resnet18", str(path), in_channels=1)
    expected = source.network.encoder.conv1.weight.sum(1, keepdim=True)
    torch.testing.assert_close(grey.network.encoder.conv1.weight, expected)
    torch.testing.assert_close(
        grey.network.encoder.layer1[0].conv1.weight, source.network.encoder.layer1[0].conv1.weight
    )


@pytest.mark.parametrize("arch", ["SegNet", "OriginalUnet"])
def test_classic_models_take_one_channel(arch):
    model = build_model(arch, "resnet34", "none", classes=2, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)).shape == (2, 2, 64, 64)


def test_other_channel_counts_are_refused():
    with pytest.raises(ModelError, match="in_channels 2"):
        build_model("Unet", "resnet18", "none", in_channels=2)


def test_an_ensemble_reads_one_kind_of_image(tmp_path):
    grey = Member(tmp_path / "a.pt", build_model("SegNet", "", in_channels=1), TrainConfig(in_channels=1), None)
    colour = Member(tmp_path / "b.pt", build_model("SegNet", ""), TrainConfig(), None)
    assert Ensemble([grey]).in_channels == 1 and Ensemble([colour]).in_channels == 3
    with pytest.raises(CheckpointError, match="different image channels"):
        Ensemble([grey, colour])


def test_overlays_of_grey_images_are_drawn_in_colour():
    grey = np.full((32, 32, 1), 90, dtype=np.uint8)
    predicted = np.zeros((32, 32), dtype=np.uint8)
    predicted[8:24, 8:24] = 1
    drawn = overlay(grey, predicted)
    assert drawn.shape == (32, 32, 3) and (drawn[8, 8] == (230, 30, 30)).all() and (drawn[0, 0] == 90).all()


def test_prediction_images_carry_the_datas_channels(data_dir):
    data = CarvanaData(data_dir)
    data.in_channels = 1
    sample = PredictionImages(data, data.test_ids()[:1], "test", {"64x96": (64, 96), "full": None})[0]
    assert sample["images"]["64x96"].shape == (1, 64, 96) and sample["images"]["full"].shape == (1, HEIGHT, WIDTH)


def test_the_memory_count_feeds_a_grey_model_grey_images():
    model = build_model("Unet", "resnet18", "none", in_channels=1).train()
    counted = memory.saved_activation_bytes(model, build_loss("bce_dice"), 1, (64, 64), "fp32", channels_last=False)
    assert counted > 0
