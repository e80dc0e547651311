"""The layout registry: a layout registered by one line is detected, opened and read like the shipped ones."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from competition.layouts import LAYOUTS, open_data
from competition.segmentation_data import IMAGE_EXTENSIONS, SegmentationData, files_by_stem, read_index_mask


class LabelSuffixData(SegmentationData):
    """``img_<n>.png`` beside its mask ``img_<n>_label.png`` (class indices), in one folder."""

    layout = "label-suffix"

    @staticmethod
    def detect(root: Path) -> bool:
        return any(root.glob("*_label.png"))

    @classmethod
    def read(cls, root: Path, test_folder: Path | None, options: dict) -> "LabelSuffixData":
        return cls(root, options["classes"] or "background,thing", options["ignore_index"], test_folder)

    def __init__(self, root: Path, classes: str, ignore_index: int, test_folder: Path | None):
        files = files_by_stem(root, IMAGE_EXTENSIONS)
        self.labels = {stem.removesuffix("_label"): path for stem, path in files.items() if stem.endswith("_label")}
        images = {stem: path for stem, path in files.items() if stem in self.labels}
        test = files_by_stem(test_folder or root / "test", IMAGE_EXTENSIONS)
        super().__init__(root, images, classes.split(","), ignore_index, test)

    def mask_source(self, image_id: str) -> str:
        return str(self.labels[image_id])

    def _mask(self, image_id: str, split: str = "train") -> tuple[np.ndarray, str]:
        path = self.labels[image_id]
        return read_index_mask(path.read_bytes(), str(path)), str(path)


@pytest.fixture
def label_suffix_layout():
    LAYOUTS["label-suffix"] = LabelSuffixData  # the registry line a new layout's module adds
    yield LabelSuffixData
    del LAYOUTS["label-suffix"]


def test_a_registered_layout_is_detected_and_read(tmp_path, label_suffix_layout):
    mask = np.zeros((8, 12), dtype=np.uint8)
    mask[2:5, 3:9] = 1
    for index in range(3):
        Image.fromarray(np.full((8, 12, 3), 40 * index, dtype=np.uint8)).save(tmp_path / f"img_{index}.png")
        Image.fromarray(mask).save(tmp_path / f"img_{index}_label.png")
    data = open_data(tmp_path)
    assert isinstance(data, label_suffix_layout) and data.layout == "label-suffix"
    assert data.train_ids() == ["img_0", "img_1", "img_2"] and data.classes == ["background", "thing"]
    assert data.read_image("img_2").shape == (8, 12, 3)
    np.testing.assert_array_equal(data.read_mask("img_1"), mask)
    assert not data.fixed_classes and data.masks_to_count(2, 3, pixel_counts_needed=False) == 3


def test_the_shipped_layouts_keep_their_detection_order():
    assert list(LAYOUTS) == ["carvana", "pet", "folders", "labelme", "rle-table"]
