"""Pseudo-labels as training data: the folder ``python -m competition.pseudo`` writes, read and checked, and its test
images joined to a fold's training images (never to its validation images)."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from competition.data import SegmentationDataset
from competition.errors import ConfigError, DataError
from competition.layouts import open_data_as
from competition.postprocess import head_of
from competition.segmentation_data import read_index_mask

logger = logging.getLogger(__name__)

MANIFEST_NAME = "pseudo.json"  # what the folder holds and how it was made, written last
IGNORE_VALUE = 255  # a pixel of a pseudo-label mask below the confidence rule: in no class, left out of the losses


def run_classes(config, data) -> list[str]:
    """The classes a run's masks name, as pseudo-labels record them: the run's own, else its layout's (Carvana's)."""
    return config.class_names() or list(data.classes)


def read_manifest(folder: Path) -> dict:
    """``folder``'s pseudo.json, checked to hold what training reads; one line naming the file otherwise."""
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ConfigError(
            f"--pseudo {folder}: no such folder; make it with `python -m competition.pseudo --out {folder}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: not found: {folder} is not a folder of pseudo-labels (python -m competition.pseudo)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable manifest ({error}); make the pseudo-labels again") from None
    wanted = {"classes": list, "head": str, "data_dir": str, "images": list}
    wrong = [
        key for key, kind in wanted.items() if not isinstance(manifest, dict) or not isinstance(manifest.get(key), kind)
    ]
    if wrong:
        raise DataError(f"{path}: no valid {', '.join(wrong)}; it was altered or comes from another code version")
    return manifest


@dataclass
class PseudoLabels:
    """The kept test images of a pseudo-label folder: where they are read, their masks, and their pixels."""

    folder: Path
    data: object  # the data whose test images were labelled
    image_ids: list[str]
    class_pixels: np.ndarray  # (images, classes): each image's confident pixels of each class
    pixels: int  # every pixel of the kept images
    kept_pixels: int  # of those, the confident ones, that training uses
    ignore_value: int  # what an unconfident pixel becomes once read: the run's label ignore index

    def describe(self) -> str:
        share = 100 * self.kept_pixels / max(self.pixels, 1)
        return (
            f"pseudo-labels: {len(self.image_ids)} images, {self.kept_pixels} of {self.pixels} pixels ({share:.1f}%) "
            f"used, from {self.folder}"
        )

    def read_sample(self, index: int, reduce_to: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of the ``index``-th kept test image, checked to be one size; the mask's unconfident pixels
        hold ``ignore_value``."""
        image_id = self.image_ids[index]
        image, shape = self.data.read_image_and_shape(image_id, "test", reduce_to)
        path = self.folder / f"{image_id}.png"
        try:
            payload = path.read_bytes()
        except OSError as error:
            raise DataError(
                f"{path}: cannot read the pseudo-label ({error.strerror}); make the pseudo-labels again"
            ) from None
        mask = read_index_mask(payload, str(path))
        if mask.shape != shape:
            raise DataError(
                f"{path}: the pseudo-label is {mask.shape[1]}x{mask.shape[0]}, its image "
                f"{self.data.image_path(image_id, 'test')} {shape[1]}x{shape[0]}; make the pseudo-labels again"
            )
        if self.ignore_value != IGNORE_VALUE:
            mask = np.where(mask == IGNORE_VALUE, np.uint8(self.ignore_value), mask)
        return image, mask


def read_pseudo_labels(config, data, validation_ids: list[str]) -> PseudoLabels:
    """The pseudo-labels of ``config.pseudo`` for a run on ``data``, checked: made for the run's classes, at least
    one image kept, each mask there, and none of the fold's ``validation_ids`` among them."""
    folder = Path(config.pseudo)
    manifest = read_manifest(folder)
    classes, head = run_classes(config, data), head_of(config)
    if manifest["classes"] != classes or manifest["head"] != head:
        raise ConfigError(
            f"--pseudo {folder}: its labels are of the classes {','.join(map(str, manifest['classes']))} (head "
            f"{manifest['head']}), this run's are {','.join(classes)} (head {head}); make them with checkpoints of "
            "this run's classes"
        )
    images = manifest["images"]
    if not images:
        raise ConfigError(
            f"--pseudo {folder}: no test image was kept by its confidence rule; make it again with a lower "
            "--confidence or --min-kept"
        )
    image_ids = [str(image["id"]) for image in images]
    missing = [image_id for image_id in image_ids if not (folder / f"{image_id}.png").is_file()]
    if missing:
        raise DataError(
            f"--pseudo {folder}: {len(missing)} mask(s) named in {MANIFEST_NAME} are not there, e.g. {missing[:3]}"
        )
    held_out = sorted(set(image_ids) & set(validation_ids))
    if held_out:
        raise ConfigError(
            f"--pseudo {folder}: {len(held_out)} of its images are fold {config.fold}'s validation images, e.g. "
            f"{held_out[:3]}; pseudo-label test images only"
        )
    return PseudoLabels(
        folder=folder,
        data=labelled_data(manifest, config, data),
        image_ids=image_ids,
        class_pixels=np.array([image["class_pixels"] for image in images], dtype=np.int64),
        pixels=sum(int(image["pixels"]) for image in images),
        kept_pixels=sum(int(image["kept"]) for image in images),
        ignore_value=config.label_ignore_index(),
    )


def labelled_data(manifest: dict, config, data):
    """The data whose test images were pseudo-labelled: the run's own when they are its data folder's test images,
    else that folder (or its --test-images folder) read with the run's settings."""
    test_images = manifest.get("test_images")
    if not test_images and Path(manifest["data_dir"]).resolve() == Path(data.root).resolve():
        return data
    labelled = open_data_as(config, manifest["data_dir"], test_images=test_images)
    labelled.in_channels = data.in_channels
    return labelled


class PseudoLabelledSet(SegmentationDataset):
    """A fold's training images, then the pseudo-labelled test images (their masks resized to the nearest pixel:
    an average would smear the ignore value into its neighbours)."""

    def __init__(self, data, image_ids: list[str], pseudo: PseudoLabels, size=None, transform=None):
        super().__init__(data, image_ids, size=size, transform=transform)
        self.pseudo = pseudo

    def __len__(self) -> int:
        return len(self.image_ids) + len(self.pseudo.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < len(self.image_ids):
            return super().__getitem__(index)
        image, mask = self.pseudo.read_sample(index - len(self.image_ids), reduce_to=self.size)
        return self.prepared(image, mask, smooth_resize=False)
