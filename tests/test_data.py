import shutil
import zipfile

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch

from competition.carvana import CarvanaData, car_id_of
from competition.data import (
    DataError,
    SegmentationDataset,
    decode_image,
    image_id_of,
    resize_image,
)
from competition.synthetic import encode_jpeg
from tests.conftest import HEIGHT, WIDTH


def test_ids_follow_the_competition_naming(data_dir):
    data = CarvanaData(data_dir)
    ids = data.train_ids()
    assert len(ids) == 5 * 16 and len(data.test_ids()) == 2 * 16
    assert len({car_id_of(image_id) for image_id in ids}) == 5
    assert image_id_of("abc_03.jpg") == "abc_03" == image_id_of("abc_03_mask.gif")


def test_folders_and_zips_give_identical_samples(data_dir, zip_dir):
    folders, zips = CarvanaData(data_dir), CarvanaData(zip_dir)
    assert folders.train_ids() == zips.train_ids() and folders.test_ids() == zips.test_ids()
    for image_id in folders.train_ids()[::7]:
        for a, b in zip(folders.read_sample(image_id), zips.read_sample(image_id)):
            np.testing.assert_array_equal(a, b)
    test_id = folders.test_ids()[0]
    np.testing.assert_array_equal(folders.read_image(test_id, "test"), zips.read_image(test_id, "test"))
    pd.testing.assert_frame_equal(folders.read_csv("metadata.csv", ["id"]), zips.read_csv("metadata.csv", ["id"]))


def test_gif_and_csv_masks_agree_for_every_image(data_dir):
    gifs, csv = CarvanaData(data_dir, mask_source="gif"), CarvanaData(data_dir, mask_source="csv")
    for image_id in gifs.train_ids():
        gif_mask = gifs.read_mask(image_id)
        assert gif_mask.shape == (HEIGHT, WIDTH) and set(np.unique(gif_mask)) == {0, 1}
        np.testing.assert_array_equal(gif_mask, csv.read_mask(image_id))


def test_dataset_returns_uint8_image_and_float_mask(data_dir):
    data = CarvanaData(data_dir)
    dataset = SegmentationDataset(data, data.train_ids()[:3])
    image, mask = dataset[0]
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype.is_floating_point is False
    assert mask.shape == (1, HEIGHT, WIDTH) and set(mask.unique().tolist()) == {0.0, 1.0}
    small_image, small_mask = SegmentationDataset(data, data.train_ids()[:3], size=(64, 96))[0]
    assert small_image.shape == (3, 64, 96) and small_mask.shape == (1, 64, 96)
    assert abs(small_mask.mean().item() - mask.mean().item()) < 0.02


def test_dataset_applies_the_transform_to_image_and_mask_together(data_dir):
    data = CarvanaData(data_dir)
    ids = data.train_ids()[:1]
    image, mask = SegmentationDataset(data, ids)[0]
    flipped_image, flipped_mask = SegmentationDataset(data, ids, transform=A.HorizontalFlip(p=1.0))[0]
    assert (flipped_image == image.flip(-1)).all() and (flipped_mask == mask.flip(-1)).all()


@pytest.mark.parametrize(
    "target, decoded",
    [
        ((640, 960), (640, 959)),  # half scale, one pixel short: taken
        ((320, 480), (320, 480)),  # quarter scale
        ((660, 990), (1280, 1918)),  # half scale would be 3% short: full decode
        ((1280, 1918), (1280, 1918)),
    ],
)
def test_jpeg_decoded_at_a_reduced_scale_only_when_close_enough(target, decoded):
    rows, columns = np.mgrid[0:1280, 0:1918]
    image = np.stack([rows * 255 // 1279, columns * 255 // 1917, (rows + columns) % 256], axis=-1).astype(np.uint8)
    payload = encode_jpeg(image, 90)
    reduced = decode_image(payload, "car.jpg", reduce_to=target)
    assert reduced.shape == (*decoded, 3)
    difference = resize_image(reduced, target).astype(int) - resize_image(decode_image(payload, "car.jpg"), target)
    assert np.abs(difference).mean() < 1.5  # grey levels: the reduced decode is as good as the full one


def test_image_without_mask(data_copy):
    image_id = CarvanaData(data_copy).train_ids()[0]
    (data_copy / "train_masks" / f"{image_id}_mask.gif").unlink()
    data = CarvanaData(data_copy)
    with pytest.raises(DataError, match=f"have no mask.*{image_id}"):
        SegmentationDataset(data, data.train_ids())
    with pytest.raises(DataError, match=f"{image_id}.jpg has no mask"):
        data.read_mask(image_id)


def test_image_and_mask_of_different_sizes(data_copy):
    data = CarvanaData(data_copy)
    image_id = data.train_ids()[0]
    from PIL import Image

    Image.fromarray(np.zeros((HEIGHT, WIDTH + 2), np.uint8)).save(data_copy / "train_masks" / f"{image_id}_mask.gif")
    with pytest.raises(
        DataError, match=rf"{image_id}\.jpg: image is {WIDTH}x{HEIGHT} but its mask is {WIDTH + 2}x{HEIGHT}"
    ):
        data.read_sample(image_id)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg(data_copy, damage):
    data = CarvanaData(data_copy)
    image_id = data.train_ids()[0]
    path = data_copy / "train" / f"{image_id}.jpg"
    payload = path.read_bytes()
    path.write_bytes(b"not a jpeg" if damage == "garbage" else payload[: len(payload) // 2])
    with pytest.raises(DataError, match=rf"{image_id}\.jpg: the image does not decode"):
        data.read_sample(image_id)


def test_corrupt_gif(data_copy):
    data = CarvanaData(data_copy)
    image_id = data.train_ids()[0]
    (data_copy / "train_masks" / f"{image_id}_mask.gif").write_bytes(b"GIF89a broken")
    with pytest.raises(DataError, match=rf"{image_id}_mask\.gif: the mask does not decode"):
        data.read_mask(image_id)


def test_corrupt_zip(zip_dir, tmp_path):
    shutil.copytree(zip_dir, tmp_path / "data")
    (tmp_path / "data" / "train.zip").write_bytes(b"PK not really")
    with pytest.raises(DataError, match="train.zip: not a readable zip archive"):
        CarvanaData(tmp_path / "data")


@pytest.mark.parametrize(
    "rle, problem", [("1 2 3", "odd count"), ("1 999999", "past the end"), ("9 2 1 2", "out of order")]
)
def test_malformed_rle_in_train_masks_csv(data_copy, rle, problem):
    frame = pd.read_csv(data_copy / "train_masks.csv")
    frame.loc[0, "rle_mask"] = rle
    frame.to_csv(data_copy / "train_masks.csv", index=False)
    data = CarvanaData(data_copy, mask_source="csv")
    image_id = image_id_of(frame.loc[0, "img"])
    with pytest.raises(DataError, match=rf"train_masks\.csv: row {image_id}\.jpg: RLE .*{problem}"):
        data.read_mask(image_id)


def test_csv_without_expected_columns(data_copy):
    pd.DataFrame({"image": ["a.jpg"], "mask": ["1 1"]}).to_csv(data_copy / "train_masks.csv", index=False)
    with pytest.raises(DataError, match=r"train_masks\.csv: missing column\(s\) \['img', 'rle_mask'\]"):
        CarvanaData(data_copy, mask_source="csv").read_mask("a")


def test_csv_read_from_its_zip(data_copy):
    frame = pd.read_csv(data_copy / "metadata.csv", dtype=str)
    with zipfile.ZipFile(data_copy / "metadata.csv.zip", "w") as archive:
        archive.write(data_copy / "metadata.csv", "metadata.csv")
    (data_copy / "metadata.csv").unlink()
    assert CarvanaData(data_copy).read_csv("metadata.csv", ["id", "make"])["id"].tolist() == frame["id"].tolist()


def test_empty_or_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match="no train or test images.*synthetic"):
        CarvanaData(tmp_path)
    with pytest.raises(DataError, match="data folder not found"):
        CarvanaData(tmp_path / "nowhere")


def test_zip_reads_in_loader_worker_processes(data_dir, zip_dir):
    import torch

    ids = CarvanaData(data_dir).train_ids()[:8]
    expected = [SegmentationDataset(CarvanaData(data_dir), ids, size=(64, 96))[i] for i in range(len(ids))]
    loader = torch.utils.data.DataLoader(
        SegmentationDataset(CarvanaData(zip_dir), ids, size=(64, 96)), batch_size=2, num_workers=2
    )
    images, masks = (torch.cat(parts) for parts in zip(*loader))
    assert torch.equal(images, torch.stack([image for image, _ in expected]))
    assert torch.equal(masks, torch.stack([mask for _, mask in expected]))


def test_carvana_masks_keep_the_smooth_resize_and_other_layouts_the_nearest(data_dir, tmp_path):
    """Carvana's 0/1 masks: area-averaged and thresholded at half, as before this project read other layouts;
    class-index masks: the nearest pixel, so no class or ignore value is invented between two others."""
    from competition.data import resize_mask
    from competition.layouts import open_data
    from tests.layout_fixtures import make_folders

    data = CarvanaData(data_dir)
    image_id = data.train_ids()[0]
    _, mask = SegmentationDataset(data, [image_id], size=(64, 96))[0]
    expected = (resize_image(data.read_mask(image_id) * 255, (64, 96)) > 127).astype(np.float32)
    assert mask.dtype == torch.float32 and torch.equal(mask[0], torch.from_numpy(expected))
    folders = open_data(make_folders(tmp_path, voc=True))
    _, classes = SegmentationDataset(folders, ["scene0_1"], size=(32, 48))[0]
    assert classes.dtype == torch.int64 and classes.shape == (32, 48)
    assert set(classes.unique().tolist()) <= {0, 1, 2, 3, 255}
    np.testing.assert_array_equal(classes.numpy(), resize_mask(folders.read_mask("scene0_1"), (32, 48)))


class _BrokenSamples(torch.utils.data.Dataset):
    """Samples whose reading raises a project error, as a loader worker meets a file cut short."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DataError("train/a_01.jpg: the image does not decode (image file is truncated); replace it")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_error_in_a_loader_worker_reaches_the_user_as_its_one_line(workers):
    from competition.data import Loader
    from competition.workers import loader_start_method

    loader = Loader(_BrokenSamples(), num_workers=workers, multiprocessing_context=loader_start_method(workers))
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert str(caught.value) == "train/a_01.jpg: the image does not decode (image file is truncated); replace it"


def test_the_training_loaders_say_a_workers_error_in_one_line(tiny_config, data_copy):
    from competition.fold_data import build_loaders

    data = CarvanaData(data_copy)
    victim = data.train_ids()[0]
    path = data_copy / "train" / f"{victim}.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    tiny_config.workers = 1
    train_loader, _, val_loader = build_loaders(tiny_config, data, [victim] * 8, [victim], torch.device("cpu"))
    for loader in (train_loader, val_loader):
        with pytest.raises(DataError) as caught:
            next(iter(loader))
        assert str(caught.value).startswith(f"{path}: the image does not decode (image file is truncated")
        assert "\n" not in str(caught.value) and "worker" not in str(caught.value)
